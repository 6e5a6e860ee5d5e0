"""The base pass: the base model's outputs on a batch, without gradient, from the PEFT model itself.

- `adapters_disabled`: a PEFT model (or a module holding PEFT layers) with every adapter off, in eval mode, restoring
  every `requires_grad` flag and every module's train/eval mode afterwards;
- `adapter_activated`: the same model with a reference adapter active instead of the trained one (`ref_adapter_name`);
- `base_forward`: the pass itself, through whichever of those applies or through a separate `ref_model`, under
  `torch.no_grad()` and the adapted pass's autocast (`autocast_state` / `autocast_like` record and replay it);
- `check_merged`: merged adapters cannot be disabled, so they are refused.

See docs/design.md, "The base pass".
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from kl_nontarget.models.introspection import is_peft_model, tuner_layers, uncompiled, unwrap_model


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


@contextlib.contextmanager
def adapter_activated(model: nn.Module, adapter_name: str):
    """Run the enclosed code on the PeftModel `model` with adapter `adapter_name` active instead of the trained one,
    in eval mode, restoring the active adapter, every requires_grad flag and every module's mode afterwards.

    The base pass with a reference adapter (`ref_adapter_name`): PEFT's `set_adapter` marks the adapter it activates
    trainable, so the flags are saved and restored as for `adapters_disabled`.
    """
    model = unwrap_model(model)
    if not is_peft_model(model):
        raise ValueError(f"ref_adapter_name needs a peft.PeftModel, got {type(model).__name__}")
    check_merged(model)
    previous = model.active_adapter
    with _saved_state(model):
        model.eval()
        model.set_adapter(adapter_name)
        try:
            yield
        finally:
            model.set_adapter(previous)


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
                 context: contextlib.AbstractContextManager | None = None, ref_adapter_name: str | None = None) -> Any:
    """Outputs of the base model on the given forward inputs, without gradient.

    With `ref_model`, that model is called. Otherwise `model` (possibly wrapped, e.g. by DDP) is called with its
    adapters disabled, or with the adapter `ref_adapter_name` active instead of the trained one; the adapters are
    found on `unwrapped` (default: `model` without DDP wrappers). `context` (e.g. the autocast of mixed precision) is
    entered around the call so both passes run at the same precision. A `torch.compile`d model is called through
    its original module: a compiled graph does not see the adapters being switched off.
    """
    with torch.no_grad(), (context if context is not None else contextlib.nullcontext()):
        if ref_model is not None:
            return ref_model(*forward_args, **forward_kwargs)
        owner = unwrapped if unwrapped is not None else model
        switched = adapter_activated(owner, ref_adapter_name) if ref_adapter_name else adapters_disabled(owner)
        with switched:
            return uncompiled(model)(*forward_args, **forward_kwargs)
