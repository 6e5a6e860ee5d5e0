"""The base (reference) distribution for the non-target KL, and the logits of one batch.

Two sources of base logits (design.md §3):

- a PEFT model with its adapters disabled (`peft_model.disable_adapter()`), on the same forward inputs, under
  `torch.no_grad()`, restoring every `requires_grad` flag and every module's train/eval mode afterwards;
- an explicit frozen `ref_model` (full fine-tuning, or adapter inits that rewrite the base weights).

`compute_batch_logits` is the one place that turns a batch into (adapted logits, base logits, shifted labels) on the
supervised positions; the Trainer subclass, the SFT subclass and the `compute_loss_func` hook all go through it.
`base_forward` is the "get base outputs" step on its own.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

# Batch keys that are targets or loss arguments, never forward inputs of the base pass.
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch", "return_loss", "logits_to_keep")

# LoRA initialisations that rewrite the base weights: disabling the adapter then does not give the original model.
_BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


# --------------------------------------------------------------------------------------------------------------------
# Model introspection


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel / torch.compile wrappers (not PEFT)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _peft():
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a dependency, but keep the reference usable without it
        return None
    return peft


def is_peft_model(model: nn.Module) -> bool:
    peft = _peft()
    return peft is not None and isinstance(model, peft.PeftModel)


def _tuner_layer_types():
    peft = _peft()
    if peft is None:
        return ()
    from peft.tuners.tuners_utils import BaseTunerLayer

    types = [BaseTunerLayer]
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save, trainable tokens (peft >= 0.15)

        types.append(AuxiliaryTrainingWrapper)
    except ImportError:  # pragma: no cover - older peft
        from peft.utils.other import ModulesToSaveWrapper

        types.append(ModulesToSaveWrapper)
    return tuple(types)


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """Every PEFT adapter layer (and auxiliary wrapper such as modules_to_save) inside `model`."""
    types = _tuner_layer_types()
    if not types:
        return []
    return [m for m in model.modules() if isinstance(m, types)]


def has_adapters(model: nn.Module) -> bool:
    model = unwrap_model(model)
    return is_peft_model(model) or bool(tuner_layers(model))


def transformers_model(model: nn.Module) -> nn.Module:
    """The innermost transformers model: below DDP, PEFT's PeftModel and its tuner."""
    model = unwrap_model(model)
    if is_peft_model(model):
        model = model.get_base_model()
    return model


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    ids = set()
    for layer in tuner_layers(model):
        for name in getattr(layer, "adapter_layer_names", ()):
            container = getattr(layer, name, None)
            if isinstance(container, nn.Module):
                ids.update(id(p) for p in container.parameters())
        for name in getattr(layer, "other_param_names", ()):
            container = getattr(layer, name, None)
            if isinstance(container, nn.Module):
                ids.update(id(p) for p in container.parameters())
    return ids


def check_merged(model: nn.Module) -> None:
    """Raise a ValueError when any adapter layer of `model` is merged into its base weights."""
    merged = [m for m in tuner_layers(unwrap_model(model)) if getattr(m, "merged", False)]
    if merged:
        raise ValueError(
            "The model has adapters merged into its base weights (merge_adapter()/merge_and_unload()): disabling "
            "a merged adapter does not give the base model, so the non-target KL would train against the wrong "
            "reference. Unmerge the adapters (model.unmerge_adapter()) before training, or pass ref_model=<frozen "
            "base model>."
        )


def check_reference(model: nn.Module, ref_model: nn.Module | None = None) -> None:
    """Validate the source of base logits for `model`; warn where disabling adapters is not the original base.

    Raises ValueError when neither a PEFT model nor `ref_model` is available, for merged adapters, and for
    prompt-learning PEFT methods (virtual tokens change the sequence the labels are aligned with).
    """
    model = unwrap_model(model)
    if ref_model is not None:
        if not isinstance(ref_model, nn.Module):
            raise TypeError(f"ref_model must be a torch.nn.Module (a frozen copy of the base model), got "
                            f"{type(ref_model).__name__}")
        if unwrap_model(ref_model) is model:
            raise ValueError("ref_model is the model being trained; pass a separate, frozen copy of the base model "
                             "(or ref_model=None to use the PEFT model with its adapters disabled)")
        if has_adapters(ref_model) and not is_peft_model(unwrap_model(ref_model)):
            warnings.warn("ref_model contains PEFT adapter layers; it is used as is (adapters enabled).",
                          stacklevel=3)
        return
    if not has_adapters(model):
        raise ValueError(
            f"The non-target KL needs base-model logits, but the model ({type(model).__name__}) has no PEFT "
            "adapters to disable. Wrap it with peft.get_peft_model(...) (or pass peft_config= to SFTTrainer), or, "
            "for full fine-tuning, pass ref_model=<a frozen copy of the base model>."
        )
    if is_peft_model(model):
        config = model.active_peft_config
        if getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False):
            raise ValueError(
                f"PEFT method {config.peft_type} (prompt learning / adaption prompt) is not supported: its virtual "
                "tokens shift the sequence the labels are aligned with. Use a weight adapter (LoRA, DoRA, LoHa, "
                "IA3, ...) or pass ref_model=."
            )
    check_merged(model)
    _warn_not_base(model)


def _warn_not_base(model: nn.Module) -> None:
    reasons = []
    if is_peft_model(model):
        for name, config in model.peft_config.items():
            bias = getattr(config, "bias", "none")
            if bias not in (None, "none"):
                reasons.append(f"adapter {name!r} trains biases (bias={bias!r}), which disabling it does not undo")
            # modules_to_save needs no warning: PEFT trains a copy and the disabled model runs the original module
            # (tests/test_trainer.py checks that the disabled model then equals the base exactly).
            init = getattr(config, "init_lora_weights", True)
            if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
                reasons.append(f"adapter {name!r} uses init_lora_weights={init!r}, which rewrites the base weights")
    adapter_ids = _adapter_parameter_ids(model)
    unfrozen = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
    if unfrozen and not any("bias=" in r for r in reasons):
        shown = ", ".join(unfrozen[:3]) + (", ..." if len(unfrozen) > 3 else "")
        reasons.append(f"{len(unfrozen)} base-model parameters are trainable ({shown}), so the model with adapters "
                       "disabled drifts away from the base")
    if reasons:
        warnings.warn(
            "With adapters disabled this model is not the original base model: " + "; ".join(reasons) + ". The "
            "non-target KL would then pull towards a moving or wrong reference: pass ref_model=<a frozen copy of "
            "the original base model> to use it instead.",
            UserWarning,
            stacklevel=3,
        )


def prepare_ref_model(ref_model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Freeze `ref_model`, put it in eval mode, and move it to `device` unless it is dispatched with a device map."""
    ref_model.requires_grad_(False)
    ref_model.eval()
    if device is not None and getattr(ref_model, "hf_device_map", None) is None:
        ref_model.to(device)
    return ref_model


# --------------------------------------------------------------------------------------------------------------------
# The base pass


@contextlib.contextmanager
def _saved_state(model: nn.Module):
    """Restore every parameter's requires_grad flag and every module's training flag on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the enclosed code on `model` with every adapter disabled, in eval mode, restoring all state afterwards.

    `model` is a PeftModel (its `disable_adapter()` context is used) or any module that contains PEFT adapter layers
    (for example the inner model when TRL wraps it after a hook was attached); those layers are toggled directly.
    Eval mode switches off dropout and gradient checkpointing (reentrant or not) for the base pass. Leaving PEFT's
    context re-enables gradients on the active adapters, so all requires_grad flags are saved and restored.
    """
    model = unwrap_model(model)
    check_merged(model)
    with _saved_state(model), warnings.catch_warnings():
        # check_reference() already warned once; PEFT repeats its bias warning on every disable.
        warnings.filterwarnings("ignore", message=r"Careful, disabling adapter layers")
        model.eval()
        if is_peft_model(model):
            with model.disable_adapter():
                yield
        else:
            layers = [m for m in tuner_layers(model) if not m.disable_adapters]
            if not layers and not tuner_layers(model):
                raise ValueError(f"{type(model).__name__} has no PEFT adapters to disable; pass ref_model=")
            for layer in layers:
                layer.enable_adapters(False)
            try:
                yield
            finally:
                for layer in layers:
                    layer.enable_adapters(True)


def autocast_state(device_type: str):
    """(enabled, dtype) of autocast on `device_type` now, to replay around a later base pass."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # pragma: no cover - torch < 2.4
        return False, None


def autocast_like(device_type: str, state) -> contextlib.AbstractContextManager:
    """A context that reproduces an `autocast_state` (a no-op when autocast was off)."""
    enabled, dtype = state
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def base_forward(model: nn.Module, forward_kwargs: dict, *, ref_model: nn.Module | None = None,
                 forward_args: tuple = (), unwrapped: nn.Module | None = None,
                 context: contextlib.AbstractContextManager | None = None) -> Any:
    """Outputs of the base model on the given forward inputs, without gradient.

    With `ref_model`, that model is called. Otherwise `model` (possibly wrapped, e.g. by DDP) is called with its
    adapters disabled; the adapters are found on `unwrapped` (default: `model` without DDP wrappers). `context`
    (e.g. the autocast of mixed precision) is entered around the call so both passes run at the same precision.
    """
    with torch.no_grad(), (context if context is not None else contextlib.nullcontext()):
        if ref_model is not None:
            return ref_model(*forward_args, **forward_kwargs)
        with adapters_disabled(unwrapped if unwrapped is not None else model):
            return model(*forward_args, **forward_kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Logits of one batch


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
    full logits.
    """
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
                         base_context: contextlib.AbstractContextManager | None = None) -> BatchLogits:
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
        base_kwargs = _to_device(base_kwargs, _device_of(ref_model))
        base_mask = mask.to(_device_of(ref_model))
        if "logits_to_keep" in base_kwargs:
            base_kwargs["logits_to_keep"] = base_mask
    else:
        base_mask = mask
    base_outputs = base_forward(model, base_kwargs, ref_model=ref_model, forward_args=forward_args,
                                unwrapped=unwrapped, context=base_context)
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


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(kwargs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


# --------------------------------------------------------------------------------------------------------------------
# Final hidden states of one batch (the fused-linear path)
#
# When the LM head is a plain nn.Linear and the logit transform of the architecture is known, the loss can take the
# final hidden states of both passes and the head's weight (`kl_nontarget.linear.nontarget_kl_linear_loss`) instead
# of two N x V logits tensors. The hidden states are taken where the model itself hands them to its head: a forward
# pre-hook on the head keeps the head's input and lets the head project the last position only. The model is called
# exactly as on the logits path, through every wrapper (DDP, accelerate's mixed-precision autocast, PEFT, TRL's
# instance patch), and the autocast state is read where the head runs. Like TRL's fused LM head, whose results come
# out of the model's forward, the hidden states are returned in the model's outputs (as `hidden_states=(h,)`, set by
# a forward hook on the transformers model; the field is free since the batch does not ask for hidden states): the
# loss then flows through the outputs of the outermost forward, as FSDP2 (which unshards the root's parameters for
# backward from hooks on those outputs) and DDP's unused-parameter search expect.

FUSED_LINEAR_OPTIONS = (True, False, "auto")


def _plain(model):
    return 1.0, None


def _softcapped(model):
    return 1.0, getattr(model.config, "final_logit_softcapping", None)


def _cohere(model):
    return getattr(model, "logit_scale", model.config.logit_scale), None


def _granite(model):
    return 1.0 / model.config.logits_scaling, None


# CausalLM classes whose forward computes `logits = softcap * tanh(logit_scale * lm_head(hidden) / softcap)` (no tanh
# without a soft-cap) from the hidden states it passes to `lm_head`, and how to read (logit_scale, softcap). Each entry
# is checked against the model's own logits on a tiny model built from its config (tests/test_fused_trainer.py).
HEAD_TRANSFORMS = {
    "LlamaForCausalLM": _plain,
    "MistralForCausalLM": _plain,
    "Qwen2ForCausalLM": _plain,
    "Qwen3ForCausalLM": _plain,
    "GemmaForCausalLM": _plain,
    "PhiForCausalLM": _plain,  # a head with a bias
    "Phi3ForCausalLM": _plain,
    "Gemma2ForCausalLM": _softcapped,  # final_logit_softcapping
    "Gemma3ForCausalLM": _softcapped,
    "CohereForCausalLM": _cohere,  # logits * logit_scale
    "GraniteForCausalLM": _granite,  # logits / logits_scaling
}


@dataclass(frozen=True)
class LinearHead:
    """A model's LM head (a plain nn.Linear) and its logit transform `softcap * tanh(logit_scale * x / softcap)`."""

    module: nn.Linear
    logit_scale: float = 1.0
    softcap: float | None = None


def _is_trl_fused_forward(func) -> bool:
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    return code is not None and code.co_name == "_fused_forward"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def linear_head(model: nn.Module) -> tuple[LinearHead | None, str]:
    """`(LinearHead, "")` when the fused-linear loss can reproduce `model`'s logits from its final hidden states, else
    `(None, reason)`.

    Requires an architecture of `HEAD_TRANSFORMS` whose forward is transformers' own (not replaced by a patch other
    than TRL's `fused_lm_head` one, which leaves ordinary calls alone), and an LM head that is exactly `nn.Linear`:
    LoRA or `modules_to_save` on the head, quantized heads and custom heads take the logits path.
    """
    base = transformers_model(model)
    cls = type(base)
    reader = HEAD_TRANSFORMS.get(cls.__name__)
    if reader is None or not cls.__module__.startswith("transformers."):
        return None, (f"{cls.__name__} is not one of the architectures whose logit transform is known "
                      f"({', '.join(sorted(HEAD_TRANSFORMS))})")
    if getattr(cls.forward, "__module__", None) != cls.__module__:
        return None, f"{cls.__name__}.forward is patched (by {getattr(cls.forward, '__module__', '?')})"
    patched = base.__dict__.get("forward")
    if patched is not None and not _is_trl_fused_forward(patched):
        return None, f"the forward of this {cls.__name__} instance is patched"
    try:
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if type(head) is not nn.Linear:
        return None, (f"its LM head is a {type(head).__name__}, not a plain torch.nn.Linear (LoRA or modules_to_save "
                      "on lm_head, or a quantized head)")
    weight = head.weight
    if weight.device.type == "meta":
        return None, "its LM head weight is offloaded (meta device)"
    if hasattr(weight, "ds_id") and weight.requires_grad:
        return None, "its LM head is trainable and partitioned by DeepSpeed ZeRO-3"
    try:
        logit_scale, softcap = reader(base)
    except (AttributeError, TypeError, ZeroDivisionError) as error:
        return None, f"its logit transform could not be read from the config ({error})"
    if not _positive(logit_scale) or not (softcap is None or _positive(softcap)):
        return None, f"unsupported logit transform (logit_scale={logit_scale!r}, softcap={softcap!r})"
    return LinearHead(head, float(logit_scale), None if softcap is None else float(softcap)), ""


def fused_heads(model: nn.Module, ref_model: nn.Module | None = None
                ) -> tuple[tuple[LinearHead, LinearHead] | None, str]:
    """`((head, ref_head), "")` when both passes can use the fused-linear loss, else `(None, reason)`.

    Without `ref_model` the base pass (adapters disabled) uses the same head. A `ref_model` needs a plain linear head
    with the same transform and shape, on the same device, and no bias unless it is the same tensor (the loss shares
    one bias between the passes).
    """
    found, reason = linear_head(model)
    if found is None:
        return None, reason
    if ref_model is None:
        return (found, found), ""
    ref, reason = linear_head(ref_model)
    if ref is None:
        return None, "ref_model: " + reason
    if (ref.logit_scale, ref.softcap) != (found.logit_scale, found.softcap):
        return None, "ref_model transforms its logits differently from the model"
    w, rw = found.module.weight, ref.module.weight
    if rw.shape != w.shape or rw.device != w.device:
        return None, "ref_model's LM head differs in shape or device from the model's"
    if (found.module.bias is not None or ref.module.bias is not None) and found.module.bias is not ref.module.bias:
        return None, "the LM heads have biases that are not shared"
    return (found, ref), ""


class _HeadInput:
    """Forward pre-hook on an LM head: keeps the head's input and lets it project only the last position."""

    def __init__(self):
        self.hidden = None
        self.autocast = (False, None)
        self.calls = 0

    def __call__(self, module, args):
        x = args[0]
        self.calls += 1
        self.hidden = x
        self.autocast = autocast_state(x.device.type)
        # Not detached: the returned logits stay connected to the parameters, as DDP's find_unused_parameters
        # traversal of the outputs needs (they get no gradient: the loss uses the hidden states).
        return (x[..., -1:, :], *args[1:])

    def attach(self, module, args, output):
        """Forward hook on the model owning the head: return the head's input in the outputs, as `hidden_states`.

        A field of the ModelOutput dataclass (FSDP2 and pytree flattening see fields only), set only when empty.
        """
        if self.hidden is not None and isinstance(output, dict) and getattr(output, "hidden_states", False) is None:
            output["hidden_states"] = (self.hidden,)
        return output

    def take(self, source: str, outputs: Any = None) -> torch.Tensor:
        """The head's input, preferably as found in the forward's `outputs` (the tensor the wrappers saw)."""
        if self.calls != 1:
            raise RuntimeError(f"{source} called its LM head {self.calls} times in one forward (expected once); pass "
                               "fused_linear=False to use the logits")
        hidden, self.hidden = self.hidden, None
        returned = outputs.get("hidden_states") if isinstance(outputs, dict) else None
        if isinstance(returned, tuple) and len(returned) == 1 and isinstance(returned[0], torch.Tensor) \
                and returned[0].shape == hidden.shape:
            hidden = returned[0]
        return hidden


def register_head_capture(head: nn.Module, owner: nn.Module | None = None):
    """(capture, handles): calls of `head` record their input and return last-position logits; calls of `owner`
    (the transformers model whose forward calls `head`) return the recorded input in their outputs."""
    capture = _HeadInput()
    handles = [head.register_forward_pre_hook(capture)]
    if owner is not None:
        handles.append(owner.register_forward_hook(capture.attach))
    return capture, handles


@contextlib.contextmanager
def head_input_captured(head: nn.Module, owner: nn.Module | None = None):
    """Within the context, calls of `head` record their input (`.hidden`, `.autocast`) and return last-position logits;
    with `owner`, its outputs carry that input as `hidden_states=(input,)`."""
    capture, handles = register_head_capture(head, owner)
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


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
                         adapted_outputs: Any = None) -> BatchHidden:
    """`compute_batch_logits` for the fused-linear path: final hidden states of both passes instead of logits.

    `heads` comes from `fused_heads(model, ref_model)`. `adapted_hidden` (B, T, d) and `adapted_autocast` are the
    head input and autocast state of an adapted forward already run on `inputs` (the `compute_loss_func` hook);
    otherwise the adapted pass runs here. The other arguments are those of `compute_batch_logits`.
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

    base_kwargs, base_mask = kwargs, mask
    if ref_model is not None:
        base_kwargs = _to_device(kwargs, _device_of(ref_model))
        base_mask = mask.to(_device_of(ref_model))
    source = "ref_model" if ref_model is not None else "the base model"
    with head_input_captured(ref_head.module) as capture:
        base_forward(model, base_kwargs, ref_model=ref_model, forward_args=forward_args, unwrapped=unwrapped,
                     context=base_context)
    ref_hidden = select_hidden(capture.take(source), base_mask, source=source).to(hidden.device)
    return BatchHidden(hidden=hidden, ref_hidden=ref_hidden, labels=target[mask.to(target.device)], head=head,
                       ref_head=ref_head, autocast=adapted_autocast, outputs=adapted_outputs)


@contextlib.contextmanager
def _zero3_gathered(params):
    """DeepSpeed ZeRO-3: gather the partitioned `params` (read-only) for the enclosed code. Untested here."""
    parts = [p for p in params if p is not None and hasattr(p, "ds_id")]
    gather = None
    if parts:
        try:
            from deepspeed.zero import GatheredParameters
        except ImportError:  # pragma: no cover - ds_id without deepspeed
            GatheredParameters = None
        if GatheredParameters is not None:
            gather = GatheredParameters(parts, modifier_rank=None)
    with gather if gather is not None else contextlib.nullcontext():
        yield


def _full(t):
    """A whole tensor from an FSDP2-sharded DTensor parameter (differentiable), others as they are."""
    if t is not None and hasattr(t, "full_tensor") and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t


@contextlib.contextmanager
def head_tensors(batch: BatchHidden):
    """The tensor arguments of `nontarget_kl_linear_loss` for `batch`, at the precision of the model's head.

    Yields a dict with hidden, ref_hidden, weight, bias, ref_weight, logit_scale, softcap and labels, all on the head's
    device. Under mixed-precision autocast the head would run in the autocast dtype, so everything is cast to it (the
    casts are differentiable); otherwise to the adapted hidden states' dtype. DeepSpeed ZeRO-3 partitioned head
    weights are gathered for the duration of the context, FSDP2 DTensor weights are gathered to whole tensors.
    """
    head, ref_head = batch.head.module, batch.ref_head.module
    shared = ref_head is head
    params = [head.weight, head.bias] + ([] if shared else [ref_head.weight])
    with _zero3_gathered(params):
        weight, bias = _full(head.weight), _full(head.bias)
        ref_weight = None if shared else _full(ref_head.weight).detach()
        enabled, dtype = batch.autocast
        if not enabled or dtype is None or not batch.hidden.is_floating_point():
            dtype = batch.hidden.dtype
        device = weight.device

        def cast(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        yield {"hidden": cast(batch.hidden), "ref_hidden": cast(batch.ref_hidden), "weight": cast(weight),
               "bias": cast(bias), "ref_weight": cast(ref_weight), "logit_scale": batch.head.logit_scale,
               "softcap": batch.head.softcap, "labels": batch.labels.to(device)}
