"""`kl-nontarget sweep`: the learning-versus-forgetting frontier on your own model and data.

Takes everything `kl-nontarget sft` takes (a `--config FILE.yaml`, the model, the datasets, LoRA flags, learning rate,
batch size, steps) plus `--kl_weights 0,0.1,0.3,1`, `--baseline full_kl`, `--seeds N` and the retention set. It trains
plain LoRA (weight 0) and the non-target KL at every other weight, each from the same LoRA initialisation and data
order per seed, with the config's learning rate, batch size and step count (constant schedule), then evaluates the
target loss on the evaluation split and forgetting (Lf - H(base)) on the retention set: by default text sampled from
the base model itself (`kl_nontarget.evaluation.retention`). Output, in `output_dir`: results.json (the demos' schema),
frontier.png and the adapters; the table is printed. The loop is the demos' (`kl_nontarget.sweep.grid.run_task`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from kl_nontarget.cli.experiment import (
    RetentionArguments,
    command_main,
    load_base,
    one_process,
    parse_list,
    parse_presets,
    parse_ranks,
    parse_weights,
    retention_loader,
    tokenized_rows,
    train_steps,
)
from kl_nontarget.cli.sft import SFTRun, demo_task, has_data
from kl_nontarget.cli.sft_data import InputError, load_datasets, resolve_model_path

PROG = "kl-nontarget sweep"
BASELINES = ("full_kl",)


@dataclass
class SweepArguments(RetentionArguments):
    """The sweep's own options (the rest are `kl-nontarget sft`'s)."""

    kl_weights: str = field(default="0,0.1,0.3,1", metadata={
        "help": "Comma-separated kl_weights; 0 is plain LoRA (always run), every other weight one non-target KL run."})
    baseline: str | None = field(default=None, metadata={
        "help": "Also train this regularizer at the same weights, for comparison: 'full_kl' (full-vocabulary KL)."})
    task_name: str | None = field(default=None, metadata={"help": "Name of the task in results.json and the plot."})
    peft_variants: str = field(default="lora", metadata={
        "help": "Comma-separated PEFT variants to compare, each over the whole kl_weight grid: lora, dora, rslora, "
                "pissa, olora, loraplus, vera, loha, lokr, ia3 (rank, alpha and targets from the lora_* options)."})
    target_presets: str | None = field(default=None, metadata={
        "help": "Comma-separated target modules to compare, each over the whole grid: presets (attention, "
                "mlp_up_gate, all-linear), resolved for the model's architecture. Default: --lora_target_modules."})
    lora_ranks: str | None = field(default=None, metadata={
        "help": "Comma-separated LoRA ranks to compare (alpha scaled to keep lora_alpha / lora_r). Default: "
                "--lora_r."})
    learning_rates: str | None = field(default=None, metadata={
        "help": "Comma-separated learning rates to choose from, per variant, on its plain run (validation loss on "
                "the first half of the evaluation data; the table reports the second half). Default: the config's "
                "learning_rate only. VeRA and IA3 scale the grid by 10."})

    def weights(self) -> tuple[float, ...]:
        """The regularized weights (> 0), sorted; InputError for a bad grid."""
        regularized = tuple(w for w in parse_weights(self.kl_weights) if w > 0)
        if not regularized:
            raise InputError("--kl_weights needs at least one weight > 0 (0 alone is plain LoRA, which always runs)")
        return regularized

    def variants(self) -> tuple[str, ...]:
        """The PEFT variants; InputError for an unknown one."""
        from kl_nontarget.sweep.variants import parse_variants

        try:
            return parse_variants(self.peft_variants)
        except ValueError as err:
            raise InputError(f"--peft_variants: {err}") from None

    def presets(self) -> tuple[str, ...] | None:
        """The target modules to compare, or None; InputError for an unknown preset."""
        return parse_presets(self.target_presets)

    def ranks(self) -> tuple[int, ...] | None:
        return None if self.lora_ranks is None else parse_ranks(self.lora_ranks)

    def lr_grid(self, default: float) -> tuple[float, ...]:
        """The learning rates to choose from (`default` alone when none were given); InputError for a bad list."""
        if self.learning_rates is None:
            return (float(default),)
        return parse_list(self.learning_rates, "learning_rates", float, lambda v: math.isfinite(v) and v > 0,
                          "numbers > 0")

    def check(self) -> None:
        self.weights()
        self.variants()
        self.presets()
        self.ranks()
        self.lr_grid(1.0)
        if self.baseline is not None and self.baseline not in BASELINES:
            raise InputError(f"--baseline must be one of {BASELINES}, got {self.baseline!r}")
        self.check_retention()


def _prepare(run: SFTRun, sweep: SweepArguments, log=print):
    """(model path, train dataset, eval dataset, task name); the evaluation split is required."""
    script = run.script
    if run.model.model_name_or_path is None and not has_data(run):
        model_path, train, evaluation = demo_task(run, PROG, log)
        return model_path, train, evaluation, sweep.task_name or "shifted"
    if run.model.model_name_or_path is None or not has_data(run):
        raise InputError("pass both --model_name_or_path and --dataset_name (or neither, for the embedded demo task)")
    model_path = resolve_model_path(run.model.model_name_or_path, log=log)
    train, evaluation = load_datasets(script, run.mixture, text_field=run.training.dataset_text_field, want_eval=True)
    name = sweep.task_name or Path(str(script.dataset_name or "data")).stem
    return model_path, train, evaluation, name


def run_sweep(run: SFTRun, sweep: SweepArguments, log=print, progress=True) -> dict:
    """The whole sweep; returns the results dict written to output_dir/results.json."""
    from kl_nontarget.sweep.grid import SweepConfig, adapters, base_record, run_task, write_results

    sweep.check()
    training = run.training
    targets = run.model.lora_target_modules or "all-linear"
    cfg = SweepConfig(seeds=sweep.seeds, kl_weights=sweep.weights(),
                      methods=("nontarget_kl",) + ((sweep.baseline,) if sweep.baseline else ()),
                      batch_size=training.per_device_train_batch_size, lora_r=run.model.lora_r,
                      lora_alpha=run.model.lora_alpha, lora_targets=targets, peft_variants=sweep.variants(),
                      target_presets=sweep.presets(), lora_ranks=sweep.ranks(),
                      lr_grid=sweep.lr_grid(training.learning_rate),
                      precompute_base=getattr(training, "precompute_base", False),
                      base_cache_dir=getattr(training, "base_cache_dir", None))
    try:  # an adapter that cannot be built fails now, before anything is loaded
        adapters(cfg)
    except ValueError as err:
        raise InputError(str(err)) from None
    one_process(run, PROG)
    start = time.time()
    model_path, train, evaluation, task = _prepare(run, sweep, log)
    if evaluation is None:
        raise InputError("a sweep measures the target loss on held-out data: pass --eval_dataset FILE, or a dataset "
                         "with a test split (--dataset_test_split)")
    model, tokenizer = load_base(run, model_path)
    train_rows, eval_rows = tokenized_rows(model, tokenizer, training, train, evaluation)
    heldout, retention = retention_loader(model, tokenizer, sweep, seed=training.seed)
    cfg.max_steps = cfg.eval_every = train_steps(run, len(train_rows))
    cfg.extra = {"model": str(model_path), "dataset": str(run.script.dataset_name), "retention": retention}
    out_dir = Path(training.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base, _ = base_record(model, tokenizer, heldout, model_path)
    data = {"train": train_rows, "val": eval_rows, "test": eval_rows}
    if len(cfg.lr_grid) > 1:
        # Choosing among learning rates on the rows the table reports would flatter the choice: half each.
        if len(eval_rows) < 2:
            raise InputError("--learning_rates chooses on half of the evaluation data and reports the other half: "
                             "it needs at least 2 evaluation examples")
        half = len(eval_rows) // 2
        data.update(val=eval_rows[:half], test=eval_rows[half:])
        log(f"learning rates {', '.join(f'{lr:g}' for lr in cfg.lr_grid)}: chosen per adapter on {half} evaluation "
            f"examples, reported on the other {len(eval_rows) - half}")
    info, runs = run_task(model, tokenizer.pad_token_id, task, data, cfg, heldout, out_dir, model_path,
                          progress=progress, log=log)
    base["tasks"][task] = info
    return write_results(runs, base, cfg, out_dir, start, log)


def main(argv: list[str] | None = None) -> int:
    """`kl-nontarget sweep ...`: 0 on success, 2 for bad input (one message on stderr)."""
    return command_main(PROG, SweepArguments, run_sweep, argv)
