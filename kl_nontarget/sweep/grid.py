"""A learning-versus-forgetting sweep: plain LoRA and regularized runs over kl_weights and seeds, one shared loop.

Both demos and `kl-nontarget sweep` go through `run_task`: for one task (token rows with -100 on unsupervised
positions, split into train / val / test), it picks the learning rate and step count best for plain LoRA on the
validation split, keeps them for every method, trains every (method, kl_weight) of `plan` for every seed from the
same LoRA initialisation and data order, and evaluates target loss on the test split and forgetting on a retention
set. `write_results` writes results.json (one row per run: task, seed, method, kl_weight, target_loss,
target_accuracy, forgetting = Lf - H(base), lf, retention_ppl, plus any extra keys), frontier.png and the table.

`cfg` is any object with the fields of `SweepConfig` (the demos' configs have them too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kl_nontarget.evaluation.loader import padded_loader
from kl_nontarget.evaluation.metrics import evaluate_lm, forgetting_metrics
from kl_nontarget.sweep.runs import (
    METHODS,
    ValidationCallback,
    choose_baseline,
    evaluate_run,
    finetune,
    lora_from_snapshot,
)


@dataclass
class SweepConfig:
    """Settings of one sweep (the field names are shared with the demos' configs).

    `methods`: the regularized methods besides plain LoRA ("nontarget_kl", "full_kl"), each at every kl_weight.
    `lr_grid` / `eval_every` / `max_steps`: with more than one learning rate, or validation more often than
    `max_steps`, a plain-LoRA sweep on the validation split picks (lr, steps) for every method; otherwise
    `lr_grid[0]` and `max_steps` are used as they are.
    """

    seeds: int = 1
    kl_weights: tuple = (0.1, 0.3, 1.0)
    methods: tuple = ("nontarget_kl",)
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list | None = None
    lr_grid: tuple = (1e-4,)
    max_steps: int = 100
    eval_every: int = 100
    steps_tolerance: float = 0.02
    match_tolerance: float = 0.05
    extra: dict = field(default_factory=dict)  # recorded in results.json only (the model, the data, ...)
    precompute_base: bool | str = False  # the non-target KL runs share one base pass over the data (a cache)
    base_cache_dir: str | None = None

    def to_dict(self):
        return dataclasses.asdict(self)


def versions():
    import peft
    import transformers

    import kl_nontarget

    return {"kl_nontarget": kl_nontarget.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version()}


def plan(cfg):
    """(method, kl_weight) for every run of one task and seed: plain LoRA, then each method at each weight."""
    methods = getattr(cfg, "methods", METHODS[1:])
    return [("lora", 0.0)] + [(m, float(w)) for m in methods for w in cfg.kl_weights]


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


def base_record(model, tokenizer, heldout_loader, path, /, **extra):
    """The base model's record of results.json (its `forgetting`, Lf - H against itself, is 0), and the
    `forgetting_metrics` it came from. `extra`: more keys (any name, "model" too), placed after "path"; "tasks"
    starts empty."""
    metrics = forgetting_metrics(model, heldout_loader, base_model=model, progress=False)
    record = {"path": str(path), **extra, "parameters": sum(p.numel() for p in model.parameters()),
              "vocab_size": len(tokenizer), "entropy": metrics["base_entropy"], "lf": metrics["lf"],
              "forgetting": 0.0, "retention_ppl": metrics["base_ppl"], "accuracy": metrics["base_accuracy"],
              "tasks": {}}
    return record, metrics


def write_results(runs, base, cfg, out_dir, start, log=print, extra_report=None):
    """Writes out_dir/results.json and out_dir/frontier.png, prints the table (and `extra_report(results)`)."""
    from kl_nontarget.sweep.plot import plot_frontier
    from kl_nontarget.sweep.report import format_table

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
    test_loader, val_loader = padded_loader(data["test"], pad), padded_loader(data["val"], pad)
    target = evaluate_lm(model, test_loader, progress=False)
    info = {"target_loss": target["loss"], "target_accuracy": target["sequence_accuracy"]}
    snapshot = None  # the seed-0 plain-LoRA weights at the chosen (lr, steps), taken from the sweep
    if len(cfg.lr_grid) > 1 or cfg.eval_every < cfg.max_steps:
        history, snapshots = {}, {}
        for lr in cfg.lr_grid:
            cb = ValidationCallback(val_loader, cfg.eval_every)
            finetune(model, data["train"], pad, method="lora", kl_weight=0.0, lr=lr, steps=cfg.max_steps,
                     seed=0, batch_size=cfg.batch_size, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                     lora_targets=getattr(cfg, "lora_targets", None), callbacks=[cb],
                     desc=f"{task}: sweep lora lr={lr:g}", progress=progress)
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
                peft_model = lora_from_snapshot(model, snapshot, seed, cfg.lora_r, cfg.lora_alpha,
                                                getattr(cfg, "lora_targets", None))
            else:
                peft_model = finetune(model, data["train"], pad, method=method, kl_weight=weight, lr=lr,
                                      steps=steps, seed=seed, batch_size=cfg.batch_size, lora_r=cfg.lora_r,
                                      lora_alpha=cfg.lora_alpha, lora_targets=getattr(cfg, "lora_targets", None),
                                      desc=f"{task} seed {seed}: {method} λ={weight:g}", progress=progress,
                                      precompute_base=getattr(cfg, "precompute_base", False),
                                      base_cache_dir=getattr(cfg, "base_cache_dir", None))
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
