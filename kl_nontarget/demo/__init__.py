"""`kl-nontarget demo`: learning versus forgetting on a self-made base model.

- `corpus`: the synthetic base language and its word-level tokenizer;
- `base`: the tiny Llama pretrained on it with `transformers.Trainer`, cached by config and seed;
- `tasks`: the `shifted` and `near` fine-tuning tasks;
- `runs`: one LoRA run per method (`lora`, `nontarget_kl`, `full_kl`) through the real Trainer classes;
- `runner`: the whole demo, `report`: the terminal table, `plot`: frontier.png;
- `config`: the default, quick and tiny settings.
"""

from kl_nontarget.demo.config import DemoConfig, default_config, quick_config, tiny_config
from kl_nontarget.demo.runner import run_demo

__all__ = ["DemoConfig", "default_config", "quick_config", "tiny_config", "run_demo"]
