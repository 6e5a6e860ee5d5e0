"""axolotl's QLoRA path with the plugin: one real run of examples/axolotl.yaml with `adapter: qlora` and
`load_in_4bit: true` (axolotl's own BitsAndBytesConfig: NF4, double quantization, float32 compute), on a tiny Llama of
hidden size 64 (bitsandbytes' CPU backend needs 64-wide blocks), CPU. The base's linears are bitsandbytes
`Linear4bit`, and every step equals `NonTargetKLTrainer` on the recorded batch over a fresh plain-PEFT QLoRA copy (the
same quantization config, the same 4-bit weights)."""

from __future__ import annotations

import pytest
import torch

from axolotl_runs import GRAD_TOL, LOSS_TOL, alpaca_rows, example_config, max_diff, reference_step, run_axolotl


@pytest.fixture(scope="module")
def qlora_dir(tmp_path_factory):
    from tiny_models import tiny_llama, tiny_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("axolotl_qlora")
    tiny_llama(root / "model", hidden_size=64)
    tiny_tokenizer(root / "model")
    write_jsonl(root / "data.jsonl", alpaca_rows())
    return root


@pytest.fixture(scope="module")
def qlora_run(qlora_dir):
    return run_axolotl(example_config(qlora_dir, "qlora", adapter="qlora", load_in_4bit=True, max_steps=2))


def linear4bit_state(model):
    """The weights of every bitsandbytes Linear4bit of `model` as its forward sees them (the packed NF4 weight
    dequantized with its quant state, double-quantized absmax included), by module name."""
    import bitsandbytes as bnb

    return {name.removeprefix("base_model.model.").replace(".base_layer", ""):
            bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


@pytest.mark.filterwarnings("ignore::kl_nontarget.models.reference.TrainedAdapterWarning")
def test_qlora_steps_equal_nontarget_kl_trainer(qlora_run, qlora_dir, tmp_path):
    from bitsandbytes.nn import Linear4bit

    cfg, trainer, steps = qlora_run
    assert len(steps) == 2 and cfg.adapter == "qlora" and cfg.load_in_4bit
    model = trainer.model
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, Linear4bit)
    assert isinstance(layer.mlp.down_proj.base_layer, Linear4bit)
    quantization = model.base_model.model.config.quantization_config
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_compute_dtype == torch.float32
    trained = linear4bit_state(model)
    assert len(trained) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    # The reference's base (reference_step's load, the same config): the same 4-bit weights as axolotl's run.
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(str(qlora_dir / "model"), dtype=torch.float32,
                                                 quantization_config=quantization, device_map="cpu")
    reference = linear4bit_state(fresh)
    assert reference.keys() == trained.keys()
    for name, weight in trained.items():
        torch.testing.assert_close(weight, reference[name], rtol=0, atol=0, msg=name)
    loss_diffs, grad_diffs = [], []
    for i, step in enumerate(steps):
        loss, grads, sums = reference_step(qlora_dir, cfg, step, tmp_path, quantization_config=quantization)
        torch.testing.assert_close(step["loss"], loss, **LOSS_TOL, msg=f"step {i + 1}")
        for name, grad in grads.items():
            torch.testing.assert_close(step["grads"][name], grad, **GRAD_TOL, msg=f"step {i + 1}: {name}")
        loss_diffs.append(float((step["loss"] - loss).abs()))
        grad_diffs.append(max_diff(step["grads"], grads))
    assert float(sums["kl"]) > 0
    print("\nqlora:", [float(s["loss"]) for s in steps], "kl", float(sums["kl"]), "max |loss diff|", max(loss_diffs),
          "max |grad diff|", max(grad_diffs))
