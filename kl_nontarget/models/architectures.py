"""The architectures the library knows, in one table: how each turns its head's output into logits (for the
fused-linear path, `lm_head`) and which of its modules are the attention and MLP projections (for the
`target_modules` presets).

Presets (`PRESETS`), resolved per architecture by `target_modules(model, preset)`:

- `attention`: the self-attention projections (q, k, v, o, or the architecture's fused equivalents);
- `mlp_up_gate`: the MLP's up and gate projections, the down projection left frozen;
- `all-linear`: every linear layer but the head (PEFT's own shorthand, passed through).

Tuning only the attention projections, or the MLP's up/gate with its down projection frozen, is reported to learn a
target with far less drift of the output distribution than tuning everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ARCHITECTURES", "PRESETS", "Architecture", "architecture_name", "target_modules"]

PRESETS = ("attention", "mlp_up_gate", "all-linear")


def _plain(model):
    return 1.0, None


def _softcapped(model):
    return 1.0, getattr(model.config, "final_logit_softcapping", None)


def _cohere(model):
    return getattr(model, "logit_scale", model.config.logit_scale), None


def _granite(model):
    return 1.0 / model.config.logits_scaling, None


@dataclass(frozen=True)
class Architecture:
    """One row of `ARCHITECTURES`.

    `logits(model) -> (logit_scale, softcap)`: the forward computes `softcap * tanh(logit_scale * lm_head(h) /
    softcap)` (no tanh without a soft-cap) from the hidden states `h` it hands to `lm_head`. The module names are the
    last components of the decoder layers' projections, as PEFT's `target_modules` matches them.
    """

    logits: Callable
    attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_up_gate: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_down: tuple[str, ...] = ("down_proj",)


# Every entry is checked on a tiny model built from its config: the logit transform against the model's own logits
# (tests/test_fused_trainer.py), the module names against the model's modules (tests/test_presets.py).
ARCHITECTURES = {
    "LlamaForCausalLM": Architecture(_plain),
    "MistralForCausalLM": Architecture(_plain),
    "Qwen2ForCausalLM": Architecture(_plain),
    "Qwen3ForCausalLM": Architecture(_plain),
    "GemmaForCausalLM": Architecture(_plain),
    "PhiForCausalLM": Architecture(_plain, attention=("q_proj", "k_proj", "v_proj", "dense"),  # a head with a bias
                                   mlp_up_gate=("fc1",), mlp_down=("fc2",)),  # no gate
    "Phi3ForCausalLM": Architecture(_plain, attention=("qkv_proj", "o_proj"), mlp_up_gate=("gate_up_proj",)),
    "Gemma2ForCausalLM": Architecture(_softcapped),  # final_logit_softcapping
    "Gemma3ForCausalLM": Architecture(_softcapped),
    "CohereForCausalLM": Architecture(_cohere),  # logits * logit_scale
    "GraniteForCausalLM": Architecture(_granite),  # logits / logits_scaling
}


def architecture_name(model) -> str:
    """The CausalLM class name of `model` (a module, PEFT-wrapped or not) or of a transformers config."""
    from kl_nontarget.models.introspection import transformers_model

    if hasattr(model, "model_type") and not hasattr(model, "forward"):  # a config
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM._model_mapping[type(model)].__name__
    return type(transformers_model(model)).__name__


def target_modules(model, targets):
    """`targets` with a preset name resolved for `model`'s architecture (a module or its config): the module names
    of `PRESETS[...]`, "all-linear" as is, and anything else (a list of names, a regex) unchanged.

    ValueError for a string that is neither a preset nor "all-linear" but looks like a preset name (no dot, no regex),
    and for a preset on an architecture outside `ARCHITECTURES`.
    """
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] in PRESETS:
        targets = targets[0]  # a command line's `--lora_target_modules attention`
    if not isinstance(targets, str) or targets == "all-linear":
        return targets
    if targets not in PRESETS:
        if targets.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"unknown target_modules preset {targets!r}; presets: {', '.join(PRESETS)} (or pass "
                             "module names)")
        return targets  # a regex over module names, for PEFT
    name = architecture_name(model)
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise ValueError(f"the target_modules preset {targets!r} is known for {', '.join(sorted(ARCHITECTURES))}, "
                         f"not {name}: pass module names")
    return list(arch.attention if targets == "attention" else arch.mlp_up_gate)
