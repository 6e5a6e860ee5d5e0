"""What a model is made of: the wrappers around it (DDP, torch.compile, PEFT), its PEFT adapter layers, its device, a
forward patched onto its instance, and the MoE router coefficient of its config.

Every other module asks these questions through here, so the answers agree (e.g. `transformers_model` is the one
definition of "the innermost transformers model").
"""

from __future__ import annotations

import torch
from torch import nn


def _is_deepspeed_engine(model: nn.Module) -> bool:
    """A DeepSpeed engine (the Trainer and `trl.models.prepare_deepspeed` wrap models, a ref_model included, in
    one), recognised by class without importing deepspeed."""
    return any(c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed.") for c in type(model).__mro__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel / DeepSpeedEngine / torch.compile wrappers (not PEFT)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or _is_deepspeed_engine(model):
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


def router_aux_loss_coef(model: nn.Module) -> float:
    """`router_aux_loss_coef` of a Mixture-of-Experts model's (text) config, 0.0 for other models."""
    config = getattr(transformers_model(model), "config", None)
    if config is None:
        return 0.0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)
