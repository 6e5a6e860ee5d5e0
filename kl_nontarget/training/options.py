"""`RegularizerOptions`: the one typed, frozen set of regularizer options, validated once.

The trainers, the `compute_loss_func` hook and (through their config classes) the command line all hold one of these.
To add an option, add a field with its default and its check in `__post_init__`; everything that holds a
`RegularizerOptions` then carries it (`options.replace(field=value)` derives a checked copy, `from_object` reads the
fields from a config object). `UsesRegularizerOptions` gives the holders attribute access (`trainer.kl_weight`); a new
field that holders should expose as an attribute gets a property there.

This module imports nothing heavy (no torch, no transformers): the config classes and the command line read it early.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from numbers import Real
from typing import Literal, Union

from kl_nontarget.ops.checks import check_regularizer_options

FUSED_LINEAR_OPTIONS = (True, False, "auto")

KLDirection = Literal["forward", "reverse"]
FusedLinear = Union[bool, Literal["auto"]]
PrecomputeBase = Union[bool, Literal["auto"]]


def check_kl_target(kl_target) -> None:
    """ValueError unless `kl_target` is None or a finite number > 0."""
    if kl_target is None:
        return
    if isinstance(kl_target, bool) or not isinstance(kl_target, Real) or not math.isfinite(kl_target) \
            or kl_target <= 0:
        raise ValueError("kl_target must be a finite number > 0 (the non-target KL per token to aim for) or None, "
                         f"got {kl_target!r}")


def _check_true_false_auto(name, value) -> None:
    """ValueError unless `value` is True, False or "auto" (not 1, 0 or another string)."""
    if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")


def check_fused_linear(fused_linear) -> None:
    """ValueError unless `fused_linear` is True, False or "auto"."""
    _check_true_false_auto("fused_linear", fused_linear)


def check_precompute_base(precompute_base, base_cache_dir) -> None:
    """ValueError/TypeError unless `precompute_base` is True, False or "auto" and `base_cache_dir` a path or None."""
    _check_true_false_auto("precompute_base", precompute_base)
    if base_cache_dir is not None and not isinstance(base_cache_dir, (str, os.PathLike)):
        raise TypeError(f"base_cache_dir must be a path or None, got {type(base_cache_dir).__name__}")


@dataclass(frozen=True)
class RegularizerOptions:
    """Options of the non-target KL regularizer shared by the trainers and the `compute_loss_func` hook.

    Args:
        kl_weight: weight of the non-target KL (>= 0; 0 gives plain cross-entropy).
        temperature: temperature of both non-target distributions (> 0; the KL is scaled by T^2).
        kl_direction: "forward" for KL(base || adapted), "reverse" for KL(adapted || base).
        fused_linear: "auto", True or False: whether the loss is computed from final hidden states and the LM head
            (no N x V logits) when the model qualifies; see `kl_nontarget.NonTargetKLTrainer`.
        precompute_base: False, True or "auto": compute the base model's final hidden states at the supervised
            positions once before training, store them on disk and reuse them at every step, epoch and later run on
            the same model and data (trainers only, fused-linear path only; see `kl_nontarget.training.base_cache`).
            True refuses to train when the cache cannot apply; "auto" warns and runs the base pass at every step.
        base_cache_dir: folder of those caches (default: `base_hidden` in `$KL_NONTARGET_CACHE`, else
            in `~/.cache/kl-nontarget`).
        kl_target: None (default) keeps `kl_weight` fixed. A number > 0 makes the weight adaptive: it starts at
            `kl_weight` (which must then be > 0) and is steered after every step so that the non-target KL per token
            tracks `kl_target` (`kl_nontarget.training.adaptive_weight`).

    Raises TypeError/ValueError at construction for a bad value; numbers are stored as floats.
    """

    kl_weight: float = 1.0
    temperature: float = 1.0
    kl_direction: KLDirection = "forward"
    fused_linear: FusedLinear = "auto"
    precompute_base: PrecomputeBase = False
    base_cache_dir: str | None = None
    kl_target: float | None = None

    def __post_init__(self):
        check_fused_linear(self.fused_linear)
        check_precompute_base(self.precompute_base, self.base_cache_dir)
        if self.base_cache_dir is not None:
            object.__setattr__(self, "base_cache_dir", os.fspath(self.base_cache_dir))
        check_regularizer_options(self.kl_weight, self.temperature, self.kl_direction)
        check_kl_target(self.kl_target)
        if self.kl_target is not None:
            if not self.kl_weight > 0:
                raise ValueError("kl_target makes kl_weight adaptive by multiplying it at every step: start it above 0 "
                                 f"(got kl_weight={self.kl_weight!r})")
            object.__setattr__(self, "kl_target", float(self.kl_target))
        # Normalised once here, so every consumer sees plain floats (ints and numpy scalars are accepted above).
        object.__setattr__(self, "kl_weight", float(self.kl_weight))
        object.__setattr__(self, "temperature", float(self.temperature))

    @property
    def reverse(self) -> bool:
        """Whether the KL is KL(adapted || base)."""
        return self.kl_direction == "reverse"

    def loss_kwargs(self) -> dict:
        """The keywords of `nontarget_kl_loss` / `nontarget_kl_linear_loss` these options set."""
        return {"kl_weight": self.kl_weight, "temperature": self.temperature, "kl_direction": self.kl_direction}

    def replace(self, **changes) -> RegularizerOptions:
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_object(cls, source, **overrides) -> RegularizerOptions:
        """Options read from the attributes of `source` named like the fields; fields `source` lacks keep their
        defaults, `overrides` win. A source with a `regularizer_options()` method (the config classes of
        `kl_nontarget.training.config`, whose fields are named apart from TRL's, e.g. `kl_temperature`) is asked
        instead."""
        if callable(getattr(source, "regularizer_options", None)):
            return source.regularizer_options().replace(**overrides)
        values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if hasattr(source, f.name)}
        return cls(**{**values, **overrides})


class UsesRegularizerOptions:
    """Attribute access (`obj.kl_weight`, ...) to the `RegularizerOptions` held as `self.options`.

    Assigning an attribute (`trainer.kl_weight = 0.5`) replaces `self.options` with a checked copy, so the options
    stay one frozen, valid object (starting from the defaults when none is held yet).
    """

    options: RegularizerOptions

    def _replace_options(self, **changes) -> None:
        try:
            current = self.options
        except AttributeError:  # none held yet
            current = None
        self.options = (current if current is not None else RegularizerOptions()).replace(**changes)

    @property
    def kl_weight(self) -> float:
        return self.options.kl_weight

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        self._replace_options(kl_weight=value)

    @property
    def temperature(self) -> float:
        return self.options.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._replace_options(temperature=value)

    @property
    def kl_direction(self) -> str:
        return self.options.kl_direction

    @kl_direction.setter
    def kl_direction(self, value: str) -> None:
        self._replace_options(kl_direction=value)

    @property
    def fused_linear(self) -> FusedLinear:
        return self.options.fused_linear

    @fused_linear.setter
    def fused_linear(self, value: FusedLinear) -> None:
        self._replace_options(fused_linear=value)

    @property
    def precompute_base(self) -> PrecomputeBase:
        return self.options.precompute_base

    @precompute_base.setter
    def precompute_base(self, value: PrecomputeBase) -> None:
        self._replace_options(precompute_base=value)

    @property
    def kl_target(self) -> float | None:
        return self.options.kl_target

    @kl_target.setter
    def kl_target(self, value: float | None) -> None:
        self._replace_options(kl_target=value)


def options_from(options: RegularizerOptions | None = None, **keywords) -> RegularizerOptions:
    """`options` (a `RegularizerOptions`), or one built from the loose `keywords` (its field names).

    The trainers and the hook accept either form: `options=RegularizerOptions(...)` or `kl_weight=..., ...`. With
    `options`, keywords must be left at their defaults (ValueError otherwise: which value would win is unclear).
    """
    if options is None:
        return RegularizerOptions(**keywords)
    if not isinstance(options, RegularizerOptions):
        raise TypeError(f"options must be a RegularizerOptions, got {type(options).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(RegularizerOptions)}
    changed = sorted(k for k, v in keywords.items() if k in defaults and v is not defaults[k] and v != defaults[k])
    if changed:
        raise ValueError(f"pass either options= or {', '.join(changed)}, not both")
    return options
