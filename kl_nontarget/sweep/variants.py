"""The PEFT adapters a sweep trains, by name: one table of configs, not one code path per variant.

`AdapterSpec` (variant, rank, alpha, target modules) is what a sweep run fine-tunes; `VARIANTS` maps a name to the
PEFT config it builds, the factor its learning-rate grid is scaled by (VeRA and IA3 train a few vectors and need
larger steps) and, for LoRA+, the learning-rate ratio of the B matrices. Variants whose init rewrites the base weights
(PiSSA, OLoRA) need nothing special here: the trainers regularize towards the model as it starts
(`kl_nontarget.models.reference.initial_reference`) and the sweep measures forgetting against the original base.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kl_nontarget.models.architectures import PRESETS, target_modules

# Every linear projection of a Llama-style decoder layer: the default targets.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The feed-forward output projections among them: IA3 scales their inputs rather than their outputs.
FEEDFORWARD = ("down_proj", "fc2", "dense_4h_to_h", "w2")


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter of a sweep run: a `VARIANTS` name, its rank and alpha, and the target modules (names, a preset of
    `kl_nontarget.models.architectures.PRESETS` such as "attention" or "all-linear", or None for `LORA_TARGETS`).

    ValueError at construction for an unknown variant or preset, and for a variant that cannot use the targets.
    """

    variant: str = "lora"
    r: int = 8
    alpha: int = 16
    targets: tuple | str | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown PEFT variant {self.variant!r}; known: {', '.join(VARIANTS)}")
        if isinstance(self.targets, (list, tuple)):  # a command line's one value: ["attention"] is the preset
            targets = tuple(self.targets)
            object.__setattr__(self, "targets", targets[0] if len(targets) == 1 and targets[0] in PRESETS else targets)
        if isinstance(self.targets, str) and self.targets not in PRESETS:
            target_modules(None, self.targets)  # ValueError for an unknown preset name
        if VARIANTS[self.variant].needs_names and isinstance(self.targets, str) and self.targets not in PRESETS[:2]:
            raise ValueError(f"the {self.variant} variant needs target module names or a preset (it must know the "
                             f"feed-forward ones), got {self.targets!r}")

    @property
    def name(self) -> str:
        """"variant / targets / r=R", the adapter's key in results.json (`adapter_name`)."""
        return adapter_name(self.variant, self.targets_label, self.r)

    @property
    def targets_label(self) -> str:
        """The targets as results.json records them: the preset's name, or the module names."""
        if self.targets is None:
            return ",".join(LORA_TARGETS)
        return self.targets if isinstance(self.targets, str) else ",".join(self.targets)

    def target_modules(self, base_model) -> list[str] | str:
        """The target modules for `base_model`'s architecture (a preset resolved to its module names)."""
        if self.targets is None:
            return list(LORA_TARGETS)
        resolved = target_modules(base_model, self.targets)
        return resolved if isinstance(resolved, str) else list(resolved)

    def peft_config(self, base_model):
        """The PEFT config of this adapter for `base_model`."""
        return VARIANTS[self.variant].config(self, self.target_modules(base_model))

    def model(self, base_model, seed: int):
        """A fresh PEFT copy of `base_model` with this adapter, initialised from `seed` (the same init for every run
        of a seed)."""
        from peft import get_peft_model

        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(base_model), self.peft_config(base_model))

    def trainable_parameters(self, base_model) -> int:
        """How many parameters this adapter trains on `base_model` (LoRA+'s optimizer does not change it)."""
        model = self.model(base_model, seed=0)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def optimizer(self, model, lr: float):
        """The optimizer this variant needs instead of the Trainer's default AdamW (LoRA+), else None."""
        ratio = VARIANTS[self.variant].loraplus_ratio
        if ratio is None:
            return None
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, weight_decay=0.0)


def adapter_name(variant: str, targets: str, r: int) -> str:
    """The key of an adapter in results.json: "variant / targets / r=R"."""
    return f"{variant} / {targets} / r={r}"


@dataclass(frozen=True)
class Variant:
    """One row of `VARIANTS`."""

    description: str
    config: Callable  # (AdapterSpec, resolved target modules) -> PEFT config
    lr_factor: float = 1.0  # the sweep's learning rates are multiplied by it
    loraplus_ratio: float | None = None  # LoRA+: the B matrices learn this many times faster
    needs_names: bool = False  # the config needs module names, not a shorthand such as "all-linear"


def _lora(**extra):
    def make(spec: AdapterSpec, targets):
        from peft import LoraConfig

        return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=targets,
                          task_type="CAUSAL_LM", **extra)

    return make


def _vera(spec: AdapterSpec, targets):
    from peft import VeraConfig

    # VeRA trains two vectors per layer over shared frozen random projections, whose rank is large by design.
    return VeraConfig(r=256, vera_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


def _lycoris(name):
    def make(spec: AdapterSpec, targets):
        import peft

        return getattr(peft, name)(r=spec.r, alpha=spec.alpha, target_modules=targets, task_type="CAUSAL_LM")

    return make


def _ia3(spec: AdapterSpec, targets):
    from peft import IA3Config

    return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t in FEEDFORWARD],
                     task_type="CAUSAL_LM")


VARIANTS: dict[str, Variant] = {
    "lora": Variant("LoRA: W + (alpha / r) B A, B = 0 at the start", _lora()),
    "dora": Variant("DoRA: LoRA's direction with a trained magnitude per output", _lora(use_dora=True)),
    "rslora": Variant("rsLoRA: LoRA scaled by alpha / sqrt(r)", _lora(use_rslora=True)),
    "pissa": Variant("PiSSA: A, B from the top-r singular vectors; the base keeps the residual",
                     _lora(init_lora_weights="pissa_niter_4")),
    "olora": Variant("OLoRA: A, B from a QR factor of W; the base keeps the residual",
                     _lora(init_lora_weights="olora")),
    "loraplus": Variant("LoRA+: LoRA whose B matrices learn 16x faster", _lora(), loraplus_ratio=16.0),
    "vera": Variant("VeRA: two trained vectors per layer over shared random projections of rank 256", _vera,
                    lr_factor=10.0),
    "loha": Variant("LoHa: a Hadamard product of two low-rank updates", _lycoris("LoHaConfig")),
    "lokr": Variant("LoKr: a Kronecker product update", _lycoris("LoKrConfig")),
    "ia3": Variant("IA3: learned rescaling of keys, values and feed-forward inputs", _ia3, lr_factor=10.0,
                   needs_names=True),
}


def parse_variants(text: str) -> tuple[str, ...]:
    """Comma-separated variant names -> a tuple of known names (ValueError naming an unknown one)."""
    names = tuple(dict.fromkeys(v.strip().lower() for v in str(text).split(",") if v.strip()))
    if not names:
        raise ValueError("no PEFT variant given")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown PEFT variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return names
