"""`ForgettingCallback`: measure forgetting during training, with any `transformers.Trainer`.

Reporting only the target metric hides forgetting. At every evaluation and at the end of training this callback
measures, on a retention set, how far the model has drifted from its base:

- `eval_forgetting` = Lf − H(base) = KL(base || model) per token (0 for an unchanged model);
- `eval_retention_ppl`: the model's perplexity on the retention text.

The retention set is the user's data or, by default, text sampled once from the base model itself (see
`kl_nontarget.evaluation.retention`), so it needs no replay data. The base is the PEFT model with its adapters disabled,
or an explicit `base_model`. Cost per measurement: one no-grad forward of the model and one of the base over the set
(default 32 samples of at most 64 new tokens, about two thousand tokens), plus one sampling pass before training.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from kl_nontarget.evaluation.metrics import forgetting_metrics
from kl_nontarget.evaluation.retention import batches, has_text, rows_from_data, sample_from_base
from kl_nontarget.models.introspection import unwrap_model
from kl_nontarget.models.reference import initial_reference


class ForgettingCallback(TrainerCallback):
    """Logs `eval_forgetting` and `eval_retention_ppl` at every evaluation and at the end of training.

    Args:
        trainer: the trainer whose logs receive the values (so W&B, TensorBoard and the console get them, as TRL's
            callbacks do). Without it the values are added to the metrics that `trainer.evaluate()` returns and to
            `state.log_history`, but the reporting integrations do not see them. Also settable with `attach()`.
        retention_data: a `datasets.Dataset` or a list of examples with `text` or `input_ids`; None samples the
            retention set from the base model.
        base_model: an explicit base model; None means the trained PEFT model with its adapters disabled.
        tokenizer: to tokenize `text` and the sampling prompts; default: the trainer's `processing_class`.
        num_samples, max_new_tokens, seed: size and seed of the sampled retention set.
        batch_size: rows per forward pass when measuring.
        max_length: truncation of the user's texts, in tokens.
        prefix: metric prefix (`eval` gives `eval_forgetting`).
    """

    def __init__(self, trainer=None, *, retention_data=None, base_model=None, tokenizer=None, num_samples: int = 32,
                 max_new_tokens: int = 64, seed: int = 0, batch_size: int = 8, max_length: int = 512,
                 prefix: str = "eval"):
        for name, value in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens),
                            ("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.trainer = trainer
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.sampling = {"num_samples": num_samples, "max_new_tokens": max_new_tokens, "seed": seed}
        self.batch_size = batch_size
        self.max_length = max_length
        self.prefix = prefix
        self.rows = None
        self._data = retention_data
        self._last_step = None
        self._last_values = None
        self._warned = False
        if retention_data is not None:
            # Bad data is refused now, before any training; texts wait for the trainer's tokenizer if none is given.
            if tokenizer is not None or not has_text(retention_data):
                self.rows = rows_from_data(retention_data, tokenizer, max_length=max_length)

    def attach(self, trainer) -> ForgettingCallback:
        """Log through `trainer` and add this callback to it; returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # -- the retention set ---------------------------------------------------------------------------------------

    def retention_rows(self, model, tokenizer=None) -> list[dict]:
        """The retention rows, built on first use (sampled from the base model when no data was given)."""
        if self.rows is not None:
            return self.rows
        tokenizer = self.tokenizer or tokenizer
        if self._data is not None:
            self.rows = rows_from_data(self._data, tokenizer, max_length=self.max_length)
        else:
            if tokenizer is None:
                raise ValueError("ForgettingCallback samples its retention set from the base model and needs a "
                                 "tokenizer: pass tokenizer=, or give the trainer a processing_class")
            self.rows = sample_from_base(model, tokenizer, base_model=self.base_model, **self.sampling)
        return self.rows

    def _pad_id(self, tokenizer):
        tokenizer = self.tokenizer or tokenizer
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(tokenizer, attr, None) if tokenizer is not None else None
            if value is not None:
                return value
        return 0

    def measure(self, model, tokenizer=None) -> dict:
        """`{prefix_forgetting, prefix_retention_ppl}` of `model` now."""
        rows = self.retention_rows(model, tokenizer)
        m = forgetting_metrics(model, list(batches(rows, self._pad_id(tokenizer), self.batch_size)),
                               base_model=self.base_model, progress=False)
        return {f"{self.prefix}_forgetting": m["lf_kl"], f"{self.prefix}_retention_ppl": m["retention_ppl"]}

    # -- Trainer events ------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        # Draw the sample before any update, so it comes from the base whatever the adapters are.
        if model is not None:
            if self.base_model is None:
                # PiSSA, OLoRA, ...: the base is the model as it starts (the trainers have snapshotted it already).
                initial_reference(unwrap_model(model))
            self.retention_rows(unwrap_model(model), processing_class)

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        self._report(state, model, processing_class, metrics)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self._last_step != state.global_step:
            self._report(state, model, processing_class, None)

    def _report(self, state, model, processing_class, metrics):
        if model is None:
            return
        if self._last_step == state.global_step and metrics is not None and self._last_values is not None:
            metrics.update(self._last_values)  # several eval datasets at one step: measure once
            return
        values = self.measure(unwrap_model(model), processing_class)
        self._last_step, self._last_values = state.global_step, values
        if metrics is not None:
            metrics.update(values)
        if self.trainer is not None:
            self.trainer.log(dict(values))
            return
        state.log_history.append({**values, "step": state.global_step})
        if not self._warned:
            self._warned = True
            warnings.warn("ForgettingCallback was created without trainer=: eval_forgetting reaches the metrics and "
                          "state.log_history, but not the reporting integrations; use ForgettingCallback(trainer, ...)"
                          " or callback.attach(trainer)", UserWarning, stacklevel=2)
