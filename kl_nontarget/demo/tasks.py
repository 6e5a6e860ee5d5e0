"""The two fine-tuning tasks, built from the base grammar.

Both use a question form the base corpus never contains, "what will NAME VERB ? NAME VERB the", after one
base-domain sentence of context; the answer is "X ." (both tokens supervised, the prompt not):

- `shifted`: X is a verb of another topic, fixed per VERB. The base model has never seen a verb after "the", so it
  gives X a probability of roughly 1e-5: deterministic answers the base strongly disprefers.
- `near`: X is the verb's second most likely object in the base grammar: an answer the base already finds
  plausible (about 20%), also fixed per VERB.

The (name, verb) pairs are split between train, validation and test, so held-out examples ask about pairs the
adapter never saw (the answer depends on the verb only, so the rule itself is learnable).
"""

from __future__ import annotations

import random

from kl_nontarget.demo.corpus import NAMES, Grammar

TASKS = ("shifted", "near")
SPLITS = ("train", "val", "test")


def answer_map(grammar: Grammar, task: str):
    """verb -> the deterministic X of `task`."""
    topics = grammar.topics
    out = {}
    for ti, topic in enumerate(topics):
        for vi, verb in enumerate(topic.verbs):
            if task == "shifted":
                out[verb] = topics[(ti + 2) % len(topics)].verbs[vi]
            elif task == "near":
                out[verb] = grammar.objects[verb][1]
            else:
                raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return out


def split_pairs(grammar: Grammar, seed: int = 0, fractions=(0.7, 0.15, 0.15)):
    """(name, verb) pairs divided into train / val / test."""
    verbs = [v for t in grammar.topics for v in t.verbs]
    pairs = [(n, v) for n in NAMES for v in verbs]
    random.Random(seed).shuffle(pairs)
    a = int(fractions[0] * len(pairs))
    b = a + int(fractions[1] * len(pairs))
    return {"train": pairs[:a], "val": pairs[a:b], "test": pairs[b:]}


def make_examples(grammar: Grammar, task: str, pairs, n: int, seed: int):
    """`n` (prompt words, answer words) tuples sampled over `pairs`."""
    answers = answer_map(grammar, task)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, verb = pairs[i % len(pairs)] if i < len(pairs) else rng.choice(pairs)
        topic = grammar.topic_of_verb[verb]
        entities = [name] + [e for e in grammar.entities(rng, topic) if e != name][:1]
        context = grammar.sentence(rng, topic, entities)
        prompt = ["<bos>"] + context + ["what", "will", name, verb, "?", name, verb, "the"]
        answer = [answers[verb], "."]
        out.append((prompt, answer))
    return out


def encode_examples(tokenizer, examples):
    """Token ids with labels: -100 on the prompt, the answer supervised."""
    rows = []
    for prompt, answer in examples:
        p = tokenizer.convert_tokens_to_ids(prompt)
        a = tokenizer.convert_tokens_to_ids(answer)
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return rows


def task_examples(grammar: Grammar, task: str, sizes: dict, seed: int = 0):
    """{"train"|"val"|"test": (prompt words, answer words) tuples} for `task`; `sizes` gives the count per split."""
    pairs = split_pairs(grammar, seed)
    return {split: make_examples(grammar, task, pairs[split], sizes[split],
                                 seed=1000 * (SPLITS.index(split) + 1) + seed)
            for split in SPLITS}


def build_task(grammar: Grammar, tokenizer, task: str, sizes: dict, seed: int = 0):
    """{"train"|"val"|"test": encoded rows} for `task`; `sizes` gives the number of examples per split."""
    return {split: encode_examples(tokenizer, examples)
            for split, examples in task_examples(grammar, task, sizes, seed).items()}
