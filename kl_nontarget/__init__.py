"""kl-nontarget: LoRA fine-tuning with a non-target KL regularizer against forgetting.

At every supervised token the gold entry is removed from the base and the adapted next-token distributions, the
rest renormalised, and `kl_weight * KL(base || adapted)` added to the cross-entropy.

Public API: `nontarget_kl_loss` / `NonTargetKLLoss` (logits in), `nontarget_kl_linear_loss` (hidden states in),
`NonTargetKLTrainer` (transformers), `NonTargetKLSFTTrainer` (TRL), `nontarget_kl_loss_func` (the
`compute_loss_func` hook, for either; also in `kl_nontarget.integrations.trl`), `RegularizerOptions`, the options they
share, and `NonTargetKLConfig`, a `TrainingArguments` holding them (`kl_nontarget.integrations.trl.NonTargetKLSFTConfig`
for TRL), `ForgettingCallback` (forgetting measured during training) and `snapshot_adapter` (a frozen copy of the
trained adapter, to pass as `ref_adapter_name=`).
"""

from kl_nontarget.ops.linear_loss import nontarget_kl_linear_loss
from kl_nontarget.ops.logits_loss import NonTargetKLLoss, nontarget_kl_loss
from kl_nontarget.training.options import RegularizerOptions

__all__ = ["ForgettingCallback", "NonTargetKLConfig", "NonTargetKLLoss", "NonTargetKLSFTConfig",
           "NonTargetKLSFTTrainer", "NonTargetKLTrainer", "RegularizerOptions", "nontarget_kl_linear_loss",
           "nontarget_kl_loss", "nontarget_kl_loss_func", "snapshot_adapter"]
__version__ = "0.1.0"

# The trainers pull in transformers and TRL: import them only when asked for.
_LAZY = {
    "ForgettingCallback": "kl_nontarget.evaluation.forgetting_callback",
    "NonTargetKLTrainer": "kl_nontarget.training.trainer",
    "NonTargetKLConfig": "kl_nontarget.training.config",
    "NonTargetKLSFTConfig": "kl_nontarget.integrations.trl",
    "NonTargetKLSFTTrainer": "kl_nontarget.integrations.trl",
    "nontarget_kl_loss_func": "kl_nontarget.training.loss_func",
    "snapshot_adapter": "kl_nontarget.models.reference",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kl_nontarget' has no attribute {name!r}")
