"""Measuring forgetting: metrics against the base model, retention sets, and a callback that measures them during
training.

- `metrics`: Lf, Lf - H(base), retention perplexity, accuracy drift, the KL decomposition, target-task loss;
- `retention`: retention sets (text sampled from the base itself, or a user's data) as token rows;
- `forgetting_callback`: `ForgettingCallback`, for any `transformers.Trainer`;
- `loader`: token-id rows to padded batches (the evaluation loader, also the sweeps' training collator).
"""
