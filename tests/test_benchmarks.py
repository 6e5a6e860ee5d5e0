"""Smoke tests of the benchmark scripts: they run on the CPU and write a well-formed results file.

Nothing here checks a timing (benchmarks are never timed tests); only that the scripts run, record every row, and
write finite numbers, and that the implementations agree on the loss they benchmark.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "oom", "error", "skipped"}


def _run(script, out, *args, timeout=300):
    # --threads 1: a smoke run on a shared CPU is faster and steadier without OpenMP threads waiting for each other.
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", "--threads", "1", "--out",
           str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _load(out):
    doc = json.loads(Path(out).read_text(), parse_constant=_reject_constant)
    assert isinstance(doc["device"], str) and doc["device"]
    assert isinstance(doc["torch"], str) and doc["torch"]
    assert doc["triton"] is None or isinstance(doc["triton"], str)
    assert isinstance(doc["rows"], list) and doc["rows"]
    return doc


def _check_row(row, bench):
    assert row["bench"] == bench
    assert isinstance(row["impl"], str) and row["impl"]
    assert isinstance(row["N"], int) and row["N"] > 0
    assert isinstance(row["V"], int) and row["V"] > 0
    assert row["dtype"] in ("bf16", "fp32")
    assert row["status"] in STATUSES
    if row["status"] == "ok":
        for key in ("ms", "peak_mb"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0, (key, row)
        assert row["ms"] > 0
    else:
        assert row.get("note"), row
    for key, value in row.items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, row)


def test_bench_kernel_cpu_quick(tmp_path):
    out = tmp_path / "results.json"
    stdout = _run("bench_kernel.py", out, "--quick")
    assert "| N | V | dtype | impl |" in stdout
    doc = _load(out)
    rows = doc["rows"]
    for row in rows:
        _check_row(row, "kernel")
    impls = {r["impl"] for r in rows}
    expected = {"kl_nontarget_torch", "eager"}
    if importlib.util.find_spec("triton") is not None:
        expected.add("kl_nontarget_triton")
    assert expected <= impls
    assert all(r["status"] == "ok" for r in rows if r["impl"] in expected), rows
    # The implementations benchmark the same loss on the same inputs: in float32 they agree closely. (Rows with a
    # "hidden" size take hidden states and an LM head instead of logits: they agree among themselves.)
    by_shape = {}
    for r in rows:
        if r["dtype"] == "fp32" and r["status"] == "ok":
            by_shape.setdefault((r["N"], r["V"], r.get("hidden")), []).append(r["loss"])
    assert by_shape
    for losses in by_shape.values():
        assert max(losses) - min(losses) <= 1e-4 * max(abs(x) for x in losses), losses

    # A second run merges into the same file: rows are replaced, not duplicated.
    _run("bench_kernel.py", out, "--quick", "--impls", "eager", "--dtype", "fp32", "--V", "512")
    rows2 = _load(out)["rows"]
    keys = [(r["impl"], r["N"], r["V"], r["dtype"]) for r in rows2]
    assert len(keys) == len(set(keys)) == len(rows)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="bench_step needs peft")
def test_bench_step_cpu_tiny(tmp_path):
    out = tmp_path / "results.json"
    _run("bench_step.py", out, "--model", "tiny", "--steps", "2", "--warmup-steps", "1")
    rows = _load(out)["rows"]
    assert {r["impl"] for r in rows} == {"plain", "kl", "kl_cached"}
    for row in rows:
        _check_row(row, "step")
        assert row["status"] == "ok", row
    for impl in ("kl", "kl_cached"):
        kl = next(r for r in rows if r["impl"] == impl)
        assert math.isfinite(kl["time_ratio"]) and kl["time_ratio"] > 0
    cached = next(r for r in rows if r["impl"] == "kl_cached")
    # tiny: hidden size 64 in float32, 3 steps of 4 x 63 supervised tokens: 256 bytes per token and a few bytes more
    assert 256 <= cached["cache_bytes_per_token"] < 400 and cached["precompute_ms"] > 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_run_script_refuses_cleanly_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OUT=str(tmp_path / "out")))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and "Nothing was run" in proc.stdout
    assert "no CUDA device" in (tmp_path / "out" / "summary.txt").read_text()
    assert not (tmp_path / "out" / "results.json").exists()


def test_variants_table_interpolates_along_the_non_target_frontier(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import variants_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(method, weight, seed, target, forgetting):
        return {"task": "people", "variant": "dora", "method": method, "kl_weight": weight, "seed": seed,
                "target_loss": target, "forgetting": forgetting}

    # Plain (0.1, 0.8) and the non-target KL at 0.3 (0.2, 0.3) and 1 (0.4, 0.1), two seeds that average to these.
    runs = [row("lora", 0, s, 0.1 + d, 0.8 - d) for s, d in ((0, 0.01), (1, -0.01))]
    # The non-target KL at 0.1 (0.25, 0.5) is beaten on both axes by 0.3: not on the frontier.
    runs += [row("nontarget_kl", 0.3, 0, 0.2, 0.3), row("nontarget_kl", 1, 0, 0.4, 0.1),
             row("nontarget_kl", 0.1, 0, 0.25, 0.5)]
    runs += [row("full_kl", 0.3, 0, 0.3, 0.4), row("full_kl", 1, 0, 0.9, 0.05)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": runs}))
    variants_table.main([str(path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # At 0.3, halfway from (0.2, 0.3) to (0.4, 0.1): 0.2, so the full KL forgets 2x more; 0.9 is past the frontier.
    assert "λ 0.3: 0.200 (2.0x)" in line and "λ 1: 0.100 (0.5x) (edge)" in line
    assert "| 0.100, 0.800 |" in line
