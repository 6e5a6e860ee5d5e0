"""The regularizer inside a `transformers.Trainer`: from a batch to the loss, the trainers, the `compute_loss_func`
hook, their options and configs, the base hidden-state cache, the adaptive weight and the logged components.

- `options`: `RegularizerOptions`, the one typed set of options; `config`: the same as TrainingArguments fields;
- `batch_rows`: a batch -> shifted labels and the adapted and base logits (or final hidden states);
- `step_loss`: which path a step takes (fused-linear or logits) and its one loss call;
- `trainer`: `NonTargetKLMixin`, `NonTargetKLTrainer`; `loss_func`: `nontarget_kl_loss_func`;
- `base_cache`, `precompute`: `precompute_base` (the store, and the trainers' use of it);
- `adaptive_weight` (`kl_target`), `component_log` (`ce_loss` / `nontarget_kl` logging), `trainer_args` (Liger's
  flag, reference models prepared like TRL's), `clean_exit` (multi-process gloo runs end cleanly).
"""
