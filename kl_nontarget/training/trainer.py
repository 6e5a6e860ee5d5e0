"""`NonTargetKLTrainer`: a transformers Trainer whose loss is cross-entropy plus the non-target KL to the base model.

The logic lives in `NonTargetKLMixin`, shared with `kl_nontarget.integrations.trl.NonTargetKLSFTTrainer`:

- `compute_loss` gets (adapted logits, base logits, shifted labels) on the supervised positions from
  `batch_rows.compute_batch_logits`, then calls `compute_regularized_loss`, the method a subclass overrides to change
  the regularizer (it receives already shifted and selected rows);
- with a plain linear LM head whose logit transform is known (`lm_head.linear_head`), the loss takes the final
  hidden states of both passes and the head's weight instead (`fused_linear`, see `NonTargetKLTrainer`), so no
  N x V logits exist; the logits path remains for evaluation with predictions, for subclasses that override
  `compute_regularized_loss`, and for other heads;
- the loss is normalised by the Trainer's `num_items_in_batch` (the shifted-label count over the accumulation window
  and the ranks), so accumulation and data parallelism give the gradients of one big batch;
- `ce_loss` and `nontarget_kl` are logged at every logging step (averaged over the window and the ranks, like
  `loss`), and evaluation reports `eval_ce_loss` and `eval_nontarget_kl`.
"""

from __future__ import annotations

import os
import warnings

import torch.nn.functional as F
from transformers import Trainer

from kl_nontarget.models.introspection import is_compiled, router_aux_loss_coef
from kl_nontarget.models.reference import check_base_source, load_ref_model
from kl_nontarget.ops.logits_loss import nontarget_kl_loss
from kl_nontarget.training.adaptive_weight import AdaptiveKLWeight
from kl_nontarget.training.base_cache import pop_index
from kl_nontarget.training.batch_rows import (
    IGNORE_INDEX,
    BatchHidden,
    compute_batch_hidden,
    compute_batch_logits,
    shifted_labels,
)
from kl_nontarget.training.clean_exit import install_exit_handler
from kl_nontarget.training.component_log import (
    ComponentLog,
    accelerator_gather,
    eval_metrics,
    metric_key_prefix,
    train_logs,
)
from kl_nontarget.training.config import merge_options, reference_model_spec
from kl_nontarget.training.options import RegularizerOptions, UsesRegularizerOptions, options_from
from kl_nontarget.training.precompute import INDEX_KEY, BasePrecompute, static_blocker
from kl_nontarget.training.step_loss import fused_loss, require_fused, step_heads
from kl_nontarget.training.trainer_args import liger_without_fused_loss, prepare_trainer_ref_model, trainer_args


class NonTargetKLMixin(UsesRegularizerOptions):
    """Loss, logging and evaluation of the non-target KL for a `transformers.Trainer` subclass.

    Call `_init_nontarget_kl(options, ref_model, ...)` at the end of `__init__`. The regularizer's options are
    `self.options` (a `RegularizerOptions`); `kl_weight`, `temperature`, `kl_direction` and `fused_linear` read it.
    When `self.args` is a config with the regularizer's fields (`kl_nontarget.training.config.NonTargetKLArguments`),
    the options (and the reference, `ref_model_name_or_path` / `ref_adapter_name`) come from it as well
    (`config.merge_options`).

    `regularizer_log_name`: the name the regularizer term is logged under (`eval_<name>` in evaluation). A subclass
    that overrides `compute_regularized_loss` declares its own; without one its term is logged as "regularizer",
    never as "nontarget_kl".
    """

    regularizer_log_name: str | None = None

    @property
    def options(self) -> RegularizerOptions:
        """The regularizer's options; with `kl_target`, `kl_weight` is the adaptive weight of this step."""
        adaptive = self.adaptive_kl_weight
        if adaptive is None or adaptive.kl_weight == self._options.kl_weight:
            return self._options
        return self._options.replace(kl_weight=adaptive.kl_weight)

    @options.setter
    def options(self, value: RegularizerOptions) -> None:
        self._options = value
        adaptive = self.adaptive_kl_weight
        if adaptive is not None:  # an explicit new weight (trainer.kl_weight = ...) restarts the controller there
            adaptive.kl_weight = value.kl_weight

    @property
    def adaptive_kl_weight(self) -> AdaptiveKLWeight | None:
        """The callback holding the adaptive weight (with `kl_target`), else None. Looked up in the callback list
        every time: resuming with restore_callback_states_from_checkpoint=True replaces the instance."""
        if getattr(self, "_options", None) is None or self._options.kl_target is None:
            return None
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, AdaptiveKLWeight)), None)

    def _init_nontarget_kl(self, options: RegularizerOptions | None = None, ref_model=None, *,
                           ref_adapter_name: str | None = None, ref_model_init_kwargs: dict | None = None,
                           **keywords):
        # Options given as keywords (or options=) and in args (a NonTargetKLConfig) are merged; a clash is an error.
        self.options = merge_options(options_from(options, **keywords), self.args)
        if self._options.kl_target is not None:
            self.add_callback(AdaptiveKLWeight(self._options.kl_target, self._options.kl_weight))
        configured, configured_kwargs = reference_model_spec(self.args)
        if configured is not None:
            if ref_model is not None:
                raise ValueError(f"ref_model= was given and args.ref_model_name_or_path={configured!r} too; pass one "
                                 "of them")
            ref_model, ref_model_init_kwargs = configured, configured_kwargs
        if ref_adapter_name is None:
            ref_adapter_name = getattr(self.args, "ref_adapter_name", None)
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = load_ref_model(ref_model, ref_model_init_kwargs, self.model)
        elif ref_model_init_kwargs is not None:
            raise ValueError("ref_model_init_kwargs applies when ref_model is a model name or path; got "
                             f"ref_model={type(ref_model).__name__}")
        if self.model is not None:
            # PiSSA, OLoRA, ...: the reference becomes a snapshot of the initial adapter (models/reference.py).
            ref_adapter_name = check_base_source(self.model, ref_model, ref_adapter_name)
        self.ref_adapter_name = ref_adapter_name
        self.ref_model = None if ref_model is None else prepare_trainer_ref_model(self, ref_model)
        self._loss_only_prediction = False
        if self.options.fused_linear is True:
            if self._overrides_regularized_loss():
                raise ValueError(f"fused_linear=True: {type(self).__name__} overrides compute_regularized_loss, which "
                                 "takes logits; use fused_linear='auto' or False")
            if self.model is not None:
                require_fused(self.model, self.ref_model)
        # precompute_base: the base hidden-state caches, built at train() (kl_nontarget.training.precompute).
        self.base_precompute = BasePrecompute(self)
        if self.options.precompute_base is True and self.model is not None:
            reason = static_blocker(self)
            if reason is not None:
                self.base_precompute.refuse_or_warn(reason)
        # The loss is normalised by `num_items_in_batch`: ask the Trainer to count the tokens of the accumulation
        # window (and not to divide the loss by the accumulation steps again).
        self.model_accepts_loss_kwargs = True
        self.component_log = ComponentLog()
        # Multi-process CPU (gloo) runs: finish the collectives before the interpreter exits (see clean_exit.py).
        install_exit_handler()

    # -- the loss ------------------------------------------------------------------------------------------------

    def compute_regularized_loss(self, logits, ref_logits, labels, num_items_in_batch):
        """(loss, ce, kl) on already shifted and selected rows; override to change the regularizer.

        Args:
            logits: (N, V) adapted logits at the supervised positions (with gradient).
            ref_logits: (N, V) base logits there (no gradient), same dtype and device.
            labels: (N,) gold ids.
            num_items_in_batch: the denominator D (token count over the accumulation window and ranks), or None to
                divide by N.

        Returns:
            `loss = (sum CE + kl_weight * T^2 * sum KL) / D`, and the detached `ce = sum CE / D` and
            `kl = sum KL / D` (the KL before kl_weight and T^2).
        """
        return nontarget_kl_loss(logits, ref_logits, labels, num_items_in_batch=num_items_in_batch,
                                 return_components=True, **self.options.loss_kwargs())

    def compute_fused_loss(self, batch: BatchHidden, num_items_in_batch):
        """(loss, ce, kl) of `compute_regularized_loss` from final hidden states and the LM head (no N x V logits)."""
        return fused_loss(batch, self.options, num_items_in_batch, return_components=True)

    def _overrides_regularized_loss(self):
        return type(self).compute_regularized_loss is not NonTargetKLMixin.compute_regularized_loss

    def _component_name(self) -> str:
        """The name the regularizer term is logged under (see `regularizer_log_name`)."""
        if self.regularizer_log_name:
            return self.regularizer_log_name
        return "regularizer" if self._overrides_regularized_loss() else "nontarget_kl"

    def _fused_heads(self, model, needs_logits):
        """The (head, ref_head) pair when this loss call takes the fused-linear path, else None."""
        if self._overrides_regularized_loss():
            return None
        # A compiled graph would not see the head-input hooks registered for one call (dynamo does not guard on
        # hooks): compiled models take the logits path.
        compiled = is_compiled(model) or (self.ref_model is not None and is_compiled(self.ref_model))
        heads, reason = step_heads(self.accelerator.unwrap_model(model), self.ref_model, self.options,
                                   needs_logits=needs_logits or compiled)
        if compiled:
            reason = "the model is compiled (torch.compile)"
        if heads is None and self.fused_linear is True and not needs_logits \
                and not getattr(self, "_fused_fallback_warned", False):
            self._fused_fallback_warned = True
            warnings.warn(f"fused_linear=True, but this step uses the logits: {reason}", UserWarning, stacklevel=3)
        return heads

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Trainer.prediction_step asks compute_loss for the outputs even when it keeps only the loss: tell it.
        self._loss_only_prediction = bool(prediction_loss_only)
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._loss_only_prediction = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        # The example indices of precompute_base never reach the model.
        inputs, example_indices = pop_index(inputs)
        if "labels" not in inputs and "shift_labels" not in inputs:
            raise ValueError(f"{type(self).__name__} needs 'labels' in every batch (use a collator that builds "
                             "them, with -100 on unsupervised positions); got keys " + ", ".join(inputs))
        # The PEFT base pass calls `model` itself, so accelerate's mixed-precision wrapper applies to both passes; a
        # separate ref_model gets the same autocast explicitly.
        base_context = self.accelerator.autocast() if self.ref_model is not None else None
        unwrapped = self.accelerator.unwrap_model(model)
        # The fused path returns the final hidden states in the outputs' `hidden_states` field: a batch that asks for
        # all hidden states takes the logits path.
        needs_logits = (return_outputs and not self._loss_only_prediction) or bool(inputs.get("output_hidden_states"))
        heads = self._fused_heads(model, needs_logits)
        if heads is not None:
            base_hidden = self.base_precompute.base_hidden(inputs, example_indices, model.training, heads)
            batch = compute_batch_hidden(model, inputs, heads, ref_model=self.ref_model, unwrapped=unwrapped,
                                         base_context=base_context, ref_adapter_name=self.ref_adapter_name,
                                         base_hidden=base_hidden)
            loss, ce, kl = self.compute_fused_loss(batch, num_items_in_batch)
            # prediction_step with prediction_loss_only keeps the loss only; the logits were never built.
            outputs = {"loss": loss.detach()}
        else:
            batch = compute_batch_logits(model, inputs, ref_model=self.ref_model, unwrapped=unwrapped,
                                         use_logits_mask=not return_outputs, base_context=base_context,
                                         ref_adapter_name=self.ref_adapter_name)
            loss, ce, kl = self.compute_regularized_loss(batch.logits, batch.ref_logits, batch.labels,
                                                         num_items_in_batch)
            outputs = batch.outputs
        scale = 1.0
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: the count covers every rank and DDP averages the gradients
            # (docs/design.md, "Reductions").
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = self.accelerator.num_processes // tp_size if self.args.n_gpu <= 1 else self.args.n_gpu
            loss = loss * scale
        loss = self._add_router_aux_loss(loss, batch.outputs, scale, num_items_in_batch)
        self._record_components(ce, kl, scale, num_items_in_batch, inputs, model)
        self._after_loss(batch, inputs, model)
        return (loss, outputs) if return_outputs else loss

    def _add_router_aux_loss(self, loss, outputs, scale, num_items_in_batch):
        """MoE models returning `aux_loss`: add `router_aux_loss_coef * aux_loss` of the adapted pass, as the model's
        own loss does under `Trainer` (inside the loss that the data-parallel factor `scale` multiplies)."""
        aux = getattr(outputs, "aux_loss", None) if outputs is not None else None
        if aux is None:
            return loss
        coef = router_aux_loss_coef(self.model)
        if coef == 0:
            return loss
        return loss + (coef * scale) * aux.to(loss.device)

    def _after_loss(self, batch, inputs, model):
        """Hook for subclasses (the SFT subclass computes TRL's metrics here); `batch` is a `batch_rows.BatchLogits`
        or, on the fused-linear path, a `batch_rows.BatchHidden`."""

    # -- counting tokens -----------------------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples, device):
        # Count the *shifted* supervised labels whatever the transformers version counts: a tensor with a -100
        # first column counts the same whether the Trainer counts labels or labels[..., 1:].
        counted = []
        for batch in batch_samples:
            if not isinstance(batch, dict) or ("labels" not in batch and "shift_labels" not in batch):
                return super()._get_num_items_in_batch(batch_samples, device)
            target = shifted_labels(batch)
            counted.append({"labels": F.pad(target, (1, 0), value=IGNORE_INDEX)})
        return super()._get_num_items_in_batch(counted, device)

    # -- logging -------------------------------------------------------------------------------------------------

    def _record_components(self, ce, kl, scale, num_items_in_batch, inputs, model):
        mode = "train" if model.training else "eval"
        if mode == "train":
            # Scaled like the loss the Trainer logs: summed over the micro-batches of a step, it is that step's mean.
            if num_items_in_batch is None:
                steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                scale = scale / steps
            weight = scale
        else:
            # Evaluation averages per-batch values weighted by batch size, like `eval_loss`.
            labels = inputs.get("labels", inputs.get("shift_labels"))
            weight = float(labels.shape[0])
        self.component_log.add(mode, ce, kl, weight, self.state.global_step)
        adaptive = self.adaptive_kl_weight
        if mode == "train" and adaptive is not None:
            adaptive.observe(kl * weight)

    def _gathered(self, value):
        return accelerator_gather(self.accelerator, self.args.device)(value)

    def train(self, *args, **kwargs):
        # Loss calls made outside training (by hand, or before a resume) must not leak into the first logging window.
        self.component_log.reset("train")
        # precompute_base: find or build the caches, key the datasets for the run, and unkey them afterwards.
        self.base_precompute.prepare()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.base_precompute.restore()

    def _set_signature_columns_if_needed(self):
        # The example-index column of precompute_base must survive remove_unused_columns.
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and INDEX_KEY not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, INDEX_KEY]

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            components = train_logs(self.component_log, self.state.global_step, self._gathered,
                                    self._component_name())
            logs.update(components)
            if components and self.adaptive_kl_weight is not None:
                logs["kl_weight"] = self.adaptive_kl_weight.kl_weight
        return super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        self.component_log.reset("eval")
        output = super().evaluation_loop(*args, **kwargs)
        prefix = metric_key_prefix(super().evaluation_loop, args, kwargs)
        output.metrics.update(eval_metrics(self.component_log, self._gathered, prefix, self._component_name()))
        return output


class NonTargetKLTrainer(NonTargetKLMixin, Trainer):
    """`transformers.Trainer` with loss = CE + kl_weight * T^2 * KL(base_nontarget || adapted_nontarget).

    The base distribution comes from the PEFT model with its adapters disabled, from a frozen reference adapter
    (`ref_adapter_name`; made automatically, as `initial`, from the initial adapter when its init rewrote the base
    weights: PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA), or from `ref_model` (full fine-tuning).

    Args:
        *args, **kwargs: the usual `transformers.Trainer` arguments. The batches need `labels` (unshifted, -100 on
            unsupervised positions).
        kl_weight: weight of the non-target KL (>= 0; 0 gives plain cross-entropy).
        temperature: temperature of both non-target distributions (the KL is scaled by T^2).
        kl_direction: "forward" for KL(base || adapted) (default), "reverse" for KL(adapted || base).
        ref_model: a frozen base model; required when `model` is not a PEFT model.
        fused_linear: "auto" (default): when the model's LM head is a plain `nn.Linear` and its architecture's logit
            transform is known (`lm_head.HEAD_TRANSFORMS`: Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi, Phi3, Cohere,
            Granite), compute the loss from the final hidden states of both passes and the head's weight
            (`nontarget_kl_linear_loss`), in chunks, without the N x V logits; otherwise use the logits. True:
            the same, but raise at construction when the model does not qualify. False: always the logits. The
            logits are also used when evaluation needs predictions (`compute_metrics`), and when a subclass
            overrides `compute_regularized_loss`. Both paths give the same loss and gradients up to float rounding.
        precompute_base: False (default), True or "auto": compute the base model's final hidden states at the
            supervised positions of the train and eval datasets once, at `train()`, store them in `base_cache_dir`
            (memory-mapped Arrow, one file per base model, data and collation) and use them at every step instead of
            the base pass; later runs on the same model and data (more epochs, a kl_weight sweep) find the file and
            run no base pass at all. Needs the fused-linear path and a map-style dataset; True raises where the cache
            cannot apply, "auto" warns and runs the base pass at every step. See README, "Precomputing the base".
        base_cache_dir: where the caches live (default: `base_hidden` in `$KL_NONTARGET_CACHE`, else in
            ~/.cache/kl-nontarget).
        kl_target: None (default) for a fixed kl_weight; a number > 0 makes the weight adaptive, starting at
            `kl_weight` and steered after every optimizer step so that the logged `nontarget_kl` tracks the target
            (`kl_nontarget.training.adaptive_weight`). The current weight is logged as `kl_weight` and saved with
            checkpoints.
        options: all of the above but `ref_model` as one `kl_nontarget.training.options.RegularizerOptions` (then
            leave the keywords at their defaults); held as `trainer.options`.
        ref_model: also a model name or path, loaded with `ref_model_init_kwargs` (default: the model's dtype and
            attention implementation) and prepared like TRL's reference models (`models.reference.load_ref_model`).
        ref_adapter_name: an adapter loaded in the PeftModel (frozen here) whose outputs are the reference, instead
            of the model with adapters disabled: continuing from a trained adapter
            (`ref_adapter_name=kl_nontarget.snapshot_adapter(model)` keeps the model as it starts).

    With `use_liger_kernel=True`, Liger's fused_linear_cross_entropy is turned off (it returns no logits); its other
    kernels apply. MoE models add `router_aux_loss_coef * aux_loss` of the adapted pass, as `Trainer` does.

    With `args=kl_nontarget.NonTargetKLConfig(...)` the options are read from `args` (`kl_weight`, `kl_temperature`,
    `kl_direction`, `kl_fused_linear`, and the reference from `ref_model_name_or_path`); they are then saved with the
    checkpoints (`training_args.bin`) and logged with the run config. Keywords still work: a keyword at its default
    leaves the config's value, and the same option set both ways to different values is a ValueError.
    """

    def __init__(self, *args, kl_weight: float = 1.0, temperature: float = 1.0, kl_direction: str = "forward",
                 ref_model=None, fused_linear="auto", kl_target: float | None = None,
                 precompute_base=False, base_cache_dir=None,
                 options: RegularizerOptions | None = None, ref_adapter_name: str | None = None,
                 ref_model_init_kwargs: dict | None = None, **kwargs):
        options = options_from(options, kl_weight=kl_weight, temperature=temperature, kl_direction=kl_direction,
                               fused_linear=fused_linear, kl_target=kl_target, precompute_base=precompute_base,
                               base_cache_dir=base_cache_dir)
        liger_without_fused_loss(trainer_args(args, kwargs), type(self).__name__)
        super().__init__(*args, **kwargs)
        self._init_nontarget_kl(options, ref_model, ref_adapter_name=ref_adapter_name,
                                ref_model_init_kwargs=ref_model_init_kwargs)
