"""The `compute_loss_func` hook: `nontarget_kl_loss_func(model, ...)` for `transformers.Trainer` or `trl.SFTTrainer`.

It captures the forward inputs with a forward pre-hook on `model`, ignoring TRL's `fused_lm_head=True` calls and its
own base pass, and holds no tensors between steps. Call `.remove()` when done. It takes the fused-linear path (final
hidden states and the LM head, no N x V logits) when the model qualifies, like the trainers (`step_loss.step_heads`).
This module does not import TRL.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from kl_nontarget.models.base_pass import autocast_like, autocast_state
from kl_nontarget.models.introspection import (
    device_of,
    has_adapters,
    is_compiled,
    router_aux_loss_coef,
    transformers_model,
    unwrap_model,
)
from kl_nontarget.models.lm_head import register_head_capture
from kl_nontarget.models.reference import check_base_source, load_ref_model, prepare_ref_model
from kl_nontarget.training.adaptive_weight import next_weight, rank_mean
from kl_nontarget.training.batch_rows import compute_batch_hidden, compute_batch_logits
from kl_nontarget.training.clean_exit import install_exit_handler
from kl_nontarget.training.component_log import (
    ComponentLog,
    accelerator_gather,
    eval_metrics,
    metric_key_prefix,
    train_logs,
)
from kl_nontarget.training.options import RegularizerOptions, UsesRegularizerOptions, options_from
from kl_nontarget.training.step_loss import fused_loss, logits_loss, require_fused, step_heads

__all__ = ["NonTargetKLLossFunc", "nontarget_kl_loss_func"]


class NonTargetKLLossFunc(UsesRegularizerOptions):
    """`compute_loss_func` for transformers.Trainer / trl.SFTTrainer; see `nontarget_kl_loss_func`."""

    def __init__(self, model: nn.Module, *, kl_weight: float = 1.0, temperature: float = 1.0,
                 kl_direction: str = "forward", ref_model: nn.Module | str | None = None, fused_linear="auto",
                 kl_target: float | None = None, options: RegularizerOptions | None = None,
                 ref_adapter_name: str | None = None, ref_model_init_kwargs: dict | None = None):
        self.options = options_from(options, kl_weight=kl_weight, temperature=temperature, kl_direction=kl_direction,
                                    fused_linear=fused_linear, kl_target=kl_target)
        if self.options.precompute_base is not False:
            # The hook never sees the dataset, so it cannot build the cache.
            message = ("precompute_base is a trainer option (NonTargetKLTrainer, NonTargetKLSFTTrainer): the "
                       "compute_loss_func hook never sees the dataset")
            if self.options.precompute_base is True:
                raise ValueError(message)
            warnings.warn(message + "; the base pass runs at every step", UserWarning, stacklevel=3)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if is_compiled(model):
            raise ValueError(
                "nontarget_kl_loss_func cannot follow a torch.compile'd model: its forward pre-hook and the adapter "
                "switch of the base pass are invisible to the compiled graph. Pass the model before compiling it, "
                "and compile through the trainer (TrainingArguments(torch_compile=True)) with NonTargetKLTrainer or "
                "NonTargetKLSFTTrainer, which support it.")
        self._head = None  # (heads, capture, hook handles) of the adapted forward in flight on the fused path
        self.model = unwrap_model(model)
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = load_ref_model(ref_model, ref_model_init_kwargs, self.model)
        elif ref_model_init_kwargs is not None:
            raise ValueError("ref_model_init_kwargs applies when ref_model is a model name or path")
        self.ref_model = ref_model
        self.ref_adapter_name = ref_adapter_name
        self.component_log = ComponentLog()
        self._trainer = None  # the Trainer bound with `bind` (its log and evaluation_loop are wrapped)
        self._unbound_warned = False
        self._checked = False
        adapters = has_adapters(self.model)
        if ref_model is not None or ref_adapter_name is not None or adapters:
            # A plain model may still be wrapped later (SFTTrainer(peft_config=...)): then check at the first call.
            self._check()
        self._captured = None
        self._in_base_pass = False
        if self.options.fused_linear is True and (ref_model is not None or adapters):
            require_fused(self.model, ref_model)
        self._handles = [self.model.register_forward_pre_hook(self._capture, with_kwargs=True)]
        embeddings = _input_embeddings(self.model)
        if embeddings is not None:
            # Accelerate's mixed precision wraps the outermost forward in autocast, inside the pre-hook above: read
            # the autocast state where the forward actually runs (no tensors are kept).
            self._handles.append(embeddings.register_forward_pre_hook(self._note_autocast))

    def _check(self):
        self.ref_adapter_name = check_base_source(self.model, self.ref_model, self.ref_adapter_name)
        if self.ref_model is not None:
            prepare_ref_model(self.ref_model, device_of(self.model, default=None))
        self._checked = True

    def _capture(self, module, args, kwargs):
        if self._in_base_pass or kwargs.get("fused_lm_head"):
            return None
        replaced = None
        if kwargs.get("skip_logits") and kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
            # Loss-only evaluation with use_liger_kernel: the Trainer asks Liger's forward to skip the logits, but
            # has popped the labels for compute_loss_func; this loss needs the logits.
            kwargs = {k: v for k, v in kwargs.items() if k != "skip_logits"}
            replaced = (args, kwargs)
        self._release_head()
        device_type = next((v.device.type for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), "cpu")
        training = module.training and torch.is_grad_enabled()
        self._captured = {"args": tuple(args), "kwargs": dict(kwargs), "device_type": device_type,
                          "autocast": autocast_state(device_type), "training": training}
        # A training forward (train mode, gradients on, no labels: the Trainer popped them for compute_loss_func)
        # hands its final hidden states to the loss; its head then projects the last position only.
        training_forward = (training
                            and not any(kwargs.get(k) is not None for k in ("labels", "shift_labels", "logits_to_keep"))
                            and not kwargs.get("output_hidden_states"))
        if training_forward:
            heads, _reason = step_heads(self.model, self.ref_model, self.options)
            if heads is not None:
                capture, handles = register_head_capture(heads[0].module, transformers_model(self.model))
                self._head = (heads, capture, handles)
        return replaced

    def _release_head(self):
        head, self._head = self._head, None
        if head is not None:
            for handle in head[2]:
                handle.remove()
        return head

    def _note_autocast(self, module, args):
        captured = self._captured
        if self._in_base_pass or captured is None:
            return None
        captured["autocast"] = autocast_state(captured["device_type"])
        return None

    def __call__(self, outputs, labels, num_items_in_batch=None, **_):
        captured, self._captured = self._captured, None
        head = self._release_head()
        if not self._handles:
            raise RuntimeError("this loss function was removed (.remove()); create a new one with "
                               "nontarget_kl_loss_func(model, ...)")
        if captured is None:
            raise RuntimeError("nontarget_kl_loss_func saw no forward call of the model it was created with; pass "
                               "the same model (or its PEFT wrapper) to the trainer")
        if not self._checked:
            self._check()
        if self._trainer is None and captured["training"] and not self._unbound_warned:
            self._unbound_warned = True
            warnings.warn("nontarget_kl_loss_func is not bound to a Trainer, so ce_loss and nontarget_kl are not "
                          "logged: call loss_func.bind(trainer) once the trainer exists", UserWarning, stacklevel=2)
        install_exit_handler()  # multi-process gloo runs: a clean exit (see kl_nontarget/training/clean_exit.py)
        inputs = dict(captured["kwargs"])
        if labels is not None:
            inputs["labels"] = labels
        # The base pass runs at the adapted pass's precision: the same autocast, replayed.
        base_context = autocast_like(captured["device_type"], captured["autocast"])
        if head is not None and head[1].calls > 0:
            heads, capture, _handle = head
            self._in_base_pass = True
            try:
                batch = compute_batch_hidden(self.model, inputs, heads, ref_model=self.ref_model,
                                             adapted_hidden=capture.take("the model", outputs),
                                             adapted_autocast=capture.autocast, adapted_outputs=outputs,
                                             forward_args=captured["args"], base_context=base_context,
                                             ref_adapter_name=self.ref_adapter_name)
            finally:
                self._in_base_pass = False
            loss, ce, kl = fused_loss(batch, self.options, num_items_in_batch, return_components=True)
        else:
            self._in_base_pass = True
            try:
                batch = compute_batch_logits(self.model, inputs, ref_model=self.ref_model, adapted_outputs=outputs,
                                             forward_args=captured["args"], base_context=base_context,
                                             ref_adapter_name=self.ref_adapter_name)
            finally:
                self._in_base_pass = False
            loss, ce, kl = logits_loss(batch, self.options, num_items_in_batch, return_components=True)
        self._record(ce, kl, num_items_in_batch, inputs)
        if self.options.kl_target is not None and captured["training"]:
            # Adaptive weight: the hook sees micro-batches, so it updates after every training call; every rank
            # takes the same step from the rank-averaged KL.
            self.options = self.options.replace(kl_weight=next_weight(self.options.kl_weight, rank_mean(kl),
                                                                      self.options.kl_target))
        # MoE: the router's load-balancing loss of the adapted pass, as the model's own loss adds it.
        aux = getattr(outputs, "aux_loss", None)
        coef = router_aux_loss_coef(self.model) if aux is not None else 0
        if coef != 0:
            loss = loss + coef * aux.to(loss.device)
        # No `average_tokens_across_devices` scaling here: the Trainer applies it to compute_loss_func's loss.
        return loss

    # -- logging through the bound Trainer -----------------------------------------------------------------------

    @property
    def trainer(self):
        """The Trainer this loss function logs through (`bind`), or None."""
        return self._trainer

    def bind(self, trainer):
        """Log `ce_loss` / `nontarget_kl` (and `eval_ce_loss` / `eval_nontarget_kl`) through `trainer`, the Trainer
        created with `compute_loss_func=` this loss function; returns `trainer`.

        Its `log` and `evaluation_loop` are wrapped (undone by `.remove()`, or by binding another trainer). The
        binding is explicit, so a loss function never logs through another Trainer of the same process. ValueError
        when `trainer.compute_loss_func` is not this loss function.
        """
        if getattr(trainer, "compute_loss_func", None) is not self:
            raise ValueError(f"bind(trainer): this {type(trainer).__name__}'s compute_loss_func is not this loss "
                             "function; create the trainer with compute_loss_func=loss_func, then bind it")
        if trainer is self._trainer:
            return trainer
        self._detach()
        self._trainer = trainer
        gather = accelerator_gather(trainer.accelerator, trainer.args.device)
        log, evaluation_loop = trainer.log, trainer.evaluation_loop
        component_log = self.component_log

        def log_with_components(logs, *args, **kwargs):
            if "loss" in logs:
                logs.update(train_logs(component_log, trainer.state.global_step, gather))
            return log(logs, *args, **kwargs)

        def evaluation_loop_with_components(*args, **kwargs):
            component_log.reset("eval")
            output = evaluation_loop(*args, **kwargs)
            prefix = metric_key_prefix(evaluation_loop, args, kwargs)
            output.metrics.update(eval_metrics(component_log, gather, prefix))
            return output

        trainer.log = log_with_components
        trainer.evaluation_loop = evaluation_loop_with_components
        return trainer

    def _record(self, ce, kl, num_items_in_batch, inputs):
        trainer = self._trainer
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            # Scaled like the loss the Trainer logs (it multiplies compute_loss_func's loss by the process count).
            weight = 1.0
            if trainer is not None and trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
                weight = float(trainer.accelerator.num_processes)
        else:
            weight = float(inputs["labels"].shape[0]) if "labels" in inputs else 1.0
        step = trainer.state.global_step if trainer is not None else 0
        self.component_log.add(mode, ce, kl, weight, step)

    def _detach(self):
        trainer, self._trainer = self._trainer, None
        if trainer is not None:
            for name in ("log", "evaluation_loop"):
                trainer.__dict__.pop(name, None)

    def remove(self):
        """Detach the forward pre-hooks from the model and drop every captured reference."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = None
        self._release_head()
        self._detach()

    def __repr__(self):
        return (f"NonTargetKLLossFunc(kl_weight={self.kl_weight}, temperature={self.temperature}, "
                f"kl_direction={self.kl_direction!r}, ref_model={'set' if self.ref_model is not None else None}, "
                f"fused_linear={self.fused_linear!r})")


def _input_embeddings(model):
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embeddings if isinstance(embeddings, nn.Module) else None


def nontarget_kl_loss_func(model: nn.Module, *, kl_weight: float = 1.0, temperature: float = 1.0,
                           kl_direction: str = "forward", ref_model: nn.Module | str | None = None,
                           fused_linear="auto", kl_target: float | None = None,
                           options: RegularizerOptions | None = None, ref_adapter_name: str | None = None,
                           ref_model_init_kwargs: dict | None = None) -> NonTargetKLLossFunc:
    """A `compute_loss_func` adding the non-target KL to the cross-entropy, for Trainer or SFTTrainer.

    Args:
        model: the model passed to the trainer (a PEFT model, or the plain model when SFTTrainer wraps it with
            `peft_config=`, or any model together with `ref_model`).
        kl_weight, temperature, kl_direction, ref_model: as for `kl_nontarget.NonTargetKLTrainer`.
        fused_linear: "auto" (default), True or False, as for `kl_nontarget.NonTargetKLTrainer`. On the fused path
            a training forward of the model (train mode, gradients enabled, no `labels` in its inputs: how the Trainer
            calls it for `compute_loss_func`) passes its final hidden states to this loss, and its returned logits
            cover the last position only. Evaluation forwards (no gradients) keep their full logits. Pass False if
            other code needs the full logits of training-mode forwards.
        kl_target: None, or a number > 0 for an adaptive weight as in `kl_nontarget.NonTargetKLTrainer`; the hook
            sees micro-batches, not optimizer steps, so it updates the weight after every training call (with the KL
            averaged over ranks) and does not save it with checkpoints: prefer the trainers for long resumable runs.
        options: the options above (not `ref_model`) as one `RegularizerOptions`; held as `.options`.
        ref_adapter_name, ref_model_init_kwargs: as for `kl_nontarget.NonTargetKLTrainer` (a `ref_model` given by
            name is loaded at once and moved to the model's device).

    Logging: `loss_func.bind(trainer)` wraps the trainer's `log` and `evaluation_loop` (undone by `.remove()`), so
    `ce_loss` and `nontarget_kl` (and `eval_ce_loss`, `eval_nontarget_kl`) are logged as by the trainers; an unbound
    loss function computes the same loss, logs no components and warns once. MoE models returning `aux_loss` get
    `router_aux_loss_coef * aux_loss` added. A `torch.compile`d model is refused.

    Returns:
        A callable `(outputs, labels, num_items_in_batch=None) -> loss` with a `.remove()` method that detaches its
        forward pre-hooks from `model` (one on the model, one on its input embeddings to read the mixed-precision
        autocast state). The hook records the forward inputs of each call (except TRL's `fused_lm_head=True` calls
        and its own base pass); the loss function consumes them and keeps nothing.

    Example:
        >>> loss_func = nontarget_kl_loss_func(peft_model, kl_weight=1.0)
        >>> trainer = trl.SFTTrainer(model=peft_model, args=args, train_dataset=ds, compute_loss_func=loss_func)
        >>> loss_func.bind(trainer).train(); loss_func.remove()
    """
    return NonTargetKLLossFunc(model, kl_weight=kl_weight, temperature=temperature, kl_direction=kl_direction,
                               ref_model=ref_model, fused_linear=fused_linear, kl_target=kl_target, options=options,
                               ref_adapter_name=ref_adapter_name, ref_model_init_kwargs=ref_model_init_kwargs)
