"""Demo settings: the default run (< 5 min on 2 cores), `--quick` (< 1 min) and a tiny one for the tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class DemoConfig:
    seeds: int = 1
    tasks: tuple = ("shifted", "near")
    # Base model and its pretraining (a ~0.47M-parameter Llama over the 119-word grammar).
    base: dict = field(default_factory=lambda: dict(hidden_size=96, layers=4, heads=4, intermediate_size=256,
                                                    seq_len=64, train_docs=5000, heldout_docs=400, batch_size=32,
                                                    steps=500, lr=3e-3))
    base_seed: int = 0
    # Task data (examples per split).
    sizes: dict = field(default_factory=lambda: dict(train=512, val=96, test=192))
    heldout_blocks: int = 96  # 64-token blocks of held-out base text for the forgetting metrics
    # Fine-tuning.
    batch_size: int = 16
    lora_r: int = 8
    lora_alpha: int = 16
    lr_grid: tuple = (3e-3, 6e-3)  # the plain-LoRA sweep; a single value skips the sweep
    max_steps: int = 200
    eval_every: int = 25
    steps_tolerance: float = 0.02  # fewest steps whose validation loss is within this of the best
    kl_weights: tuple = (0.03, 0.3, 1.0, 3.0)
    match_tolerance: float = 0.05  # "same target loss" for the matched comparison (absolute, nats)

    def to_dict(self):
        return dataclasses.asdict(self)


def default_config(seeds=None):
    cfg = DemoConfig()
    if seeds is not None:
        cfg.seeds = seeds
    return cfg


def quick_config(seeds=None):
    # A smoke run: a smaller, shorter-trained base and 60 steps per run; its numbers are not the evidence.
    cfg = DemoConfig(seeds=1, lr_grid=(1e-2,), max_steps=40, eval_every=40, kl_weights=(0.03, 0.3, 1.0, 3.0),
                     sizes=dict(train=256, val=32, test=64), heldout_blocks=32)
    cfg.base.update(hidden_size=64, layers=2, intermediate_size=160, train_docs=1200, heldout_docs=150, steps=150)
    if seeds is not None:
        cfg.seeds = seeds
    return cfg


def tiny_config():
    """For the tests: a few seconds end to end (the numbers mean nothing)."""
    cfg = DemoConfig(seeds=1, lr_grid=(3e-3, 1e-2), max_steps=4, eval_every=2, kl_weights=(0.1, 1.0),
                     sizes=dict(train=32, val=8, test=8), heldout_blocks=4, batch_size=8)
    cfg.base.update(hidden_size=32, layers=1, heads=2, intermediate_size=64, seq_len=32, train_docs=60,
                    heldout_docs=20, batch_size=8, steps=5)
    return cfg
