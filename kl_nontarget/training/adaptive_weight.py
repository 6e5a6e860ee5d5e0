"""Adaptive kl_weight: a bounded multiplicative controller that steers the non-target KL towards a target.

Choosing `kl_weight` by hand means guessing how much drift a run may afford. With `kl_target` set, the weight starts
at `kl_weight` and after every optimizer step is multiplied by

    1 + rate * clip(kl / kl_target - 1, -max_error, max_error)

where `kl` is the step's mean non-target KL per supervised token (over the accumulation window and all ranks, the
value logged as `nontarget_kl`). This is the adaptive KL coefficient of Ziegler et al. (2019, "Fine-Tuning Language
Models from Human Preferences"), with their constants as defaults (rate 0.1, error clipped at 0.2): a KL above the
target raises the weight, one below lowers it, by at most 2% per step, so one noisy batch cannot swing it and a
sustained gap moves it by a factor of e in about 50 steps. The weight is kept within [`MIN_WEIGHT`, `MAX_WEIGHT`]
so it can always recover. Every rank computes the same update from the same gathered value.

`AdaptiveKLWeight` is a `TrainerCallback` that holds the current weight; it is saved in the checkpoint's
`trainer_state.json` (as an `ExportableState`), and a resumed run continues from the saved value.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from kl_nontarget.training.options import check_kl_target

MIN_WEIGHT = 1e-4
MAX_WEIGHT = 1e4


def next_weight(weight: float, kl: float, kl_target: float, *, rate: float = 0.1, max_error: float = 0.2) -> float:
    """One controller step: the new weight after a step whose KL was `kl`."""
    if not math.isfinite(kl):
        return weight  # a NaN/inf step says nothing about the drift: keep the weight
    error = min(max(kl / kl_target - 1.0, -max_error), max_error)
    return min(max(weight * (1.0 + rate * error), MIN_WEIGHT), MAX_WEIGHT)


def rank_mean(value: torch.Tensor) -> float:
    """`value` averaged over the ranks of the default process group (itself in a single process)."""
    import torch.distributed as dist

    value = value.detach().float().reshape(1).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


class AdaptiveKLWeight(TrainerCallback, ExportableState):
    """Holds and updates the adaptive kl_weight of a trainer (created by the trainers when `kl_target` is set).

    The trainer reports each micro-batch's KL with `observe`; after each optimizer step (`on_step_end`) the step's KL
    is averaged over ranks and the weight updated with `next_weight`.
    """

    def __init__(self, kl_target: float, kl_weight: float, rate: float = 0.1, max_error: float = 0.2):
        check_kl_target(kl_target)
        if kl_target is None:
            raise ValueError("AdaptiveKLWeight needs a kl_target")
        if not (isinstance(kl_weight, (int, float)) and kl_weight > 0):
            raise ValueError(f"an adaptive kl_weight must start above 0 (it is multiplied at each step), got "
                             f"{kl_weight!r}")
        self.kl_target = float(kl_target)
        self.kl_weight = float(kl_weight)
        self.rate = float(rate)
        self.max_error = float(max_error)
        self._step_kl = None

    def observe(self, kl: torch.Tensor) -> None:
        """Add one micro-batch's KL, scaled so that the sum over a step's micro-batches is the step's mean."""
        kl = kl.detach().float().reshape(())
        self._step_kl = kl if self._step_kl is None else self._step_kl + kl

    def step_kl(self) -> float | None:
        """The KL of the step that just ended, averaged over ranks (None when nothing was observed)."""
        if self._step_kl is None:
            return None
        return rank_mean(self._step_kl)

    def on_step_end(self, args, state, control, **kwargs):
        kl = self.step_kl()
        self._step_kl = None
        if kl is not None:
            self.kl_weight = next_weight(self.kl_weight, kl, self.kl_target, rate=self.rate,
                                         max_error=self.max_error)

    def on_train_begin(self, args, state, control, **kwargs):
        self._step_kl = None
        # Resuming: take the weight saved with the checkpoint (transformers restores callback states itself only
        # with restore_callback_states_from_checkpoint=True, which then rebuilds this callback from `state()`).
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step > 0 else None
        if isinstance(saved, list):
            saved = saved[-1] if saved else None
        if isinstance(saved, dict) and "kl_weight" in saved.get("args", {}):
            self.kl_weight = float(saved["args"]["kl_weight"])

    def state(self) -> dict:
        return {"args": {"kl_target": self.kl_target, "kl_weight": self.kl_weight, "rate": self.rate,
                         "max_error": self.max_error}, "attributes": {}}
