"""TRL integration: `NonTargetKLSFTTrainer` (preferred) and the `nontarget_kl_loss_func` hook.

`NonTargetKLSFTTrainer` overrides `SFTTrainer.compute_loss` (TRL 1.16's does not call the Trainer's and scores tokens
with its own chunked "fused LM head"); everything else of SFT stays: dataset preparation (completion-only and
assistant-only labels, packing, padding-free), TRL's `peft_config=` path, its metrics.

`nontarget_kl_loss_func(model, ...)` returns a callable for `compute_loss_func=` of `transformers.Trainer` or
`trl.SFTTrainer`. It captures the forward inputs with a forward pre-hook on `model`, ignoring TRL's
`fused_lm_head=True` calls and its own base pass, and holds no tensors between steps. Call `.remove()` when done.
"""

from __future__ import annotations

import warnings

import torch
import trl
from torch import nn

from kl_nontarget.loss import nontarget_kl_loss
from kl_nontarget.reference import autocast_like, autocast_state, check_reference, compute_batch_logits, \
    has_adapters, is_peft_model, prepare_ref_model, unwrap_model
from kl_nontarget.trainer import NonTargetKLMixin, check_options

__all__ = ["NonTargetKLSFTTrainer", "nontarget_kl_loss_func", "NonTargetKLLossFunc"]


def _remove_fused_lm_head(model: nn.Module) -> None:
    """Undo TRL's `add_fused_lm_head` instance patch (this trainer never calls `fused_lm_head=True`)."""
    model = unwrap_model(model)
    base = model.get_base_model() if is_peft_model(model) else model
    patched = base.__dict__.get("forward")
    func = getattr(patched, "__func__", None)
    if func is not None and getattr(func, "__code__", None) is not None and func.__code__.co_name == "_fused_forward":
        del base.__dict__["forward"]


class NonTargetKLSFTTrainer(NonTargetKLMixin, trl.SFTTrainer):
    """`trl.SFTTrainer` with loss = CE + kl_weight * T^2 * KL(base_nontarget || adapted_nontarget).

    Args:
        *args, **kwargs: the usual `SFTTrainer` arguments, `peft_config=` included (SFTTrainer then wraps the model).
        kl_weight, temperature, kl_direction, ref_model: as for `kl_nontarget.NonTargetKLTrainer`.

    Logs `ce_loss` and `nontarget_kl` next to SFT's `entropy`, `mean_token_accuracy` and `num_tokens`. Only the
    "nll" loss type is supported; the MoE router auxiliary loss is not added.
    """

    def __init__(self, *args, kl_weight=1.0, temperature=1.0, kl_direction="forward", ref_model=None, **kwargs):
        check_options(kl_weight, temperature, kl_direction)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("NonTargetKLSFTTrainer computes its own loss; do not pass compute_loss_func (use "
                             "trl.SFTTrainer with compute_loss_func=nontarget_kl_loss_func(...) for the hook form)")
        super().__init__(*args, **kwargs)
        if getattr(self.args, "loss_type", "nll") != "nll":
            raise ValueError(f"NonTargetKLSFTTrainer supports loss_type='nll' only, got {self.args.loss_type!r}")
        if getattr(self.args, "label_smoothing_factor", 0) > 0:
            raise ValueError("NonTargetKLSFTTrainer does not support label_smoothing_factor > 0")
        if getattr(self, "aux_loss_enabled", False):
            warnings.warn("NonTargetKLSFTTrainer does not add the MoE router auxiliary loss", UserWarning,
                          stacklevel=2)
        _remove_fused_lm_head(self.model)
        self._init_nontarget_kl(kl_weight=kl_weight, temperature=temperature, kl_direction=kl_direction,
                                ref_model=ref_model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        return NonTargetKLMixin.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                             num_items_in_batch=num_items_in_batch)

    def _after_loss(self, batch, inputs, model):
        metrics = getattr(self, "_metrics", None)
        if not isinstance(metrics, dict):
            return
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            logits = batch.logits.detach()
            entropy = logits.new_zeros((), dtype=torch.float32)
            correct = logits.new_zeros((), dtype=torch.float32)
            for start in range(0, logits.shape[0], 1024):  # chunks keep the float32 copy small
                chunk = logits[start:start + 1024].float()
                logp = torch.log_softmax(chunk, dim=-1)
                entropy += -(logp.exp() * logp).sum()
                correct += (chunk.argmax(-1) == batch.labels[start:start + 1024]).sum()
            count = torch.tensor(float(logits.shape[0]), device=logits.device)
            stats = self.accelerator.gather_for_metrics(torch.stack([entropy, correct, count]).reshape(1, 3)).sum(0)
        n = stats[2].item()
        metrics[mode]["entropy"].append(stats[0].item() / n if n > 0 else 0.0)
        metrics[mode]["mean_token_accuracy"].append(stats[1].item() / n if n > 0 else 0.0)
        if mode == "train" and hasattr(self, "_total_train_tokens"):
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            tokens = self.accelerator.gather_for_metrics(local.reshape(1)).sum().item()
            self._total_train_tokens += int(tokens) // getattr(self, "_tp_size", 1)
        if hasattr(self, "_total_train_tokens"):
            metrics[mode]["num_tokens"] = [self._total_train_tokens]


class NonTargetKLLossFunc:
    """`compute_loss_func` for transformers.Trainer / trl.SFTTrainer; see `nontarget_kl_loss_func`."""

    def __init__(self, model, *, kl_weight=1.0, temperature=1.0, kl_direction="forward", ref_model=None):
        check_options(kl_weight, temperature, kl_direction)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.kl_weight = float(kl_weight)
        self.temperature = float(temperature)
        self.kl_direction = kl_direction
        self.model = unwrap_model(model)
        self.ref_model = ref_model
        self._checked = False
        if ref_model is not None or has_adapters(self.model):
            # A plain model may still be wrapped later (SFTTrainer(peft_config=...)): then check at the first call.
            self._check()
        self._captured = None
        self._in_base_pass = False
        self._handles = [self.model.register_forward_pre_hook(self._capture, with_kwargs=True)]
        embeddings = _input_embeddings(self.model)
        if embeddings is not None:
            # Accelerate's mixed precision wraps the outermost forward in autocast, inside the pre-hook above: read
            # the autocast state where the forward actually runs (no tensors are kept).
            self._handles.append(embeddings.register_forward_pre_hook(self._note_autocast))

    def _check(self):
        check_reference(self.model, self.ref_model)
        if self.ref_model is not None:
            prepare_ref_model(self.ref_model, _first_device(self.model))
        self._checked = True

    def _capture(self, module, args, kwargs):
        if self._in_base_pass or kwargs.get("fused_lm_head"):
            return None
        device_type = next((v.device.type for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), "cpu")
        self._captured = {"args": tuple(args), "kwargs": dict(kwargs), "device_type": device_type,
                          "autocast": autocast_state(device_type)}
        return None

    def _note_autocast(self, module, args):
        captured = self._captured
        if self._in_base_pass or captured is None:
            return None
        captured["autocast"] = autocast_state(captured["device_type"])
        return None

    def __call__(self, outputs, labels, num_items_in_batch=None, **_):
        captured, self._captured = self._captured, None
        if not self._handles:
            raise RuntimeError("this loss function was removed (.remove()); create a new one with "
                               "nontarget_kl_loss_func(model, ...)")
        if captured is None:
            raise RuntimeError("nontarget_kl_loss_func saw no forward call of the model it was created with; pass "
                               "the same model (or its PEFT wrapper) to the trainer")
        if not self._checked:
            self._check()
        inputs = dict(captured["kwargs"])
        if labels is not None:
            inputs["labels"] = labels
        # The base pass runs at the adapted pass's precision: the same autocast, replayed.
        base_context = autocast_like(captured["device_type"], captured["autocast"])
        self._in_base_pass = True
        try:
            batch = compute_batch_logits(self.model, inputs, ref_model=self.ref_model, adapted_outputs=outputs,
                                         forward_args=captured["args"], base_context=base_context)
        finally:
            self._in_base_pass = False
        # No `average_tokens_across_devices` scaling here: the Trainer applies it to compute_loss_func's loss.
        return nontarget_kl_loss(batch.logits, batch.ref_logits, batch.labels, kl_weight=self.kl_weight,
                                 temperature=self.temperature, kl_direction=self.kl_direction,
                                 num_items_in_batch=num_items_in_batch)

    def remove(self):
        """Detach the forward pre-hooks from the model and drop every captured reference."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = None

    def __repr__(self):
        return (f"NonTargetKLLossFunc(kl_weight={self.kl_weight}, temperature={self.temperature}, "
                f"kl_direction={self.kl_direction!r}, ref_model={'set' if self.ref_model is not None else None})")


def _input_embeddings(model):
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embeddings if isinstance(embeddings, nn.Module) else None


def _first_device(model):
    for p in model.parameters():
        return p.device
    return None


def nontarget_kl_loss_func(model, *, kl_weight=1.0, temperature=1.0, kl_direction="forward", ref_model=None):
    """A `compute_loss_func` adding the non-target KL to the cross-entropy, for Trainer or SFTTrainer.

    Args:
        model: the model passed to the trainer (a PEFT model, or the plain model when SFTTrainer wraps it with
            `peft_config=`, or any model together with `ref_model`).
        kl_weight, temperature, kl_direction, ref_model: as for `kl_nontarget.NonTargetKLTrainer`.

    Returns:
        A callable `(outputs, labels, num_items_in_batch=None) -> loss` with a `.remove()` method that detaches its
        forward pre-hooks from `model` (one on the model, one on its input embeddings to read the mixed-precision
        autocast state). The hook records the forward inputs of each call (except TRL's `fused_lm_head=True` calls
        and its own base pass); the loss function consumes them and keeps nothing.

    Example:
        >>> loss_func = nontarget_kl_loss_func(peft_model, kl_weight=1.0)
        >>> trainer = trl.SFTTrainer(model=peft_model, args=args, train_dataset=ds, compute_loss_func=loss_func)
        >>> trainer.train(); loss_func.remove()
    """
    return NonTargetKLLossFunc(model, kl_weight=kl_weight, temperature=temperature, kl_direction=kl_direction,
                               ref_model=ref_model)
