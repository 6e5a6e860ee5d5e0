"""What the trainers change in, or read from, a `transformers.Trainer`'s setup: Liger-Kernel's fused cross-entropy
turned off (`liger_without_fused_loss`), the TrainingArguments among a constructor's arguments (`trainer_args`), and a
reference model prepared the way TRL prepares its reference models (`prepare_trainer_ref_model`).

- Liger-Kernel (`use_liger_kernel=True`): its fused linear cross-entropy replaces the model's forward with one that
  computes the cross-entropy from the hidden states and never returns logits. The non-target KL needs both
  distributions, and has its own fused-linear path, so the trainers turn that one kernel off, as TRL's SFTTrainer
  does, and keep Liger's others (RoPE, RMSNorm, SwiGLU, ...). A forward that is Liger-patched anyway (applied by
  hand, or under the `compute_loss_func` hook, which cannot change the Trainer's arguments) still works: it is called
  without labels, so it returns logits, and the batch code passes it no boolean `logits_to_keep` and no `skip_logits`.
- A reference model (`prepare_trainer_ref_model`): DeepSpeed and FSDP through TRL's helpers, otherwise
  `accelerator.prepare_model(..., evaluation_mode=True)`.
"""

from __future__ import annotations

import warnings

from torch import nn

__all__ = ["liger_without_fused_loss", "prepare_trainer_ref_model", "trainer_args"]


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
