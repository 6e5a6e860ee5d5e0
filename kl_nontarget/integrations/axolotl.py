"""The non-target KL as an axolotl plugin: `plugins: [kl_nontarget.integrations.axolotl.NonTargetKLPlugin]`.

With that line in an axolotl config, the regularizer's keys (`kl_weight`, `kl_temperature`, `kl_direction`,
`kl_fused_linear`, `kl_target`, `precompute_base`, `base_cache_dir`, `ref_model_name_or_path`,
`ref_model_init_kwargs`, `ref_adapter_name`; `kl_nontarget.integrations.axolotl_args.NonTargetKLArgs`) become
ordinary config keys, validated by axolotl's config schema at load, and axolotl's SFT path trains with
loss = CE + kl_weight * T^2 * KL(base_nontarget || adapted_nontarget), logging `ce_loss` and `nontarget_kl`.

How: `get_trainer_cls` returns the trainer class axolotl would have used for the config (its `AxolotlTrainer`, or a
`trainer_cls:` subclass of it) composed with `kl_nontarget.NonTargetKLTrainer`:

    class NonTargetKLAxolotlTrainer(AxolotlTrainer, NonTargetKLTrainer)

Python's method order puts axolotl's trainer and its mixins first (samplers and packing, optimizers, schedulers,
checkpoints, offloading, its logging and metrics) and `NonTargetKLMixin` under them, above `transformers.Trainer`:
`AxolotlTrainer.compute_loss` does its token accounting and hands over to the non-target KL's `compute_loss` where
it would have called `Trainer.compute_loss`. The batches are axolotl's own (its collators, sample packing with
`position_ids`, completion-only and chat-template labels), and so is the model (its LoRA or QLoRA adapter, loaded by
axolotl): the base distribution is that PeftModel with its adapters disabled.

What the plugin refuses, at config load (`axolotl_args.REFUSED`) or at trainer creation: RL trainers, reward models,
ORPO, EAFT, Cut Cross Entropy and Liger's fused linear cross-entropy (they hide the logits and hidden states), Mamba,
a `trainer_cls:` that is not an `AxolotlTrainer`, and another plugin's trainer class.

This module imports axolotl; only axolotl imports it (`kl_nontarget` itself never does).
"""

from __future__ import annotations

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import BasePlugin, PluginManager

from kl_nontarget.integrations.axolotl_args import PLUGIN, refusal, trainer_options
from kl_nontarget.training.trainer import NonTargetKLMixin, NonTargetKLTrainer

__all__ = ["NonTargetKLPlugin", "nontarget_kl_trainer_class"]


def _axolotl_trainer_class(cfg) -> type:
    """The trainer class axolotl's causal builder (`HFCausalTrainerBuilder._get_trainer_cls`) picks for `cfg`, when
    it is one the non-target KL can extend; ValueError otherwise."""
    message = refusal(dict(cfg))
    if message is not None:
        raise ValueError(message)
    if cfg.get("model_config_type") == "mamba":
        raise ValueError(f"{PLUGIN}: axolotl's Mamba trainer computes its own loss; the non-target KL does not "
                         "support Mamba models")
    name = cfg.get("trainer_cls")
    if not name:
        return AxolotlTrainer
    from axolotl.utils import get_cls_from_module_str

    cls = get_cls_from_module_str(name)
    if not (isinstance(cls, type) and issubclass(cls, AxolotlTrainer)):
        raise ValueError(f"{PLUGIN}: trainer_cls: {name!r} is not a subclass of axolotl's AxolotlTrainer, so the "
                         "non-target KL cannot be added to it")
    return cls


def nontarget_kl_trainer_class(base: type, trainer_kwargs: dict) -> type:
    """`base` (an `AxolotlTrainer` subclass) composed with `NonTargetKLTrainer`, built with `trainer_kwargs`
    (`options=`, `ref_model=`, `ref_adapter_name=`, `ref_model_init_kwargs=`)."""
    if issubclass(base, NonTargetKLMixin):
        return base

    class NonTargetKLAxolotlTrainer(base, NonTargetKLTrainer):
        __doc__ = f"axolotl's {base.__name__} with the non-target KL (kl_nontarget.integrations.axolotl)."

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **trainer_kwargs, **kwargs)
            # AxolotlTrainer turns this off for models whose forward takes no `num_items_in_batch`; the non-target
            # KL's loss is normalised by that count itself (NonTargetKLMixin._init_nontarget_kl).
            self.model_accepts_loss_kwargs = True

    NonTargetKLAxolotlTrainer.__qualname__ = NonTargetKLAxolotlTrainer.__name__ = f"NonTargetKL{base.__name__}"
    return NonTargetKLAxolotlTrainer


def _trainer_kwargs(cfg) -> dict:
    kwargs = {"options": trainer_options(cfg), "ref_adapter_name": cfg.get("ref_adapter_name")}
    if cfg.get("ref_model_name_or_path"):
        from types import SimpleNamespace

        from kl_nontarget.training.config import reference_model_spec

        spec = SimpleNamespace(ref_model_name_or_path=cfg.get("ref_model_name_or_path"),
                               ref_model_init_kwargs=cfg.get("ref_model_init_kwargs"))
        kwargs["ref_model"], kwargs["ref_model_init_kwargs"] = reference_model_spec(spec)
    return kwargs


class NonTargetKLPlugin(BasePlugin):
    """axolotl plugin: axolotl's SFT trainer with the non-target KL (see the module docstring)."""

    def get_input_args(self) -> str:
        return "kl_nontarget.integrations.axolotl_args.NonTargetKLArgs"

    def get_trainer_cls(self, cfg):
        if cfg.get("rl"):
            raise ValueError(refusal({"rl": cfg.get("rl")}))
        manager = PluginManager.get_instance()
        others = [name for name, plugin in manager.plugins.items()
                  if plugin is not self and type(plugin).get_trainer_cls is not BasePlugin.get_trainer_cls
                  and plugin.get_trainer_cls(cfg) is not None]
        if others:
            raise ValueError(f"{PLUGIN}: the plugin(s) {', '.join(others)} bring their own trainer class too; "
                             "only one trainer class can train, so the non-target KL cannot be combined with them")
        return nontarget_kl_trainer_class(_axolotl_trainer_class(cfg), _trainer_kwargs(cfg))

    def post_trainer_create(self, cfg, trainer):
        # Never a silent plain run: an earlier plugin's trainer class would have been chosen over ours.
        if not isinstance(trainer, NonTargetKLMixin):
            raise ValueError(f"{PLUGIN}: axolotl built a {type(trainer).__name__}, not the non-target KL's trainer "
                             "(another plugin's trainer class, or an RL trainer); refusing to train without the "
                             "regularizer")
