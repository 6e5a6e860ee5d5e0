"""The loss of one batch as the trainers and the `compute_loss_func` hook compute it: which path a step takes (the
fused-linear path from final hidden states, or the logits path), and the loss call of each path.

Both `NonTargetKLMixin.compute_loss` (kl_nontarget.training.trainer) and `NonTargetKLLossFunc.__call__`
(kl_nontarget.training.loss_func) decide the path with `step_heads` and compute the loss with `fused_loss` /
`logits_loss`; `require_fused` is the construction-time check of `fused_linear=True`.
"""

from __future__ import annotations

from torch import nn

from kl_nontarget.models.lm_head import LinearHead, fused_heads
from kl_nontarget.ops.logits_loss import nontarget_kl_loss
from kl_nontarget.training.batch_rows import BatchHidden, BatchLogits, head_tensors
from kl_nontarget.training.options import RegularizerOptions

Heads = tuple[LinearHead, LinearHead]


def require_fused(model: nn.Module, ref_model: nn.Module | None) -> None:
    """ValueError, with the reason, when `fused_linear=True` was asked for but `model` does not qualify."""
    heads, reason = fused_heads(model, ref_model)
    if heads is None:
        raise ValueError(f"fused_linear=True, but the fused-linear loss cannot be used: {reason}. Use "
                         "fused_linear='auto' to fall back to the logits")


def step_heads(model: nn.Module, ref_model: nn.Module | None, options: RegularizerOptions, *,
               needs_logits: bool = False) -> tuple[Heads | None, str]:
    """`((head, ref_head), "")` when this step takes the fused-linear path, else `(None, reason)`.

    `model` is unwrapped (no DDP); `needs_logits`: the caller needs the full logits (predictions, all hidden states).
    """
    if options.fused_linear is False:
        return None, "fused_linear=False"
    if needs_logits:
        return None, "this step needs the logits"
    return fused_heads(model, ref_model)


def fused_loss(batch: BatchHidden, options: RegularizerOptions, num_items_in_batch=None, *,
               return_components: bool = False):
    """The loss of a `BatchHidden`: `nontarget_kl_linear_loss` at the head's precision (no N x V logits)."""
    with head_tensors(batch) as tensors:
        return tensors.loss(options, num_items_in_batch, return_components=return_components)


def logits_loss(batch: BatchLogits, options: RegularizerOptions, num_items_in_batch=None, *,
                return_components: bool = False):
    """The loss of a `BatchLogits`: `nontarget_kl_loss` of its selected rows."""
    return nontarget_kl_loss(batch.logits, batch.ref_logits, batch.labels, num_items_in_batch=num_items_in_batch,
                             return_components=return_components, **options.loss_kwargs())
