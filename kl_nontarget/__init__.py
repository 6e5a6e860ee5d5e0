"""kl-nontarget: LoRA fine-tuning with a non-target KL regularizer against forgetting.

At every supervised token the gold entry is removed from the base and the adapted next-token distributions, the
rest renormalised, and `kl_weight * KL(base || adapted)` added to the cross-entropy.

Public API: `nontarget_kl_loss` / `NonTargetKLLoss` (logits in), `nontarget_kl_linear_loss` (hidden states in),
`NonTargetKLTrainer` (transformers), and in `kl_nontarget.trl`: `NonTargetKLSFTTrainer`, `nontarget_kl_loss_func`.
"""

from kl_nontarget.linear import nontarget_kl_linear_loss
from kl_nontarget.loss import NonTargetKLLoss, nontarget_kl_loss

__all__ = ["NonTargetKLLoss", "NonTargetKLTrainer", "nontarget_kl_linear_loss", "nontarget_kl_loss"]
__version__ = "0.1.0"


def __getattr__(name):
    # The trainer pulls in transformers: import it only when asked for.
    if name == "NonTargetKLTrainer":
        from kl_nontarget.trainer import NonTargetKLTrainer
        return NonTargetKLTrainer
    raise AttributeError(f"module 'kl_nontarget' has no attribute {name!r}")
