#!/usr/bin/env python
"""axolotl with the non-target KL plugin against axolotl without it: step time and peak memory, next to the same
ratio for the library's own trainer (bench_step.py's "transformers" harness), in one process and on one model.

Runs in axolotl's environment (.venv-axolotl, see docs/axolotl.md): axolotl 0.19.0 pins its own transformers, trl
and peft. The model is bench_step.py's (a random-weight Qwen2 built from a config, saved to a temp folder with a
word-level tokenizer); the data are random token ids, every position supervised, given to axolotl as a
pre-tokenized dataset (input_ids, attention_mask, labels), so both harnesses train on the same kind of batch.

Rows ("harness", "impl"):
  axolotl       plain: axolotl's LoRA SFT (`axolotl.train.train`, its AxolotlTrainer and the model's own CE)
                kl:    the same config plus `plugins: [kl_nontarget.integrations.axolotl.NonTargetKLPlugin]`, kl_weight
  transformers  plain / kl: bench_step.py's arms (transformers.Trainer on a PEFT model / NonTargetKLTrainer)
"time_ratio" and "peak_ratio" are kl against plain within a harness; the goal is axolotl's ratio within 5% of the
library trainer's. Steps are timed from on_step_begin to on_step_end (bench_step.StepMeter), the median of the
measured steps after warm-up, in wall time ("ms") and CPU time ("cpu_ms", `time.process_time`); "time_ratio" compares
`--clock` (default the CPU time: with --threads 1 it measures the step's compute on a machine shared with other
jobs, where wall time is mostly waiting), "wall_ratio" and "cpu_ratio" are both.

Examples:
  .venv-axolotl/bin/python benchmarks/bench_axolotl.py --threads 1
  .venv-axolotl/bin/python benchmarks/bench_axolotl.py --model tiny --batch 4 --seq 64 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import _common as C  # noqa: E402
import bench_step as S  # noqa: E402

PLUGIN = "kl_nontarget.integrations.axolotl.NonTargetKLPlugin"


class CpuClockMeter(S.StepMeter):
    """bench_step's StepMeter that also records each step's CPU time (`time.process_time`): with `--threads 1` it is
    the step's compute, whatever else the machine runs, where the wall time of a shared CPU is mostly waiting."""

    def __init__(self, device, warmup_steps):
        super().__init__(device, warmup_steps)
        self.cpu_times = []

    def begin(self):
        super().begin()
        self._c0 = time.process_time()

    def end(self):
        self.cpu_times.append((time.process_time() - self._c0) * 1e3)
        super().end()

    def summary(self):
        out = super().summary()
        out["cpu_ms"] = statistics.median(self.cpu_times[self.warmup_steps:])
        return out


def axolotl_config(root, impl, args):
    """The axolotl config of one arm (a dict), for the model and data in `root`."""
    config = dict(base_model=os.path.join(root, "model"), datasets=[{"path": os.path.join(root, "data.jsonl"),
                                                                        "ds_type": "json"}],
                  output_dir=os.path.join(root, f"axolotl-{impl}"), dataset_prepared_path=os.path.join(root, "prep"),
                  adapter="lora", lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                  lora_target_modules=S.LORA_TARGETS, lora_mlp_kernel=False, lora_qkv_kernel=False,
                  lora_o_kernel=False, sequence_len=args.seq, sample_packing=False, val_set_size=0,
                  micro_batch_size=args.batch, gradient_accumulation_steps=1,
                  max_steps=args.warmup_steps + args.steps, num_epochs=1, optimizer="adamw_torch",
                  lr_scheduler="constant", learning_rate=1e-4, logging_steps=args.warmup_steps + args.steps,
                  save_strategy="no", seed=args.seed, dataloader_num_workers=0, dataset_num_proc=1, bf16=False,
                  fp16=False, tf32=False)
    if impl == "kl":
        config.update(plugins=[PLUGIN], kl_weight=args.kl_weight)
    return config


def prepare(root, args):
    """The model and tokenizer folder and the pre-tokenized data of the axolotl arms."""
    model = S.build_model(args.model, torch.float32, "cpu", args.seed)
    model.save_pretrained(os.path.join(root, "model"))
    S.build_tokenizer(S.model_vocab(args.model)).save_pretrained(os.path.join(root, "model"))
    ids = S.token_rows((args.warmup_steps + args.steps) * args.batch, args.seq, S.model_vocab(args.model), args.seed)
    with open(os.path.join(root, "data.jsonl"), "w") as f:
        for row in ids.tolist():
            f.write(json.dumps({"input_ids": row, "attention_mask": [1] * len(row), "labels": row}) + "\n")


def run_axolotl_arm(root, impl, args):
    import yaml
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.integrations.base import BasePlugin, PluginManager
    from axolotl.train import train
    from transformers import set_seed

    meter = CpuClockMeter("cpu", args.warmup_steps)

    class Meter(BasePlugin):
        # post_trainer_create runs for every registered plugin (add_callbacks_post_trainer only with cfg.plugins).
        def post_trainer_create(self, cfg, trainer):
            trainer.add_callback(meter.callback)

    manager = PluginManager.get_instance()
    manager.plugins.clear()  # a process-wide singleton: no plugin of the other arm
    path = os.path.join(root, f"axolotl-{impl}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(axolotl_config(root, impl, args), f)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        cfg = load_cfg(path)
        manager.plugins["bench_axolotl.Meter"] = Meter()
        set_seed(args.seed)
        _, _, trainer = train(cfg=cfg, dataset_meta=load_datasets(cfg=cfg))
    summary = meter.summary()
    summary["trainer"] = type(trainer).__name__
    del trainer
    C.free_memory("cpu")
    return summary


def run(args):
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_axolotl_") as root:
        prepare(root, args)
        for harness in ("axolotl", "transformers"):
            base = dict(bench="axolotl_step", harness=harness, model=args.model, dtype="fp32", batch=args.batch,
                        seq=args.seq, N=args.batch * (args.seq - 1), V=S.model_vocab(args.model), lora_r=args.lora_r,
                        kl_weight=args.kl_weight, threads=torch.get_num_threads())
            results = {}
            for impl in ("plain", "kl"):
                if harness == "axolotl":
                    res = run_axolotl_arm(root, impl, args)
                else:
                    S.StepMeter = CpuClockMeter  # bench_step's arm, with this meter
                    try:
                        res = S.run_arm("transformers", impl, args, root)
                    finally:
                        S.StepMeter = CpuClockMeter.__mro__[1]
                row = dict(base, impl=impl, ms=res["ms"], cpu_ms=res["cpu_ms"],
                           peak_mb=C.finite_or_none(res["peak_mb"]), extra_mb=C.finite_or_none(res["extra_mb"]),
                           steps=res["steps"], status="ok")
                if "trainer" in res:
                    row["trainer"] = res["trainer"]
                results[impl] = row
                rows.append(row)
            kl, plain = results["kl"], results["plain"]
            kl["time_ratio"] = kl[args.clock] / plain[args.clock]
            kl["wall_ratio"], kl["cpu_ratio"] = kl["ms"] / plain["ms"], kl["cpu_ms"] / plain["cpu_ms"]
            if kl["peak_mb"] and plain["peak_mb"]:
                kl["peak_ratio"] = kl["peak_mb"] / plain["peak_mb"]
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", choices=tuple(S.MODELS), default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", choices=("cpu_ms", "ms"), default="cpu_ms",
                   help="what time_ratio compares: the steps' CPU time (default; with --threads 1, steady on a shared "
                        "machine) or their wall time")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/axolotl-<cpu>.json)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    # What bench_step.run_arm reads for its "transformers" arms.
    args.device, args.dtype = "cpu", "fp32"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    vers = C.versions()
    print(f"# bench_axolotl on {C.device_name('cpu')}: torch {vers['torch']}, transformers {vers.get('transformers')}, "
          f"peft {vers.get('peft')}, axolotl {_version('axolotl')}; model {args.model} (fp32), batch {args.batch} x "
          f"seq {args.seq}, LoRA r={args.lora_r}, kl_weight {args.kl_weight}; {args.warmup_steps} warm-up + "
          f"{args.steps} measured steps")
    rows = run(args)
    print()
    S.print_table(rows)
    for r in rows:
        if r.get("cpu_ratio") is not None:
            print(f"{r['harness']}: CPU ms/step {r['cpu_ms']:.1f}, regularized / plain: CPU {r['cpu_ratio']:.3f}x, "
                  f"wall {r['wall_ratio']:.3f}x")
    ratios = {r["harness"]: r["time_ratio"] for r in rows if r.get("time_ratio") is not None}
    if len(ratios) == 2:
        rel = ratios["axolotl"] / ratios["transformers"]
        print(f"\nstep time, regularized / plain: axolotl {ratios['axolotl']:.3f}x, library trainer "
              f"{ratios['transformers']:.3f}x; axolotl's ratio / the library's = {rel:.3f} (goal within 5%)")
    if not args.no_save:
        out = args.out or C.RESULTS_DIR / f"axolotl-{C.device_slug('cpu')}.json"
        meta = {"axolotl_meta": {"warmup_steps": args.warmup_steps, "steps": args.steps, "axolotl": _version("axolotl"),
                                 "memory": C.cpu_memory_method(), "threads": torch.get_num_threads()}}
        print(f"\nwrote {C.save_results(out, 'cpu', rows, meta)}")
    return rows


def _version(name):
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
