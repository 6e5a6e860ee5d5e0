"""`kl-nontarget demo`: learning versus forgetting on a self-made base model.

- `corpus`: the synthetic base language and its word-level tokenizer;
- `base`: the tiny Llama pretrained on it with `transformers.Trainer`, cached by config and seed;
- `tasks`: the `shifted` and `near` fine-tuning tasks;
- `runs`: one LoRA run per method (`lora`, `nontarget_kl`, `full_kl`) through the real Trainer classes;
- `runner`: the whole demo, `report`: the terminal table, `plot`: frontier.png;
- `config`: the default, quick and tiny settings.

`kl-nontarget demo --model smollm2` runs the same experiment on a real pretrained chat model (`pretrained`), with
its own task (`people`), held-out text sampled from the base (`samples`), probe questions (`probes`) and batched
generation (`generation`); the model comes from `kl_nontarget.models.loading`.
"""

from kl_nontarget.demo.config import DemoConfig, default_config, quick_config, tiny_config
from kl_nontarget.demo.runner import run_demo

__all__ = ["DemoConfig", "default_config", "quick_config", "tiny_config", "run_demo"]
