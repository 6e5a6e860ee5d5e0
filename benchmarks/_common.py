"""Shared helpers of the benchmark scripts: device naming, timing, peak memory, the results file and the table.

Imported as a plain module (`import _common`) by the scripts beside it, which put this folder on `sys.path`.
Nothing here imports triton: `bench_kernel.py --device cpu` must set TRITON_INTERPRET=1 before triton's first import.

Peak memory:
  * CUDA: `torch.cuda.max_memory_allocated()` after `torch.cuda.reset_peak_memory_stats()` (tensor memory only, the
    caching allocator's reserve is not counted). "peak_mb" is that peak, inputs included; "extra_mb" is the peak minus
    what was allocated just before the call (the inputs), i.e. what the measured code added at its high-water mark.
  * CPU: the process's resident set (RSS). Before the call, freed heap memory is handed back (`malloc_trim`) and the
    kernel's high-water mark is reset (writing "5" to /proc/self/clear_refs); after it, VmHWM - VmRSS(before) is the
    memory the call added at its peak ("extra_mb"). "peak_mb" adds the bytes of the inputs, to be comparable with
    CUDA's number. Where clear_refs cannot be written, a thread samples VmRSS every millisecond instead (it can miss
    a short peak); where there is no /proc at all, the memory columns are null.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import threading
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 2**20

# Fields that identify a row: a new run replaces an old row with the same identity and keeps every other row.
IDENTITY = ("bench", "impl", "N", "V", "dtype", "model", "batch", "seq", "harness", "threads", "hidden")


# ---------------------------------------------------------------------------------------------------------------
# devices


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{_cpu_model()} ({os.cpu_count()} CPUs)"  # torch's thread count goes in each CPU row


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_slug(device: str) -> str:
    if device == "cuda":
        return slugify(torch.cuda.get_device_name(0))
    return "cpu-" + slugify(_cpu_model())


def versions() -> dict:
    out = {"torch": torch.__version__, "triton": None, "python": platform.python_version()}
    try:  # only the version string: importing triton here would switch off a later TRITON_INTERPRET=1
        from importlib.metadata import version

        out["triton"] = version("triton")
    except Exception:  # noqa: BLE001 - not installed
        pass
    for name in ("transformers", "trl", "peft", "liger-kernel", "accelerate", "datasets"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001
            pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(err, oom_cls):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        trim_heap()


# ---------------------------------------------------------------------------------------------------------------
# timing


def time_ms(fn, device: str, *, warmup: int, reps: int, before=None) -> float:
    """Median wall time of `fn()` in milliseconds after `warmup` untimed calls.

    `before()` runs ahead of every call, outside the timed region (e.g. to drop the previous gradient). On CUDA
    each call is bracketed by CUDA events; on CPU by `time.perf_counter`.
    """
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    sync(device)
    times = []
    for _ in range(max(1, reps)):
        if before is not None:
            before()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_bandwidth_gbps(device: str) -> float:
    """Device-memory bandwidth from a large device-to-device copy (bytes read + bytes written per second, GB/s)."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=10 if device == "cuda" else 5)
    src = dst = None  # free both buffers before measuring what is left
    free_memory(device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------------------
# memory


_libc = None


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and it would hide a later peak)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str):
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuPeak:
    """Context manager: `.extra_mb` is the RSS the block added at its peak (see the module docstring)."""

    method = None  # "clear_refs", "sampling" or None; set by the first use

    def __enter__(self):
        gc.collect()
        trim_heap()
        self.base_kb = _status_kb("VmRSS")
        self.extra_mb = None
        self._thread = None
        if self.base_kb is None:
            CpuPeak.method = None
            return self
        if _reset_hwm():
            CpuPeak.method = "clear_refs"
            return self
        CpuPeak.method = "sampling"
        self._peak_kb = self.base_kb
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                rss = _status_kb("VmRSS") or 0
                self._peak_kb = max(self._peak_kb, rss)
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.base_kb is None:
            return False
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak_kb = max(self._peak_kb, _status_kb("VmRSS") or 0)
        else:
            peak_kb = _status_kb("VmHWM") or 0
        self.extra_mb = max(0.0, (peak_kb - self.base_kb) / 1024)
        return False


def cpu_memory_method() -> str:
    if _status_kb("VmRSS") is None:
        return "unavailable (no /proc): memory columns are null"
    probe = _reset_hwm()
    return ("RSS high-water mark (malloc_trim, then /proc/self/clear_refs reset of VmHWM; extra = VmHWM - VmRSS "
            "before the call)" if probe else "RSS sampled every 1 ms by a thread (may miss short peaks)")


def mem_available_bytes():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_call(fn, device: str, input_bytes: int):
    """Run `fn()` once and return (peak_mb, extra_mb) as described in the module docstring."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return peak / MB, (peak - base) / MB
    with CpuPeak() as p:
        fn()
    if p.extra_mb is None:
        return None, None
    return p.extra_mb + input_bytes / MB, p.extra_mb


# ---------------------------------------------------------------------------------------------------------------
# results


def finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _identity(row: dict) -> tuple:
    return tuple(row.get(k) for k in IDENTITY)


def default_out(device: str) -> Path:
    return RESULTS_DIR / f"{device_slug(device)}.json"


def save_results(path, device: str, rows: list, meta: dict | None = None) -> Path:
    """Merge `rows` into the results file at `path` (same device): rows with the same identity are replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        if not isinstance(old, dict) or old.get("device") != device_name(device):
            old = {}
    new_ids = {_identity(r) for r in rows}
    merged = [r for r in old.get("rows", []) if _identity(r) not in new_ids] + rows
    doc = {k: v for k, v in old.items() if k != "rows"}  # e.g. the other benchmark's *_meta
    doc.update({"device": device_name(device), **{k: v for k, v in versions().items() if k in ("torch", "triton")}})
    doc["versions"] = versions()
    doc["updated"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if meta:
        doc.update(meta)
    doc["rows"] = merged
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return path


def fmt(x, spec=".2f", none="-"):
    if x is None:
        return none
    return format(x, spec)


def markdown_table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
