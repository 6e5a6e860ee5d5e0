"""`ComponentLog`: the cross-entropy and non-target KL parts of the loss, accumulated for logging.

Training sums each micro-batch's components scaled like the loss the Trainer logs (summed over the micro-batches of a
step, they give that step's value) and reports their mean over the steps of a logging window; evaluation weights
each batch by its size, like `eval_loss`. The trainer gathers the sums across ranks (`NonTargetKLMixin`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

MODES = ("train", "eval")


class ComponentLog:
    """Running sums of `ce` and `kl` (and of their weights) per mode, "train" and "eval"."""

    def __init__(self):
        self._sums = {mode: self._zero() for mode in MODES}
        self.window_start: int | None = None  # global step at which the training window opened

    @staticmethod
    def _zero() -> dict:
        return {"ce": 0.0, "kl": 0.0, "weight": 0.0}

    def sums(self, mode: str) -> dict:
        """A copy of the sums of `mode`: {"ce", "kl", "weight"} (tensors or floats)."""
        return dict(self._sums[mode])

    def reset(self, mode: str) -> None:
        """Drop the sums of `mode` (and, for "train", the open window)."""
        self._sums[mode] = self._zero()
        if mode == "train":
            self.window_start = None

    def add(self, mode: str, ce: torch.Tensor, kl: torch.Tensor, weight: float, global_step: int = 0) -> None:
        """Add one batch's components, each multiplied by `weight`."""
        if mode == "train" and self.window_start is None:
            self.window_start = global_step
        sums = self._sums[mode]
        sums["ce"] = sums["ce"] + ce.detach().float() * weight
        sums["kl"] = sums["kl"] + kl.detach().float() * weight
        sums["weight"] += weight

    def window_steps(self, global_step: int) -> int:
        """Optimizer steps since the training window opened (0 when none is open)."""
        return 0 if self.window_start is None else global_step - self.window_start


Gather = Callable[[object], torch.Tensor]  # a value -> a 1-D tensor of its values on every rank


def train_logs(log: ComponentLog, global_step: int, gather: Gather, name: str = "nontarget_kl") -> dict:
    """`{"ce_loss", name}`: the training window's means (over its optimizer steps and the ranks), and close the
    window; empty when no window is open."""
    steps = log.window_steps(global_step)
    if steps <= 0:
        return {}
    sums = log.sums("train")
    values = {"ce_loss": gather(sums["ce"]).mean().item() / steps, name: gather(sums["kl"]).mean().item() / steps}
    log.reset("train")
    return values


def metric_key_prefix(evaluation_loop: Callable, args: tuple, kwargs: dict) -> str:
    """The `metric_key_prefix` of a call `evaluation_loop(*args, **kwargs)` of a Trainer (bound method), "eval" when
    not given."""
    bound = inspect.signature(evaluation_loop).bind_partial(*args, **kwargs)
    return bound.arguments.get("metric_key_prefix", "eval")


def eval_metrics(log: ComponentLog, gather: Gather, prefix: str = "eval", name: str = "nontarget_kl") -> dict:
    """`{f"{prefix}_ce_loss", f"{prefix}_{name}"}`: the evaluation's batch-size weighted means over the ranks (empty
    when nothing was recorded); the evaluation sums are reset."""
    sums = log.sums("eval")
    log.reset("eval")
    total = gather(sums["weight"]).sum().item()
    if total <= 0:
        return {}
    return {f"{prefix}_ce_loss": gather(sums["ce"]).sum().item() / total,
            f"{prefix}_{name}": gather(sums["kl"]).sum().item() / total}


def accelerator_gather(accelerator, device) -> Gather:
    """A `Gather` through an accelerate `Accelerator` (no communication in a single process)."""

    def gather(value):
        value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(1)
        return accelerator.gather(value) if accelerator.num_processes > 1 else value

    return gather
