"""The variants study's comparison table: per task and PEFT variant, the non-target KL against the full KL at matched
target loss.

    python benchmarks/variants_table.py OUT/results.json [more results.json ...]

Reads the `results.json` of `kl-nontarget demo --model smollm2 --variants ...` (or of `kl-nontarget sweep
--peft_variants ... --baseline full_kl`), averages the seeds, and prints a markdown table: plain LoRA's target loss and
forgetting (Lf - H), each regularizer's points, and the non-target KL's forgetting interpolated at each full-KL point's
target loss. The interpolation runs along the non-target KL's frontier: the plain run and every kl_weight that no
other of them beats on both axes, joined by straight lines in the (target loss, forgetting) plane. A full-KL point
outside that frontier's target-loss range is compared with the nearest end and marked "(edge)". The ratio is full-KL
forgetting over non-target forgetting at the same target loss: above 1, the non-target KL forgets less.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from statistics import mean


def mean_points(runs: list[dict]) -> dict:
    """{(task, variant): {(method, weight): (target loss, forgetting)}}, averaged over seeds."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["task"], r.get("variant", "lora"), r["method"], float(r["kl_weight"]))].append(r)
    points = defaultdict(dict)
    for (task, variant, method, weight), rows in groups.items():
        points[(task, variant)][(method, weight)] = (mean(r["target_loss"] for r in rows),
                                                     mean(r["forgetting"] for r in rows))
    return points


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes, by target loss: along them forgetting only falls."""
    front = []
    for point in sorted(points):
        if not front or point[1] < front[-1][1]:
            front.append(point)
    return front


def interpolate(frontier: list[tuple[float, float]], target: float) -> tuple[float, bool]:
    """Forgetting on the piecewise-linear Pareto frontier at `target` loss; True when `target` is outside its range."""
    frontier = pareto(frontier)
    if target <= frontier[0][0]:
        return frontier[0][1], target < frontier[0][0]
    if target >= frontier[-1][0]:
        return frontier[-1][1], target > frontier[-1][0]
    for (x0, y0), (x1, y1) in zip(frontier, frontier[1:]):
        if x0 <= target <= x1:
            return y0 + (y1 - y0) * (target - x0) / (x1 - x0), False
    raise AssertionError("unreachable")


def table(points: dict) -> str:
    lines = ["| task | variant | plain: target, Lf − H | non-target KL λ: target, Lf − H | full KL λ: target, Lf − H "
             "| at the full KL's target loss: non-target Lf − H (full / non-target) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (task, variant), p in points.items():
        plain = p[("lora", 0.0)]
        nt = {w: v for (m, w), v in p.items() if m == "nontarget_kl"}
        full = {w: v for (m, w), v in p.items() if m == "full_kl"}
        frontier = [plain, *nt.values()]
        compared = []
        for w, (target, forgetting) in sorted(full.items()):
            ours, edge = interpolate(frontier, target)
            compared.append(f"λ {w:g}: {ours:.3f} ({forgetting / ours:.1f}x){' (edge)' if edge else ''}")

        def fmt(d):
            return "; ".join(f"{w:g}: {t:.3f}, {f:.3f}" for w, (t, f) in sorted(d.items()))

        lines.append(f"| {task} | {variant} | {plain[0]:.3f}, {plain[1]:.3f} | {fmt(nt)} | {fmt(full)} | "
                     f"{'; '.join(compared)} |")
    return "\n".join(lines)


def main(argv=None):
    paths = (argv if argv is not None else sys.argv[1:]) or []
    if not paths:
        raise SystemExit("usage: python benchmarks/variants_table.py RESULTS.json [RESULTS.json ...]")
    runs = [r for path in paths for r in json.loads(open(path).read())["runs"]]
    print(table(mean_points(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
