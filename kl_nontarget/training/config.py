"""Config dataclasses: the regularizer's options as fields of a `TrainingArguments` (or, in
`kl_nontarget.integrations.trl`, of an `SFTConfig`), so they can come from a YAML file or the command line, are saved in
`training_args.bin` and appear in `args.to_dict()` (the run config W&B and TensorBoard record).

`NonTargetKLArguments` defines the fields once; `NonTargetKLConfig` (here) and
`kl_nontarget.integrations.trl.NonTargetKLSFTConfig` inherit them. The field names avoid every field of
TrainingArguments, TRL's SFTConfig, GKDConfig (which has `temperature`), DPOConfig, ModelConfig and ScriptArguments, so
the classes combine in one parser with TRL's:

    config field             RegularizerOptions / loss keyword
    kl_weight                kl_weight
    kl_temperature           temperature
    kl_direction             kl_direction
    kl_fused_linear          fused_linear
    kl_target                kl_target
    precompute_base          precompute_base
    base_cache_dir           base_cache_dir
    ref_model_name_or_path   (the trainers' ref_model=, loaded from this path)
    ref_model_init_kwargs    (from_pretrained keywords of that reference)
    ref_adapter_name         (the trainers' ref_adapter_name=: an adapter of the PeftModel as the reference)

`OPTION_OF_FIELD` is that mapping in code, the one place that knows it: a field of `NonTargetKLArguments` stands for
the `RegularizerOptions` field of the same name unless `RENAMED` says otherwise. To add a regularizer option, add it
to `RegularizerOptions` (options.py) and a field of the same name, default and help to `NonTargetKLArguments`;
validation, the trainers, `to_dict()`/`training_args.bin` and the command line then follow. A field that is not an
option (like `ref_model_name_or_path`) is just a field; whoever reads it decides what it means.

This module imports transformers' `TrainingArguments` but not TRL.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from kl_nontarget.training.options import RegularizerOptions

__all__ = ["OPTION_OF_FIELD", "RENAMED", "NonTargetKLArguments", "NonTargetKLConfig", "merge_options",
           "reference_model_spec"]

# Config fields named apart from their RegularizerOptions field: `temperature` is the sampling temperature of TRL's
# GKD config (and of generation configs), and a bare `fused_linear` would not say what it belongs to.
RENAMED = {"kl_temperature": "temperature", "kl_fused_linear": "fused_linear"}

# Spellings of kl_fused_linear accepted from a command line or a YAML string (as transformers' parser reads bools).
_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")


def _fused_linear_value(value):
    """True, False or "auto" from a bool or a string such as "auto", "true", "no" (anything else is returned as is,
    for `RegularizerOptions` to refuse with its message)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered == "auto":
            return "auto"
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    return value


@dataclass
class NonTargetKLArguments:
    """The non-target KL's fields, shared by `NonTargetKLConfig` and
    `kl_nontarget.integrations.trl.NonTargetKLSFTConfig`.

    Args:
        kl_weight: weight of the non-target KL (>= 0; 0 gives plain cross-entropy).
        kl_temperature: temperature of both non-target distributions (> 0; the KL is scaled by T^2); the loss's
            `temperature` (named so as not to clash with the sampling `temperature` of TRL's configs).
        kl_direction: "forward" for KL(base || adapted), "reverse" for KL(adapted || base).
        kl_fused_linear: "auto", True or False (the trainers' `fused_linear`); the strings "true"/"false" (and
            yes/no, 1/0) are read as booleans, so YAML and command lines may write either.
        kl_target: None for a fixed `kl_weight`; a number > 0 makes the weight adaptive
            (`kl_nontarget.training.adaptive_weight`).
        precompute_base: "false", "true" or "auto" (the trainers' `precompute_base`, same spellings as
            kl_fused_linear); base_cache_dir: where its caches live.
        ref_model_name_or_path: a frozen reference model for the base distribution, loaded by the trainer with
            `AutoModelForCausalLM.from_pretrained` (the trainers' `ref_model=`): needed for full fine-tuning. None:
            the PEFT model with its adapters disabled (or, for inits that rewrite the base weights such as PiSSA, a
            snapshot of the initial adapter).
        ref_adapter_name: the trainers' `ref_adapter_name`: an adapter of the PeftModel used as the reference.
        ref_model_init_kwargs: `from_pretrained` keywords for that reference (a dict, or a JSON string on a command
            line); None: the config's `model_init_kwargs` when it has them (SFTConfig), else {}. `dtype` may be a
            string ("float32", "bfloat16", "float16", "auto"); it defaults to float32.

    Validated in `__post_init__` (the same TypeError/ValueError as `RegularizerOptions`, prefixed with the field's
    name where it differs from the option's); `regularizer_options()` gives the `RegularizerOptions`.
    """

    kl_weight: float = field(default=1.0, metadata={
        "help": "Weight of the non-target KL added to the cross-entropy (>= 0; 0 gives plain cross-entropy)."})
    kl_temperature: float = field(default=1.0, metadata={
        "help": "Temperature of the base and adapted non-target distributions (> 0); the KL is scaled by T^2."})
    kl_direction: Literal["forward", "reverse"] = field(default="forward", metadata={
        "help": "'forward': KL(base || adapted); 'reverse': KL(adapted || base)."})
    kl_fused_linear: str = field(default="auto", metadata={
        "help": "Compute the loss from the final hidden states and the LM head, without the N x V logits: 'auto' "
                "(when the model qualifies), 'true' (required) or 'false'."})
    kl_target: float | None = field(default=None, metadata={
        "help": "Adaptive kl_weight: the non-target KL per token to aim for (> 0). The weight starts at kl_weight and "
                "is steered after every optimizer step. Default: a fixed kl_weight."})
    precompute_base: str = field(default="false", metadata={
        "help": "Compute the base model's final hidden states at the supervised positions once, store them on disk "
                "and reuse them at every step, epoch and later run on the same base and data: 'false', 'true' "
                "(required) or 'auto' (falls back to a base pass per step where the cache cannot apply)."})
    base_cache_dir: str | None = field(default=None, metadata={
        "help": "Folder of the precompute_base caches. Default: base_hidden in $KL_NONTARGET_CACHE, else in "
                "~/.cache/kl-nontarget."})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "A frozen reference model (folder or hub name) for the base distribution; needed for full "
                "fine-tuning. Default: the PEFT model with its adapters disabled."})
    ref_model_init_kwargs: dict | str | None = field(default=None, metadata={
        "help": "from_pretrained keywords of the reference model, as a dict or a JSON string. Default: "
                "model_init_kwargs when the config has them."})
    ref_adapter_name: str | None = field(default=None, metadata={
        "help": "An adapter loaded in the PeftModel (frozen during training) whose outputs are the reference, "
                "instead of the model with adapters disabled: for continuing from a trained adapter."})

    def __post_init__(self):
        self.check_nontarget_kl_arguments()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def check_nontarget_kl_arguments(self) -> None:
        """Normalise and validate the fields (TypeError/ValueError naming the field)."""
        self.kl_fused_linear = _fused_linear_value(self.kl_fused_linear)
        self.precompute_base = _fused_linear_value(self.precompute_base)  # the same spellings: true/false/auto
        options = self.regularizer_options()
        # Numbers as floats and the rest as RegularizerOptions stores them, so to_dict() and training_args.bin hold
        # exactly the options the trainer will use.
        for name, option in OPTION_OF_FIELD.items():
            setattr(self, name, getattr(options, option))
        if self.ref_model_name_or_path is not None and not isinstance(self.ref_model_name_or_path, str):
            raise TypeError(f"ref_model_name_or_path must be a string, got "
                            f"{type(self.ref_model_name_or_path).__name__}")
        kwargs = self.ref_model_init_kwargs
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"ref_model_init_kwargs must be a JSON object, got {self.ref_model_init_kwargs!r} "
                                 f"({err})") from None
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"ref_model_init_kwargs must be a dict (or a JSON object string), got "
                            f"{type(kwargs).__name__}")
        self.ref_model_init_kwargs = kwargs

    def regularizer_options(self) -> RegularizerOptions:
        """The `RegularizerOptions` these fields set (TypeError/ValueError naming the field for a bad value)."""
        values = {option: getattr(self, name) for name, option in OPTION_OF_FIELD.items()}
        try:
            return RegularizerOptions(**values)
        except (TypeError, ValueError) as err:
            raise type(err)(_with_field_name(str(err))) from None


def _option_of_field() -> dict[str, str]:
    options = {f.name for f in dataclasses.fields(RegularizerOptions)}
    mapping = {}
    for f in dataclasses.fields(NonTargetKLArguments):
        option = RENAMED.get(f.name, f.name)
        if option in options:
            mapping[f.name] = option
    return mapping


# config field -> RegularizerOptions field, and back.
OPTION_OF_FIELD = _option_of_field()
FIELD_OF_OPTION = {option: name for name, option in OPTION_OF_FIELD.items()}


def _with_field_name(message: str) -> str:
    # RegularizerOptions' messages start with the option's name; say which config field that is.
    for option, name in FIELD_OF_OPTION.items():
        if message.startswith(option) and name != option:
            return f"{name}: {message}"
    return message


@dataclass
class NonTargetKLConfig(NonTargetKLArguments, TrainingArguments):
    """`transformers.TrainingArguments` with the non-target KL's options (see `NonTargetKLArguments`).

    `kl_nontarget.NonTargetKLTrainer(args=NonTargetKLConfig(..., kl_weight=0.3))` reads its options from it. For TRL,
    use `kl_nontarget.integrations.trl.NonTargetKLSFTConfig`.
    """


def merge_options(given: RegularizerOptions, args, source: str = "given to the trainer") -> RegularizerOptions:
    """`given` (from a trainer's keywords or `options=`) combined with the options of `args`.

    When `args` is not a `NonTargetKLArguments`, `given` is returned. Otherwise, per option, a value at its default
    counts as not set: the other side's value is taken. The same option set both ways to different values is a
    ValueError naming both (which one should win is unclear).
    """
    if not isinstance(args, NonTargetKLArguments):
        return given
    configured = args.regularizer_options()
    defaults = RegularizerOptions()
    merged, conflicts = {}, []
    for f in dataclasses.fields(RegularizerOptions):
        mine, theirs, default = getattr(given, f.name), getattr(configured, f.name), getattr(defaults, f.name)
        if _same(mine, default):
            merged[f.name] = theirs
        elif _same(theirs, default) or _same(mine, theirs):
            merged[f.name] = mine
        else:
            conflicts.append(f"{f.name}={mine!r} ({source}) but args.{FIELD_OF_OPTION.get(f.name, f.name)}="
                             f"{theirs!r}")
    if conflicts:
        raise ValueError("the regularizer's options are set both in the trainer's arguments and in args, with "
                         "different values: " + "; ".join(conflicts) + ". Set each in one place (or to the same "
                         "value).")
    return RegularizerOptions(**merged)


def _same(a, b) -> bool:
    # True and 1 (or "auto" and a number) are different settings, whatever == says.
    return type(a) is type(b) and a == b


def reference_model_spec(args) -> tuple[str | None, dict | None]:
    """`(ref_model_name_or_path, from_pretrained keywords)` of `args`, or `(None, None)` when it names no reference.

    The keywords are `args.ref_model_init_kwargs`, else a copy of `args.model_init_kwargs` (an SFTConfig's), else {};
    a string `dtype` is turned into the torch dtype ("auto" is kept). The trainer loads the model
    (`reference.load_ref_model`, which takes the trained model's dtype when none is given).
    """
    path = getattr(args, "ref_model_name_or_path", None)
    if path is None:
        return None, None
    import torch

    kwargs = getattr(args, "ref_model_init_kwargs", None)
    if kwargs is None:
        kwargs = getattr(args, "model_init_kwargs", None)
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"ref_model_init_kwargs: unknown dtype {dtype!r} (use float32, bfloat16, float16 or auto)")
        kwargs["dtype"] = getattr(torch, dtype)
    return path, kwargs
