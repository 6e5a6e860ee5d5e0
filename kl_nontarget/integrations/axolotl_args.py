"""The axolotl plugin's config keys: `NonTargetKLArgs`, a pydantic model that axolotl merges into its config schema.

`kl_nontarget.integrations.axolotl.NonTargetKLPlugin.get_input_args` names this class; axolotl's `validate_config`
then builds its config model as a subclass of its own and this one, so the keys below are ordinary axolotl YAML keys
and a bad value fails at config load, in axolotl's own `ValidationError`, naming the key. The keys, their meanings and
their checks are those of `kl_nontarget.training.config.NonTargetKLArguments` (the `NonTargetKLConfig` fields); a key
left out (None) takes `RegularizerOptions`' default (`kl_weight` 1.0, `kl_fused_linear` "auto", ...).

The model also refuses, at config load, what the plugin cannot train with the non-target KL (`REFUSED`): RL trainers
(`rl:`), reward and process-reward models, ORPO and EAFT (axolotl's trainer computes those losses itself), and the
forward replacements that hide the logits and hidden states (Cut Cross Entropy, Liger's fused linear cross-entropy).

This module imports pydantic and the package's options, not axolotl: the docs test reads it without axolotl installed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from kl_nontarget.training.config import OPTION_OF_FIELD, _fused_linear_value, _with_field_name
from kl_nontarget.training.options import RegularizerOptions

__all__ = ["NonTargetKLArgs", "REFUSED", "refusal", "trainer_options"]

PLUGIN = "kl_nontarget.integrations.axolotl.NonTargetKLPlugin"

_LOGITS_HIDDEN = ("replaces the model's forward with one that computes the cross-entropy from the hidden states and "
                  "returns no logits, while the non-target KL needs the adapted and base distributions; the plugin's "
                  "own fused-linear path (kl_fused_linear: auto) computes CE and KL from the hidden states without "
                  "the N x V logits. Remove the key (or set it to false)")
_OWN_TRAINER = "is a trainer with its own loss, which the non-target KL's trainer cannot extend"

# config key -> why the plugin refuses a config that sets it (to anything but false / null / 0).
REFUSED = {
    "rl": f"axolotl's RL trainers (DPO, IPO, KTO, ORPO, SimPO, GRPO, EBFT) are not supported: each {_OWN_TRAINER}; "
          "the plugin covers axolotl's SFT path",
    "reward_model": f"axolotl's reward-model trainer {_OWN_TRAINER}",
    "process_reward_model": f"axolotl's process-reward-model trainer {_OWN_TRAINER}",
    "orpo_alpha": "ORPO's loss is computed by axolotl's trainer before the non-target KL's could run",
    "use_eaft": "EAFT replaces the loss function (compute_loss_func), which the non-target KL's trainer does not call",
    "cut_cross_entropy": f"Cut Cross Entropy {_LOGITS_HIDDEN}",
    "liger_fused_linear_cross_entropy": f"Liger's fused linear cross-entropy {_LOGITS_HIDDEN}",
}


def refusal(data: dict) -> str | None:
    """The message refusing `data` (an axolotl config as a dict), or None when the plugin can train it."""
    for key, why in REFUSED.items():
        if data.get(key):
            return f"{PLUGIN}: {key}: {data[key]!r} cannot be combined with the non-target KL: {why}."
    return None


class NonTargetKLArgs(BaseModel):
    """The non-target KL's axolotl keys (see `kl_nontarget.training.config.NonTargetKLArguments` for each)."""

    kl_weight: float | None = Field(default=None, json_schema_extra={
        "description": "Weight of the non-target KL added to the cross-entropy (>= 0; 0 gives plain cross-entropy). "
                       "Default 1.0."})
    kl_temperature: float | None = Field(default=None, json_schema_extra={
        "description": "Temperature of the base and adapted non-target distributions (> 0); the KL is scaled by T^2."})
    kl_direction: Literal["forward", "reverse"] | None = Field(default=None, json_schema_extra={
        "description": "'forward': KL(base || adapted) (default); 'reverse': KL(adapted || base)."})
    kl_fused_linear: bool | Literal["auto"] | None = Field(default=None, json_schema_extra={
        "description": "Compute the loss from the final hidden states and the LM head, without the N x V logits: "
                       "auto (default; when the model qualifies), true (required) or false."})
    kl_target: float | None = Field(default=None, json_schema_extra={
        "description": "Adaptive kl_weight: the non-target KL per token to aim for (> 0). Default: a fixed weight."})
    precompute_base: bool | Literal["auto"] | None = Field(default=None, json_schema_extra={
        "description": "Cache the base model's final hidden states on disk once and reuse them: false (default), "
                       "true (required) or auto."})
    base_cache_dir: str | None = Field(default=None, json_schema_extra={
        "description": "Folder of the precompute_base caches (default: ~/.cache/kl-nontarget/base_hidden)."})
    ref_model_name_or_path: str | None = Field(default=None, json_schema_extra={
        "description": "A frozen reference model for the base distribution (needed for full fine-tuning). Default: "
                       "the PEFT model with its adapters disabled."})
    ref_model_init_kwargs: dict[str, Any] | None = Field(default=None, json_schema_extra={
        "description": "from_pretrained keywords of the reference model (dtype as a string)."})
    ref_adapter_name: str | None = Field(default=None, json_schema_extra={
        "description": "An adapter loaded in the PeftModel whose outputs are the reference."})

    @field_validator("kl_fused_linear", "precompute_base", mode="before")
    @classmethod
    def _true_false_auto(cls, value):
        # The spellings NonTargetKLArguments accepts: auto, true/false, yes/no, 1/0 (strings or YAML booleans).
        return value if value is None else _fused_linear_value(value)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            message = refusal(data)
            if message is not None:
                raise ValueError(message)
        return data

    @model_validator(mode="after")
    def _check_options(self):
        trainer_options(self)  # ValueError/TypeError naming the key
        return self


def trainer_options(cfg) -> RegularizerOptions:
    """The `RegularizerOptions` an axolotl config (a `NonTargetKLArgs`, axolotl's `DictDefault` or a dict) sets: its
    keys that are set, the defaults for the rest. ValueError naming the key for a bad value."""
    get = cfg.get if isinstance(cfg, dict) else (lambda name: getattr(cfg, name, None))
    values = {option: get(name) for name, option in OPTION_OF_FIELD.items() if get(name) is not None}
    try:
        return RegularizerOptions(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(_with_field_name(str(err))) from None
