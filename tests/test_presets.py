"""`target_modules` presets (attention, mlp_up_gate, all-linear) resolved on every architecture of the table
(kl_nontarget/models/architectures.py), and used by the sweep, `kl-nontarget sft` and the SFT trainer."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from kl_nontarget.models.architectures import ARCHITECTURES, PRESETS, architecture_name, target_modules

from tiny_models import TINY_ARCHITECTURES, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapted(model):
    """{module name: the LoRA-wrapped modules' parent kind ("self_attn", "mlp", ...)} of a PEFT model."""
    return {name.split(".")[-1]: name.split(".")[-2] for name, module in model.named_modules()
            if hasattr(module, "lora_A") and not name.endswith(("lora_A", "lora_B"))}


def test_every_architecture_of_the_table_has_a_tiny_config():
    assert {architecture_name(tiny_causal_lm(t).config) for t in TINY_ARCHITECTURES} == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHITECTURES))
def test_presets_resolve_to_the_models_own_modules(model_type):
    arch = ARCHITECTURES[architecture_name(tiny_causal_lm(model_type))]
    for preset, parent in (("attention", "self_attn"), ("mlp_up_gate", "mlp")):
        model = tiny_causal_lm(model_type)
        names = target_modules(model, preset)
        assert names == target_modules(model.config, preset)  # a config resolves the same way
        adapted = _adapted(get_peft_model(model, LoraConfig(r=2, target_modules=names)))
        assert set(adapted) == set(names) and set(adapted.values()) == {parent}, adapted
        # every layer's projections, and nothing else: one adapter per name per layer
        layers = model.config.num_hidden_layers
        assert sum(1 for n, m in model.named_modules() if hasattr(m, "lora_A") and not n.endswith(
            ("lora_A", "lora_B"))) == layers * len(names)
    assert not set(arch.mlp_up_gate) & set(arch.mlp_down)  # the down projection stays frozen
    everything = _adapted(get_peft_model(tiny_causal_lm(model_type),
                                         LoraConfig(r=2, target_modules=target_modules(model, "all-linear"))))
    assert set(arch.attention) | set(arch.mlp_up_gate) | set(arch.mlp_down) == set(everything)


def test_other_targets_pass_through_and_bad_presets_fail():
    model = tiny_causal_lm("llama")
    assert target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert target_modules(model, ["attention"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]  # a CLI's one value
    assert target_modules(model, r".*\.q_proj") == r".*\.q_proj"  # a regex, for PEFT
    assert target_modules(model, None) is None and set(PRESETS) == {"attention", "mlp_up_gate", "all-linear"}
    with pytest.raises(ValueError, match="unknown target_modules preset 'attn'"):
        target_modules(model, "attn")
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="not GPT2LMHeadModel"):
        target_modules(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)), "attention")


def test_a_preset_trains_only_its_modules(model_dirs, tmp_path):
    from kl_nontarget.sweep.variants import AdapterSpec

    from tiny_models import load_model

    model = AdapterSpec(targets="mlp_up_gate", r=2).model(load_model(model_dirs), seed=0)
    trained = {n.split(".lora_")[0].split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"gate_proj", "up_proj"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "down_proj" in n)
    assert torch.isfinite(next(p for p in model.parameters() if p.requires_grad)).all()
