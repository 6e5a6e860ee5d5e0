"""What the experiment commands (`kl-nontarget sweep`, `sequence`, `powerlaw`) share on top of `kl-nontarget sft`'s
parser: comma-separated lists, the retention set's options, loading the base model, the data tokenized as
`trl.SFTTrainer` tokenizes it, and the step count of a run."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from kl_nontarget.cli.sft import SFTRun, model_init_kwargs
from kl_nontarget.cli.sft_data import InputError


def parse_list(text, option: str, convert: Callable = float, ok: Callable = lambda v: True,
               rule: str = "") -> tuple:
    """The comma-separated values of `--option`, converted and checked; InputError naming the option otherwise."""
    try:
        values = tuple(convert(v) for v in str(text).replace(" ", "").split(",") if v != "")
    except ValueError:
        raise InputError(f"--{option} must be comma-separated {rule or 'numbers'}, got {text!r}") from None
    if not values or not all(ok(v) for v in values):
        raise InputError(f"--{option} must be {rule or 'numbers'}, got {text!r}")
    return values


def parse_weights(text, option: str = "kl_weights") -> tuple[float, ...]:
    """kl_weights (>= 0, finite), sorted, without repeats."""
    return tuple(sorted(set(parse_list(text, option, float, lambda w: math.isfinite(w) and w >= 0,
                                       "numbers >= 0"))))


def parse_presets(text, option: str = "target_presets") -> tuple[str, ...] | None:
    """Target-module presets (`kl_nontarget.models.architectures.PRESETS`), or None for no text."""
    if text is None:
        return None
    from kl_nontarget.models.architectures import PRESETS

    return parse_list(text, option, str, lambda t: t in PRESETS, f"presets ({', '.join(PRESETS)})")


def parse_ranks(text, option: str = "lora_ranks") -> tuple[int, ...]:
    """LoRA ranks (integers >= 1), in the given order, without repeats."""
    return tuple(dict.fromkeys(parse_list(text, option, int, lambda r: r >= 1, "integers >= 1")))


@dataclass
class RetentionArguments:
    """The retention set of the forgetting metrics, and the seeds (shared by the experiment commands)."""

    seeds: int = field(default=1, metadata={"help": "Seeds per setting (LoRA init and data order)."})
    retention_data: str | None = field(default=None, metadata={
        "help": "Retention text for the forgetting metrics: a .jsonl/.json/.parquet/.csv file or folder with a "
                "'text' column. Default: text sampled from the base model itself."})
    retention_samples: int = field(default=32, metadata={
        "help": "Samples drawn from the base model for the default retention set (at most 64 new tokens each)."})

    def check_retention(self) -> None:
        for name in ("seeds", "retention_samples"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}")


def load_base(run: SFTRun, model_path):
    """(model, tokenizer) of `model_path` as the run's options ask (float32 unless a dtype is given), on the GPU
    when there is one and `use_cpu` is off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = model_init_kwargs(run)
    if kwargs.get("dtype") in (None, "auto"):
        kwargs["dtype"] = torch.float32
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.to("cuda" if torch.cuda.is_available() and not run.training.use_cpu else "cpu")
    return model, tokenizer


def retention_loader(model, tokenizer, args: RetentionArguments, seed: int = 0):
    """(a padded loader over the retention rows, a description for results.json)."""
    from kl_nontarget.evaluation.loader import padded_loader
    from kl_nontarget.evaluation.retention import rows_from_data, sample_from_base

    if args.retention_data is not None:
        from kl_nontarget.cli.sft_data import load_data

        data = load_data(args.retention_data)
        data = data["train"] if hasattr(data, "keys") else data
        rows, what = rows_from_data(data, tokenizer), args.retention_data
    else:
        rows = sample_from_base(model, tokenizer, base_model=model, num_samples=args.retention_samples, seed=seed)
        what = f"{len(rows)} samples from the base model"
    return padded_loader(rows, tokenizer.pad_token_id, batch_size=8), what


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
    (templates, completion-only and assistant-only masks, truncation), without training; `evaluation` may be None
    (then no eval rows)."""
    import tempfile

    import trl

    from kl_nontarget.integrations.trl import remove_trl_patch

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.SFTConfig(**{**_sft_fields(training), "output_dir": tmp, "report_to": [], "packing": False,
                                "bf16": False, "fp16": False, "eval_strategy": "no"})
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                 processing_class=tokenizer)
        train_rows = _rows(trainer.train_dataset)
        eval_rows = None if evaluation is None else _rows(trainer.eval_dataset)
        # SFTTrainer patched the model's forward with its chunked LM head; the experiments train the plain model.
        remove_trl_patch(model)
    if not train_rows or eval_rows == []:
        raise InputError("no supervised tokens left after tokenization in the " +
                         ("training" if not train_rows else "evaluation") + " data (check max_length and the columns)")
    return train_rows, eval_rows or []


def _sft_fields(training) -> dict:
    import dataclasses

    import trl

    names = {f.name for f in dataclasses.fields(trl.SFTConfig) if f.init}
    keep = ("max_length", "dataset_text_field", "completion_only_loss", "assistant_only_loss", "chat_template_path",
            "eos_token", "pad_token", "truncation_mode", "dataset_kwargs", "use_cpu", "seed")
    return {k: getattr(training, k) for k in keep if k in names and hasattr(training, k)}


def train_steps(run: SFTRun, examples: int) -> int:
    """The step count of one training run: `max_steps`, or the epochs' worth of batches."""
    training = run.training
    if training.max_steps is not None and training.max_steps > 0:
        return training.max_steps
    per_epoch = math.ceil(examples / training.per_device_train_batch_size)
    return max(1, math.ceil(per_epoch * training.num_train_epochs))


def command_main(prog: str, arguments: type, body: Callable, argv: list[str] | None = None) -> int:
    """`prog ...` as a command: parse `argv` (default: sys.argv[1:]) with the sft options and the `arguments`
    dataclass, then `body(run, arguments)`; 0 on success, 2 for bad input (one message on stderr)."""
    import sys

    from kl_nontarget.cli.sft import parse_args, run_command

    argv = list(sys.argv[1:] if argv is None else argv)

    def parse_and_run() -> int:
        run = parse_args(argv, extra_types=(arguments,), prog=prog)
        body(run, run.extras[0])
        return 0

    return run_command(prog, parse_and_run)


def one_process(run: SFTRun, prog: str) -> None:
    """InputError for `accelerate launch` options: the experiment commands run in one process."""
    if run.launch_args:
        raise InputError(f"{prog} runs in one process; unknown option(s): {' '.join(run.launch_args)}")
