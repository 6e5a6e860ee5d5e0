"""What the two autograd Functions (`logits_loss.py`, logits in; `linear_loss.py`, hidden states in) share.

- the checks of the loss options and of the label range;
- backend resolution (`resolve_backend`, `rows_function`);
- `RowParams`: the one params object of a loss call (row-function options, reduction, its 1/D scale);
- the reductions (`reduction_scale`, `RowParams.reduce`);
- the backward pass: gradients are computed in the forward, already scaled by 1/D, so the backward only multiplies
  them by the incoming gradient, in place unless the graph is kept (`scale_saved_grads`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kl_nontarget.ops.checks import check_regularizer_options

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_loss_options(*, kl_weight, temperature, reduction, kl_direction, backend, num_items_in_batch) -> None:
    """Checks of the keyword options shared by `nontarget_kl_loss` and `nontarget_kl_linear_loss`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_regularizer_options(kl_weight, temperature, kl_direction)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a number or a one-element tensor, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
        elif not isinstance(num_items_in_batch, (int, float)) or isinstance(num_items_in_batch, bool):
            raise TypeError(f"num_items_in_batch must be an int or a 0-dim tensor, got "
                            f"{type(num_items_in_batch).__name__}")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """ValueError naming the first label that is neither a vocabulary id nor `ignore_index`."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        raise ValueError(f"label {value} is out of range for a vocabulary of {vocab_size} "
                         f"(valid ids are 0..{vocab_size - 1}, or ignore_index={ignore_index})")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"triton" or "torch" for `backend` on `device` ("auto": Triton on CUDA); ValueError when it cannot run."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                             "before triton is imported, or use backend='torch'")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA tensors, got device {device}")
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'") from err
    return backend


def rows_function(backend: str) -> Callable:
    """The `nontarget_ce_rows` of a resolved backend (imported on first use: Triton only when asked for)."""
    if backend == "triton":
        from kl_nontarget.ops import triton_rows
        return triton_rows.nontarget_ce_rows
    from kl_nontarget.ops import torch_rows
    return torch_rows.nontarget_ce_rows


def reduction_scale(labels1d, *, reduction, ignore_index, num_items_in_batch, dtype):
    """0-dim factor applied to the summed loss: 1 / D for "mean" (D = num_items_in_batch or the number of valid
    labels, at least 1), else 1."""
    device = labels1d.device
    if reduction == "mean":
        if num_items_in_batch is None:
            denom = (labels1d != ignore_index).sum()
        else:
            denom = torch.as_tensor(num_items_in_batch, device=device).reshape(())
        return 1.0 / denom.to(device=device, dtype=dtype).clamp_min(1)
    return torch.ones((), dtype=dtype, device=device)


@dataclass(frozen=True)
class RowParams:
    """Everything a loss call passes to its autograd Function besides the tensors that take a gradient.

    `rows_fn` is the backend's `nontarget_ce_rows`; `scale` the 0-dim reduction factor (`reduction_scale`);
    `label_shape` the shape of the "none" reduction's output.
    """

    rows_fn: Callable
    kl_weight: float
    temperature: float
    ignore_index: int
    reverse: bool
    reduction: str
    scale: torch.Tensor
    label_shape: torch.Size

    @classmethod
    def build(cls, labels: torch.Tensor, labels1d: torch.Tensor, *, backend: str, kl_weight, temperature,
              ignore_index, reduction, kl_direction, num_items_in_batch, input_dtype: torch.dtype) -> RowParams:
        """Params of one call: `backend` already resolved, `labels1d` the flattened int64 labels, `input_dtype` the
        logits' (or hidden states') dtype: the statistics are float64 for float64 inputs, else float32."""
        stat_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
        scale = reduction_scale(labels1d, reduction=reduction, ignore_index=ignore_index,
                                num_items_in_batch=num_items_in_batch, dtype=stat_dtype)
        return cls(rows_fn=rows_function(backend), kl_weight=kl_weight, temperature=temperature,
                   ignore_index=ignore_index, reverse=kl_direction == "reverse", reduction=reduction, scale=scale,
                   label_shape=labels.shape)

    @property
    def stat_dtype(self) -> torch.dtype:
        """The dtype of the per-row statistics and the reductions (that of `scale`)."""
        return self.scale.dtype

    @property
    def kl_factor(self):
        """kl_weight * T^2, the factor of the KL in the loss."""
        return self.kl_weight * self.temperature ** 2

    @property
    def grad_scale(self) -> torch.Tensor:
        """Factor of the row gradients: 1/D, or 1 for "none" (the backward multiplies by each row's gradient)."""
        return torch.ones_like(self.scale) if self.reduction == "none" else self.scale

    def rows(self, logits, ref_logits, labels, *, grad_scale, compute_grad, scratch=False, out=None):
        """(ce, kl, grad) of the backend's row function on one block of rows; `scratch=True`: the caller's
        temporaries `logits` and `ref_logits` may be overwritten; `out`: a buffer like `logits` for the gradient."""
        return self.rows_fn(logits, ref_logits, labels, grad_scale=grad_scale, compute_grad=compute_grad,
                            kl_weight=self.kl_weight, temperature=self.temperature, ignore_index=self.ignore_index,
                            reverse=self.reverse, scratch=scratch, out=out)

    def reduce(self, ce, kl):
        """(loss, ce, kl) reduced from per-row values: scaled sums, or per position for "none"."""
        kl_factor = self.kl_factor
        if self.reduction == "none":
            shape = self.label_shape
            return (ce + kl_factor * kl).reshape(shape), ce.reshape(shape), kl.reshape(shape)
        ce_sum, kl_sum = ce.sum(), kl.sum()
        s = self.scale
        return (ce_sum + kl_factor * kl_sum) * s, ce_sum * s, kl_sum * s


def graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True when torch cannot tell."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


def scale_saved_grads(grad_loss: torch.Tensor, grads: tuple, *, keep: bool) -> tuple:
    """The gradients computed in the forward (`None` entries allowed) times the incoming `grad_loss`.

    A per-row `grad_loss` (reduction "none") multiplies each row; a scalar 1 (the common `loss.backward()`) costs
    nothing. Scaled in place (one rounding) unless `keep` (the graph is kept for another backward).
    """
    if grad_loss.dim() > 0:
        factor = grad_loss.reshape(-1, 1)
    elif not bool(grad_loss == 1):
        factor = grad_loss
    else:
        return grads
    return tuple(None if g is None else (g if not keep else g.clone()).mul_(factor) for g in grads)
