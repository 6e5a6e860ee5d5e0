"""Cross-entropy + non-target KL from logits: input checks and the autograd Function.

The math lives in the backends (`triton_rows` on GPU, `torch_rows` on CPU); both return per-row statistics and the
gradient already scaled by 1/D, so the backward pass only multiplies by the incoming gradient when it is not 1.
Reductions, backend resolution and that backward scaling are shared with `linear_loss.py` (`kl_nontarget.ops.params`).
"""

from __future__ import annotations

import torch
from torch import nn

from kl_nontarget.ops.checks import DIRECTIONS, check_regularizer_options
from kl_nontarget.ops.params import (
    BACKENDS,
    LABEL_DTYPES,
    REDUCTIONS,
    RowParams,
    check_label_range,
    check_loss_options,
    graph_is_kept,
    resolve_backend,
    scale_saved_grads,
)

__all__ = ["BACKENDS", "DIRECTIONS", "LABEL_DTYPES", "REDUCTIONS", "NonTargetKLLoss", "check_regularizer_options",
           "nontarget_kl_loss"]


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
    check_loss_options(kl_weight=kl_weight, temperature=temperature, reduction=reduction,
                       kl_direction=kl_direction, backend=backend, num_items_in_batch=num_items_in_batch)


class _NonTargetCEFunction(torch.autograd.Function):
    """loss = reduce(ce + kl_weight * T^2 * kl); the gradient is computed in the forward by the backend."""

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, params: RowParams):
        ce, kl, grad = params.rows(logits, ref_logits, labels, grad_scale=params.grad_scale, compute_grad=True)
        loss, ce_out, kl_out = params.reduce(ce, kl)
        ctx.grad = grad
        ctx.mark_non_differentiable(ce_out, kl_out)
        return loss, ce_out, kl_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        keep = graph_is_kept()
        grad = ctx.grad
        if not keep:
            ctx.grad = None  # let the N x V buffer go as soon as the next node has consumed it
        (grad,) = scale_saved_grads(grad_loss, (grad,), keep=keep)
        return grad, None, None, None


def nontarget_kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, *, kl_weight: float = 1.0,
                      temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                      num_items_in_batch: int | torch.Tensor | None = None, kl_direction: str = "forward",
                      backend: str = "auto", return_components: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    check_label_range(labels, vocab, ignore_index)
    backend = resolve_backend(backend, logits.device)

    z = logits.reshape(-1, vocab)
    b = ref_logits.detach().reshape(-1, vocab)
    if z.stride(-1) != 1:
        z = z.contiguous()
    if b.stride(-1) != 1:
        b = b.contiguous()
    y = labels.reshape(-1).to(torch.int64)

    params = RowParams.build(labels, y, backend=backend, kl_weight=kl_weight, temperature=temperature,
                             ignore_index=ignore_index, reduction=reduction, kl_direction=kl_direction,
                             num_items_in_batch=num_items_in_batch, input_dtype=logits.dtype)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, ce, kl = _NonTargetCEFunction.apply(z, b, y, params)
    else:
        ce_rows, kl_rows, _ = params.rows(z.detach(), b, y, grad_scale=params.scale, compute_grad=False)
        loss, ce, kl = params.reduce(ce_rows, kl_rows)
    if return_components:
        return loss, ce.detach(), kl.detach()
    return loss


class NonTargetKLLoss(nn.Module):
    """`nontarget_kl_loss` as a module: keyword arguments are fixed at construction.

    `forward(logits, ref_logits, labels, num_items_in_batch=None)` returns what `nontarget_kl_loss` returns.
    """

    def __init__(self, *, kl_weight: float = 1.0, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", kl_direction: str = "forward", backend: str = "auto",
                 return_components: bool = False):
        super().__init__()
        self.options = dict(kl_weight=kl_weight, temperature=temperature, ignore_index=ignore_index,
                            reduction=reduction, kl_direction=kl_direction, backend=backend,
                            return_components=return_components)

    def forward(self, logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                num_items_in_batch: int | torch.Tensor | None = None):
        return nontarget_kl_loss(logits, ref_logits, labels, num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
