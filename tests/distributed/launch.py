"""One way to run the multi-process scripts of this folder: `torchrun` on CPU/gloo, every rank's output kept apart.

`launch(script, out, *args, ranks=2)` runs `tests/distributed/<script> OUT ARGS...` (or a script given by its absolute
path) on `ranks` processes (a plain
`python` for one rank) and returns OUT. Each rank's stdout and stderr go to their own files; when the run fails the
assertion message names the rank(s) that failed, their exit codes, and the end of each rank's output, failing
ranks first.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    # One thread per rank (two ranks share two cores) and the tests folder importable (tiny_models).
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)


def _rank_logs(log_dir: Path) -> dict[int, str]:
    """{rank: its stderr and stdout tails} from torchrun's --log-dir layout (<run>/attempt_N/<rank>/std*.log)."""
    logs: dict[int, str] = {}
    for folder in sorted(log_dir.glob("**/attempt_*/*")):
        if not folder.is_dir() or not folder.name.isdigit():
            continue
        parts = []
        for name in ("stderr.log", "stdout.log"):
            file = folder / name
            if file.exists():
                text = file.read_text(errors="replace")
                parts.append(f"--- {name} (last 4000 characters) ---\n{text[-4000:]}")
        logs[int(folder.name)] = "\n".join(parts)
    return logs


def _failed_ranks(summary: str) -> dict[int, str]:
    """{rank: exit code text} from torchrun's failure summary."""
    found = {}
    for rank, code, signal in re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)[^\n]*?(SIG[A-Z]+)?\)?\s*\n",
                                         summary):
        found[int(rank)] = f"exit code {code}" + (f", {signal}" if signal else "")
    return found


def launch(script: str, out, *args: str, ranks: int = 2, timeout: int = TIMEOUT) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = str(script if Path(script).is_absolute() else HERE / script)
    if ranks == 1:
        cmd = [sys.executable, path, str(out), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
        assert proc.returncode == 0, (f"{' '.join(cmd)} failed with exit code {proc.returncode}\n"
                                      f"--- stderr ---\n{proc.stderr[-6000:]}\n--- stdout ---\n{proc.stdout[-2000:]}")
        return out
    log_dir = out / "rank_logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "--log-dir", str(log_dir), "--redirects", "3", path, str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if proc.returncode != 0:
        failed = _failed_ranks(proc.stderr)
        logs = _rank_logs(log_dir)
        order = sorted(logs, key=lambda r: (r not in failed, r))
        report = [f"{script} on {ranks} ranks failed (torchrun exit code {proc.returncode}); failing ranks: "
                  + (", ".join(f"rank {r} ({code})" for r, code in sorted(failed.items())) or "unknown")]
        report += [f"===== rank {r}{' (FAILED)' if r in failed else ''} =====\n{logs[r]}" for r in order]
        report.append(f"===== torchrun =====\n{proc.stderr[-3000:]}")
        raise AssertionError("\n".join(report))
    return out
