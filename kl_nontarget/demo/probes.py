"""Probe questions: general knowledge the base model answers right, asked again after every fine-tuning run.

Each probe is a chat question, answered greedily (a few dozen tokens), and counts as still answered when the reply
contains one of the accepted strings (case-insensitive). The table shows the base's answer and every run's.
"""

from __future__ import annotations

from kl_nontarget.demo.generation import generate
from kl_nontarget.demo.people import chat_prompt

# (key, question, accepted substrings of a right answer)
PROBES = (
    ("capital", "What is the capital of France?", ("paris",)),
    ("sum", "What is 2 + 3?", ("5", "five")),
    ("sky", "What colour is the sky on a clear day?", ("blue",)),
    ("week", "How many days are there in a week?", ("7", "seven")),
)


def run_probes(model, tokenizer, probes=PROBES, max_new_tokens: int = 24):
    """{key: {"answer": str, "right": bool}}: every probe answered greedily, in one batch."""
    replies = generate(model, tokenizer, [chat_prompt(tokenizer, q) for _, q, _ in probes],
                       max_new_tokens=max_new_tokens, do_sample=False)
    out = {}
    for (key, _, accepted), (_, new) in zip(probes, replies):
        reply = tokenizer.decode(new, skip_special_tokens=True).strip()
        out[key] = {"answer": reply, "right": any(a in reply.lower() for a in accepted)}
    return out


def format_probes(results) -> str:
    """The probe table: the base's answers, then a check or cross per probe for every run (every seed)."""
    base = results["base"].get("probes")
    if not base:
        return ""
    keys = list(base)
    questions = {k: q for k, q, _ in PROBES}
    lines = ["", "probe questions (greedy answers; ✓ = still right):"]
    for k in keys:
        mark = "✓" if base[k]["right"] else "✗"
        lines.append(f"  {k:8} {questions.get(k, '')}   base: {mark} {base[k]['answer']!r}")
    header = (f"  {'method':13} {'λ':>5} {'seed':>4} " + " ".join(f"{k:>8}" for k in keys)
              + "  answer to the first probe")
    lines += ["", header, "  " + "-" * (len(header) - 2)]
    for r in results["runs"]:
        probes = r.get("probes") or {}
        marks = " ".join(f"{('✓' if probes[k]['right'] else '✗') if k in probes else '-':>8}" for k in keys)
        first = probes.get(keys[0], {}).get("answer", "")
        lines.append(f"  {r['method']:13} {r['kl_weight']:5g} {r['seed']:>4} {marks}  {first[:60]!r}")
    return "\n".join(lines)
