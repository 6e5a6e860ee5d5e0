"""The LM head: which heads the fused-linear loss can reproduce, their logit transform, and capturing their input.

When the LM head is a plain nn.Linear and the logit transform of the architecture is known, the loss can take the
final hidden states of both passes and the head's weight (`kl_nontarget.ops.linear_loss.nontarget_kl_linear_loss`)
instead of two N x V logits tensors. The hidden states are taken where the model itself hands them to its head: a
forward pre-hook on the head keeps the head's input and lets the head project the last position only. The model is
called exactly as on the logits path, through every wrapper (DDP, accelerate's mixed-precision autocast, PEFT, TRL's
instance patch), and the autocast state is read where the head runs. Like TRL's fused LM head, whose results come out of
the model's forward, the hidden states are returned in the model's outputs (as `hidden_states=(h,)`, set by a forward
hook on the transformers model; the field is free since the batch does not ask for hidden states): the loss then flows
through the outputs of the outermost forward, as FSDP2 (which unshards the root's parameters for backward from hooks on
those outputs) and DDP's unused-parameter search expect.

`head_weights` gathers the head's parameters where they are sharded (DeepSpeed ZeRO-3, FSDP2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kl_nontarget.models.architectures import ARCHITECTURES
from kl_nontarget.models.base_pass import autocast_state
from kl_nontarget.models.introspection import patched_forward, transformers_model
from kl_nontarget.ops.checks import is_positive_number
from kl_nontarget.ops.linear_loss import head_logits

__all__ = ["HEAD_TRANSFORMS", "LinearHead", "fused_heads", "head_input_captured",
           "head_weights", "linear_head", "register_head_capture"]


# CausalLM class -> how to read its (logit_scale, softcap): the logit transforms of `architectures.ARCHITECTURES`.
HEAD_TRANSFORMS = {name: arch.logits for name, arch in ARCHITECTURES.items()}


@dataclass(frozen=True)
class LinearHead:
    """A model's LM head (a plain nn.Linear) and its logit transform `softcap * tanh(logit_scale * x / softcap)`."""

    module: nn.Linear
    logit_scale: float = 1.0
    softcap: float | None = None


    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """This head's logits of `hidden`, transform included (`weight`/`bias`: gathered copies of the module's)."""
        weight = self.module.weight if weight is None else weight
        bias = self.module.bias if bias is None else bias
        return head_logits(hidden, weight, bias, self.logit_scale, self.softcap)[0]


def linear_head(model: nn.Module) -> tuple[LinearHead | None, str]:
    """`(LinearHead, "")` when the fused-linear loss can reproduce `model`'s logits from its final hidden states, else
    `(None, reason)`.

    Requires an architecture of `HEAD_TRANSFORMS` whose forward is transformers' own (not replaced by a patch other
    than TRL's `fused_lm_head` one, which leaves ordinary calls alone), and an LM head that is exactly `nn.Linear`:
    LoRA or `modules_to_save` on the head, quantized heads and custom heads take the logits path.
    """
    base = transformers_model(model)
    cls = type(base)
    reader = HEAD_TRANSFORMS.get(cls.__name__)
    if reader is None or not cls.__module__.startswith("transformers."):
        return None, (f"{cls.__name__} is not one of the architectures whose logit transform is known "
                      f"({', '.join(sorted(HEAD_TRANSFORMS))})")
    if getattr(cls.forward, "__module__", None) != cls.__module__:
        return None, f"{cls.__name__}.forward is patched (by {getattr(cls.forward, '__module__', '?')})"
    if patched_forward(base) is not None:
        return None, f"the forward of this {cls.__name__} instance is patched (Liger's fused loss, ...)"
    try:
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if type(head) is not nn.Linear:
        return None, (f"its LM head is a {type(head).__name__}, not a plain torch.nn.Linear (LoRA or modules_to_save "
                      "on lm_head, or a quantized head)")
    weight = head.weight
    if weight.device.type == "meta":
        return None, "its LM head weight is offloaded (meta device)"
    if hasattr(weight, "ds_id") and weight.requires_grad:
        return None, "its LM head is trainable and partitioned by DeepSpeed ZeRO-3"
    try:
        logit_scale, softcap = reader(base)
    except (AttributeError, TypeError, ZeroDivisionError) as error:
        return None, f"its logit transform could not be read from the config ({error})"
    if not is_positive_number(logit_scale) or not (softcap is None or is_positive_number(softcap)):
        return None, f"unsupported logit transform (logit_scale={logit_scale!r}, softcap={softcap!r})"
    return LinearHead(head, float(logit_scale), None if softcap is None else float(softcap)), ""


def fused_heads(model: nn.Module, ref_model: nn.Module | None = None
                ) -> tuple[tuple[LinearHead, LinearHead] | None, str]:
    """`((head, ref_head), "")` when both passes can use the fused-linear loss, else `(None, reason)`.

    Without `ref_model` the base pass (adapters disabled) uses the same head. A `ref_model` needs a plain linear head
    with the same transform and shape, on the same device, and no bias unless it is the same tensor (the loss shares
    one bias between the passes).
    """
    found, reason = linear_head(model)
    if found is None:
        return None, reason
    if ref_model is None:
        return (found, found), ""
    ref, reason = linear_head(ref_model)
    if ref is None:
        return None, "ref_model: " + reason
    if (ref.logit_scale, ref.softcap) != (found.logit_scale, found.softcap):
        return None, "ref_model transforms its logits differently from the model"
    w, rw = found.module.weight, ref.module.weight
    if _full_shape(rw) != _full_shape(w) or rw.device != w.device:
        return None, "ref_model's LM head differs in shape or device from the model's"
    if (found.module.bias is not None or ref.module.bias is not None) and found.module.bias is not ref.module.bias:
        return None, "the LM heads have biases that are not shared"
    return (found, ref), ""


def _full_shape(weight: torch.Tensor) -> torch.Size:
    """The whole shape of a parameter: a ZeRO-3 partition keeps it in `ds_shape` (its own shape is empty)."""
    return getattr(weight, "ds_shape", weight.shape)


class _HeadInput:
    """Forward pre-hook on an LM head: keeps the head's input and lets it project only the last position."""

    def __init__(self):
        self.hidden = None
        self.autocast = (False, None)
        self.calls = 0

    def __call__(self, module, args):
        x = args[0]
        self.calls += 1
        self.hidden = x
        self.autocast = autocast_state(x.device.type)
        # Not detached: the returned logits stay connected to the parameters, as DDP's find_unused_parameters
        # traversal of the outputs needs (they get no gradient: the loss uses the hidden states).
        return (x[..., -1:, :], *args[1:])

    def attach(self, module, args, output):
        """Forward hook on the model owning the head: return the head's input in the outputs, as `hidden_states`.

        A field of the ModelOutput dataclass (FSDP2 and pytree flattening see fields only), set only when empty.
        """
        if self.hidden is not None and isinstance(output, dict) and getattr(output, "hidden_states", False) is None:
            output["hidden_states"] = (self.hidden,)
        return output

    def take(self, source: str, outputs: Any = None) -> torch.Tensor:
        """The head's input, preferably as found in the forward's `outputs` (the tensor the wrappers saw)."""
        if self.calls != 1:
            raise RuntimeError(f"{source} called its LM head {self.calls} times in one forward (expected once); pass "
                               "fused_linear=False to use the logits")
        hidden, self.hidden = self.hidden, None
        returned = outputs.get("hidden_states") if isinstance(outputs, dict) else None
        if isinstance(returned, tuple) and len(returned) == 1 and isinstance(returned[0], torch.Tensor) \
                and returned[0].shape == hidden.shape:
            hidden = returned[0]
        return hidden


def register_head_capture(head: nn.Module, owner: nn.Module | None = None):
    """(capture, handles): calls of `head` record their input and return last-position logits; calls of `owner`
    (the transformers model whose forward calls `head`) return the recorded input in their outputs."""
    capture = _HeadInput()
    handles = [head.register_forward_pre_hook(capture)]
    if owner is not None:
        handles.append(owner.register_forward_hook(capture.attach))
    return capture, handles


@contextlib.contextmanager
def head_input_captured(head: nn.Module, owner: nn.Module | None = None):
    """Within the context, calls of `head` record their input (`.hidden`, `.autocast`) and return last-position logits;
    with `owner`, its outputs carry that input as `hidden_states=(input,)`."""
    capture, handles = register_head_capture(head, owner)
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()



def _gathered_parameters():
    """DeepSpeed's `GatheredParameters` context, from the module that defines it.

    `deepspeed.zero` is an attribute of the package, not an importable module: `from deepspeed.zero import ...`
    raises ModuleNotFoundError (deepspeed 0.19), and swallowing that once made the loss compute with empty shards.
    """
    try:
        from deepspeed.runtime.zero import GatheredParameters
    except ImportError as error:  # pragma: no cover - ds_id without an importable deepspeed
        raise RuntimeError("the LM head is partitioned by DeepSpeed ZeRO-3 (its parameters have ds_id), but "
                           f"deepspeed.runtime.zero.GatheredParameters cannot be imported ({error}): the fused-linear "
                           "loss would read empty shards. Pass fused_linear=False to use the logits") from error
    return GatheredParameters


@contextlib.contextmanager
def _zero3_gathered(params):
    """DeepSpeed ZeRO-3: gather the partitioned `params` (read-only) for the enclosed code, in one call.

    One gather per loss call: the chunk loop of `nontarget_kl_linear_loss` runs inside the context and reads the
    gathered tensors (tests/distributed/zero_train.py counts the gathers).
    """
    parts = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not parts:
        yield
        return
    with _gathered_parameters()(parts, modifier_rank=None):
        yield


def _full(t):
    """A whole tensor from an FSDP2-sharded DTensor parameter (differentiable), others as they are."""
    if t is not None and hasattr(t, "full_tensor") and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t



@contextlib.contextmanager
def head_weights(head: LinearHead, ref_head: LinearHead):
    """(weight, bias, ref_weight) of the heads as whole tensors for the context; `ref_weight` is None (and detached
    otherwise) when both passes share one head. DeepSpeed ZeRO-3 partitioned weights are gathered for the duration of
    the context, FSDP2 DTensor weights are gathered to whole (differentiable) tensors."""
    module, ref_module = head.module, ref_head.module
    shared = ref_module is module
    params = [module.weight, module.bias] + ([] if shared else [ref_module.weight])
    with _zero3_gathered(params):
        ref_weight = None if shared else _full(ref_module.weight).detach()
        yield _full(module.weight), _full(module.bias), ref_weight

