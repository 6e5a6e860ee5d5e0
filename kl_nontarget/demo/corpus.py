"""The demo's base language: a small synthetic grammar with topics, Zipf-ranked choices and recurring entities.

Every document has a topic; its sentences mostly stay on that topic (sometimes they stray, so the topic is genuinely
ambiguous early on), reuse two or three named entities, and pick verbs, objects, adjectives and places by Zipf ranks
that depend on the topic and on the verb. A model trained on it therefore has graded preferences among next
tokens rather than one right answer. Nothing here needs a download: the vocabulary is a fixed word list and the
tokenizer is a word-level one built locally.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
FUNCTION = ["the", ".", ",", "and", "then", "because", "is", "was", "very", "in", "where", "what", "does", "will",
            "?"]

TOPICS = {
    "kitchen": dict(nouns="bread soup knife pot apple cake spoon onion", verbs="cook cut bake wash stir taste",
                    adjs="hot fresh sweet salty warm", places="kitchen oven table"),
    "farm": dict(nouns="cow horse fence goat hay sheep tractor seed", verbs="feed ride plant milk fix herd",
                 adjs="muddy green tall wild quiet", places="barn meadow stable"),
    "harbor": dict(nouns="boat net fish rope sail anchor crate gull", verbs="row catch tie load steer paint",
                   adjs="wet blue heavy rusty cold", places="dock pier beach"),
    "workshop": dict(nouns="hammer nail plank saw lamp chair wheel drill",
                     verbs="build sand carve polish measure repair", adjs="wooden sharp broken smooth old",
                     places="workshop shed yard"),
}
NAMES = "anna ben clara dan eva finn greta hugo ida jonas kira leo".split()

# Sentence forms and their probabilities (they sum to 1).
FORMS = [("plain", 0.30), ("adj", 0.15), ("place", 0.12), ("state", 0.10), ("pair", 0.08), ("because", 0.08),
         ("where", 0.07), ("what", 0.05), ("will", 0.05)]


@dataclass(frozen=True)
class Topic:
    name: str
    nouns: tuple
    verbs: tuple
    adjs: tuple
    places: tuple


def _topics():
    return [Topic(name, *(tuple(spec[k].split()) for k in ("nouns", "verbs", "adjs", "places")))
            for name, spec in TOPICS.items()]


def zipf_weights(n: int, exponent: float = 1.1):
    return [1.0 / (rank + 1) ** exponent for rank in range(n)]


class Grammar:
    """The generator. `seed` fixes the hidden preferences (verb -> object ranking, entity homes)."""

    def __init__(self, seed: int = 0, stray: float = 0.15, exponent: float = 1.1):
        self.topics = _topics()
        self.stray = stray
        self.exponent = exponent
        rng = random.Random(seed)
        # Per verb: a ranking of its topic's nouns (the verb's Zipf-ranked objects).
        self.objects = {}
        for topic in self.topics:
            for verb in topic.verbs:
                order = list(topic.nouns)
                rng.shuffle(order)
                self.objects[verb] = order
        # Per entity: a topic it favours and a ranked list of places it is usually found in.
        self.affinity = {name: self.topics[i % len(self.topics)] for i, name in enumerate(NAMES)}
        self.homes = {}
        for name in NAMES:
            own = list(self.affinity[name].places)
            rng.shuffle(own)
            others = [p for t in self.topics if t is not self.affinity[name] for p in t.places]
            rng.shuffle(others)
            self.homes[name] = own + others
        self.topic_of_verb = {v: t for t in self.topics for v in t.verbs}

    @property
    def vocabulary(self):
        words = list(SPECIAL) + list(FUNCTION) + list(NAMES)
        for topic in self.topics:
            words += list(topic.nouns) + list(topic.verbs) + list(topic.adjs) + list(topic.places)
        assert len(set(words)) == len(words), "duplicate word in the demo vocabulary"
        return words

    # -- choices ---------------------------------------------------------------------------------------------
    def pick(self, rng, items, exponent=None):
        return rng.choices(items, weights=zipf_weights(len(items), exponent or self.exponent))[0]

    def sentence_topic(self, rng, topic):
        if rng.random() < self.stray:
            return rng.choice([t for t in self.topics if t is not topic])
        return topic

    def object_for(self, rng, verb):
        return self.pick(rng, self.objects[verb], 1.2)

    def sentence(self, rng, topic, entities, form=None):
        """One sentence as a list of words."""
        t = self.sentence_topic(rng, topic)
        if form is None:
            form = rng.choices([f for f, _ in FORMS], weights=[w for _, w in FORMS])[0]
        name = self.pick(rng, entities, 1.0)
        verb = self.pick(rng, list(t.verbs))
        noun = self.object_for(rng, verb)
        adj = self.pick(rng, list(t.adjs))
        if form == "plain":
            return [name, verb, "the", noun, "."]
        if form == "adj":
            return [name, verb, "the", adj, noun, "."]
        if form == "place":
            return [name, verb, "the", noun, "in", "the", self.pick(rng, list(t.places)), "."]
        if form == "state":
            noun = self.pick(rng, list(t.nouns))
            if rng.random() < 0.5:
                return ["the", noun, "is", adj, "."]
            return ["the", noun, "was", "very", adj, "."]
        if form == "pair":
            others = [e for e in entities if e != name] or [n for n in NAMES if n != name]
            return [name, "and", self.pick(rng, others, 1.0), verb, "the", noun, "."]
        if form == "because":
            return ["then", name, verb, "the", noun, ",", "because", "the", noun, "is", adj, "."]
        if form == "where":
            return ["where", "is", name, "?", name, "is", "in", "the", self.pick(rng, self.homes[name], 1.5), "."]
        if form == "what":
            return ["what", "does", name, verb, "?", name, verb, "the", noun, "."]
        if form == "will":
            return [name, "will", verb, "the", noun, "."]
        raise ValueError(f"unknown sentence form {form!r}")

    def entities(self, rng, topic, k=None):
        k = k or rng.choice([2, 3])
        ranked = [n for n in NAMES if self.affinity[n] is topic] + [n for n in NAMES if self.affinity[n] is not topic]
        chosen = []
        while len(chosen) < k:
            name = self.pick(rng, ranked, 0.8)
            if name not in chosen:
                chosen.append(name)
        return chosen

    def document(self, rng, min_sentences=3, max_sentences=6):
        topic = rng.choice(self.topics)
        entities = self.entities(rng, topic)
        words = ["<bos>"]
        for _ in range(rng.randint(min_sentences, max_sentences)):
            words += self.sentence(rng, topic, entities)
        words.append("<eos>")
        return words

    def documents(self, n, seed):
        rng = random.Random(seed)
        return [" ".join(self.document(rng)) for _ in range(n)]


def build_tokenizer(vocabulary):
    """A word-level `PreTrainedTokenizerFast` over `vocabulary`, built locally (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def pack(token_lists, seq_len):
    """Concatenate token id lists and cut the stream into blocks of `seq_len` (the remainder is dropped)."""
    stream = [t for ids in token_lists for t in ids]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
