"""TRL integration: `NonTargetKLSFTTrainer` (preferred) and the `nontarget_kl_loss_func` hook.

`NonTargetKLSFTTrainer` overrides `SFTTrainer.compute_loss` (TRL 1.16's does not call the Trainer's and scores tokens
with its own chunked "fused LM head"); everything else of SFT stays: dataset preparation (completion-only and
assistant-only labels, packing, padding-free), TRL's `peft_config=` path, its metrics.

`nontarget_kl_loss_func(model, ...)` returns a callable for `compute_loss_func=` of `transformers.Trainer` or
`trl.SFTTrainer`. It captures the forward inputs with a forward pre-hook on `model`, ignoring TRL's
`fused_lm_head=True` calls and its own base pass, and holds no tensors between steps. Call `.remove()` when done.

Both use the fused-linear loss (final hidden states and the LM head, no N x V logits; `fused_linear=`) when the
model qualifies (`kl_nontarget.reference.linear_head`). TRL's own fused LM head runs the backbone inside the model's
forward and reads the head's weight; here the hidden states are likewise taken inside the forward, where the model
hands them to its head (a pre-hook on the head), so every wrapper and TRL's patch stay in place.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import trl
from torch import nn

from kl_nontarget.distributed import install_exit_handler
from kl_nontarget.linear import default_chunk_size, nontarget_kl_linear_loss
from kl_nontarget.loss import nontarget_kl_loss
from kl_nontarget.reference import BatchHidden, autocast_like, autocast_state, check_reference, compute_batch_hidden, \
    compute_batch_logits, fused_heads, has_adapters, head_tensors, is_peft_model, prepare_ref_model, \
    register_head_capture, transformers_model, unwrap_model
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
        kl_weight, temperature, kl_direction, ref_model, fused_linear: as for `kl_nontarget.NonTargetKLTrainer`.

    Logs `ce_loss` and `nontarget_kl` next to SFT's `entropy`, `mean_token_accuracy` and `num_tokens` (on the
    fused-linear path the last two are computed from the hidden states in chunks). Only the "nll" loss type is
    supported; the MoE router auxiliary loss is not added.
    """

    def __init__(self, *args, kl_weight=1.0, temperature=1.0, kl_direction="forward", ref_model=None,
                 fused_linear="auto", **kwargs):
        check_options(kl_weight, temperature, kl_direction, fused_linear)
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
                                ref_model=ref_model, fused_linear=fused_linear)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        return NonTargetKLMixin.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                             num_items_in_batch=num_items_in_batch)

    def _after_loss(self, batch, inputs, model):
        metrics = getattr(self, "_metrics", None)
        if not isinstance(metrics, dict):
            return
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            if isinstance(batch, BatchHidden):
                entropy, correct, count = _hidden_statistics(batch)
            else:
                entropy, correct, count = _logits_statistics(batch.logits.detach(), batch.labels)
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


def _logits_statistics(logits, labels, stats=None):
    """Sums of the entropy and of the top-1 hits over the rows of `logits` (float32), and the row count."""
    if stats is None:
        stats = [logits.new_zeros((), dtype=torch.float32) for _ in range(3)]
    for start in range(0, logits.shape[0], 1024):  # chunks keep the float32 copy small
        chunk = logits[start:start + 1024].float()
        logp = torch.log_softmax(chunk, dim=-1)
        stats[0] += -(logp.exp() * logp).sum()
        stats[1] += (chunk.argmax(-1) == labels[start:start + 1024]).sum()
    stats[2] += logits.shape[0]
    return stats


def _hidden_statistics(batch):
    """`_logits_statistics` of the adapted logits, rebuilt from the hidden states a chunk at a time."""
    with head_tensors(batch) as t:
        hidden, weight, bias = t["hidden"].detach(), t["weight"].detach(), t["bias"]
        bias = None if bias is None else bias.detach()
        scale, softcap, labels = t["logit_scale"], t["softcap"], t["labels"]
        stats = [hidden.new_zeros((), dtype=torch.float32) for _ in range(3)]
        chunk = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device, softcap=softcap)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                logits = F.linear(hidden[start:start + chunk], weight, bias)
                if softcap is not None:
                    logits = (torch.tanh(logits.float() * (scale / softcap)) * softcap).to(hidden.dtype)
                elif scale != 1.0:
                    logits = logits * scale
                _logits_statistics(logits, labels[start:start + chunk], stats)
                del logits
    return stats


class NonTargetKLLossFunc:
    """`compute_loss_func` for transformers.Trainer / trl.SFTTrainer; see `nontarget_kl_loss_func`."""

    def __init__(self, model, *, kl_weight=1.0, temperature=1.0, kl_direction="forward", ref_model=None,
                 fused_linear="auto"):
        check_options(kl_weight, temperature, kl_direction, fused_linear)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.kl_weight = float(kl_weight)
        self.temperature = float(temperature)
        self.kl_direction = kl_direction
        self.fused_linear = fused_linear
        self._head = None  # (heads, capture, hook handles) of the adapted forward in flight on the fused path
        self.model = unwrap_model(model)
        self.ref_model = ref_model
        self._checked = False
        if ref_model is not None or has_adapters(self.model):
            # A plain model may still be wrapped later (SFTTrainer(peft_config=...)): then check at the first call.
            self._check()
        self._captured = None
        self._in_base_pass = False
        if fused_linear is True and (ref_model is not None or has_adapters(self.model)):
            heads, reason = fused_heads(self.model, ref_model)
            if heads is None:
                raise ValueError(f"fused_linear=True, but the fused-linear loss cannot be used: {reason}. Use "
                                 "fused_linear='auto' to fall back to the logits")
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
        self._release_head()
        device_type = next((v.device.type for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), "cpu")
        self._captured = {"args": tuple(args), "kwargs": dict(kwargs), "device_type": device_type,
                          "autocast": autocast_state(device_type)}
        # A training forward (train mode, gradients on, no labels: the Trainer popped them for compute_loss_func)
        # hands its final hidden states to the loss; its head then projects the last position only.
        if (self.fused_linear is not False and module.training and torch.is_grad_enabled()
                and not any(kwargs.get(k) is not None for k in ("labels", "shift_labels", "logits_to_keep"))
                and not kwargs.get("output_hidden_states")):
            heads, _reason = fused_heads(self.model, self.ref_model)
            if heads is not None:
                capture, handles = register_head_capture(heads[0].module, transformers_model(self.model))
                self._head = (heads, capture, handles)
        return None

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
        install_exit_handler()  # multi-process gloo runs: a clean exit (see kl_nontarget/distributed.py)
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
                                             forward_args=captured["args"], base_context=base_context)
            finally:
                self._in_base_pass = False
            with head_tensors(batch) as t:
                return nontarget_kl_linear_loss(
                    t["hidden"], t["ref_hidden"], t["weight"], t["labels"], bias=t["bias"], ref_weight=t["ref_weight"],
                    logit_scale=t["logit_scale"], softcap=t["softcap"], kl_weight=self.kl_weight,
                    temperature=self.temperature, kl_direction=self.kl_direction,
                    num_items_in_batch=num_items_in_batch)
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
        self._release_head()

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


def _first_device(model):
    for p in model.parameters():
        return p.device
    return None


def nontarget_kl_loss_func(model, *, kl_weight=1.0, temperature=1.0, kl_direction="forward", ref_model=None,
                           fused_linear="auto"):
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
                               ref_model=ref_model, fused_linear=fused_linear)
