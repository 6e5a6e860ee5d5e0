"""Retention sets: the text on which forgetting is measured, from the user's data or sampled from the base model.

A retention set is a list of rows `{"input_ids": [...], "labels": [...]}` (labels -100 where nothing is measured,
e.g. on a prompt). `rows_from_data` turns a user's examples (`text` or `input_ids`) into rows; `sample_from_base`
draws continuations from the base model itself (a PEFT model with its adapters disabled, or an explicit base model)
for a small built-in set of varied prompts, plain and, when the tokenizer has a chat template, chat. Sampling at
T = 1 from the base gives text on which the base model is at home, so drift there is forgetting, and it needs no
data the user does not have. `batches` pads rows into model inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from kl_nontarget.evaluation.loader import PadCollator

# Plain-text openings across registers (encyclopedic, narrative, code, instructions, letters, numbers).
PLAIN_PROMPTS = (
    "The history of the city begins",
    "In mathematics, a prime number is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "To make a simple bread, you need",
    "Dear Sir or Madam, I am writing to",
    "The results of the experiment show that",
    "Water boils at",
    "The main causes of the First World War were",
    "Photosynthesis is the process by which",
    "import numpy as np\n",
    "Here are three tips for a job interview:",
)

# Chat questions, formatted with the tokenizer's chat template when it has one.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Explain what a black hole is in two sentences.",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
    "What is 12 times 7?",
    "Give me three ideas for a weekend trip.",
)


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids(tokenizer, prompts: Sequence[str] | None = None, chat_prompts: Sequence[str] | None = None
               ) -> list[list[int]]:
    """Token ids of the plain prompts and, when the tokenizer has a chat template, of the chat prompts."""
    plain = PLAIN_PROMPTS if prompts is None else tuple(prompts)
    chat = CHAT_PROMPTS if chat_prompts is None else tuple(chat_prompts)
    out = [_token_ids(tokenizer, p) for p in plain]
    if chat and getattr(tokenizer, "chat_template", None):
        out += [_chat_ids(tokenizer, q) for q in chat]
    out = [ids for ids in out if ids]
    if not out:
        raise ValueError("no prompt gave any tokens: pass prompts= with text the tokenizer can encode")
    return out


def trim_at_stop(continuation: list[int], stop_ids: set[int]) -> list[int]:
    """The continuation up to and including its first stop token (EOS/padding)."""
    for i, token in enumerate(continuation):
        if token in stop_ids:
            return continuation[:i + 1]
    return continuation


@torch.no_grad()
def sample_from_base(model, tokenizer, *, num_samples: int = 32, max_new_tokens: int = 64, seed: int = 0,
                     base_model=None, prompts: Sequence[str] | None = None,
                     chat_prompts: Sequence[str] | None = None) -> list[dict]:
    """Rows of text sampled at T = 1 from the base model, prompt masked out of the labels.

    `num_samples` continuations of at most `max_new_tokens` tokens are spread over the prompts (each prompt's samples
    come from one `generate` call). The base model is `base_model`, or `model` with its adapters disabled. The global
    random state is left as it was (sampling uses a forked generator seeded with `seed`), and every module's
    train/eval mode and requires_grad flag is restored.
    """
    from kl_nontarget.evaluation.metrics import base_model_context

    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples} and {max_new_tokens}")
    ids = prompt_ids(tokenizer, prompts, chat_prompts)
    counts = [num_samples // len(ids) + (1 if i < num_samples % len(ids) else 0) for i in range(len(ids))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = {t for t in (tokenizer.eos_token_id, pad) if t is not None}
    rows = []
    with base_model_context(model, base_model) as base:
        device = next(base.parameters()).device
        modes = [(m, m.training) for m in base.modules()]
        base.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for prompt, count in zip(ids, counts):
                    if count == 0:
                        continue
                    inputs = torch.tensor([prompt], device=device)
                    out = base.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                                        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                        num_return_sequences=count, pad_token_id=pad)
                    for seq in out.tolist():
                        continuation = trim_at_stop(seq[len(prompt):], stop)
                        if continuation:
                            rows.append({"input_ids": prompt + continuation,
                                         "labels": [-100] * len(prompt) + continuation})
        finally:
            for m, mode in modes:
                m.training = mode
    return rows


def rows_from_data(data: Iterable, tokenizer=None, *, max_length: int = 512) -> list[dict]:
    """Rows from examples with `input_ids` (used as is, `labels` too if present) or `text` (tokenized).

    `data` is a `datasets.Dataset` or any iterable of dicts. Raises ValueError when no example holds usable text
    (a `text` string or a non-empty `input_ids` list), naming the fields found.
    """
    rows, fields = [], set()
    for example in data:
        if not isinstance(example, dict):
            raise TypeError("retention examples must be dicts with 'text' or 'input_ids', got "
                            f"{type(example).__name__}")
        fields.update(example)
        if example.get("input_ids") is not None:
            ids = [int(t) for t in example["input_ids"]][:max_length]
            labels = [int(t) for t in example.get("labels", ids)][:max_length]
        elif isinstance(example.get("text"), str) and example["text"].strip():
            if tokenizer is None:
                raise ValueError("retention examples with 'text' need a tokenizer (pass tokenizer=, or give the "
                                 "trainer a processing_class)")
            ids = list(tokenizer(example["text"], truncation=True, max_length=max_length)["input_ids"])
            labels = ids
        else:
            continue
        if len(ids) > 1:
            rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        found = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"the retention data holds no usable text: each example needs a non-empty 'text' string or "
                         f"'input_ids' of at least 2 tokens (fields found: {found})")
    return rows


def has_text(data: Iterable) -> bool:
    """Whether some example of `data` has a non-empty `text` string (and so needs a tokenizer)."""
    names = getattr(data, "column_names", None)
    if names is not None and "text" not in names:
        return False
    return any(isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"].strip() for e in data)


def batches(rows: Sequence[dict], pad_id: int, batch_size: int = 8) -> Iterator[dict]:
    """Right-padded batches of `rows`: input_ids, attention_mask, and labels (-100 on padding)."""
    collate = PadCollator(pad_id)
    for start in range(0, len(rows), batch_size):
        yield collate(rows[start:start + batch_size])
