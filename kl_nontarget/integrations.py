"""How the trainers meet the rest of the ecosystem: Liger-Kernel, reference models given by name, MoE router losses,
SFT loss types and `torch.compile`.

- Liger-Kernel (`use_liger_kernel=True`): its fused linear cross-entropy replaces the model's forward with one that
  computes the cross-entropy from the hidden states and never returns logits. The non-target KL needs both
  distributions, and has its own fused-linear path, so the trainers turn that one kernel off
  (`liger_without_fused_loss`), as TRL's SFTTrainer does, and keep Liger's others (RoPE, RMSNorm, SwiGLU, ...).
  A forward that is Liger-patched anyway (applied by hand, or under the `compute_loss_func` hook, which cannot change
  the Trainer's arguments) still works: it is called without labels, so it returns logits, and the batch code passes
  it no boolean `logits_to_keep` and no `skip_logits`.
- `ref_model` as a name or path (`load_ref_model`): loaded like the model (its dtype and attention implementation
  unless `ref_model_init_kwargs` says otherwise) and prepared as TRL prepares reference models
  (`prepare_trainer_ref_model`: DeepSpeed and FSDP through TRL's helpers, otherwise
  `accelerator.prepare_model(..., evaluation_mode=True)`).
- MoE (`router_aux_loss_coef`): the load-balancing loss of the adapted pass is added as the parent trainer adds it.
- SFT loss types (`check_sft_loss_type`): only "nll"; DFT reweights each token's cross-entropy by its detached
  probability, which the fused row kernels do not compute.
"""

from __future__ import annotations

import os
import warnings

from torch import nn

__all__ = ["SUPPORTED_SFT_LOSS_TYPES", "check_sft_loss_type", "liger_without_fused_loss", "load_ref_model",
           "prepare_trainer_ref_model", "router_aux_loss_coef", "trainer_args"]

SUPPORTED_SFT_LOSS_TYPES = ("nll",)


def trainer_args(args: tuple, kwargs: dict):
    """The TrainingArguments among a Trainer constructor's arguments (`args=` or the second positional), or None."""
    if "args" in kwargs:
        return kwargs["args"]
    return args[1] if len(args) > 1 else None


def liger_without_fused_loss(training_args, trainer_name: str) -> None:
    """With `use_liger_kernel=True`, set `liger_kernel_config["fused_linear_cross_entropy"] = False` on
    `training_args` (warning when it was asked for explicitly); Liger's other kernels stay as configured."""
    if training_args is None or not getattr(training_args, "use_liger_kernel", False):
        return
    config = dict(getattr(training_args, "liger_kernel_config", None) or {})
    if config.get("fused_linear_cross_entropy"):
        warnings.warn(
            f"{trainer_name} turns Liger's fused_linear_cross_entropy off: it replaces the model's forward with one "
            "that computes the cross-entropy alone and returns no logits, while the non-target KL needs the adapted "
            "and base distributions. Liger's other kernels stay on; for the memory saving, the non-target KL's own "
            "fused-linear path (fused_linear='auto') computes CE and KL from the hidden states without the logits.",
            UserWarning, stacklevel=3)
    training_args.liger_kernel_config = {**config, "fused_linear_cross_entropy": False}


def check_sft_loss_type(loss_type) -> None:
    """ValueError unless `loss_type` (SFTConfig.loss_type) is one the non-target KL trainers support."""
    if loss_type not in SUPPORTED_SFT_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} is not supported with the non-target KL; supported: "
            f"{', '.join(repr(t) for t in SUPPORTED_SFT_LOSS_TYPES)}. (DFT weights each token's cross-entropy by its "
            "detached probability, which the fused CE + KL kernels do not compute.)")


def router_aux_loss_coef(model: nn.Module) -> float:
    """`router_aux_loss_coef` of a Mixture-of-Experts model's (text) config, 0.0 for other models."""
    from kl_nontarget.base_model import transformers_model

    config = getattr(transformers_model(model), "config", None)
    if config is None:
        return 0.0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)


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
        from kl_nontarget.base_model import transformers_model

        inner = transformers_model(model)
        dtype = getattr(inner, "dtype", None)
        if dtype is not None:
            kwargs.setdefault("dtype", dtype)
        attn = getattr(getattr(inner, "config", None), "_attn_implementation", None)
        if attn is not None:
            kwargs.setdefault("attn_implementation", attn)
    kwargs.setdefault("device_map", None)
    return AutoModelForCausalLM.from_pretrained(os.fspath(name_or_path), **kwargs)


def prepare_trainer_ref_model(trainer, ref_model: nn.Module) -> nn.Module:
    """Freeze `ref_model` and prepare it for `trainer` as TRL prepares reference models.

    DeepSpeed: `trl.models.prepare_deepspeed` (ZeRO-3 partitions it like the model); FSDP: `trl.models.prepare_fsdp`;
    otherwise `accelerator.prepare_model(ref_model, evaluation_mode=True)`: device placement, the mixed-precision
    autocast, no DDP wrapper. A model dispatched with a device map keeps its placement.
    """
    ref_model.requires_grad_(False)
    ref_model.eval()
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        try:
            from trl.models import prepare_deepspeed, prepare_fsdp
        except ImportError as error:  # pragma: no cover - trl is a dependency
            raise ValueError("a ref_model under DeepSpeed or FSDP is prepared with TRL's helpers: install trl") \
                from error
        if trainer.is_deepspeed_enabled:
            return prepare_deepspeed(ref_model, trainer.accelerator)
        return prepare_fsdp(ref_model, trainer.accelerator)
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)
