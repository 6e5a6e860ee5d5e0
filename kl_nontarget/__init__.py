"""kl-nontarget: LoRA fine-tuning with a non-target KL regularizer against forgetting.

At every supervised token the gold entry is removed from the base and the adapted next-token distributions, the
rest renormalised, and `kl_weight * KL(base || adapted)` added to the cross-entropy.
"""

from kl_nontarget.loss import NonTargetKLLoss, nontarget_kl_loss

__all__ = ["NonTargetKLLoss", "nontarget_kl_loss"]
__version__ = "0.1.0"
