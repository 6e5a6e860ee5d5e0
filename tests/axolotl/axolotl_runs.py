"""Real axolotl runs of examples/axolotl.yaml on a tiny Llama, for the tests of this folder.

`example_config` writes the example with the test's model, data and CPU settings; `load_config` is axolotl's own
config loading and validation; `run_axolotl` trains with axolotl's Python API (`load_cfg`, `load_datasets`, `train`)
and returns what `recorder.RecorderPlugin` recorded at every step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

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
