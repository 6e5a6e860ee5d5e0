"""Forgetting's scaling law: Lf against the number of fine-tuned parameters and of update steps.

Kalajdzievski (2024) finds that the forgetting loss Lf (the cross-entropy of the fine-tuned model's predictions
against the base's on base text) follows a shifted power law in the number of fine-tuned parameters N and of update
steps S, so neither fewer parameters nor early stopping removes it. The form fitted here is

    Lf = A * N^a * S^b + E,        A > 0, E < min(Lf)

where E is the level Lf starts from (for an unchanged model Lf = H(base), the base's entropy on that text).

How it is fitted: for a fixed E the model is linear in log space, log(Lf - E) = log A + a log N + b log S, and is
solved by least squares; E is chosen by a bounded scalar search (golden section on a log-spaced grid's best bracket)
to minimise the squared error of Lf itself. The uncertainty of (a, b, E) is the standard deviation over bootstrap
refits on points resampled with replacement (`bootstrap` of them, seeded).

`ForgettingCurve` collects the points: a Trainer callback that measures Lf on held-out base text at given steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from transformers import TrainerCallback

from kl_nontarget.evaluation.metrics import forgetting_metrics

MIN_POINTS = 5


@dataclass(frozen=True)
class PowerLawFit:
    """Lf = A * N^a * S^b + E, with bootstrap standard deviations of a, b and E."""

    A: float
    a: float
    b: float
    E: float
    a_std: float
    b_std: float
    E_std: float
    r2: float
    points: int

    def predict(self, n, s):
        return self.A * np.power(n, self.a) * np.power(s, self.b) + self.E

    def to_dict(self):
        return asdict(self)


def _check(points):
    n, s, lf = (np.asarray(x, dtype=np.float64) for x in zip(*points)) if points else ([], [], [])
    if len(points) < MIN_POINTS or len(np.unique(n)) < 2 or len(np.unique(s)) < 2:
        raise ValueError(f"a power-law fit needs at least {MIN_POINTS} points over at least 2 parameter counts and 2 "
                         f"step counts, got {len(points)} point(s) with {len(np.unique(n))} parameter count(s) and "
                         f"{len(np.unique(s))} step count(s)")
    if not (np.all(n > 0) and np.all(s > 0) and np.all(np.isfinite(lf))):
        raise ValueError("power-law points need N > 0, S > 0 and a finite Lf")
    return n, s, lf


def _fit_given_e(n, s, lf, e):
    """(log A, a, b, squared error of Lf) of the least-squares fit with E = e."""
    design = np.stack([np.ones_like(n), np.log(n), np.log(s)], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.log(lf - e), rcond=None)
    predicted = np.exp(design @ coef) + e
    return coef, float(np.sum((predicted - lf) ** 2))


def _fit(n, s, lf):
    low = float(np.min(lf))
    span = max(float(np.ptp(lf)), 1e-6)
    # E lies below min(Lf): search e = low - span * 10^t over t in [-4, 2] (E from just under min(Lf) to far below).
    ts = np.linspace(-4.0, 2.0, 61)
    errors = [_fit_given_e(n, s, lf, low - span * 10 ** t)[1] for t in ts]
    i = int(np.argmin(errors))
    lo, hi = ts[max(i - 1, 0)], ts[min(i + 1, len(ts) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden-section search inside the grid's best bracket
        x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if _fit_given_e(n, s, lf, low - span * 10 ** x1)[1] < _fit_given_e(n, s, lf, low - span * 10 ** x2)[1]:
            hi = x2
        else:
            lo = x1
    e = low - span * 10 ** ((lo + hi) / 2)
    coef, sse = _fit_given_e(n, s, lf, e)
    return float(np.exp(coef[0])), float(coef[1]), float(coef[2]), e, sse


def fit_power_law(points, *, bootstrap: int = 200, seed: int = 0) -> PowerLawFit:
    """Fit Lf = A * N^a * S^b + E to `points` [(N, S, Lf), ...]; ValueError for too few or bad points."""
    n, s, lf = _check(points)
    big_a, a, b, e, sse = _fit(n, s, lf)
    total = float(np.sum((lf - lf.mean()) ** 2))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(lf), len(lf))
        if len(np.unique(n[pick])) < 2 or len(np.unique(s[pick])) < 2:
            continue
        samples.append(_fit(n[pick], s[pick], lf[pick])[1:4])
    std = np.std(np.asarray(samples), axis=0) if samples else np.full(3, float("nan"))
    return PowerLawFit(A=big_a, a=a, b=b, E=e, a_std=float(std[0]), b_std=float(std[1]), E_std=float(std[2]),
                       r2=1.0 - sse / total if total > 0 else float("nan"), points=len(lf))


class ForgettingCurve(TrainerCallback):
    """Measures Lf (and Lf - H) on `heldout_loader` against `base_model` after each step in `steps`."""

    def __init__(self, heldout_loader, steps, base_model=None):
        self.loader, self.steps, self.base_model = heldout_loader, set(int(s) for s in steps), base_model
        self.points: dict[int, dict] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            m = forgetting_metrics(model, self.loader, base_model=self.base_model, progress=False)
            self.points[state.global_step] = {"lf": m["lf"], "forgetting": m["lf_kl"]}


def collect_points(model, pad, train_rows, adapters, kl_weights, steps, heldout_loader, *, lr, batch_size, seeds=1,
                   log=print, progress=True):
    """({method name: [(N, S, Lf), ...]}, the rows for results.json): for every weight (0 = plain LoRA), adapter
    (ranks, target presets) and seed, one run to max(steps) measuring Lf against `model` at each of `steps`; N is the
    adapter's trained parameters."""
    from kl_nontarget.sweep.runs import finetune

    points, rows = {}, []
    for weight, adapter, seed in ((w, a, s) for w in kl_weights for a in adapters for s in range(seeds)):
        name = "plain LoRA" if weight == 0 else f"non-target KL λ={weight:g}"
        curve = ForgettingCurve(heldout_loader, steps, base_model=model)
        trained = finetune(model, train_rows, pad, adapter, method="lora" if weight == 0 else "nontarget_kl",
                           kl_weight=float(weight), lr=lr, steps=max(steps), seed=seed, batch_size=batch_size,
                           callbacks=[curve], progress=progress, desc=f"{name}, {adapter.name}, seed {seed}")
        n = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        for step, m in sorted(curve.points.items()):
            points.setdefault(name, []).append((n, step, m["lf"]))
            rows.append({"method": name, "kl_weight": float(weight), "adapter": adapter.name, "seed": seed,
                         "trainable_parameters": n, "steps": step, "lf": m["lf"], "forgetting": m["forgetting"]})
        log(f"  {name}, {adapter.name}, seed {seed} (N = {n:,}): Lf " + ", ".join(
            f"{curve.points[s]['lf']:.4f}@{s}" for s in sorted(curve.points)))
    return points, rows


def format_fits(fits: dict, entropy: float) -> str:
    """The printed fits, one line per method, and how the regularizer changes them."""
    lines = [f"\nLf = A * N^a * S^b + E (N: trained parameters, S: steps; the base's entropy H = {entropy:.3f})"]
    for name, fit in fits.items():
        lines.append(f"  {name:22} a = {fit.a:.3f} ± {fit.a_std:.3f}, b = {fit.b:.3f} ± {fit.b_std:.3f}, "
                     f"A = {fit.A:.3g}, E = {fit.E:.3f} ± {fit.E_std:.3f}, R² = {fit.r2:.3f} ({fit.points} points)")
    return "\n".join(lines)


def plot_power_law(points_by_method: dict, fits: dict, path):
    """powerlaw.png: Lf against steps, one colour per parameter count, the fit drawn over the points; one panel per
    method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(points_by_method)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = points_by_method[name]
        counts = sorted({p[0] for p in points})
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(counts)))
        for count, color in zip(counts, colors):
            mine = sorted((s, lf) for n, s, lf in points if n == count)
            ax.plot([p[0] for p in mine], [p[1] for p in mine], "o", color=color, label=f"N = {count:,}")
            if name in fits:
                grid = np.geomspace(min(p[0] for p in mine), max(p[0] for p in mine), 50)
                ax.plot(grid, fits[name].predict(count, grid), "-", color=color, alpha=0.7)
        fit = fits.get(name)
        ax.set_title(name + (f": a = {fit.a:.2f}, b = {fit.b:.2f}, E = {fit.E:.2f}" if fit else ""), fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("update steps S")
        ax.set_ylabel("Lf on held-out base text")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
