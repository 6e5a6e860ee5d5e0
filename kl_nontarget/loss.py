"""Cross-entropy + non-target KL: input checks, the autograd Function, reductions and backend dispatch.

The math lives in the backends (`triton_impl` on GPU, `torch_impl` on CPU); both return per-row statistics and the
gradient already scaled by 1/D, so the backward pass only multiplies by the incoming gradient when it is not 1.
"""

from __future__ import annotations

import math
import os
from numbers import Real

import torch
from torch import nn

REDUCTIONS = ("mean", "sum", "none")
DIRECTIONS = ("forward", "reverse")
BACKENDS = ("auto", "triton", "torch")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _check_inputs(logits, ref_logits, labels, *, kl_weight, temperature, reduction, kl_direction, backend,
                  num_items_in_batch):
    for name, t in (("logits", logits), ("ref_logits", ref_logits), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if ref_logits.dtype != logits.dtype:
        raise TypeError(f"ref_logits dtype {ref_logits.dtype} does not match logits dtype {logits.dtype}; "
                        "cast one of them so both models' logits share a dtype")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(logits.shape)}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} does not match logits shape "
                         f"{tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the vocabulary "
                         f"dimension, {tuple(logits.shape[:-1])} (labels are not shifted here)")
    if ref_logits.device != logits.device or labels.device != logits.device:
        raise ValueError(f"logits, ref_logits and labels must be on one device, got {logits.device}, "
                         f"{ref_logits.device} and {labels.device}")
    _check_options(kl_weight=kl_weight, temperature=temperature, reduction=reduction,
                   kl_direction=kl_direction, backend=backend, num_items_in_batch=num_items_in_batch)


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


def _check_options(*, kl_weight, temperature, reduction, kl_direction, backend, num_items_in_batch):
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


def _check_label_range(labels, vocab_size, ignore_index):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        raise ValueError(f"label {value} is out of range for a vocabulary of {vocab_size} "
                         f"(valid ids are 0..{vocab_size - 1}, or ignore_index={ignore_index})")


def _resolve_backend(backend, device):
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


def _rows_fn(backend):
    if backend == "triton":
        from kl_nontarget import triton_impl
        return triton_impl.nontarget_ce_rows
    from kl_nontarget import torch_impl
    return torch_impl.nontarget_ce_rows


def _reduction_scale(labels1d, *, reduction, ignore_index, num_items_in_batch, dtype):
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


class _NonTargetCEFunction(torch.autograd.Function):
    """loss = reduce(ce + kl_weight * T^2 * kl); the gradient is computed in the forward by the backend."""

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, grad_scale, rows_fn, opts, reduce):
        ce, kl, grad = rows_fn(logits, ref_logits, labels, grad_scale=grad_scale, compute_grad=True, **opts)
        loss, ce_out, kl_out = reduce(ce, kl)
        ctx.grad = grad
        ctx.per_row = loss.dim() > 0
        ctx.mark_non_differentiable(ce_out, kl_out)
        return loss, ce_out, kl_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad = ctx.grad
        keep = _graph_is_kept()
        if not keep:
            ctx.grad = None  # let the N x V buffer go as soon as the next node has consumed it
        if ctx.per_row:
            factor = grad_loss.reshape(-1, 1)
        elif not bool(grad_loss == 1):
            factor = grad_loss
        else:  # the common case, loss.backward(): no extra pass over N x V
            return grad, None, None, None, None, None, None
        # Scale in place (computed in float32, one rounding) unless the graph is kept for another backward.
        out = grad if not keep else torch.empty_like(grad).copy_(grad)
        return out.mul_(factor), None, None, None, None, None, None


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True when torch cannot tell."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


def nontarget_kl_loss(logits, ref_logits, labels, *, kl_weight=1.0, temperature=1.0, ignore_index=-100,
                      reduction="mean", num_items_in_batch=None, kl_direction="forward", backend="auto",
                      return_components=False):
    """Cross-entropy plus a KL between the base and adapted non-target distributions.

    At every position whose label is not `ignore_index`, the gold token is removed from both next-token
    distributions, the rest renormalised, and `kl_weight * T^2 * KL` added to the ordinary cross-entropy.

    Args:
        logits: (..., V) logits of the model being trained; the only input that receives a gradient.
        ref_logits: (..., V) logits of the base (reference) model, same shape and dtype; treated as constants.
        labels: (...) integer gold ids aligned with the rows (no shifting is done here).
        kl_weight: weight of the KL term (lambda), >= 0.
        temperature: T > 0 applied to both distributions of the KL (the cross-entropy stays at T = 1); the KL is
            scaled by T^2, as in distillation.
        ignore_index: label value of positions that contribute nothing.
        reduction: "mean" divides the sum by D = `num_items_in_batch` if given, else the number of valid labels
            (at least 1); "sum" returns the sum; "none" returns one value per position (0 where ignored).
        num_items_in_batch: the token count transformers' Trainer passes (int or one-element tensor).
        kl_direction: "forward" for KL(base || adapted), "reverse" for KL(adapted || base).
        backend: "triton" (CUDA, or CPU with TRITON_INTERPRET=1), "torch", or "auto" (Triton on CUDA).
        return_components: also return the detached cross-entropy and KL (before kl_weight and T^2), reduced the
            same way.

    Returns:
        The loss, or `(loss, ce, kl)` with `return_components=True`.
    """
    _check_inputs(logits, ref_logits, labels, kl_weight=kl_weight, temperature=temperature, reduction=reduction,
                  kl_direction=kl_direction, backend=backend, num_items_in_batch=num_items_in_batch)
    vocab = logits.shape[-1]
    _check_label_range(labels, vocab, ignore_index)
    backend = _resolve_backend(backend, logits.device)
    rows_fn = _rows_fn(backend)

    z = logits.reshape(-1, vocab)
    b = ref_logits.detach().reshape(-1, vocab)
    if z.stride(-1) != 1:
        z = z.contiguous()
    if b.stride(-1) != 1:
        b = b.contiguous()
    y = labels.reshape(-1).to(torch.int64)

    stat_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scale = _reduction_scale(y, reduction=reduction, ignore_index=ignore_index,
                             num_items_in_batch=num_items_in_batch, dtype=stat_dtype)
    kl_factor = kl_weight * temperature ** 2

    def reduce(ce, kl):
        if reduction == "none":
            shape = labels.shape
            return (ce + kl_factor * kl).reshape(shape), ce.reshape(shape), kl.reshape(shape)
        ce_sum, kl_sum = ce.sum(), kl.sum()
        return (ce_sum + kl_factor * kl_sum) * scale, ce_sum * scale, kl_sum * scale

    opts = dict(kl_weight=kl_weight, temperature=temperature, ignore_index=ignore_index,
                reverse=kl_direction == "reverse")
    if torch.is_grad_enabled() and logits.requires_grad:
        # "none" keeps the gradient unscaled per row; the backward multiplies by each row's incoming gradient.
        grad_scale = torch.ones_like(scale) if reduction == "none" else scale
        loss, ce, kl = _NonTargetCEFunction.apply(z, b, y, grad_scale, rows_fn, opts, reduce)
    else:
        ce_rows, kl_rows, _ = rows_fn(z.detach(), b, y, grad_scale=scale, compute_grad=False, **opts)
        loss, ce, kl = reduce(ce_rows, kl_rows)
    if return_components:
        return loss, ce.detach(), kl.detach()
    return loss


class NonTargetKLLoss(nn.Module):
    """`nontarget_kl_loss` as a module: keyword arguments are fixed at construction.

    `forward(logits, ref_logits, labels, num_items_in_batch=None)` returns what `nontarget_kl_loss` returns.
    """

    def __init__(self, *, kl_weight=1.0, temperature=1.0, ignore_index=-100, reduction="mean",
                 kl_direction="forward", backend="auto", return_components=False):
        super().__init__()
        self.options = dict(kl_weight=kl_weight, temperature=temperature, ignore_index=ignore_index,
                            reduction=reduction, kl_direction=kl_direction, backend=backend,
                            return_components=return_components)

    def forward(self, logits, ref_logits, labels, num_items_in_batch=None):
        return nontarget_kl_loss(logits, ref_logits, labels, num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
