"""Real axolotl runs of examples/axolotl.yaml on a tiny Llama, for the tests of this folder.

`example_config` writes the example with the test's model, data and CPU settings; `load_config` is axolotl's own
config loading and validation; `run_axolotl` trains with axolotl's Python API (`load_cfg`, `load_datasets`, `train`)
and returns what `recorder.RecorderPlugin` recorded at every step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "axolotl.yaml"
PLUGIN = "kl_nontarget.integrations.axolotl.NonTargetKLPlugin"
RECORDER = "recorder.RecorderPlugin"

# What the tests change in examples/axolotl.yaml: the tiny model and data of a temp folder, a CPU-sized run, and a
# learning rate large enough that the adapter moves off zero by step 2 (so the KL and its gradient are not zero).
CPU_RUN = dict(dataset_num_proc=1, sequence_len=128, micro_batch_size=4, max_steps=3, learning_rate=0.02,
               dataloader_num_workers=0, save_safetensors=True, bf16=False, fp16=False, tf32=False,
               use_tensorboard=False)


def alpaca_rows(n=12, seed=7):
    """Alpaca-format rows over the tiny tokenizer's words (instruction, input, output)."""
    from tiny_models import toy_prompt_completions

    rows = toy_prompt_completions(n, seed=seed)
    return [{"instruction": r["prompt"], "input": "" if i % 3 else "w1 w2", "output": r["completion"].strip()}
            for i, r in enumerate(rows)]


def reset_plugins():
    """axolotl's PluginManager is a process-wide singleton: forget the plugins of an earlier run."""
    from axolotl.integrations.base import PluginManager

    manager = PluginManager.get_instance()
    manager.plugins.clear()
    manager.cfg = None


def example_config(root: Path, name: str, *, plugins=(PLUGIN, RECORDER), **overrides) -> Path:
    """examples/axolotl.yaml with the tiny model, data and output folder of `root`, `CPU_RUN` and `overrides`,
    written to `root/<name>.yaml`. `plugins`: the plugin list (without PLUGIN: plain axolotl, no `kl_*` keys)."""
    config = yaml.safe_load(EXAMPLE.read_text())
    assert config["plugins"] == [PLUGIN]
    config.update(base_model=str(root / "model"), tokenizer_config=str(root / "model"),
                  datasets=[{"path": str(root / "data.jsonl"), "ds_type": "json", "type": "alpaca"}],
                  output_dir=str(root / name), dataset_prepared_path=str(root / f"{name}-prepared"), **CPU_RUN)
    config.update(overrides)
    config["plugins"] = list(plugins)
    if PLUGIN not in plugins:
        for key in [k for k in config if k.startswith("kl_")]:
            del config[key]
    if not plugins:
        del config["plugins"]
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def load_config(path: Path):
    """axolotl's own config loading and validation (`axolotl.cli.config.load_cfg`), after a plugin reset."""
    from axolotl.cli.config import load_cfg

    reset_plugins()
    return load_cfg(str(path))


def run_axolotl(path: Path):
    """Train the config at `path` with axolotl's Python API (load_cfg, load_datasets, train), recording every step;
    returns (cfg, trainer, steps)."""
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train
    from transformers import set_seed

    from recorder import RecorderPlugin

    cfg = load_config(path)
    set_seed(0)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    dataset_meta = load_datasets(cfg=cfg)
    _, _, trainer = train(cfg=cfg, dataset_meta=dataset_meta)
    return cfg, trainer, RecorderPlugin.steps


# float32 on CPU, the same code on both sides: the loss to 1e-6 relative, gradients to 1e-5 relative.
LOSS_TOL = dict(rtol=1e-6, atol=1e-7)
GRAD_TOL = dict(rtol=1e-5, atol=1e-8)
# kl_weight 0 against the model's own cross-entropy: two computations of one loss, float32 rounding apart.
PLAIN_LOSS_TOL = dict(rtol=1e-6, atol=1e-6)
PLAIN_GRAD_TOL = dict(rtol=1e-5, atol=1e-7)


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between same-named tensors of `a` and `b`."""
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def reference_step(axolotl_dir, cfg, step, tmp_path, quantization_config=None):
    """`NonTargetKLTrainer.compute_loss` and its gradients on a recorded step: the same batch, `num_items_in_batch`
    and adapter weights, on a fresh copy of the base model with the adapter axolotl saved (plain PEFT).
    `quantization_config`: load the base with it (bitsandbytes on CPU) and `prepare_model_for_kbit_training`, plain
    PEFT's QLoRA."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, TrainingArguments

    from kl_nontarget import NonTargetKLTrainer

    if quantization_config is None:
        base = AutoModelForCausalLM.from_pretrained(str(axolotl_dir / "model"), dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(axolotl_dir / "model"), dtype=torch.float32,
                                                    quantization_config=quantization_config, device_map="cpu")
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(base, cfg.output_dir, is_trainable=True)
    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, value in step["params"].items():
            named[name].copy_(value)
    model.train()
    args = TrainingArguments(str(tmp_path / "ref"), use_cpu=True, report_to="none", max_steps=1)
    trainer = NonTargetKLTrainer(model=model, args=args, kl_weight=cfg.kl_weight, temperature=cfg.kl_temperature,
                                 kl_direction=cfg.kl_direction)
    loss = trainer.compute_loss(model, dict(step["inputs"]), num_items_in_batch=step["num_items"])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, trainer.component_log.sums("train")
