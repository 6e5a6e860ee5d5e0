"""frontier.png: target loss against forgetting, one curve per method, one panel per task (and per PEFT variant: tasks
in rows, variants in columns), the base marked."""

from __future__ import annotations

from kl_nontarget.sweep.report import aggregate, panel_info, panel_of, panels

COLORS = {"lora": "black", "nontarget_kl": "tab:blue", "full_kl": "tab:orange"}
LABELS = {"lora": "plain LoRA", "nontarget_kl": "+ non-target KL", "full_kl": "+ full-vocabulary KL"}


def plot_frontier(results, path):
    """Writes the frontier plot of a results dict (as in results.json) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    agg = aggregate(results)
    rows = {}  # task -> its panels (one per variant)
    for name in panels(results):
        rows.setdefault(name.partition(" / ")[0], []).append(name)
    columns = max(len(names) for names in rows.values())
    fig, axes = plt.subplots(len(rows), columns, figsize=(6.2 * columns, 4.8 * len(rows)), squeeze=False)
    for ax in (axes[i][j] for i, names in enumerate(rows.values()) for j in range(len(names), columns)):
        ax.axis("off")
    for ax, task in ((axes[i][j], name) for i, names in enumerate(rows.values()) for j, name in enumerate(names)):
        for r in results["runs"]:  # every seed, faint
            if panel_of(results, r) == task:
                ax.scatter(r["forgetting"], r["target_loss"], s=10, alpha=0.25, color=COLORS[r["method"]],
                           linewidths=0)
        lora = agg.get((task, "lora", 0.0))
        for method in [m for m in ("nontarget_kl", "full_kl") if any(me == m for (t, me, _w) in agg if t == task)]:
            pts = sorted((w, m) for (t, me, w), m in agg.items() if t == task and me == method)
            if lora is not None:
                pts = [(0.0, lora)] + pts
            xs = [m["forgetting"] for _, m in pts]
            ys = [m["target_loss"] for _, m in pts]
            ax.plot(xs, ys, "-o", color=COLORS[method], label=LABELS[method], ms=4)
            for w, m in pts[1:]:
                ax.annotate(f"{w:g}", (m["forgetting"], m["target_loss"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=COLORS[method])
        if lora is not None:
            ax.plot([lora["forgetting"]], [lora["target_loss"]], "*", color="black", ms=13, label=LABELS["lora"])
        t = panel_info(results, task)
        if "target_loss" in t:
            ax.plot([0.0], [t["target_loss"]], "s", color="gray", ms=8, label="base model (no fine-tuning)")
        low, high = ax.get_ylim()
        if high > 8 * low:  # the base's target loss is far above the fine-tuned ones: log scale, 1-2-5 ticks
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("forgetting: Lf − H(base) = KL(base ‖ fine-tuned), held-out base text")
        ax.set_ylabel("target loss, held-out task examples (nats/token)")
        ax.set_title(f"task '{task}'" + (f"  (lr {t['lr']:g}, {t['steps']} steps)" if "lr" in t else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    seeds = max((m["n"] for m in agg.values()), default=0)
    fig.suptitle(f"learning vs forgetting (mean of {seeds} seed(s); numbers are kl_weight; lower-left is better)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
