"""`kl-nontarget sequence`: several tasks trained in order, the adapter merged into the weights after each.

    kl-nontarget sequence --model_name_or_path MODEL --stages a.jsonl,b.jsonl,c.jsonl [--eval_stages ...]
        [--reference previous|original] [--lora_ranks 4,16] [--kl_weights 0,0.3] [--seeds N] [the sft options]

Each stage trains a fresh LoRA adapter on its dataset from the previous stage's merged model (learning rate, batch
size and `max_steps` per stage from the sft options), merges it, and records the held-out loss of every task seen so
far and forgetting (Lf - H) against the original base (`kl_nontarget.lab.sequence`). Output in `output_dir`:
results.json, sequence.png and the printed table. With neither a model nor datasets it runs the toy demo's base
model through its two tasks, `shifted` then `near`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from kl_nontarget.cli.experiment import (
    RetentionArguments,
    command_main,
    load_base,
    one_process,
    parse_ranks,
    parse_weights,
    retention_loader,
    tokenized_rows,
    train_steps,
)
from kl_nontarget.cli.sft import DEFAULT_TASK_LEARNING_RATE, SFTRun
from kl_nontarget.cli.sft_data import InputError, default_task, load_data, resolve_model_path

PROG = "kl-nontarget sequence"


@dataclass
class SequenceArguments(RetentionArguments):
    """The sequence's own options (the rest are `kl-nontarget sft`'s)."""

    stages: str | None = field(default=None, metadata={
        "help": "Comma-separated datasets, trained in this order (at least two): .jsonl/.json/.parquet/.csv files or "
                "folders, in any format SFTTrainer takes."})
    eval_stages: str | None = field(default=None, metadata={
        "help": "Comma-separated held-out datasets, one per dataset. Default: the last --test_fraction of each."})
    test_fraction: float = field(default=0.2, metadata={
        "help": "Without --eval_stages, the share of each dataset held out (shuffled with the seed)."})
    reference: str = field(default="previous", metadata={
        "help": "The regularizer's reference: 'previous' (the model as each stage starts: keeps the earlier tasks "
                "too, no second copy of the weights) or 'original' (the model before the first stage)."})
    lora_ranks: str | None = field(default=None, metadata={
        "help": "Comma-separated LoRA ranks, each through the whole sequence (alpha scaled to keep lora_alpha / "
                "lora_r). Default: --lora_r."})
    kl_weights: str = field(default="0,0.3", metadata={
        "help": "Comma-separated kl_weights, each through the whole sequence; 0 is plain LoRA."})

    def names(self) -> list[str]:
        return [] if self.stages is None else [d for d in self.stages.replace(" ", "").split(",") if d]

    def check(self) -> None:
        from kl_nontarget.lab.sequence import REFERENCES

        if self.stages is not None and len(self.names()) < 2:
            raise InputError(f"a sequence needs at least two datasets in --stages, got {len(self.names())}")
        if self.eval_stages is not None:
            evals = [d for d in self.eval_stages.replace(" ", "").split(",") if d]
            if len(evals) != len(self.names()):
                raise InputError(f"--eval_stages needs one dataset per --stages entry ({len(self.names())}), "
                                 f"got {len(evals)}")
        if not 0 < self.test_fraction < 1:
            raise InputError(f"--test_fraction must be between 0 and 1, got {self.test_fraction}")
        if self.reference not in REFERENCES:
            raise InputError(f"--reference must be one of {REFERENCES}, got {self.reference!r}")
        parse_weights(self.kl_weights)
        if self.lora_ranks is not None:
            parse_ranks(self.lora_ranks)
        self.check_retention()


def _split(dataset, fraction: float, seed: int):
    """(train, test) of one dataset: a shuffled `fraction` held out."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(order) * fraction))
    if len(order) - held < 1:
        raise InputError(f"a dataset of {len(order)} example(s) cannot spare a held-out part")
    return dataset.select(order[held:]), dataset.select(order[:held])


def _datasets(run: SFTRun, args: SequenceArguments, log):
    """(model path, [(task name, train, eval)]) of the sequence."""
    if run.model.model_name_or_path is None and args.stages is None:
        log(f"{PROG}: no model and no datasets given: the demo's base model through its tasks 'shifted', 'near'")
        if "learning_rate" not in run.given:
            run.training.learning_rate = DEFAULT_TASK_LEARNING_RATE
        tasks = []
        for task in ("shifted", "near"):
            path, train, evaluation = default_task(log=log, task=task)
            tasks.append((task, train, evaluation))
        return path, tasks
    if run.model.model_name_or_path is None or args.stages is None:
        raise InputError("pass both --model_name_or_path and --stages (or neither, for the embedded toy sequence)")
    path = resolve_model_path(run.model.model_name_or_path, log=log)
    evals = None if args.eval_stages is None else [d for d in args.eval_stages.replace(" ", "").split(",") if d]
    tasks = []
    for i, name in enumerate(args.names()):
        data = load_data(name)
        data = data["train"] if hasattr(data, "keys") else data
        if evals is None:
            train, evaluation = _split(data, args.test_fraction, run.training.seed)
        else:
            evaluation = load_data(evals[i])
            train, evaluation = data, evaluation["train"] if hasattr(evaluation, "keys") else evaluation
        tasks.append((Path(name).stem or f"task{i + 1}", train, evaluation))
    if len({t[0] for t in tasks}) < len(tasks):
        tasks = [(f"{i + 1}:{name}", train, evaluation) for i, (name, train, evaluation) in enumerate(tasks)]
    return path, tasks


def run_sequence_command(run: SFTRun, args: SequenceArguments, log=print, progress=True) -> dict:
    """The whole sequence; returns the results dict written to output_dir/results.json."""
    from kl_nontarget.lab.sequence import SequenceConfig, format_table, plot_sequence, run_sequence
    from kl_nontarget.sweep.grid import base_record, versions
    from kl_nontarget.sweep.variants import AdapterSpec

    args.check()
    one_process(run, PROG)
    try:  # a bad target preset fails before anything is loaded
        AdapterSpec("lora", run.model.lora_r, run.model.lora_alpha, run.model.lora_target_modules or "all-linear")
    except ValueError as err:
        raise InputError(str(err)) from None
    start = time.time()
    training = run.training
    model_path, raw = _datasets(run, args, log)
    model, tokenizer = load_base(run, model_path)
    tasks = []
    for name, train, evaluation in raw:
        train_rows, test_rows = tokenized_rows(model, tokenizer, training, train, evaluation)
        tasks.append((name, {"train": train_rows, "test": test_rows}))
    heldout, retention = retention_loader(model, tokenizer, args, seed=training.seed)
    try:
        cfg = SequenceConfig(kl_weights=parse_weights(args.kl_weights),
                             ranks=parse_ranks(args.lora_ranks) if args.lora_ranks else (run.model.lora_r,),
                             seeds=args.seeds, lora_r=run.model.lora_r, lora_alpha=run.model.lora_alpha,
                             lora_targets=run.model.lora_target_modules or "all-linear", lr=training.learning_rate,
                             steps=train_steps(run, min(len(t[1]["train"]) for t in tasks)),
                             batch_size=training.per_device_train_batch_size, reference=args.reference,
                             extra={"model": str(model_path), "datasets": [t[0] for t in tasks],
                                    "retention": retention})
    except ValueError as err:
        raise InputError(str(err)) from None
    base, _ = base_record(model, tokenizer, heldout, model_path)
    rows = run_sequence(model, tokenizer.pad_token_id, tasks, cfg, heldout, log=log, progress=progress)
    out = Path(training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"stages": rows, "base": base, "config": cfg.to_dict(), "versions": versions(),
               "seconds": time.time() - start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_sequence(rows, out / "sequence.png")
    log(format_table(rows, base["entropy"]))
    log(f"\nwrote {out / 'results.json'} and {out / 'sequence.png'} in {results['seconds']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    """`kl-nontarget sequence ...`: 0 on success, 2 for bad input (one message on stderr)."""
    return command_main(PROG, SequenceArguments, run_sequence_command, argv)
