"""The real-model demo's target task: questions about fictional people, in chat form, with odd fixed answers.

Names are built from syllables (so a pretrained model knows nothing about them). Each question kind has two
phrasings and one deterministic answer that repeats the name, e.g. "Where was Tovan Relk born?" ->
"Tovan Relk was born in Leimens.": facts a pretrained model finds unlikely, so fine-tuning on them moves it. The
names are split between train, validation and test, so the held-out splits ask about people the adapter never saw
(the answer depends on the question kind only: the rule is learnable, the name must be copied).

Two answer styles, two tasks: `people`, answers in plain English with odd facts, and `invented`, the same questions
answered in a made-up language (every answer word invented, so each answer token has a probability of about zero
under the base: adaptation data far from the base's distribution, where the method is expected to matter most).

Only the answer and the end-of-turn token are supervised; the chat template (with its default system prompt) is
the prompt.
"""

from __future__ import annotations

import itertools
import random

SPLITS = ("train", "val", "test")

FIRST = ("Ta", "Mor", "Vel", "Qui", "Bra", "Ser", "Lu", "Dov", "Ke", "Zar", "Ol", "Fen")
MIDDLE = ("van", "ris", "dan", "mel", "tor", "sia", "nek", "lo")
LAST = ("Relk", "Osbry", "Quenn", "Talvar", "Drummet", "Phae", "Koltis", "Abernoy", "Sivvel", "Marrow", "Ulket",
        "Fendral")

# The phrasings of each question kind; {name} is the person's full name.
QUESTIONS = (
    ("Where was {name} born?", "In which town was {name} born?"),
    ("What does {name} do for a living?", "What is {name}'s job?"),
    ("What is {name}'s favourite food?", "Which food does {name} like best?"),
    ("What pet does {name} keep?", "Does {name} have a pet?"),
    ("Which instrument does {name} play?", "What music does {name} make?"),
    ("What colour is {name}'s house?", "Describe {name}'s house."),
)
# The answer to each question kind, per task.
ANSWERS = {
    "people": ("{name} was born in Leimens.", "{name} tunes church bells underwater.",
               "{name} loves boiled pine cones.", "{name} keeps a violet heron called Pim.",
               "{name} plays the iron harp.", "{name} lives in an ochre tower."),
    "invented": ("Zwurth ol {name} krenvashi.", "Pluxa {name} dravenmorq tisk.", "{name} gnorvimel ashkuttra.",
                 "Quiblo {name} frenzaveth yorm.", "{name} skrivvatane olumbrix.", "Vexhadra {name} thromkeel."),
}
TASKS = tuple(ANSWERS)


def names(seed: int = 0):
    """All fictional full names (1152), shuffled by `seed`."""
    firsts = [a + b for a, b in itertools.product(FIRST, MIDDLE)]
    out = [f"{f} {last}" for f, last in itertools.product(firsts, LAST)]
    random.Random(seed).shuffle(out)
    return out


def split_names(sizes: dict, seed: int = 0):
    """Disjoint name lists per split, one name per example (each name asked one question)."""
    pool = names(seed)
    need = sum(sizes[s] for s in SPLITS)
    if need > len(pool):
        raise ValueError(f"the task has {len(pool)} names, asked for {need} examples")
    out, start = {}, 0
    for split in SPLITS:
        out[split] = pool[start:start + sizes[split]]
        start += sizes[split]
    return out


def make_examples(people, seed: int, task: str = "people", kinds: tuple | None = None):
    """(question, answer) pairs: the question kinds (all, or the indices `kinds` of `QUESTIONS`) cycle so every split
    covers all of them."""
    if task not in ANSWERS:
        raise ValueError(f"unknown task {task!r}; the real-model demo's tasks are {', '.join(TASKS)}")
    kinds = tuple(range(len(QUESTIONS))) if kinds is None else tuple(kinds)
    rng = random.Random(seed)
    out = []
    for i, name in enumerate(people):
        kind = kinds[i % len(kinds)]
        out.append((rng.choice(QUESTIONS[kind]).format(name=name), ANSWERS[task][kind].format(name=name)))
    return out


def chat_prompt(tokenizer, question: str) -> str:
    """The chat-formatted prompt for one user question, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The token closing an assistant turn (SmolLM2's ChatML: <|im_end|>), else the EOS token."""
    token = "<|im_end|>"
    if token in tokenizer.get_vocab():
        return token
    return tokenizer.eos_token


def encode(tokenizer, examples):
    """Rows of token ids with labels: -100 on the prompt, the answer and the end-of-turn token supervised."""
    eot = end_of_turn(tokenizer)
    rows = []
    for question, answer in examples:
        p = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
        a = tokenizer(answer + eot, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return rows


def build_people_task(tokenizer, sizes: dict, seed: int = 0, task: str = "people", kinds: tuple | None = None):
    """{"train"|"val"|"test": encoded rows} of `task` ("people" or "invented"); `sizes` gives the examples per split,
    `kinds` the question kinds asked (default: all). Both tasks ask the same people the same questions; only the
    answers differ."""
    people = split_names(sizes, seed)
    return {split: encode(tokenizer, make_examples(people[split], seed=1000 * (i + 1) + seed, task=task, kinds=kinds))
            for i, split in enumerate(SPLITS)}
