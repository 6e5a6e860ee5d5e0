"""The regularizer in other training frameworks, built on `kl_nontarget.training`.

- `trl`: `NonTargetKLSFTTrainer` and `NonTargetKLSFTConfig` for TRL's `SFTTrainer`.
"""
