"""The demo end to end: base model, per-task baseline sweep, all runs, results.json, table and plot."""

from __future__ import annotations

import time
from pathlib import Path

from kl_nontarget.demo.base import base_corpus, load_or_pretrain
from kl_nontarget.demo.tasks import build_task
from kl_nontarget.evaluation.loader import padded_loader
from kl_nontarget.sweep.grid import base_record, run_task, torch_threads, write_results


def run_demo(cfg, out_dir, *, cache_dir=None, progress=True, log=print, threads=None):
    """Runs the whole demo; writes out_dir/results.json, out_dir/frontier.png and out_dir/adapters/.

    `threads`: torch intra-op threads for the run (restored afterwards); None keeps torch's setting, one per core.
    On an idle 2-core machine two threads train the demo's models about 1.35x faster than one; on cores shared with
    other work, one thread can be much faster.
    """
    with torch_threads(threads):
        return _run_demo(cfg, out_dir, cache_dir=cache_dir, progress=progress, log=log)


def _run_demo(cfg, out_dir, *, cache_dir, progress, log):
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok, grammar, base_path, cached = load_or_pretrain(cfg.base, cfg.base_seed, cache_dir, progress, log)
    pad = tok.pad_token_id
    _, heldout = base_corpus(grammar, tok, cfg.base, cfg.base_seed)
    heldout = heldout[:cfg.heldout_blocks]
    (out_dir / "base_heldout.txt").write_text(
        "\n".join(" ".join(tok.convert_ids_to_tokens(b)) for b in heldout) + "\n")
    heldout_loader = padded_loader([{"input_ids": b} for b in heldout], pad)
    base, _ = base_record(model, tok, heldout_loader, base_path, cached=cached)
    runs = []
    for task in cfg.tasks:
        data = build_task(grammar, tok, task, cfg.sizes)
        info, task_runs = run_task(model, pad, task, data, cfg, heldout_loader, out_dir, base_path, progress=progress,
                                   log=log)
        base["tasks"][task] = info
        runs += task_runs
    return write_results(runs, base, cfg, out_dir, start, log)
