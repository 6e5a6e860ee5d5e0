"""The loss on tensors: cross-entropy plus the non-target KL, with its gradient, from logits (`logits_loss`) or from
final hidden states and an LM head (`linear_loss`). No transformers, no models: tensors in, loss and gradients out.

- `checks`: the checks of kl_weight, temperature and kl_direction;
- `params`: `RowParams` (one loss call's options), the reductions, the backend choice and the backward scaling;
- `torch_rows`, `triton_rows`: the two row backends (PyTorch on the CPU; the Triton kernel of
  `kl_nontarget.kernels` on the GPU), each returning per-row CE and KL and the already scaled gradient;
- `logits_loss`: `nontarget_kl_loss` / `NonTargetKLLoss` (logits in);
- `linear_loss`: `nontarget_kl_linear_loss` (hidden states and the head in, no N x V logits in memory).
"""
