"""`kl-nontarget sft`: `trl sft` with the non-target KL.

The same parser as TRL's `sft` script (`TrlParser` over script arguments, the SFT config, `ModelConfig` and
`DatasetMixtureConfig`), with `NonTargetKLSFTConfig` in place of `SFTConfig`, so `--config file.yaml` and every
`trl sft` flag work (`accelerate launch` options such as `--num_processes` relaunch the command under accelerate, as
`trl sft` does: `sft_launch.py`), plus the regularizer's (`--kl_weight`, `--kl_temperature`, `--kl_direction`,
`--kl_fused_linear`, `--ref_model_name_or_path`, `--ref_model_init_kwargs`) and `--eval_dataset`. Differences from
`trl sft`: LoRA is on by default (`--use_peft false` is full fine-tuning and needs `--ref_model_name_or_path`);
models and datasets may also be local files (`sft_data.py`); with neither a model nor a dataset it trains the demo's
self-made base model on the demo's `shifted` task; bad input stops with one message and exit code 2 before anything
is written to the output folder; a summary is printed at the end.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from kl_nontarget.cli.sft_data import InputError, default_task, load_datasets, model_forms, resolve_model_path
from kl_nontarget.cli.sft_launch import already_launched, launch_arguments, relaunch
from kl_nontarget.integrations.trl import NonTargetKLSFTConfig, NonTargetKLSFTTrainer

T = TypeVar("T")

PROG = "kl-nontarget sft"
# The embedded default trains a toy model: TRL's default learning rate (2e-5) would not move it in a short run.
DEFAULT_TASK_LEARNING_RATE = 1e-2


@dataclass
class SFTScriptArguments(ScriptArguments):
    """TRL's script arguments and `eval_dataset`."""

    eval_dataset: str | None = field(default=None, metadata={
        "help": "A separate evaluation dataset: a .jsonl/.json/.parquet/.csv file, a folder or a hub name (its "
                "dataset_test_split if it has one, else its train split). Default: the dataset_test_split of the "
                "training data when eval_strategy is not 'no'. Given with eval_strategy 'no', it is evaluated once "
                "at the end."})


@dataclass
class SFTModelConfig(ModelConfig):
    """TRL's `ModelConfig` with LoRA on by default."""

    use_peft: bool = field(default=True, metadata={
        "help": "Train a LoRA adapter (default: true). false: full fine-tuning, which needs "
                "--ref_model_name_or_path (a frozen copy of the base for the KL)."})


class _UsageError(Exception):
    pass


class SFTParser(TrlParser):
    """TrlParser whose errors raise (one line, no usage dump of several hundred options), and which records the keys
    of the config file."""

    config_keys: frozenset = frozenset()

    def error(self, message):
        raise _UsageError(message)

    def set_defaults_with_config(self, **kwargs):
        self.config_keys = frozenset(kwargs)
        return super().set_defaults_with_config(**kwargs)


def make_parser(extra_types: tuple = (), prog: str = PROG, description: str | None = None) -> SFTParser:
    """The parser of `kl-nontarget sft`; `extra_types`: more dataclasses (`kl-nontarget sweep` adds its own)."""
    description = description or ("Supervised fine-tuning with the non-target KL regularizer: `trl sft` plus "
                                  "--kl_weight and friends. Takes --config FILE.yaml like `trl sft`.")
    return SFTParser((SFTScriptArguments, NonTargetKLSFTConfig, SFTModelConfig, DatasetMixtureConfig, *extra_types),
                     prog=prog, description=description)


@dataclass
class SFTRun:
    """The parsed arguments of one `kl-nontarget sft` call."""

    script: SFTScriptArguments
    training: NonTargetKLSFTConfig
    model: SFTModelConfig
    mixture: DatasetMixtureConfig
    given: set  # field names set explicitly (command line or config file)
    launch_args: list = field(default_factory=list)  # `accelerate launch` options (config file and command line)
    launch_cli: list = field(default_factory=list)  # those given on the command line, as written there
    extras: tuple = ()  # instances of make_parser's extra_types


def parse_args(argv: list[str], extra_types: tuple = (), prog: str = PROG) -> SFTRun:
    """Parse a command line (with `--config`); InputError for unknown options and bad values."""
    parser = make_parser(extra_types, prog)
    config_path = None
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise InputError("--config needs a file name")
        config_path = argv[position + 1]
        if not Path(config_path).is_file():
            raise InputError(f"no such config file: {config_path}")
    try:
        *parsed, config_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except _UsageError as err:
        raise InputError(str(err)) from None
    except (TypeError, ValueError) as err:  # a dataclass refused a value in its __post_init__
        raise InputError(str(err)) from None
    except Exception as err:  # yaml's errors, without importing yaml here
        if type(err).__module__.startswith("yaml"):
            raise InputError(f"cannot read {config_path}: {err}") from None
        raise
    # What no dataclass took must be `accelerate launch`'s (as with `trl sft`): the run is then relaunched under it.
    launch = launch_arguments(config_rest, cli_rest, config_path, known=[a.dest for a in parser._actions])
    flags = {a.split("=", 1)[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
    return SFTRun(*parsed[:4], given=flags | set(parser.config_keys), launch_args=launch, launch_cli=cli_rest,
                  extras=tuple(parsed[4:]))


def has_data(run: SFTRun) -> bool:
    """Whether a dataset was given (--dataset_name or `datasets:` in the config file)."""
    return bool(run.script.dataset_name or run.mixture.datasets)


def demo_task(run: SFTRun, prog: str, log=print):
    """(model path, train, eval) of the embedded demo task, for a run given neither a model nor data; the toy model's
    learning rate unless --learning_rate was given."""
    log(f"{prog}: no model and no dataset given: the demo's base model on its 'shifted' task")
    model_path, train, evaluation = default_task(log=log)
    if "learning_rate" not in run.given:
        run.training.learning_rate = DEFAULT_TASK_LEARNING_RATE
        log(f"{prog}: learning_rate {DEFAULT_TASK_LEARNING_RATE:g} for the toy model (--learning_rate to change)")
    return model_path, train, evaluation


def prepare(run: SFTRun, log=print):
    """Models resolved and datasets loaded and checked: (model path, train dataset, eval dataset or None).

    Raises InputError for bad input; writes nothing to the output folder.
    """
    script, training, model_args = run.script, run.training, run.model
    if model_args.model_name_or_path is None and not has_data(run):
        if script.eval_dataset is not None:
            raise InputError("--eval_dataset needs --model_name_or_path and --dataset_name (without them the demo's "
                             "task runs, evaluated on its own validation split with --eval_strategy steps)")
        model_path, train, evaluation = demo_task(run, PROG, log)
        if training.eval_strategy == "no":
            evaluation = None
    elif model_args.model_name_or_path is None:
        raise InputError(f"a dataset is given but no model: pass --model_name_or_path ({model_forms()})")
    elif not has_data(run):
        raise InputError("no dataset: pass --dataset_name (a hub name, a folder, or a .jsonl/.json/.parquet/.csv "
                         "file), or `datasets:` in the config file")
    else:
        model_path = resolve_model_path(model_args.model_name_or_path, log=log)
        train, evaluation = load_datasets(script, run.mixture, text_field=training.dataset_text_field,
                                          want_eval=training.eval_strategy != "no")
    if not model_args.use_peft and training.ref_model_name_or_path is None:
        raise InputError("full fine-tuning (use_peft false) needs a frozen reference for the KL: pass "
                         "--ref_model_name_or_path (usually the same model as --model_name_or_path)")
    if training.ref_model_name_or_path is not None:
        training.ref_model_name_or_path = resolve_model_path(training.ref_model_name_or_path, log=log)
    return model_path, train, evaluation


def model_init_kwargs(run: SFTRun) -> dict:
    """from_pretrained keywords, as TRL's sft script builds them (the config's model_init_kwargs win)."""
    model_args, training = run.model, run.training
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=training.trust_remote_code,
                  attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    kwargs.update(training.model_init_kwargs or {})
    return kwargs


def train(run: SFTRun, log=print) -> NonTargetKLSFTTrainer:
    """Prepare, build the trainer, train, save; returns the trainer."""
    model_path, train_dataset, eval_dataset = prepare(run, log=log)
    training = run.training
    training.model_init_kwargs = model_init_kwargs(run)
    output_dir = Path(training.output_dir)
    existed = output_dir.exists()
    try:
        # SFTTrainer tokenizes the evaluation set here even with eval_strategy "no" (then evaluated once, below).
        trainer = NonTargetKLSFTTrainer(
            model=model_path, args=training, train_dataset=train_dataset, eval_dataset=eval_dataset,
            peft_config=get_peft_config(run.model), quantization_config=get_quantization_config(run.model))
    except (OSError, ValueError, TypeError) as err:
        # Loading the model, its tokenizer or preparing the data failed: leave no empty output folder behind.
        if not existed and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise InputError(str(err)) from err
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    if eval_dataset is not None and training.eval_strategy == "no":
        trainer.evaluate()
    trainer.save_model(training.output_dir)
    trainer.save_state()  # trainer_state.json: the log history (ce_loss, nontarget_kl, ...) next to the adapter
    if training.push_to_hub:
        trainer.push_to_hub(dataset_name=run.script.dataset_name)
    return trainer


def summary(trainer, run: SFTRun) -> str:
    """The lines printed at the end: steps, the last logged ce_loss and nontarget_kl, where the result is."""
    options = trainer.options
    history = trainer.state.log_history
    lines = [f"{PROG}: {trainer.state.global_step} steps with kl_weight {options.kl_weight:g}, kl_temperature "
             f"{options.temperature:g}, kl_direction {options.kl_direction}"]
    last = next((h for h in reversed(history) if "ce_loss" in h), None)
    if last is not None:
        lines.append(f"  last logged (step {last.get('step')}): loss {last.get('loss', float('nan')):.4f}, "
                     f"ce_loss {last['ce_loss']:.4f}, nontarget_kl {last['nontarget_kl']:.4f}")
    evaluated = next((h for h in reversed(history) if "eval_ce_loss" in h), None)
    if evaluated is not None:
        lines.append(f"  evaluation (step {evaluated.get('step')}): eval_ce_loss {evaluated['eval_ce_loss']:.4f}, "
                     f"eval_nontarget_kl {evaluated['eval_nontarget_kl']:.4f}")
    out = run.training.output_dir
    if run.model.use_peft:
        lines += [f"  adapter saved to {out} (load it with peft.AutoPeftModelForCausalLM.from_pretrained)",
                  "  merge it into the base model:",
                  f"    python -c \"from peft import AutoPeftModelForCausalLM; AutoPeftModelForCausalLM."
                  f"from_pretrained('{out}').merge_and_unload().save_pretrained('{os.path.join(out, 'merged')}')\"",
                  f"  forgetting on your own text: kl-nontarget eval --adapter {out} --data FILE.jsonl"]
    else:
        lines.append(f"  model saved to {out}")
    return "\n".join(lines)


def run_command(prog: str, body: Callable[[], T]) -> T | int:
    """`body()` as a command runs it: bad input (`InputError`) prints one message on stderr and gives exit code 2,
    `--help` (SystemExit) its code. `kl-nontarget sft` and `kl-nontarget sweep` both run through here."""
    try:
        with warnings.catch_warnings():
            # TRL's configs turn on gradient checkpointing, which transformers 5.x renames and warns about on every
            # run: noise the user cannot act on.
            warnings.filterwarnings("ignore", message=r".*gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            return body()
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)


def _parse_and_train(argv: list[str]) -> tuple[Any, SFTRun] | int:
    """(trainer, run) once trained, or the exit code of a relaunch under `accelerate launch`."""
    run = parse_args(argv)
    if run.launch_args and not already_launched():
        return relaunch(argv, run.launch_args, run.launch_cli)
    return train(run), run


def main(argv: list[str] | None = None) -> int:
    """`kl-nontarget sft ...`: 0 on success, 2 for bad input (one message on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    result = run_command(PROG, lambda: _parse_and_train(argv))
    if isinstance(result, int):
        return result
    trainer, run = result
    if trainer.is_world_process_zero():
        print(summary(trainer, run))
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, release the process group
        trainer.end()
    return 0
