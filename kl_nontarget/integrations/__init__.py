"""The regularizer in other training frameworks, built on `kl_nontarget.training`.

- `trl`: `NonTargetKLSFTTrainer` and `NonTargetKLSFTConfig` for TRL's `SFTTrainer`.
- `axolotl`: `NonTargetKLPlugin`, the axolotl plugin (`plugins: [kl_nontarget.integrations.axolotl.NonTargetKLPlugin]`);
  its config keys are `axolotl_args.NonTargetKLArgs`. Imported only by axolotl (it imports axolotl).
"""
