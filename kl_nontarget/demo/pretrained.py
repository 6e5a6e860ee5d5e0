"""`kl-nontarget demo --model smollm2`: learning versus forgetting on a real pretrained chat model.

The same experiment as the self-made demo, on SmolLM2-135M-Instruct (or any causal chat model path):

- target task: questions about fictional people with odd fixed answers (`people`), trained on the answers only;
- forgetting: Lf, Lf - H(base) and retention perplexity on text sampled from the base itself (`samples`), and
  probe questions the base answers right (`probes`), asked again after every run;
- methods: plain LoRA, + non-target KL, + full-vocabulary KL at several kl_weights, with the learning rate and
  step count chosen for plain LoRA kept for every method (`sweep.grid.run_task`).

`--variants lora,dora,...` (`pretrained_variants_config`) runs the same comparison for several PEFT variants, each with
its own validation-chosen learning rate, on two tasks: `people` and `invented` (the same questions answered in a
made-up language the base gives almost no probability). Runs on CUDA when available, else on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kl_nontarget.demo.people import build_people_task
from kl_nontarget.demo.probes import format_probes, run_probes
from kl_nontarget.demo.samples import cached_base_text
from kl_nontarget.evaluation.loader import padded_loader
from kl_nontarget.models.loading import load_model
from kl_nontarget.sweep.grid import base_record, run_task, torch_threads, write_results

TASK = "people"
# The variants study: four LoRA forms (one rewriting the base weights) and one non-LoRA tuner.
STUDY_VARIANTS = ("lora", "dora", "rslora", "pissa", "vera")
STUDY_TASKS = ("people", "invented")


@dataclass
class PretrainedDemoConfig:
    """Settings of the real-model demo (the field names shared with `DemoConfig` mean the same)."""

    model: str = "smollm2"
    seeds: int = 1
    tasks: tuple = (TASK,)
    sizes: dict = field(default_factory=lambda: dict(train=80, val=16, test=32))
    task_seed: int = 0
    # Held-out base text: samples drawn from the base at temperature 1.
    samples: int = 32
    sample_tokens: int = 64
    sample_seed: int = 0
    probe_tokens: int = 24
    # Fine-tuning: LoRA on every projection; one learning rate, the step count chosen on validation for plain LoRA.
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lr_grid: tuple = (5e-4,)
    max_steps: int = 60
    eval_every: int = 10
    steps_tolerance: float = 0.02
    kl_weights: tuple = (0.1, 0.3, 1.0)
    match_tolerance: float = 0.05
    peft_variants: tuple = ("lora",)
    probes: bool = True  # ask the probe questions after every run

    def to_dict(self):
        return dataclasses.asdict(self)


def pretrained_config(model="smollm2", seeds=None):
    """The default run: 7 runs per seed (about 23 CPU-minutes per seed with SmolLM2, i.e. under 25 minutes on 2
    idle cores)."""
    cfg = PretrainedDemoConfig(model=model)
    if seeds is not None:
        cfg.seeds = seeds
    return cfg


def pretrained_quick_config(model="smollm2", seeds=None):
    """A smoke run: one kl_weight per regularizer, fewer steps at a higher rate, less held-out text."""
    cfg = PretrainedDemoConfig(model=model, sizes=dict(train=80, val=16, test=16), samples=16, sample_tokens=48,
                               lr_grid=(1e-3,), max_steps=30, eval_every=30, kl_weights=(0.3,))
    if seeds is not None:
        cfg.seeds = seeds
    return cfg


def pretrained_variants_config(model="smollm2", seeds=None, variants=STUDY_VARIANTS, quick=False):
    """The PEFT-variants study: both tasks, every variant at lr 1e-3 times its `lr_factor` (VeRA and IA3 need ten
    times more) and the step count (8 or 16) chosen on validation for its plain run, then the non-target and the full
    KL at weights 0.3 and 1. Per task and variant 5 runs a seed of at most 16 steps of 4 examples, about 30 to 50 s
    each on a CPU core (a grid of rates, `lr_grid`, adds a plain run per extra rate). `quick`: the `invented` task
    only (the one far from the base), one seed, 8 steps at one rate, weight 0.3 only, small splits, no step choice
    (3 runs of about 15 s per variant)."""
    if quick:
        cfg = PretrainedDemoConfig(model=model, tasks=("invented",), sizes=dict(train=16, val=4, test=8), samples=8,
                                   sample_tokens=32, batch_size=4, lr_grid=(1e-3,), max_steps=8, eval_every=8,
                                   kl_weights=(0.3,), peft_variants=tuple(variants), probes=False)
    else:
        cfg = PretrainedDemoConfig(model=model, tasks=STUDY_TASKS, sizes=dict(train=32, val=8, test=16), samples=16,
                                   sample_tokens=48, batch_size=4, lr_grid=(1e-3,), max_steps=16,
                                   eval_every=8, kl_weights=(0.3, 1.0), peft_variants=tuple(variants), probes=False)
    if seeds is not None:
        cfg.seeds = seeds
    return cfg


def pretrained_tiny_config(model="smollm2"):
    """For the tests: every piece runs, on a handful of tokens (the numbers mean nothing)."""
    return PretrainedDemoConfig(model=model, sizes=dict(train=8, val=4, test=4), samples=2, sample_tokens=6,
                                probe_tokens=4, batch_size=4, lr_grid=(5e-4,), max_steps=2, eval_every=1,
                                kl_weights=(1.0,))


def run_pretrained_demo(cfg, out_dir, *, cache_dir=None, progress=True, log=print, threads=None):
    """Runs the real-model demo; writes out_dir/results.json, frontier.png, base_samples.jsonl and adapters/."""
    with torch_threads(threads):
        return _run(cfg, out_dir, cache_dir=cache_dir, progress=progress, log=log)


def _run(cfg, out_dir, *, cache_dir, progress, log):
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, path = load_model(cfg.model, cache_dir, device=device, log=log)
    log(f"base model: {path} on {device}")
    pad = tok.pad_token_id
    heldout = cached_base_text(model, tok, path, n_samples=cfg.samples, tokens=cfg.sample_tokens,
                               seed=cfg.sample_seed, progress=progress, log=log)
    (out_dir / "base_samples.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in heldout))
    heldout_loader = padded_loader([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in heldout], pad, 8)
    base, base_forget = base_record(model, tok, heldout_loader, path, model=cfg.model, device=device)
    base.update(heldout_tokens=base_forget["tokens"])
    probe_metrics = None
    if cfg.probes:
        base_probes = run_probes(model, tok, max_new_tokens=cfg.probe_tokens)
        base.update(probes=base_probes, probes_right=sum(p["right"] for p in base_probes.values()))
        wrong = [k for k, p in base_probes.items() if not p["right"]]
        if wrong:
            log(f"note: the base model already misses the probe(s) {', '.join(wrong)}")

        def probe_metrics(peft_model):
            probes = run_probes(peft_model, tok, max_new_tokens=cfg.probe_tokens)
            return {"probes_right": sum(p["right"] for p in probes.values()), "probes": probes}

    runs = []
    for task in cfg.tasks:
        data = build_people_task(tok, cfg.sizes, cfg.task_seed, task=task)
        info, task_runs = run_task(model, pad, task, data, cfg, heldout_loader, out_dir, path, progress=progress,
                                   log=log, extra_metrics=probe_metrics)
        base["tasks"][task] = info
        runs += task_runs
    return write_results(runs, base, cfg, out_dir, start, log, extra_report=format_probes)
