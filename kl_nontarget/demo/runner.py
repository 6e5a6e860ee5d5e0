"""The demo end to end: base model, per-task baseline sweep, all runs, results.json, table and plot."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path

import torch

from kl_nontarget.demo.base import base_corpus, load_or_pretrain
from kl_nontarget.demo.data import loader
from kl_nontarget.demo.runs import (
    METHODS,
    ValidationCallback,
    choose_baseline,
    evaluate_run,
    finetune,
    lora_from_snapshot,
)
from kl_nontarget.demo.tasks import build_task
from kl_nontarget.metrics import evaluate_lm, forgetting_metrics


def versions():
    import peft
    import transformers

    import kl_nontarget

    return {"kl_nontarget": kl_nontarget.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version()}


def plan(cfg):
    """(method, kl_weight) for every run of one task and seed."""
    return [("lora", 0.0)] + [(m, float(w)) for m in METHODS[1:] for w in cfg.kl_weights]


def run_demo(cfg, out_dir, *, cache_dir=None, progress=True, log=print, threads=None):
    """Runs the whole demo; writes out_dir/results.json, out_dir/frontier.png and out_dir/adapters/.

    `threads`: torch intra-op threads for the run (restored afterwards); None keeps torch's setting, one per core.
    On an idle 2-core machine two threads train the demo's models about 1.35x faster than one; on cores shared with
    other work, one thread can be much faster.
    """
    with torch_threads(threads):
        return _run_demo(cfg, out_dir, cache_dir=cache_dir, progress=progress, log=log)


@contextlib.contextmanager
def torch_threads(threads=None):
    """torch intra-op threads set to `threads` inside the block (None: unchanged)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_demo(cfg, out_dir, *, cache_dir, progress, log):
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok, grammar, base_path, cached = load_or_pretrain(cfg.base, cfg.base_seed, cache_dir, progress, log)
    pad = tok.pad_token_id
    _, heldout = base_corpus(grammar, tok, cfg.base, cfg.base_seed)
    heldout = heldout[:cfg.heldout_blocks]
    (out_dir / "base_heldout.txt").write_text(
        "\n".join(" ".join(tok.convert_ids_to_tokens(b)) for b in heldout) + "\n")
    heldout_loader = loader([{"input_ids": b} for b in heldout], pad)
    base_forget = forgetting_metrics(model, heldout_loader, base_model=model, progress=False)
    base = {"path": str(base_path), "cached": cached, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tok), "entropy": base_forget["base_entropy"], "lf": base_forget["lf"], "forgetting": 0.0,
            "retention_ppl": base_forget["base_ppl"], "accuracy": base_forget["base_accuracy"], "tasks": {}}
    runs = []
    for task in cfg.tasks:
        data = build_task(grammar, tok, task, cfg.sizes)
        info, task_runs = run_task(model, pad, task, data, cfg, heldout_loader, out_dir, base_path, progress=progress,
                                   log=log)
        base["tasks"][task] = info
        runs += task_runs
    return write_results(runs, base, cfg, out_dir, start, log)


def write_results(runs, base, cfg, out_dir, start, log=print, extra_report=None):
    """Writes out_dir/results.json and out_dir/frontier.png, prints the table (and `extra_report(results)`)."""
    from kl_nontarget.demo.plot import plot_frontier
    from kl_nontarget.demo.report import format_table

    out_dir = Path(out_dir)
    config = cfg.to_dict()
    config["torch_threads"] = torch.get_num_threads()
    results = {"runs": runs, "base": base, "config": config, "versions": versions(),
               "seconds": time.time() - start}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    plot_frontier(results, out_dir / "frontier.png")
    log(format_table(results))
    if extra_report is not None:
        log(extra_report(results))
    log(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'frontier.png'} in {results['seconds']:.0f} s")
    return results


def run_task(model, pad, task, data, cfg, heldout_loader, out_dir, base_path, *, progress=True, log=print,
             extra_metrics=None):
    """All runs of one task (every seed and method); returns (the task's base record, the run rows).

    `data` holds the encoded "train" / "val" / "test" rows. The learning rate and step count are those best for
    plain LoRA on the validation split (seed 0), kept for every method: with several learning rates in
    `cfg.lr_grid`, or validation more often than `cfg.max_steps`, a plain-LoRA sweep picks them (`choose_baseline`)
    and its weights at the chosen step are reused as the seed-0 plain-LoRA run. Every adapter is saved under
    out_dir/adapters/. `extra_metrics(peft_model) -> dict` adds keys to each run row (the real-model probes).
    """
    test_loader, val_loader = loader(data["test"], pad), loader(data["val"], pad)
    target = evaluate_lm(model, test_loader, progress=False)
    info = {"target_loss": target["loss"], "target_accuracy": target["sequence_accuracy"]}
    snapshot = None  # the seed-0 plain-LoRA weights at the chosen (lr, steps), taken from the sweep
    if len(cfg.lr_grid) > 1 or cfg.eval_every < cfg.max_steps:
        history, snapshots = {}, {}
        for lr in cfg.lr_grid:
            cb = ValidationCallback(val_loader, cfg.eval_every)
            finetune(model, data["train"], pad, method="lora", kl_weight=0.0, lr=lr, steps=cfg.max_steps,
                     seed=0, batch_size=cfg.batch_size, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                     callbacks=[cb], desc=f"{task}: sweep lora lr={lr:g}", progress=progress)
            history[lr], snapshots[lr] = cb.history, cb.snapshots
        lr, steps, val_loss = choose_baseline(history, cfg.steps_tolerance)
        snapshot = snapshots[lr][steps]
        info["sweep"] = {str(k): v for k, v in history.items()}
    else:
        lr, steps, val_loss = cfg.lr_grid[0], cfg.max_steps, None
    info.update(lr=lr, steps=steps, val_loss=val_loss)
    log(f"{task}: base target loss {info['target_loss']:.3f}; plain-LoRA baseline lr={lr:g}, steps={steps}"
        + (f" (validation loss {val_loss:.4f})" if val_loss is not None else ""))
    runs = []
    for seed in range(cfg.seeds):
        for method, weight in plan(cfg):
            tag = f"{task}-{method}-{weight:g}-seed{seed}"
            if method == "lora" and seed == 0 and snapshot is not None:
                peft_model = lora_from_snapshot(model, snapshot, seed, cfg.lora_r, cfg.lora_alpha)
            else:
                peft_model = finetune(model, data["train"], pad, method=method, kl_weight=weight, lr=lr,
                                      steps=steps, seed=seed, batch_size=cfg.batch_size, lora_r=cfg.lora_r,
                                      lora_alpha=cfg.lora_alpha,
                                      desc=f"{task} seed {seed}: {method} λ={weight:g}", progress=progress)
            metrics = evaluate_run(peft_model, test_loader, heldout_loader)
            peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
            peft_model.save_pretrained(Path(out_dir) / "adapters" / tag)
            row = {"task": task, "seed": seed, "method": method, "kl_weight": weight,
                   "target_loss": metrics["target_loss"], "target_accuracy": metrics["target_accuracy"],
                   "forgetting": metrics["forgetting"], "lf": metrics["lf"], "retention_ppl": metrics["retention_ppl"]}
            if extra_metrics is not None:
                row.update(extra_metrics(peft_model))
            runs.append(row)
            log(f"  {tag}: target loss {row['target_loss']:.4f}, accuracy {row['target_accuracy']:.3f}, "
                f"Lf-H {row['forgetting']:.4f}, retention ppl {row['retention_ppl']:.3f}")
            del peft_model
    return info, runs
