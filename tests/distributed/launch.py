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
import signal
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
    # One thread per rank (two ranks share two cores), the tests folder importable (tiny_models), and Python's
    # fault handler on, so a rank stopped by SIGABRT (a crash, or `_run` on a timeout) prints every thread's stack.
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path,
                PYTHONFAULTHANDLER="1")


def _run(cmd: list[str], timeout: int) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, timed out) of `cmd`. On a timeout the ranks (torchrun starts them in sessions of
    their own) get SIGABRT first, so each dumps every thread's stack into its log, then everything is killed."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, False
    except subprocess.TimeoutExpired:
        children = psutil.Process(proc.pid).children(recursive=True)
        for child in children:
            child.send_signal(signal.SIGABRT)
        psutil.wait_procs(children, timeout=20)
        for process in [*children, proc]:
            try:
                process.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        out, err = proc.communicate()
        return proc.returncode, out or "", err or "", True


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
    for rank, code, sig in re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)[^\n]*?(SIG[A-Z]+)?\)?\s*\n",
                                         summary):
        found[int(rank)] = f"exit code {code}" + (f", {sig}" if sig else "")
    return found


def _root_cause(summary: str) -> int | None:
    """The rank torchrun names as the first observed failure (the others may just have been stopped after it)."""
    found = re.search(r"Root Cause.*?rank\s*:\s*(\d+)", summary, re.S)
    return int(found.group(1)) if found else None


def launch(script: str, out, *args: str, ranks: int = 2, timeout: int = TIMEOUT) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = str(script if Path(script).is_absolute() else HERE / script)
    if ranks == 1:
        cmd = [sys.executable, path, str(out), *args]
        code, stdout, stderr, timed_out = _run(cmd, timeout)
        assert code == 0 and not timed_out, (
            f"{' '.join(cmd)} {'timed out after %d s' % timeout if timed_out else 'failed'} (exit code {code})\n"
            f"--- stderr ---\n{stderr[-6000:]}\n--- stdout ---\n{stdout[-2000:]}")
        return out
    log_dir = out / "rank_logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "--log-dir", str(log_dir), "--redirects", "3", path, str(out), *args]
    code, _stdout, stderr, timed_out = _run(cmd, timeout)
    if code != 0 or timed_out:
        failed = _failed_ranks(stderr)
        logs = _rank_logs(log_dir)
        first = _root_cause(stderr)
        order = sorted(logs, key=lambda r: (r != first, r not in failed, r))
        what = f"timed out after {timeout} s (every rank's stacks follow)" if timed_out else "failed"
        report = [f"{Path(script).name} on {ranks} ranks {what} (torchrun exit code {code}); failing ranks: "
                  + (", ".join(f"rank {r} ({how})" for r, how in sorted(failed.items())) or "unknown")]
        report += [f"===== rank {r}{' (FAILED)' if r in failed else ''} =====\n{logs[r]}" for r in order]
        report.append(f"===== torchrun =====\n{stderr[-3000:]}")
        raise AssertionError("\n".join(report))
    return out
