"""A learning-versus-forgetting sweep: plain LoRA and regularized runs over kl_weights and seeds, one shared loop.

Both demos and `kl-nontarget sweep` go through `run_task`: for one task (token rows with -100 on unsupervised
positions, split into train / val / test) and each PEFT variant (`cfg.peft_variants`, default LoRA only), it picks
the learning rate and step count best for the plain (unregularized) variant on the validation split, keeps them for
that variant's regularized runs, trains every (method, kl_weight) of `plan` for every seed from the same adapter
initialisation and data order, and evaluates target loss on the test split and forgetting on a retention set against
the original base model. `write_results` writes results.json (one row per run: task, variant, seed, method,
kl_weight, target_loss, target_accuracy, forgetting = Lf - H(base), lf, retention_ppl, plus any extra keys),
frontier.png and the table.

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
from kl_nontarget.sweep.variants import VARIANTS, AdapterSpec


@dataclass
class SweepConfig:
    """Settings of one sweep (the field names are shared with the demos' configs).

    `methods`: the regularized methods besides plain LoRA ("nontarget_kl", "full_kl"), each at every kl_weight.
    `lr_grid` / `eval_every` / `max_steps`: with more than one learning rate, or validation more often than
    `max_steps`, a plain-run sweep on the validation split picks (lr, steps) for every method; otherwise
    `lr_grid[0]` and `max_steps` are used as they are. `peft_variants`: the adapters to compare
    (`kl_nontarget.sweep.variants.VARIANTS`), each with its own (lr, steps), chosen on its own plain runs from the
    grid times the variant's `lr_factor`.
    """

    seeds: int = 1
    kl_weights: tuple = (0.1, 0.3, 1.0)
    methods: tuple = ("nontarget_kl",)
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list | None = None
    peft_variants: tuple = ("lora",)
    target_presets: tuple | None = None  # compare these targets (presets or names) instead of lora_targets alone
    lora_ranks: tuple | None = None  # compare these ranks instead of lora_r alone (alpha scaled to keep alpha / r)
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


def adapters(cfg) -> list[AdapterSpec]:
    """The adapters of a sweep: one `AdapterSpec` per variant (`cfg.peft_variants`, default LoRA), target modules
    (`cfg.target_presets`, default `cfg.lora_targets`) and rank (`cfg.lora_ranks`, default `cfg.lora_r`; alpha is
    scaled with the rank so that alpha / r, LoRA's scale, stays that of `cfg.lora_alpha / cfg.lora_r`)."""
    targets = getattr(cfg, "target_presets", None) or (getattr(cfg, "lora_targets", None),)
    ranks = getattr(cfg, "lora_ranks", None) or (cfg.lora_r,)
    return [AdapterSpec(variant, r, max(1, round(cfg.lora_alpha * r / cfg.lora_r)), target)
            for variant in getattr(cfg, "peft_variants", ("lora",)) for target in targets for r in ranks]


def run_task(model, pad, task, data, cfg, heldout_loader, out_dir, base_path, *, progress=True, log=print,
             extra_metrics=None):
    """All runs of one task (every variant, seed and method); returns (the task's base record, the run rows).

    `data` holds the encoded "train" / "val" / "test" rows. Per variant, the learning rate and step count are those
    best for its plain runs on the validation split (seed 0), kept for every method: with several learning rates in
    `cfg.lr_grid`, or validation more often than `cfg.max_steps`, a plain sweep picks them (`choose_baseline`) and its
    weights at the chosen step are reused as the seed-0 plain run. Every adapter is saved under out_dir/adapters/.
    `extra_metrics(peft_model) -> dict` adds keys to each run row (the real-model probes).
    """
    runner = _TaskRuns(model, pad, task, data, cfg, heldout_loader, Path(out_dir), base_path, progress, log,
                       extra_metrics)
    target = evaluate_lm(model, runner.test_loader, progress=False)
    info = {"target_loss": target["loss"], "target_accuracy": target["sequence_accuracy"], "adapters": {}}
    log(f"{task}: base target loss {info['target_loss']:.3f}")
    runs = []
    for adapter in adapters(cfg):
        chosen = runner.choose(adapter)
        info["adapters"][adapter.name] = {k: v for k, v in chosen.items() if k != "snapshot"}
        log(f"{task} / {adapter.name}: lr={chosen['lr']:g}, steps={chosen['steps']}"
            + (f" (validation loss {chosen['val_loss']:.4f})" if chosen["val_loss"] is not None else ""))
        for seed in range(cfg.seeds):
            runs += [runner.run(adapter, chosen, method, weight, seed) for method, weight in plan(cfg)]
    if len(info["adapters"]) == 1:  # one adapter: its choice also at the top, as before adapters were compared
        info.update(next(iter(info["adapters"].values())))
    return info, runs


@dataclass
class _TaskRuns:
    """What every run of one task shares: the base model, the data and loaders, the output and the reporting."""

    model: object
    pad: int
    task: str
    data: dict
    cfg: object
    heldout_loader: object
    out_dir: Path
    base_path: object
    progress: bool
    log: object
    extra_metrics: object

    def __post_init__(self):
        self.test_loader = padded_loader(self.data["test"], self.pad)
        self.val_loader = padded_loader(self.data["val"], self.pad)

    def train(self, adapter, method, weight, lr, steps, seed, callbacks=(), desc=""):
        cfg = self.cfg
        return finetune(self.model, self.data["train"], self.pad, adapter, method=method, kl_weight=weight, lr=lr,
                        steps=steps, seed=seed, batch_size=cfg.batch_size, callbacks=callbacks, desc=desc,
                        progress=self.progress, precompute_base=getattr(cfg, "precompute_base", False),
                        base_cache_dir=getattr(cfg, "base_cache_dir", None))

    def choose(self, adapter) -> dict:
        """{lr, steps, val_loss, sweep, snapshot}: the plain run's best (lr, steps) for `adapter` on validation."""
        cfg = self.cfg
        grid = [lr * VARIANTS[adapter.variant].lr_factor for lr in cfg.lr_grid]
        if len(grid) == 1 and cfg.eval_every >= cfg.max_steps:
            return {"lr": grid[0], "steps": cfg.max_steps, "val_loss": None, "snapshot": None}
        history, snapshots = {}, {}
        for lr in grid:
            cb = ValidationCallback(self.val_loader, cfg.eval_every)
            self.train(adapter, "lora", 0.0, lr, cfg.max_steps, 0, callbacks=[cb],
                       desc=f"{self.task}: sweep {adapter.variant} lr={lr:g}")
            history[lr], snapshots[lr] = cb.history, cb.snapshots
        lr, steps, val_loss = choose_baseline(history, cfg.steps_tolerance)
        return {"lr": lr, "steps": steps, "val_loss": val_loss, "sweep": {str(k): v for k, v in history.items()},
                "snapshot": snapshots[lr][steps]}

    def run(self, adapter, chosen, method, weight, seed) -> dict:
        """One run, evaluated (forgetting against the original base) and saved: its results.json row."""
        variant = adapter.variant
        default = adapters(self.cfg)[0]  # the default adapter keeps the tags adapters had before they were compared
        extra = [variant] if variant != default.variant else []
        extra += [adapter.targets_label.replace(",", "+")] if adapter.targets != default.targets else []
        extra += [f"r{adapter.r}"] if adapter.r != default.r else []
        tag = "-".join([self.task, *extra, method, f"{weight:g}", f"seed{seed}"])
        if method == "lora" and seed == 0 and chosen["snapshot"] is not None:
            peft_model = lora_from_snapshot(self.model, chosen["snapshot"], seed, adapter)
        else:
            peft_model = self.train(adapter, method, weight, chosen["lr"], chosen["steps"], seed,
                                    desc=f"{self.task} {variant} seed {seed}: {method} λ={weight:g}")
        metrics = evaluate_run(peft_model, self.test_loader, self.heldout_loader, base_model=self.model)
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = str(self.base_path)
        peft_model.save_pretrained(self.out_dir / "adapters" / tag)
        row = {"task": self.task, "variant": variant, "targets": adapter.targets_label, "r": adapter.r,
               # what the adapter trains (a frozen snapshot of a base-rewriting init's adapter excluded)
               "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
               "seed": seed, "method": method, "kl_weight": weight,
               "target_loss": metrics["target_loss"], "target_accuracy": metrics["target_accuracy"],
               "forgetting": metrics["forgetting"], "lf": metrics["lf"], "retention_ppl": metrics["retention_ppl"]}
        if self.extra_metrics is not None:
            row.update(self.extra_metrics(peft_model))
        self.log(f"  {tag}: target loss {row['target_loss']:.4f}, accuracy {row['target_accuracy']:.3f}, "
                 f"Lf-H {row['forgetting']:.4f}, retention ppl {row['retention_ppl']:.3f}")
        return row
