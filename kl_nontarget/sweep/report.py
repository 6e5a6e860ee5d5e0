"""The terminal table and the matched-target-loss comparison, from a results dict.

Rows are grouped by panel: the task, followed by whichever of the adapter's variant, target modules and rank the
results compare (`panels`), e.g. "people / pissa" or "people / attention".
"""

from __future__ import annotations

import statistics

from kl_nontarget.sweep.variants import adapter_name

# The adapter's dimensions a sweep can compare, and how a panel names each.
DIMENSIONS = (("variant", str), ("targets", str), ("r", lambda r: f"r={r}"))


def _varying(results) -> list[tuple[str, object]]:
    return [(key, show) for key, show in DIMENSIONS
            if len({r.get(key) for r in results["runs"]}) > 1]


def panel_of(results, row) -> str:
    """The panel of a run row: its task, followed by the adapter dimensions the results compare."""
    return " / ".join([row["task"]] + [show(row[key]) for key, show in _varying(results)])


def panels(results) -> list[str]:
    """The panels of the results, in run order."""
    return list(dict.fromkeys(panel_of(results, r) for r in results["runs"]))


def panel_info(results, panel: str) -> dict:
    """The base record's task info for a panel: the base's target loss, and the chosen lr and steps of the panel's
    adapter."""
    row = next(r for r in results["runs"] if panel_of(results, r) == panel)
    info = dict(results["base"]["tasks"].get(row["task"], {}))
    if "variant" in row and "targets" in row:
        info.update(info.get("adapters", {}).get(adapter_name(row["variant"], row["targets"], row["r"]), {}))
    return info


def aggregate(results):
    """{(panel, method, kl_weight): mean metrics over seeds (+ "n")}; `forgetting` is Lf - H(base), `lf` is Lf."""
    groups = {}
    for r in results["runs"]:
        groups.setdefault((panel_of(results, r), r["method"], r["kl_weight"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        mean = {k: statistics.fmean(r[k] for r in rs)
                for k in ("target_loss", "target_accuracy", "forgetting", "lf", "retention_ppl")}
        mean["n"] = len(rs)
        out[key] = mean
    return out


def matched(results, tolerance=None):
    """Per panel and regularized method: the least forgetting among kl_weights whose mean target loss is within
    `tolerance` (absolute) of the panel's plain run, with its ratio to that run's forgetting (Lf - H). None where no
    weight matches."""
    tol = results["config"].get("match_tolerance", 0.05) if tolerance is None else tolerance
    agg = aggregate(results)
    out = {}
    for task in panels(results):
        lora = agg.get((task, "lora", 0.0))
        if lora is None:
            continue
        for method in [m for m in ("nontarget_kl", "full_kl") if any(me == m for (t, me, _w) in agg if t == task)]:
            ok = [(m["forgetting"], w, m) for (t, me, w), m in agg.items()
                  if t == task and me == method and m["target_loss"] <= lora["target_loss"] + tol]
            if not ok:
                out[(task, method)] = None
                continue
            fkl, w, m = min(ok, key=lambda x: x[0])
            out[(task, method)] = {"kl_weight": w, "target_loss": m["target_loss"], "forgetting": fkl,
                                   "ratio": fkl / lora["forgetting"] if lora["forgetting"] > 0 else float("nan"),
                                   "lora_target_loss": lora["target_loss"], "lora_forgetting": lora["forgetting"]}
    return out


def format_table(results):
    base = results["base"]
    agg = aggregate(results)
    seeds = max((m["n"] for m in agg.values()), default=0)
    lines = [f"\nbase model: {base['parameters']:,} parameters; held-out base text: entropy {base['entropy']:.3f} "
             f"nats/token, perplexity {base['retention_ppl']:.2f}",
             f"mean over {seeds} seed(s); Lf = cross-entropy of fine-tuned vs base predictions on held-out base "
             "text, forgetting = Lf-H = KL(base || fine-tuned) (0 = no drift)"]
    width = max([8] + [len(p) for p in panels(results)])
    header = (f"{'task':{width}} {'method':13} {'λ':>5} {'target loss':>11} {'accuracy':>8} {'Lf':>7} {'Lf-H':>7} "
              f"{'ret. ppl':>8}")
    for task in panels(results):
        t = panel_info(results, task)
        lines += ["", header, "-" * len(header),
                  f"{task:{width}} {'base':13} {'':>5} {t.get('target_loss', float('nan')):11.4f} "
                  f"{t.get('target_accuracy', float('nan')):8.3f} {base['lf']:7.4f} {base['forgetting']:7.4f} "
                  f"{base['retention_ppl']:8.3f}"]
        for (tk, method, w), m in agg.items():
            if tk != task:
                continue
            lines.append(f"{task:{width}} {method:13} {w:5g} {m['target_loss']:11.4f} {m['target_accuracy']:8.3f} "
                         f"{m['lf']:7.4f} {m['forgetting']:7.4f} {m['retention_ppl']:8.3f}")
    tol = results["config"].get("match_tolerance", 0.05)
    plain = "the panel's plain run's" if _varying(results) else "plain LoRA's"
    lines += ["", f"least forgetting at matched target loss (mean target loss <= {plain} + {tol:g} nats):"]
    for (task, method), m in matched(results).items():
        if m is None:
            lines.append(f"  {task:{width}} {method:13} no kl_weight reaches {plain} target loss")
        else:
            lines.append(f"  {task:{width}} {method:13} λ={m['kl_weight']:g}: target loss {m['target_loss']:.4f} "
                         f"(plain {m['lora_target_loss']:.4f}), Lf-H {m['forgetting']:.4f} "
                         f"= {m['ratio']:.2f}x {plain} {m['lora_forgetting']:.4f}")
    return "\n".join(lines)
