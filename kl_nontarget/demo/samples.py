"""Held-out text for the real-model demo's forgetting metrics: samples drawn from the base model itself.

A pretrained model's own training text is not at hand, but text it generates at temperature 1 (no top-k, no
top-p) is a sample of its distribution, and none of it is seen in fine-tuning. Prompts vary between plain text
openings and chat questions. Only the generated tokens are scored (the prompt gets label -100). The samples are
cached next to the base checkpoint, keyed by the prompts and the sampling settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kl_nontarget.demo.generation import generate
from kl_nontarget.demo.people import chat_prompt

PLAIN_PROMPTS = (
    "The history of the city begins",
    "In the morning, the farmers",
    "A simple way to cook rice is",
    "The theory of evolution explains",
    "Dear Sarah, thank you for your letter.",
    "def fibonacci(n):",
    "The weather today",
    "Once upon a time, in a small village,",
)
CHAT_PROMPTS = (
    "Can you explain how a rainbow forms?",
    "Give me three tips for studying better.",
    "Write a short poem about the sea.",
    "What are the benefits of drinking water?",
    "How do I make a cup of tea?",
    "Tell me a fun fact about space.",
    "What should I pack for a weekend hike?",
    "Why do leaves change colour in autumn?",
)
SAMPLES_VERSION = 2


def prompts(tokenizer, n_prompts: int):
    """`n_prompts` prompt strings, alternating plain and chat ones."""
    chat = [chat_prompt(tokenizer, q) for q in CHAT_PROMPTS]
    mixed = [p for pair in zip(PLAIN_PROMPTS, chat) for p in pair]
    if n_prompts > len(mixed):
        raise ValueError(f"at most {len(mixed)} prompts, asked for {n_prompts}")
    return mixed[:n_prompts]


def sample_base_text(model, tokenizer, *, n_samples: int, tokens: int, seed: int = 0, progress=True):
    """Rows {"input_ids", "labels", "text"} of `n_samples` base samples of up to `tokens` new tokens each.

    The prompts are used in turn (prompt i % n_prompts for sample i); a sample ends early at an end token.
    """
    n_prompts = min(n_samples, len(PLAIN_PROMPTS) + len(CHAT_PROMPTS))
    texts = prompts(tokenizer, n_prompts)
    chosen = [texts[i % n_prompts] for i in range(n_samples)]
    torch.manual_seed(seed)
    rows = []
    batch = 16
    with tqdm(total=n_samples, desc="sampling base text", disable=not progress, leave=False) as bar:
        for start in range(0, n_samples, batch):
            part = chosen[start:start + batch]
            # temperature 1 with no top-k / top-p cut: samples of the model's own distribution
            for text, (prompt_ids, new) in zip(part, generate(model, tokenizer, part, max_new_tokens=tokens,
                                                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0)):
                rows.append({"input_ids": prompt_ids + new, "labels": [-100] * len(prompt_ids) + new,
                             "text": text + tokenizer.decode(new, skip_special_tokens=False)})
            bar.update(len(part))
    return rows


def cached_base_text(model, tokenizer, checkpoint, *, n_samples, tokens, seed=0, progress=True, log=print):
    """`sample_base_text`, cached in the checkpoint folder (or a subfolder of it) under a key of the settings."""
    device = next(model.parameters()).device
    key = json.dumps({"n": n_samples, "tokens": tokens, "seed": seed, "plain": PLAIN_PROMPTS, "chat": CHAT_PROMPTS,
                      "version": SAMPLES_VERSION, "device": device.type}, sort_keys=True)
    path = Path(checkpoint) / f"base_samples-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if path.is_file():
        log(f"held-out base text: {n_samples} samples loaded from {path}")
        return json.loads(path.read_text())
    rows = sample_base_text(model, tokenizer, n_samples=n_samples, tokens=tokens, seed=seed, progress=progress)
    try:
        path.write_text(json.dumps(rows))
        log(f"held-out base text: {n_samples} samples of up to {tokens} tokens drawn from the base, cached in {path}")
    except OSError as err:  # a read-only checkpoint folder: use the samples without caching them
        log(f"held-out base text: {n_samples} samples drawn (not cached: {err})")
    return rows
