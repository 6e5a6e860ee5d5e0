"""TRL integration: `NonTargetKLSFTTrainer` (preferred) and the `nontarget_kl_loss_func` hook.

`NonTargetKLSFTTrainer` overrides `SFTTrainer.compute_loss` (TRL 1.16's does not call the Trainer's and scores tokens
with its own chunked "fused LM head"); everything else of SFT stays: dataset preparation (completion-only and
assistant-only labels, packing, padding-free), TRL's `peft_config=` path, its metrics.

`nontarget_kl_loss_func(model, ...)`, the `compute_loss_func=` hook, lives in `kl_nontarget.training.loss_func` (it
serves plain `transformers.Trainer` too) and is importable from here.

`NonTargetKLSFTConfig` is `trl.SFTConfig` with the regularizer's fields
(`kl_nontarget.training.config.NonTargetKLArguments`); `kl-nontarget sft` parses it.

Both use the fused-linear loss (final hidden states and the LM head, no N x V logits; `fused_linear=`) when the
model qualifies (`kl_nontarget.models.lm_head.linear_head`). TRL's own fused LM head runs the backbone inside the
model's forward and reads the head's weight; here the hidden states are likewise taken inside the forward, where the
model hands them to its head (a pre-hook on the head), so every wrapper and TRL's patch stay in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import trl
from torch import nn

from kl_nontarget.models.architectures import PRESETS, target_modules
from kl_nontarget.models.introspection import is_trl_fused_forward, transformers_model
from kl_nontarget.ops.linear_loss import default_chunk_size
from kl_nontarget.training.batch_rows import BatchHidden, head_tensors
from kl_nontarget.training.config import NonTargetKLArguments
from kl_nontarget.training.loss_func import NonTargetKLLossFunc, nontarget_kl_loss_func
from kl_nontarget.training.options import RegularizerOptions, options_from
from kl_nontarget.training.trainer import NonTargetKLMixin
from kl_nontarget.training.trainer_args import liger_without_fused_loss, trainer_args

__all__ = ["NonTargetKLSFTConfig", "NonTargetKLSFTTrainer", "nontarget_kl_loss_func", "NonTargetKLLossFunc"]


def _resolve_target_preset(args: tuple, kwargs: dict) -> None:
    """A `peft_config` whose `target_modules` is a preset (attention, mlp_up_gate) gets the module names of the
    model's architecture (`kl_nontarget.models.architectures`), the model given as a module or a name/path."""
    config = kwargs.get("peft_config")
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (set, frozenset)):
        targets = sorted(targets)
    presets = PRESETS[:2]  # "all-linear" is PEFT's own shorthand: it needs no resolving
    if not (targets in presets or (isinstance(targets, list) and len(targets) == 1 and targets[0] in presets)):
        return
    model = kwargs.get("model", args[0] if args else None)
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        model = AutoConfig.from_pretrained(os.fspath(model))
    config.target_modules = set(target_modules(model, targets))


# SFT loss types the trainers support: DFT reweights each token's cross-entropy by its detached probability, which
# the fused row kernels do not compute.
SUPPORTED_SFT_LOSS_TYPES = ("nll",)


def check_sft_loss_type(loss_type) -> None:
    """ValueError unless `loss_type` (SFTConfig.loss_type) is one the non-target KL trainers support."""
    if loss_type not in SUPPORTED_SFT_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} is not supported with the non-target KL; supported: "
            f"{', '.join(repr(t) for t in SUPPORTED_SFT_LOSS_TYPES)}. (DFT weights each token's cross-entropy by its "
            "detached probability, which the fused CE + KL kernels do not compute.)")


@dataclass
class NonTargetKLSFTConfig(NonTargetKLArguments, trl.SFTConfig):
    """`trl.SFTConfig` with the non-target KL's fields: `kl_weight`, `kl_temperature`, `kl_direction`,
    `kl_fused_linear`, `ref_model_name_or_path`, `ref_model_init_kwargs` (see `kl_nontarget.training.config`).

    `NonTargetKLSFTTrainer(args=NonTargetKLSFTConfig(..., kl_weight=0.3))` reads its options from it. One difference
    from SFTConfig: with `bf16` unset on a machine without a bf16-capable accelerator (and without `use_cpu`),
    SFTConfig's default (bf16 on) would refuse to build; here bf16 is then off and the run trains in float32.
    """

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not _bf16_device_available():
            self.bf16 = False
        super().__post_init__()


def _bf16_device_available() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


def remove_trl_patch(model: nn.Module) -> None:
    """Undo TRL's `add_fused_lm_head` instance patch (this trainer never calls `fused_lm_head=True`)."""
    base = transformers_model(model)
    if is_trl_fused_forward(base.__dict__.get("forward")):
        del base.__dict__["forward"]


class NonTargetKLSFTTrainer(NonTargetKLMixin, trl.SFTTrainer):
    """`trl.SFTTrainer` with loss = CE + kl_weight * T^2 * KL(base_nontarget || adapted_nontarget).

    Args:
        *args, **kwargs: the usual `SFTTrainer` arguments, `peft_config=` included (SFTTrainer then wraps the model).
        kl_weight, temperature, kl_direction, ref_model, fused_linear, precompute_base, base_cache_dir, options: as
            for `kl_nontarget.NonTargetKLTrainer` (the cache is built from the prepared dataset: tokenised,
            packed); with `args=NonTargetKLSFTConfig(...)` they are read from `args` (a
            `kl_nontarget.NonTargetKLConfig` is turned into a `NonTargetKLSFTConfig`, as SFTTrainer does with
            TrainingArguments).

    Logs `ce_loss` and `nontarget_kl` next to SFT's `entropy`, `mean_token_accuracy` and `num_tokens` (on the
    fused-linear path the last two are computed from the hidden states in chunks). Only the "nll" loss type is
    supported (`loss_type="dft"` is refused). MoE models add `router_aux_loss_coef * aux_loss` of the adapted pass as
    SFTTrainer does (and log `aux_loss`). A `ref_model` given by name is loaded with `ref_model_init_kwargs`, by
    default the config's `model_init_kwargs`.
    """

    def __init__(self, *args, kl_weight: float = 1.0, temperature: float = 1.0, kl_direction: str = "forward",
                 ref_model=None, fused_linear="auto", kl_target: float | None = None,
                 precompute_base=False, base_cache_dir=None,
                 options: RegularizerOptions | None = None, ref_adapter_name: str | None = None,
                 ref_model_init_kwargs: dict | None = None, **kwargs):
        options = options_from(options, kl_weight=kl_weight, temperature=temperature, kl_direction=kl_direction,
                               fused_linear=fused_linear, kl_target=kl_target, precompute_base=precompute_base,
                               base_cache_dir=base_cache_dir)
        args, kwargs = _sft_args(args, kwargs)
        _resolve_target_preset(args, kwargs)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("NonTargetKLSFTTrainer computes its own loss; do not pass compute_loss_func (use "
                             "trl.SFTTrainer with compute_loss_func=nontarget_kl_loss_func(...) for the hook form)")
        training_args = trainer_args(args, kwargs)
        if training_args is not None:
            check_sft_loss_type(getattr(training_args, "loss_type", "nll"))
        liger_without_fused_loss(training_args, type(self).__name__)
        super().__init__(*args, **kwargs)
        check_sft_loss_type(getattr(self.args, "loss_type", "nll"))
        if getattr(self.args, "label_smoothing_factor", 0) > 0:
            raise ValueError("NonTargetKLSFTTrainer does not support label_smoothing_factor > 0")
        remove_trl_patch(self.model)
        if isinstance(ref_model, (str, os.PathLike)) and ref_model_init_kwargs is None:
            ref_model_init_kwargs = dict(getattr(self.args, "model_init_kwargs", None) or {})
        self._init_nontarget_kl(options, ref_model, ref_adapter_name=ref_adapter_name,
                                ref_model_init_kwargs=ref_model_init_kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if getattr(self, "aux_loss_enabled", False):
            # As SFTTrainer: ask the MoE model for its router logits, so that it returns `aux_loss`.
            inputs = {**inputs, "output_router_logits": True}
        return NonTargetKLMixin.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                             num_items_in_batch=num_items_in_batch)

    def _add_router_aux_loss(self, loss, outputs, scale, num_items_in_batch):
        """SFTTrainer's rule: `router_aux_loss_coef * aux_loss` of the adapted pass, outside the data-parallel factor
        and averaged over the accumulation steps when the loss is normalised by `num_items_in_batch`."""
        aux = getattr(outputs, "aux_loss", None) if outputs is not None else None
        if not getattr(self, "aux_loss_enabled", False) or aux is None:
            return loss
        metrics = getattr(self, "_metrics", None)
        if isinstance(metrics, dict):
            mode = "train" if self.model.training else "eval"
            metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        steps = 1
        if num_items_in_batch is not None:
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return loss + self.router_aux_loss_coef * aux.to(loss.device) / steps

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


def _sft_args(args: tuple, kwargs: dict):
    """(args, kwargs) with a `NonTargetKLArguments` that is not an SFTConfig turned into a `NonTargetKLSFTConfig`:
    SFTTrainer would rebuild it as a plain SFTConfig, which has no regularizer fields."""
    positional = "args" not in kwargs and len(args) > 1
    config = args[1] if positional else kwargs.get("args")
    if not isinstance(config, NonTargetKLArguments) or isinstance(config, trl.SFTConfig):
        return args, kwargs
    values = config.to_dict()
    values["hub_token"] = config.hub_token  # to_dict hides it
    values.pop("push_to_hub_token", None)
    config = NonTargetKLSFTConfig(**values)
    if positional:
        return (args[0], config, *args[2:]), kwargs
    return args, {**kwargs, "args": config}


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
        hidden, weight, labels = t.hidden.detach(), t.weight.detach(), t.labels
        bias = None if t.bias is None else t.bias.detach()
        stats = [hidden.new_zeros((), dtype=torch.float32) for _ in range(3)]
        chunk = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device,
                                   softcap=t.head.softcap)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                logits = t.head.logits(hidden[start:start + chunk], weight, bias)
                _logits_statistics(logits, labels[start:start + chunk], stats)
                del logits
    return stats
