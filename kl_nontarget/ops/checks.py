"""The loss options' checks, shared by the two losses (`logits_loss`, `linear_loss`) and by
`kl_nontarget.training.options.RegularizerOptions`: kl_weight, temperature and kl_direction, and positive numbers.

Imports nothing heavy: the bottom of the package (docs/design.md, "Architecture").
"""

from __future__ import annotations

import math
from numbers import Real

DIRECTIONS = ("forward", "reverse")


def check_regularizer_options(kl_weight, temperature, kl_direction) -> None:
    """TypeError/ValueError for a bad kl_weight, temperature or kl_direction (the losses and the trainers)."""
    for name, value in (("kl_weight", kl_weight), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if kl_direction not in DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {DIRECTIONS}, got {kl_direction!r}")


def is_positive_number(value) -> bool:
    """Whether `value` is a finite real number > 0 (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
