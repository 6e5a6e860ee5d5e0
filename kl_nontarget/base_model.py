"""The base model: where the non-target KL's reference distribution comes from, and the pass that computes it.

Two sources of base outputs (docs/design.md, "The base pass"):

- a PEFT model with its adapters disabled (`adapters_disabled`), on the same forward inputs, under
  `torch.no_grad()`, restoring every `requires_grad` flag and every module's train/eval mode afterwards;
- an explicit frozen `ref_model` (full fine-tuning, or adapter inits that rewrite the base weights).

Also here: PEFT introspection (`unwrap_model`, `is_peft_model`, `tuner_layers`, `has_adapters`, `transformers_model`),
the checks of the reference (`check_reference`, `check_merged`), the autocast replay of mixed precision
(`autocast_state`, `autocast_like`) and the device helpers the other modules share.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

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


def trainable_base_parameters(model: nn.Module) -> list[str]:
    """The names of `model`'s trainable parameters that are not adapter parameters (the base model's own)."""
    adapter_ids = _adapter_parameter_ids(model)
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids]


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
            raise TypeError(f"ref_model must be a torch.nn.Module (a frozen copy of the base model) or a model name "
                            f"or path, got {type(ref_model).__name__}")
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
    unfrozen = trainable_base_parameters(model)
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


def uncompiled(model: nn.Module) -> nn.Module:
    """`model` without an outer `torch.compile` wrapper (other wrappers stay)."""
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `model`, or a module it wraps (DDP, DataParallel), is a `torch.compile`d module."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            return True
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return False



_CPU = torch.device("cpu")


def device_of(model: nn.Module, default: torch.device | None = _CPU) -> torch.device | None:
    """The device of `model`'s first parameter, or `default` when it has none."""
    for p in model.parameters():
        return p.device
    return default


def to_device(kwargs: dict, device: torch.device) -> dict:
    """`kwargs` with every tensor moved to `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def patched_forward(model: nn.Module):
    """The forward patched onto the transformers model's instance (Liger's fused-loss forward, ...), or None.

    Not counted: TRL's `fused_lm_head` patch (it leaves ordinary calls alone) and accelerate's mixed-precision wrapper
    around the class's own forward (`prepare_model` on a reference model; it only adds autocast).
    """
    base = transformers_model(model)
    patched = base.__dict__.get("forward")
    if patched is None or is_trl_fused_forward(patched):
        return None
    original = base.__dict__.get("_original_forward")
    if original is not None and getattr(original, "__func__", None) is type(base).forward:
        return None
    return patched


def is_trl_fused_forward(func) -> bool:
    """Whether `func` is the instance forward TRL's `add_fused_lm_head` installs (it leaves ordinary calls alone)."""
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    return code is not None and code.co_name == "_fused_forward"

