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
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from kl_nontarget.cli.sft import SFTRun, demo_task, has_data, model_init_kwargs, parse_args, run_command
from kl_nontarget.cli.sft_data import InputError, load_datasets, resolve_model_path

PROG = "kl-nontarget sweep"
BASELINES = ("full_kl",)


@dataclass
class SweepArguments:
    """The sweep's own options (the rest are `kl-nontarget sft`'s)."""

    kl_weights: str = field(default="0,0.1,0.3,1", metadata={
        "help": "Comma-separated kl_weights; 0 is plain LoRA (always run), every other weight one non-target KL run."})
    baseline: str | None = field(default=None, metadata={
        "help": "Also train this regularizer at the same weights, for comparison: 'full_kl' (full-vocabulary KL)."})
    seeds: int = field(default=1, metadata={"help": "Seeds per setting (LoRA init and data order)."})
    retention_data: str | None = field(default=None, metadata={
        "help": "Retention text for the forgetting metrics: a .jsonl/.json/.parquet/.csv file or folder with a "
                "'text' column. Default: text sampled from the base model itself."})
    retention_samples: int = field(default=32, metadata={
        "help": "Samples drawn from the base model for the default retention set (at most 64 new tokens each)."})
    task_name: str | None = field(default=None, metadata={"help": "Name of the task in results.json and the plot."})
    peft_variants: str = field(default="lora", metadata={
        "help": "Comma-separated PEFT variants to compare, each over the whole kl_weight grid: lora, dora, rslora, "
                "pissa, olora, loraplus, vera, loha, lokr, ia3 (rank, alpha and targets from the lora_* options)."})
    learning_rates: str | None = field(default=None, metadata={
        "help": "Comma-separated learning rates to choose from, per variant, on its plain run (validation loss on "
                "the first half of the evaluation data; the table reports the second half). Default: the config's "
                "learning_rate only. VeRA and IA3 scale the grid by 10."})

    def weights(self) -> tuple[float, ...]:
        """The regularized weights (> 0), sorted; InputError for a bad grid."""
        try:
            values = [float(w) for w in str(self.kl_weights).replace(" ", "").split(",") if w != ""]
        except ValueError:
            raise InputError(f"--kl_weights must be comma-separated numbers, got {self.kl_weights!r}") from None
        bad = [w for w in values if not (math.isfinite(w) and w >= 0)]
        if bad or not values:
            raise InputError(f"--kl_weights must be numbers >= 0, got {self.kl_weights!r}")
        regularized = sorted({w for w in values if w > 0})
        if not regularized:
            raise InputError("--kl_weights needs at least one weight > 0 (0 alone is plain LoRA, which always runs)")
        return tuple(regularized)

    def variants(self) -> tuple[str, ...]:
        """The PEFT variants; InputError for an unknown one."""
        from kl_nontarget.sweep.variants import parse_variants

        try:
            return parse_variants(self.peft_variants)
        except ValueError as err:
            raise InputError(f"--peft_variants: {err}") from None

    def lr_grid(self, default: float) -> tuple[float, ...]:
        """The learning rates to choose from (`default` alone when none were given); InputError for a bad list."""
        if self.learning_rates is None:
            return (float(default),)
        try:
            values = tuple(float(v) for v in str(self.learning_rates).replace(" ", "").split(",") if v)
        except ValueError:
            raise InputError(f"--learning_rates must be comma-separated numbers, got {self.learning_rates!r}") \
                from None
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise InputError(f"--learning_rates must be numbers > 0, got {self.learning_rates!r}")
        return values

    def check(self) -> None:
        self.weights()
        self.variants()
        self.lr_grid(1.0)
        if self.baseline is not None and self.baseline not in BASELINES:
            raise InputError(f"--baseline must be one of {BASELINES}, got {self.baseline!r}")
        for name in ("seeds", "retention_samples"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}")


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


def _rows(dataset) -> list[dict]:
    """Token rows (labels -100 off the supervised tokens) from a dataset TRL's SFTTrainer has tokenized."""
    rows = []
    for example in dataset:
        ids = list(example["input_ids"])
        mask = example.get("completion_mask") or example.get("assistant_masks")
        labels = ids if mask is None else [t if m else -100 for t, m in zip(ids, mask)]
        if len(ids) > 1 and any(y != -100 for y in labels[1:]):
            rows.append({"input_ids": ids, "labels": labels})
    return rows


def tokenized_rows(model, tokenizer, training, train, evaluation) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) tokenized exactly as `trl.SFTTrainer` does for these datasets and this config
    (templates, completion-only and assistant-only masks, truncation), without training."""
    import tempfile

    import trl

    from kl_nontarget.integrations.trl import remove_trl_patch

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.SFTConfig(**{**_sft_fields(training), "output_dir": tmp, "report_to": [], "packing": False,
                                "bf16": False, "fp16": False,
                                "eval_strategy": "no"})
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                 processing_class=tokenizer)
        train_rows, eval_rows = _rows(trainer.train_dataset), _rows(trainer.eval_dataset)
        # SFTTrainer patched the model's forward with its chunked LM head; the sweep's runs train the plain model.
        remove_trl_patch(model)
    if not train_rows or not eval_rows:
        raise InputError("no supervised tokens left after tokenization in the " +
                         ("training" if not train_rows else "evaluation") + " data (check max_length and the columns)")
    return train_rows, eval_rows


def _sft_fields(training) -> dict:
    import dataclasses

    import trl

    names = {f.name for f in dataclasses.fields(trl.SFTConfig) if f.init}
    keep = ("max_length", "dataset_text_field", "completion_only_loss", "assistant_only_loss", "chat_template_path",
            "eos_token", "pad_token", "truncation_mode", "dataset_kwargs", "use_cpu", "seed")
    return {k: getattr(training, k) for k in keep if k in names and hasattr(training, k)}


def run_sweep(run: SFTRun, sweep: SweepArguments, log=print, progress=True) -> dict:
    """The whole sweep; returns the results dict written to output_dir/results.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kl_nontarget.evaluation.loader import padded_loader
    from kl_nontarget.evaluation.retention import rows_from_data, sample_from_base
    from kl_nontarget.sweep.grid import SweepConfig, base_record, run_task, write_results
    from kl_nontarget.sweep.variants import AdapterSpec

    sweep.check()
    targets = run.model.lora_target_modules or "all-linear"
    for variant in sweep.variants():  # a variant that cannot be built fails now, before anything is loaded
        try:
            AdapterSpec(variant, run.model.lora_r, run.model.lora_alpha, targets)
        except ValueError as err:
            raise InputError(str(err)) from None
    if run.launch_args:
        raise InputError(f"{PROG} runs in one process; unknown option(s): {' '.join(run.launch_args)}")
    start = time.time()
    training = run.training
    model_path, train, evaluation, task = _prepare(run, sweep, log)
    if evaluation is None:
        raise InputError("a sweep measures the target loss on held-out data: pass --eval_dataset FILE, or a dataset "
                         "with a test split (--dataset_test_split)")
    kwargs = model_init_kwargs(run)
    if kwargs.get("dtype") in (None, "auto"):
        kwargs["dtype"] = torch.float32
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    device = "cuda" if torch.cuda.is_available() and not training.use_cpu else "cpu"
    model.to(device)
    train_rows, eval_rows = tokenized_rows(model, tokenizer, training, train, evaluation)
    if sweep.retention_data is not None:
        from kl_nontarget.cli.sft_data import load_data

        data = load_data(sweep.retention_data)
        data = data["train"] if hasattr(data, "keys") else data
        retention = rows_from_data(data, tokenizer)
    else:
        retention = sample_from_base(model, tokenizer, base_model=model, num_samples=sweep.retention_samples,
                                     seed=training.seed)
    pad = tokenizer.pad_token_id
    heldout = padded_loader(retention, pad, batch_size=8)
    steps = training.max_steps
    if steps is None or steps <= 0:
        per_epoch = math.ceil(len(train_rows) / training.per_device_train_batch_size)
        steps = max(1, math.ceil(per_epoch * training.num_train_epochs))
    lr_grid = sweep.lr_grid(training.learning_rate)
    cfg = SweepConfig(seeds=sweep.seeds, kl_weights=sweep.weights(),
                      methods=("nontarget_kl",) + ((sweep.baseline,) if sweep.baseline else ()),
                      batch_size=training.per_device_train_batch_size, lora_r=run.model.lora_r,
                      lora_alpha=run.model.lora_alpha, lora_targets=targets, peft_variants=sweep.variants(),
                      lr_grid=lr_grid, max_steps=steps, eval_every=steps,
                      precompute_base=getattr(training, "precompute_base", False),
                      base_cache_dir=getattr(training, "base_cache_dir", None),
                      extra={"model": str(model_path), "dataset": str(run.script.dataset_name),
                             "retention": sweep.retention_data or f"{len(retention)} samples from the base model"})
    out_dir = Path(training.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base, _ = base_record(model, tokenizer, heldout, model_path)
    data = {"train": train_rows, "val": eval_rows, "test": eval_rows}
    if len(lr_grid) > 1:
        # Choosing among learning rates on the rows the table reports would flatter the choice: half each.
        if len(eval_rows) < 2:
            raise InputError("--learning_rates chooses on half of the evaluation data and reports the other half: "
                             "it needs at least 2 evaluation examples")
        half = len(eval_rows) // 2
        data.update(val=eval_rows[:half], test=eval_rows[half:])
        log(f"learning rates {', '.join(f'{lr:g}' for lr in lr_grid)}: chosen per variant on {half} evaluation "
            f"examples, reported on the other {len(eval_rows) - half}")
    info, runs = run_task(model, pad, task, data, cfg, heldout, out_dir, model_path, progress=progress, log=log)
    base["tasks"][task] = info
    return write_results(runs, base, cfg, out_dir, start, log)


def main(argv: list[str] | None = None) -> int:
    """`kl-nontarget sweep ...`: 0 on success, 2 for bad input (one message on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def parse_and_sweep() -> int:
        run = parse_args(argv, extra_types=(SweepArguments,), prog=PROG)
        (sweep,) = run.extras
        run_sweep(run, sweep)  # checks the sweep's options first
        return 0

    return run_command(PROG, parse_and_sweep)
