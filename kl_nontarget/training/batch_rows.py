"""One batch in, the rows the loss needs out: shifted labels, and the adapted and base logits (or final hidden states)
at the supervised positions.

`compute_batch_logits` is the one place that turns a batch into (adapted logits, base logits, shifted labels) on the
supervised positions; `compute_batch_hidden` does the same with final hidden states for the fused-linear path, and
`head_tensors` hands those to `nontarget_kl_linear_loss` at the head's precision (`HeadTensors.loss`). The Trainer
subclass, the SFT subclass and the `compute_loss_func` hook all go through here (via `kl_nontarget.training.step_loss`).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kl_nontarget.models.base_pass import base_forward
from kl_nontarget.models.introspection import device_of, patched_forward, to_device, transformers_model
from kl_nontarget.models.lm_head import LinearHead, head_input_captured, head_weights
from kl_nontarget.ops.linear_loss import nontarget_kl_linear_loss
from kl_nontarget.training.options import RegularizerOptions

IGNORE_INDEX = -100

# Batch keys that are targets or loss arguments, never forward inputs of the base pass. `skip_logits`: the Trainer
# adds it in loss-only evaluation with `use_liger_kernel`, for Liger's fused-loss forward, which needs the labels.
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch", "return_loss", "logits_to_keep", "skip_logits")


def shifted_labels(inputs: dict, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with the logits' positions: `labels[:, 1:]` padded with -100 (or `shift_labels` as given)."""
    shift = inputs.get("shift_labels")
    if shift is not None:
        return shift
    if labels is None:
        labels = inputs.get("labels")
    if labels is None:
        raise ValueError("the batch has no 'labels' (or 'shift_labels'): the non-target KL loss needs token labels, "
                         "with -100 at positions that are not supervised")
    if not isinstance(labels, torch.Tensor) or labels.dtype in (torch.bool,) or labels.is_floating_point():
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (batch, sequence), got {tuple(labels.shape)}")
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def forward_kwargs(inputs: dict) -> dict:
    """The model inputs of a batch: everything except labels and loss arguments."""
    return {k: v for k, v in inputs.items() if k not in _LOSS_KEYS}


_MASK_SUPPORT: dict[type, bool] = {}


def supports_logits_mask(model: nn.Module) -> bool:
    """Whether `model(..., logits_to_keep=<bool (B, T) mask>)` returns (num_true, V) logits.

    True when the model's forward takes `logits_to_keep` and its modeling module slices with transformers'
    `slice_logits_to_keep` that accepts boolean masks (transformers >= 5.21). Older versions fall back to slicing the
    full logits. False for an instance whose forward is patched (Liger's fused-loss forward slices the hidden states
    with `logits_to_keep` itself and takes an integer only).
    """
    if patched_forward(model) is not None:
        return False
    base = transformers_model(model)
    cls = type(base)
    if cls not in _MASK_SUPPORT:
        _MASK_SUPPORT[cls] = _probe_logits_mask(cls)
    return _MASK_SUPPORT[cls]


def _probe_logits_mask(cls: type) -> bool:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
    if "logits_to_keep" not in params:
        return False
    helper = getattr(sys.modules.get(cls.__module__), "slice_logits_to_keep", None)
    if helper is None:
        return False
    try:
        out = helper(torch.zeros(2, 3, 1), torch.tensor([[True, False, True], [False, False, True]]))
    except Exception:  # noqa: BLE001 - any failure means "not supported"
        return False
    return tuple(out.shape) == (3, 1)


def _accepts_kwarg(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(type(transformers_model(model)).forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def select_logits(logits: torch.Tensor, mask: torch.Tensor, *, source: str = "model") -> torch.Tensor:
    """The (N, V) rows of `logits` at the True positions of `mask` (B, T); logits already selected pass through."""
    n = int(mask.sum())
    if logits.dim() == 2 and logits.shape[0] == n:
        return logits
    if logits.dim() == 3 and logits.shape[:2] == mask.shape:
        return logits[mask]
    raise ValueError(f"{source} returned logits of shape {tuple(logits.shape)}, which match neither the batch "
                     f"{tuple(mask.shape)} nor its {n} supervised positions")


@dataclass
class BatchLogits:
    """Adapted and base logits on the supervised positions of a batch, and the gold labels there."""

    logits: torch.Tensor  # (N, V), adapted model, carries the gradient
    ref_logits: torch.Tensor  # (N, V), base model, no gradient; same dtype and device as `logits`
    labels: torch.Tensor  # (N,), gold ids, all != -100
    outputs: Any  # the adapted model's outputs


def compute_batch_logits(model: nn.Module, inputs: dict, *, ref_model: nn.Module | None = None,
                         unwrapped: nn.Module | None = None, adapted_outputs: Any = None,
                         labels: torch.Tensor | None = None, forward_args: tuple = (),
                         use_logits_mask: bool = True,
                         base_context: contextlib.AbstractContextManager | None = None,
                         ref_adapter_name: str | None = None) -> BatchLogits:
    """Run the adapted pass (unless `adapted_outputs` is given) and the base pass on one batch.

    Args:
        model: the model being trained, as the Trainer calls it (possibly wrapped by DDP).
        inputs: the batch: forward inputs plus `labels` (unshifted, (B, T)) or `shift_labels`.
        ref_model: explicit base model; default: `model` with its adapters disabled.
        unwrapped: where to find the adapters (default: `model` without DDP wrappers).
        adapted_outputs: outputs of an adapted forward already run on `inputs` (the `compute_loss_func` hook).
        labels: unshifted labels, when they are not in `inputs`.
        forward_args: positional forward arguments, if the forward was called with any.
        use_logits_mask: ask the model for logits at the supervised positions only, when the installed transformers
            supports a boolean `logits_to_keep`. Pass False when the caller needs the full logits in the outputs.
        base_context: a context entered around the base pass only: mixed-precision autocast when the base model is
            not called through the same accelerate wrapper as the adapted one (a `ref_model`, or a hook on the inner
            model).
        ref_adapter_name: a PEFT adapter of `model` to run the base pass with, instead of disabling the adapters.

    Returns:
        A `BatchLogits` whose rows are the positions with a supervised next token (labels[:, 1:] != -100).
    """
    target, mask, kwargs = _batch_parts(model, inputs, labels)

    if adapted_outputs is None:
        adapted_kwargs = dict(kwargs)
        if use_logits_mask and supports_logits_mask(model):
            adapted_kwargs["logits_to_keep"] = mask
        adapted_outputs = model(*forward_args, **adapted_kwargs)
    logits = select_logits(_logits_of(adapted_outputs), mask, source="the model")

    base_kwargs = dict(kwargs)
    base_model = ref_model if ref_model is not None else model
    if supports_logits_mask(base_model):
        base_kwargs["logits_to_keep"] = mask
    if ref_model is not None:
        base_kwargs = to_device(base_kwargs, device_of(ref_model))
        base_mask = mask.to(device_of(ref_model))
        if "logits_to_keep" in base_kwargs:
            base_kwargs["logits_to_keep"] = base_mask
    else:
        base_mask = mask
    base_outputs = base_forward(model, base_kwargs, ref_model=ref_model, forward_args=forward_args,
                                unwrapped=unwrapped, context=base_context, ref_adapter_name=ref_adapter_name)
    ref_logits = select_logits(_logits_of(base_outputs), base_mask,
                               source="ref_model" if ref_model is not None else "the base model")
    if ref_logits.shape[-1] != logits.shape[-1]:
        raise ValueError(f"the base model's vocabulary ({ref_logits.shape[-1]} logits) differs from the adapted "
                         f"model's ({logits.shape[-1]}); ref_model must share the tokenizer and vocabulary")
    ref_logits = ref_logits.to(device=logits.device, dtype=logits.dtype)
    return BatchLogits(logits=logits, ref_logits=ref_logits, labels=target[mask], outputs=adapted_outputs)


def _batch_parts(model: nn.Module, inputs: dict, labels: torch.Tensor | None):
    """(shifted labels (B, T), supervised mask (B, T), forward kwargs) of a batch, validated."""
    target = shifted_labels(inputs, labels)
    mask = target != IGNORE_INDEX
    kwargs = forward_kwargs(inputs)
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.shape != target.shape:
        raise ValueError(f"labels shape {tuple(target.shape)} does not match input_ids shape {tuple(ids.shape)}")
    if "use_cache" not in kwargs and _accepts_kwarg(model, "use_cache"):
        kwargs["use_cache"] = False
    return target, mask, kwargs


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model outputs ({type(outputs).__name__}) carry no logits tensor")
    return logits



# --------------------------------------------------------------------------------------------------------------------
# Final hidden states of one batch (the fused-linear path; see `kl_nontarget.models.lm_head`)


def select_hidden(hidden: torch.Tensor, mask: torch.Tensor, *, source: str = "the model") -> torch.Tensor:
    """The (N, d) rows of the head's input (B, T, d) at the True positions of `mask` (B, T)."""
    if hidden.dim() == 3 and hidden.shape[:2] == mask.shape:
        return hidden[mask.to(hidden.device)]
    raise ValueError(f"{source} passed hidden states of shape {tuple(hidden.shape)} to its LM head, which do not "
                     f"match the batch {tuple(mask.shape)}; pass fused_linear=False")


@dataclass
class BatchHidden:
    """Adapted and base final hidden states on the supervised positions of a batch, the heads and the gold labels."""

    hidden: torch.Tensor  # (N, d), adapted model, carries the gradient
    ref_hidden: torch.Tensor  # (N, d), base model, no gradient, on hidden's device
    labels: torch.Tensor  # (N,), gold ids, all != -100
    head: LinearHead
    ref_head: LinearHead
    autocast: tuple  # (enabled, dtype) where the adapted model called its head: the head's precision
    outputs: Any  # the adapted model's outputs (their logits cover the last position only)


def compute_batch_hidden(model: nn.Module, inputs: dict, heads: tuple[LinearHead, LinearHead], *,
                         ref_model: nn.Module | None = None, unwrapped: nn.Module | None = None,
                         labels: torch.Tensor | None = None, forward_args: tuple = (),
                         base_context: contextlib.AbstractContextManager | None = None,
                         adapted_hidden: torch.Tensor | None = None, adapted_autocast: tuple = (False, None),
                         adapted_outputs: Any = None, ref_adapter_name: str | None = None,
                         base_hidden: torch.Tensor | None = None) -> BatchHidden:
    """`compute_batch_logits` for the fused-linear path: final hidden states of both passes instead of logits.

    `heads` comes from `fused_heads(model, ref_model)`. `adapted_hidden` (B, T, d) and `adapted_autocast` are the
    head input and autocast state of an adapted forward already run on `inputs` (the `compute_loss_func` hook);
    otherwise the adapted pass runs here. `base_hidden` (N, d): the base model's final hidden states at the
    supervised positions, already known (`kl_nontarget.training.base_cache`); then no base pass runs. The other
    arguments are those of `compute_batch_logits`.
    """
    target, mask, kwargs = _batch_parts(model, inputs, labels)
    head, ref_head = heads
    if adapted_hidden is None and kwargs.get("output_hidden_states"):
        raise ValueError("the fused-linear path returns the final hidden states in `hidden_states`: remove "
                         "output_hidden_states from the batch, or pass fused_linear=False")
    if adapted_hidden is None:
        with head_input_captured(head.module, transformers_model(model)) as capture:
            adapted_outputs = model(*forward_args, **kwargs)
        adapted_hidden, adapted_autocast = capture.take("the model", adapted_outputs), capture.autocast
    hidden = select_hidden(adapted_hidden, mask, source="the model")
    if base_hidden is None:
        ref_hidden, _ = _base_hidden(model, kwargs, mask, ref_head, ref_model=ref_model, unwrapped=unwrapped,
                                     forward_args=forward_args, base_context=base_context,
                                     ref_adapter_name=ref_adapter_name)
    elif base_hidden.shape != hidden.shape:
        raise ValueError(f"base_hidden has shape {tuple(base_hidden.shape)}, but the batch has {hidden.shape[0]} "
                         f"supervised positions of hidden size {hidden.shape[-1]}")
    else:
        ref_hidden = base_hidden
    ref_hidden = ref_hidden.to(hidden.device)
    return BatchHidden(hidden=hidden, ref_hidden=ref_hidden, labels=target[mask.to(target.device)], head=head,
                       ref_head=ref_head, autocast=adapted_autocast, outputs=adapted_outputs)


def _base_hidden(model, kwargs, mask, ref_head, *, ref_model, unwrapped, forward_args=(), base_context=None,
                 ref_adapter_name=None):
    """(base final hidden states at the True positions of `mask`, autocast state at the base model's head)."""
    base_kwargs, base_mask = kwargs, mask
    if ref_model is not None:
        base_kwargs = to_device(kwargs, device_of(ref_model))
        base_mask = mask.to(device_of(ref_model))
    source = "ref_model" if ref_model is not None else "the base model"
    with head_input_captured(ref_head.module) as capture:
        base_forward(model, base_kwargs, ref_model=ref_model, forward_args=forward_args, unwrapped=unwrapped,
                     context=base_context, ref_adapter_name=ref_adapter_name)
        autocast = capture.autocast
        hidden = capture.take(source)
    return select_hidden(hidden, base_mask, source=source), autocast


@dataclass
class BaseRows:
    """The base pass alone on one batch, at its supervised positions (row-major over (batch, sequence))."""

    hidden: torch.Tensor  # (N, d), no gradient
    input_ids: torch.Tensor  # (N,), the token at each position
    labels: torch.Tensor  # (N,), the gold next token there
    autocast: tuple  # (enabled, dtype) where the base model called its head


def compute_base_rows(model: nn.Module, inputs: dict, ref_head: LinearHead, *, ref_model: nn.Module | None = None,
                      unwrapped: nn.Module | None = None,
                      base_context: contextlib.AbstractContextManager | None = None) -> BaseRows:
    """The base model's final hidden states at the supervised positions of `inputs` (needs `input_ids`)."""
    target, mask, kwargs = _batch_parts(model, inputs, None)
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise ValueError("the batch has no input_ids tensor")
    hidden, autocast = _base_hidden(model, kwargs, mask, ref_head, ref_model=ref_model, unwrapped=unwrapped,
                                    base_context=base_context)
    return BaseRows(hidden=hidden, input_ids=ids[mask], labels=target[mask], autocast=autocast)


@dataclass(frozen=True)
class HeadTensors:
    """The tensor arguments of `nontarget_kl_linear_loss` for one `BatchHidden`, all on the head's device, at the
    precision of the model's head (`head_tensors`)."""

    hidden: torch.Tensor  # (N, d), carries the gradient
    ref_hidden: torch.Tensor  # (N, d)
    weight: torch.Tensor  # (V, d), the adapted head (whole, gathered)
    bias: torch.Tensor | None
    ref_weight: torch.Tensor | None  # None when both passes share one head
    labels: torch.Tensor  # (N,)
    head: LinearHead  # the logit transform

    def loss(self, options: RegularizerOptions, num_items_in_batch=None, *, return_components: bool = False):
        """`nontarget_kl_linear_loss` of these tensors under `options`: the one fused-loss call."""
        return nontarget_kl_linear_loss(
            self.hidden, self.ref_hidden, self.weight, self.labels, bias=self.bias, ref_weight=self.ref_weight,
            logit_scale=self.head.logit_scale, softcap=self.head.softcap, num_items_in_batch=num_items_in_batch,
            return_components=return_components, **options.loss_kwargs())


@contextlib.contextmanager
def head_tensors(batch: BatchHidden) -> Iterator[HeadTensors]:
    """The `HeadTensors` of `batch`, valid for the duration of the context.

    Under mixed-precision autocast the head would run in the autocast dtype, so everything is cast to it (the casts are
    differentiable); otherwise to the adapted hidden states' dtype. Sharded head weights are gathered for the duration
    of the context (`lm_head.head_weights`).
    """
    with head_weights(batch.head, batch.ref_head) as (weight, bias, ref_weight):
        enabled, dtype = batch.autocast
        if not enabled or dtype is None or not batch.hidden.is_floating_point():
            dtype = batch.hidden.dtype
        device = weight.device

        def cast(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        yield HeadTensors(hidden=cast(batch.hidden), ref_hidden=cast(batch.ref_hidden), weight=cast(weight),
                          bias=cast(bias), ref_weight=cast(ref_weight), labels=batch.labels.to(device),
                          head=batch.head)

