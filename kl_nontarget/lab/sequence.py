"""Sequential fine-tuning with merges: tasks trained in order, each adapter merged into the weights before a fresh
one starts on the next task (incremental LoRA updates, Soutif-Cormerais et al., arXiv 2405.18069), plain and with
the non-target KL, at several LoRA ranks.

After every stage it records the target loss of every task seen so far (on that task's held-out rows) and forgetting
of the pretraining distribution: Lf, Lf - H(base) and retention perplexity against the *original* base on held-out
base text, whatever the regularizer's reference was.

The regularizer's reference (`reference`):
- "previous" (default): the model as this stage starts, i.e. the previous stage's merged model, which is the PEFT
  model with its adapter disabled. It keeps what every earlier stage learned, the earlier tasks included, and needs
  no second copy of the weights.
- "original": the model before the first stage (a frozen copy, passed as `ref_model`). It pulls towards the
  pretraining distribution only, so it also pulls the earlier tasks' answers back towards the original's.

Every merge is checked: the merged model's logits on a batch equal the adapted model's (the largest difference is
recorded as `merge_error`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from kl_nontarget.evaluation.loader import padded_loader
from kl_nontarget.evaluation.metrics import evaluate_lm
from kl_nontarget.sweep.runs import evaluate_run, finetune
from kl_nontarget.sweep.variants import AdapterSpec

REFERENCES = ("previous", "original")
# A merge that changes the logits by more than this (float32) is an error, not rounding.
MERGE_TOLERANCE = 1e-3


@dataclass
class SequenceConfig:
    """Settings of a sequence run. `kl_weights`: 0 is plain LoRA, every other weight a non-target KL run; `ranks`:
    the LoRA ranks compared (alpha scaled with the rank to keep `lora_alpha / lora_r`); `lr`, `steps`,
    `batch_size`: every stage's training."""

    kl_weights: tuple = (0.0, 0.3)
    ranks: tuple = (8,)
    seeds: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple | str | None = None
    lr: float = 1e-3
    steps: int = 40
    batch_size: int = 8
    reference: str = "previous"
    extra: dict = field(default_factory=dict)  # recorded in results.json only

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if not self.ranks or any(int(r) < 1 for r in self.ranks):
            raise ValueError(f"ranks must be integers >= 1, got {self.ranks!r}")
        if not self.kl_weights or any(w < 0 for w in self.kl_weights):
            raise ValueError(f"kl_weights must be numbers >= 0, got {self.kl_weights!r}")

    def adapter(self, r: int) -> AdapterSpec:
        return AdapterSpec("lora", int(r), max(1, round(self.lora_alpha * r / self.lora_r)), self.lora_targets)

    def to_dict(self):
        return dataclasses.asdict(self)


def merged(peft_model, check_batch=None) -> tuple[torch.nn.Module, float]:
    """(the transformers model with the adapter merged into its weights, the largest |logit| difference the merge
    made on `check_batch`, or 0.0 without one). ValueError when that difference exceeds `MERGE_TOLERANCE`."""
    error = 0.0
    if check_batch is not None:
        inputs = {k: v for k, v in check_batch.items() if k != "labels"}
        with torch.no_grad():
            before = peft_model.eval()(**inputs).logits
    model = peft_model.merge_and_unload()
    if check_batch is not None:
        with torch.no_grad():
            error = float((model.eval()(**inputs).logits - before).abs().max())
        if error > MERGE_TOLERANCE:
            raise ValueError(f"merging the adapter changed the logits by {error:.3g} (more than {MERGE_TOLERANCE})")
    return model, error


def run_sequence(model, pad, tasks, cfg: SequenceConfig, heldout_loader, *, log=print, progress=True):
    """Every (seed, rank, kl_weight) through the whole sequence `tasks` ([(name, {"train", "test"} rows), ...],
    at least two); returns the rows: one per stage, with the target loss of each task seen so far
    (`target_loss[task]`), forgetting against `model` (the original) and the merge's `merge_error`."""
    if len(tasks) < 2:
        raise ValueError(f"a sequence needs at least two tasks, got {len(tasks)}")
    tests = {name: padded_loader(data["test"], pad) for name, data in tasks}
    check = next(iter(padded_loader(tasks[0][1]["test"][:2], pad)))
    rows = []
    for seed in range(cfg.seeds):
        for r in cfg.ranks:
            for weight in cfg.kl_weights:
                method = "lora" if weight == 0 else "nontarget_kl"
                ref_model = model if cfg.reference == "original" and weight > 0 else None
                current = copy.deepcopy(model)
                for stage, (task, data) in enumerate(tasks, 1):
                    peft_model = finetune(current, data["train"], pad, cfg.adapter(r), method=method,
                                          kl_weight=float(weight), lr=cfg.lr, steps=cfg.steps, seed=seed,
                                          batch_size=cfg.batch_size, ref_model=ref_model, progress=progress,
                                          desc=f"r={r} λ={weight:g} seed {seed}: stage {stage} ({task})")
                    current, error = merged(peft_model, check)
                    metrics = evaluate_run(current, tests[task], heldout_loader, base_model=model)
                    losses = {name: evaluate_lm(current, tests[name], progress=False)["loss"]
                              for name, _ in tasks[:stage]}
                    row = {"seed": seed, "r": int(r), "kl_weight": float(weight), "method": method, "stage": stage,
                           "task": task, "target_loss": losses, "forgetting": metrics["forgetting"],
                           "lf": metrics["lf"], "retention_ppl": metrics["retention_ppl"], "merge_error": error}
                    rows.append(row)
                    log(f"  r={r} λ={weight:g} seed {seed} stage {stage} ({task}): Lf-H {row['forgetting']:.4f}, "
                        + ", ".join(f"{name} loss {loss:.3f}" for name, loss in losses.items()))
                del current
    return rows


def mean_rows(rows) -> dict:
    """{(r, kl_weight, stage): means over seeds of forgetting, lf, retention_ppl and each task's loss}."""
    groups = {}
    for row in rows:
        groups.setdefault((row["r"], row["kl_weight"], row["stage"]), []).append(row)
    out = {}
    for key, group in groups.items():
        n = len(group)
        mean = {k: sum(g[k] for g in group) / n for k in ("forgetting", "lf", "retention_ppl")}
        mean["target_loss"] = {t: sum(g["target_loss"][t] for g in group) / n for t in group[0]["target_loss"]}
        mean["task"], mean["n"] = group[0]["task"], n
        out[key] = mean
    return out


def format_table(rows, base_entropy: float) -> str:
    """The printed table: per rank and weight, each stage's forgetting and every task's loss (means over seeds)."""
    means = mean_rows(rows)
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    header = f"{'r':>4} {'λ':>5} {'stage':>5} {'trained on':12} {'Lf-H':>7} {'ret.ppl':>8} " + " ".join(
        f"{t[:12]:>12}" for t in tasks)
    lines = [f"\nforgetting = Lf - H against the original base (H = {base_entropy:.3f} nats/token); task columns: "
             "held-out target loss of each task seen so far", header, "-" * len(header)]
    for (r, w, stage), m in sorted(means.items()):
        cells = " ".join(f"{m['target_loss'][t]:12.4f}" if t in m["target_loss"] else f"{'':>12}" for t in tasks)
        lines.append(f"{r:4d} {w:5g} {stage:5d} {m['task'][:12]:12} {m['forgetting']:7.4f} "
                     f"{m['retention_ppl']:8.3f} {cells}")
    last = max(row["stage"] for row in rows)
    plain = {r: m for (r, w, s), m in means.items() if w == 0 and s == last}
    for (r, w, s), m in sorted(means.items()):
        if s == last and w > 0 and r in plain and plain[r]["forgetting"] > 0:
            ratio = m["forgetting"] / plain[r]["forgetting"]
            lines.append(f"after the last stage, r={r}: λ={w:g} forgets {ratio:.2f}x as much as plain LoRA")
    return "\n".join(lines)


def plot_sequence(rows, path):
    """sequence.png: forgetting, and each task's held-out loss, against the stage; one line per (rank, weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_rows(rows)
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(4.6 * (1 + len(tasks)), 4.0), squeeze=False)
    for r, w in sorted({(r, w) for r, w, _ in means}):
        stages = sorted(s for rr, ww, s in means if (rr, ww) == (r, w))
        style = dict(marker="o", ls="-" if w == 0 else "--", label=f"r={r}, " + ("plain" if w == 0 else f"λ={w:g}"))
        axes[0][0].plot(stages, [means[(r, w, s)]["forgetting"] for s in stages], **style)
        for ax, task in zip(axes[0][1:], tasks):
            seen = [s for s in stages if task in means[(r, w, s)]["target_loss"]]
            ax.plot(seen, [means[(r, w, s)]["target_loss"][task] for s in seen], **style)
    axes[0][0].set_title("forgetting: Lf − H(original base)")
    for ax, task in zip(axes[0][1:], tasks):
        ax.set_title(f"held-out loss on '{task}'")
    for ax in axes[0]:
        ax.set_xlabel("stage (adapter merged after each)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
