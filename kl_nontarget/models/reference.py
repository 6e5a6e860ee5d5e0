"""The reference of the non-target KL: which model the base distribution comes from, and its checks.

Three sources (docs/design.md, "The base pass"):

- the PEFT model with its adapters disabled (the default); `check_reference` refuses what cannot be disabled (no
  adapters, merged adapters, prompt learning) and warns where disabling them does not give the original base
  (trained biases, trainable base weights, inits that rewrite the base weights such as PiSSA or OLoRA);
- a reference adapter (`ref_adapter_name`, TRL's convention): a second, frozen adapter of the same PeftModel, which
  the base pass activates instead of disabling the adapters (`base_pass.adapter_activated`). `snapshot_adapter` makes
  one from the trainable adapter, for continuing from an adapter that has already learned something;
- a separate frozen `ref_model` (full fine-tuning), also by name or path (`load_ref_model`).

`check_base_source` validates whichever was chosen, and warns (`TrainedAdapterWarning`) when a PeftModel's trainable
adapter is not at its identity initialisation and nothing else was chosen: the KL is then not zero at the first step.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings

import torch
from torch import nn

from kl_nontarget.models.base_pass import check_merged
from kl_nontarget.models.introspection import (
    has_adapters,
    is_peft_model,
    trainable_base_parameters,
    transformers_model,
    tuner_layers,
    unwrap_model,
)

__all__ = ["BASE_REWRITING_INITS", "INITIAL_ADAPTER", "TrainedAdapterWarning", "adapter_parameters",
           "base_rewriting_init", "check_base_source", "check_reference", "initial_reference", "load_ref_model",
           "prepare_ref_model", "snapshot_adapter"]

logger = logging.getLogger(__name__)


class TrainedAdapterWarning(UserWarning):
    """The trainable adapter is not at its identity initialisation and the reference is the bare base model."""


# LoRA initialisations that move part of the base weights into the adapter (PiSSA's principal components, OLoRA's QR
# factor, LoftQ's quantization residual, CorDA, LoRA-GA): with the adapter disabled the model is not the original
# base; with its initial adapter it is (LoftQ: up to its quantization error).
BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")
# The name of the automatic snapshot of such an adapter, the reference of the non-target KL (`initial_reference`).
INITIAL_ADAPTER = "initial"
_SNAPSHOTS_LOGGED: set[str] = set()


def base_rewriting_init(model: nn.Module) -> str | None:
    """The `init_lora_weights` of the PeftModel's active adapter when that init rewrote the base weights, else None."""
    model = unwrap_model(model)
    if not is_peft_model(model) or not isinstance(model.active_adapter, str):
        return None
    init = getattr(model.peft_config[model.active_adapter], "init_lora_weights", True)
    return init if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS) else None


def initial_reference(model: nn.Module, ref_model: nn.Module | None = None,
                      ref_adapter_name: str | None = None) -> str | None:
    """The reference adapter for `model`: `ref_adapter_name` when given; otherwise, when no `ref_model` is given
    either and the active adapter's init rewrote the base weights (`base_rewriting_init`), a frozen snapshot of that
    adapter as it is now, named `INITIAL_ADAPTER` (logged once per process and init; an existing one is reused);
    else None.

    With PiSSA, OLoRA, CorDA or LoRA-GA the base weights hold a residual and the adapter the rest, so the model as it
    starts (residual + initial adapter) is the original model, to float rounding, while the model with its adapter
    disabled is not. With LoftQ the base holds quantized weights and the model as it starts approximates the original
    to LoftQ's error: pass the original as `ref_model` to regularize towards it exactly.
    """
    if ref_adapter_name is not None or ref_model is not None:
        return ref_adapter_name
    init = base_rewriting_init(model)
    if init is None:
        return None
    peft_model = unwrap_model(model)
    if INITIAL_ADAPTER in peft_model.peft_config:
        logger.warning("init_lora_weights=%r: the non-target KL's reference is the existing adapter %r (an earlier "
                       "snapshot of the initial adapter)", init, INITIAL_ADAPTER)
        return INITIAL_ADAPTER
    snapshot_adapter(peft_model, INITIAL_ADAPTER)
    if init in _SNAPSHOTS_LOGGED:  # once per process and init: a sweep makes one per run
        return INITIAL_ADAPTER
    _SNAPSHOTS_LOGGED.add(init)
    logger.warning("init_lora_weights=%r rewrote the base weights, so the model with its adapter disabled is not the "
                   "original base: the non-target KL's reference is the model as it starts, a frozen copy of the "
                   "initial adapter named %r (kl_nontarget.snapshot_adapter). Pass ref_model= or ref_adapter_name= to "
                   "choose another reference.", init, INITIAL_ADAPTER)
    return INITIAL_ADAPTER


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
            if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
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


def load_ref_model(name_or_path: str | os.PathLike, init_kwargs: dict | None, model: nn.Module | None) -> nn.Module:
    """A reference model loaded from a Hub name or a local path with `AutoModelForCausalLM.from_pretrained`.

    `init_kwargs` (`ref_model_init_kwargs`) go to `from_pretrained`; unless they say otherwise the reference takes the
    dtype and attention implementation of `model` (the model being trained), and `device_map=None`: the trainer
    places it (`prepare_trainer_ref_model`). Pass `device_map` (or `quantization_config`) there to change that.
    """
    from transformers import AutoModelForCausalLM

    if init_kwargs is not None and not isinstance(init_kwargs, dict):
        raise TypeError(f"ref_model_init_kwargs must be a dict, got {type(init_kwargs).__name__}")
    kwargs = dict(init_kwargs or {})
    if model is not None:
        inner = transformers_model(model)
        dtype = getattr(inner, "dtype", None)
        if dtype is not None:
            kwargs.setdefault("dtype", dtype)
        attn = getattr(getattr(inner, "config", None), "_attn_implementation", None)
        if attn is not None:
            kwargs.setdefault("attn_implementation", attn)
    kwargs.setdefault("device_map", None)
    return AutoModelForCausalLM.from_pretrained(os.fspath(name_or_path), **kwargs)


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that belongs to PEFT adapter `adapter_name` (PEFT names them
    `...<layer>.<adapter_name>.<weight>`, or `...<layer>.<adapter_name>` for ParameterDicts)."""
    marker = f".{adapter_name}."
    return [(n, p) for n, p in model.named_parameters() if marker in n or n.endswith(f".{adapter_name}")]


def check_ref_adapter(model: nn.Module, ref_adapter_name: str) -> None:
    """ValueError unless `ref_adapter_name` is an adapter of the PeftModel `model` other than the one being trained;
    the reference adapter is then frozen (it must not move)."""
    if not isinstance(ref_adapter_name, str) or not ref_adapter_name:
        raise TypeError(f"ref_adapter_name must be the name of an adapter, got {ref_adapter_name!r}")
    model = unwrap_model(model)
    if not is_peft_model(model):
        raise ValueError(f"ref_adapter_name={ref_adapter_name!r} needs a peft.PeftModel holding that adapter, got "
                         f"{type(model).__name__}")
    if ref_adapter_name not in model.peft_config:
        raise ValueError(f"ref_adapter_name={ref_adapter_name!r} is not an adapter of this model (adapters: "
                         f"{', '.join(sorted(model.peft_config))}); load it with model.load_adapter(path, "
                         f"adapter_name={ref_adapter_name!r}) or make it with kl_nontarget.snapshot_adapter(model)")
    active = list(getattr(model.base_model, "active_adapters", [model.active_adapter]))
    if ref_adapter_name in active:
        raise ValueError(f"ref_adapter_name={ref_adapter_name!r} is the adapter being trained; the reference must be "
                         "a different, frozen adapter (kl_nontarget.snapshot_adapter(model) copies the trained one)")
    if len(active) != 1:
        raise ValueError(f"ref_adapter_name needs exactly one active (trained) adapter, got {active}")
    config = model.peft_config[ref_adapter_name]
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(f"the reference adapter {ref_adapter_name!r} is a prompt-learning adapter; use a weight "
                         "adapter (LoRA, ...)")
    check_merged(model)
    for _, p in adapter_parameters(model, ref_adapter_name):
        p.requires_grad_(False)


def check_base_source(model: nn.Module, ref_model: nn.Module | None = None,
                      ref_adapter_name: str | None = None) -> str | None:
    """Validate the reference of `model` (`ref_model`, the adapter `ref_adapter_name`, or the disabled adapters) and
    return the reference adapter the base pass activates: `ref_adapter_name`, the automatic snapshot of an init that
    rewrote the base weights (`initial_reference`), or None (the adapters are disabled, or `ref_model` runs).

    ValueError/TypeError as `check_reference` and `check_ref_adapter`, and for both `ref_model` and
    `ref_adapter_name`. Warns (`TrainedAdapterWarning`) when the reference is the bare base but the trainable adapter
    already changes the model (a LoRA with non-zero A and B, an IA3 vector other than ones).
    """
    if ref_adapter_name is not None and ref_model is not None:
        raise ValueError("pass either ref_model or ref_adapter_name, not both")
    ref_adapter_name = initial_reference(model, ref_model, ref_adapter_name)
    if ref_adapter_name is not None:
        check_ref_adapter(model, ref_adapter_name)
        return ref_adapter_name
    check_reference(model, ref_model)
    if ref_model is None:
        moved = trained_adapter_layers(model)
        if moved:
            shown = ", ".join(moved[:2]) + (", ..." if len(moved) > 2 else "")
            warnings.warn(
                f"The trainable adapter already changes the model ({len(moved)} adapter layers away from their "
                f"initialisation: {shown}), and the reference is the base model with adapters disabled, so the "
                "non-target KL is not zero at the first step. To keep the model as it is now as the reference, "
                "snapshot the adapter before training: ref_adapter_name=kl_nontarget.snapshot_adapter(model).",
                TrainedAdapterWarning, stacklevel=3)
    return None


def trained_adapter_layers(model: nn.Module) -> list[str]:
    """Names of the adapter layers whose active adapter is not the identity (LoRA and IA3 are checked; other adapter
    types are not)."""
    model = unwrap_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    moved = []
    for layer in tuner_layers(model):
        active = getattr(layer, "active_adapters", None) or []
        for adapter in active:
            if _is_moved(layer, adapter):
                moved.append(names.get(id(layer), type(layer).__name__))
                break
    return moved


def _entry(container, adapter):
    if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and adapter in container:
        entry = container[adapter]
        return entry.weight if isinstance(entry, nn.Module) and hasattr(entry, "weight") else entry
    return None


@torch.no_grad()
def _is_moved(layer: nn.Module, adapter: str) -> bool:
    for a_name, b_name in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
        a, b = _entry(getattr(layer, a_name, None), adapter), _entry(getattr(layer, b_name, None), adapter)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device.type != "meta":
            return bool(a.abs().sum() > 0) and bool(b.abs().sum() > 0)
    ia3 = _entry(getattr(layer, "ia3_l", None), adapter)
    if isinstance(ia3, torch.Tensor) and ia3.device.type != "meta":
        return bool((ia3 != 1).any())
    return False


def snapshot_adapter(model: nn.Module, name: str = "reference") -> str:
    """Copy the PeftModel's trainable adapter into a new frozen adapter `name` and return `name`, to pass as
    `ref_adapter_name=`: the non-target KL then keeps the model close to what it was when training started.

    Call it before training (after loading the adapter to continue from). The copy has the same config and weights;
    the trainable adapter stays active and trainable. Saving the model saves the copy too (as a second adapter).
    """
    model = unwrap_model(model)
    if not is_peft_model(model):
        raise ValueError(f"snapshot_adapter needs a peft.PeftModel, got {type(model).__name__}")
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if name in model.peft_config:
        raise ValueError(f"the model already has an adapter named {name!r}; pass another name")
    active = model.active_adapter
    if not isinstance(active, str):
        raise ValueError(f"snapshot_adapter needs exactly one active adapter, got {active!r}")
    config = copy.deepcopy(model.peft_config[active])
    if getattr(config, "is_prompt_learning", False):
        raise ValueError("snapshot_adapter supports weight adapters (LoRA, ...), not prompt learning")
    config.inference_mode = True
    # The copy's weights are overwritten below: create it with the plain identity init, never with one that rewrites
    # the base weights again (PiSSA, OLoRA, LoftQ) or needs data (CorDA, EVA, LoRA-GA).
    for field in ("init_lora_weights", "init_weights", "init_ia3_weights"):
        if hasattr(config, field):
            setattr(config, field, True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.add_adapter(name, config)
    state = get_peft_model_state_dict(model, adapter_name=active)
    set_peft_model_state_dict(model, state, adapter_name=name)
    # add_adapter may touch the flags: the trained adapter keeps exactly its own, the copy is frozen.
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    for _, p in adapter_parameters(model, name):
        p.requires_grad_(False)
    if model.active_adapter != active:
        model.set_adapter(active)
    return name
