"""The forgetting lab: experiments on how LoRA forgets, each one command on the user's model and data.

- `sequence`: tasks trained in order with the adapter merged after each (`kl-nontarget sequence`);
- `power_law`: forgetting against trained parameters and steps, and the fit Lf = A N^a S^b + E
  (`kl-nontarget powerlaw`).

Which modules to tune is a sweep dimension (`kl-nontarget sweep --target_presets attention,mlp_up_gate,all-linear`).
"""
