"""The model being trained and its base: what the model is made of, where the base distribution comes from, and the
LM head. Knows PEFT and transformers models; knows nothing of Trainers.

- `introspection`: wrappers (DDP, torch.compile, PEFT), adapter layers, devices, patched forwards, MoE coefficient;
- `base_pass`: the base model's outputs with the adapters disabled (or a reference adapter active), no gradient;
- `reference`: the reference's three sources (disabled adapters, a reference adapter, a `ref_model`), their checks,
  `snapshot_adapter` and `load_ref_model`;
- `lm_head`: the heads the fused-linear loss can reproduce (`HEAD_TRANSFORMS`), their input captured, their weights
  gathered where sharded;
- `loading`: model paths (a checkpoint folder, a GGUF file, `smollm2`) resolved to a trainable checkpoint.
"""
