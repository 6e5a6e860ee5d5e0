#!/usr/bin/env python
"""Forward + backward of CE + non-target KL (one gradient w.r.t. the adapted logits) against the alternatives.

Implementations (rows' "impl"):
  kl_nontarget_triton  `nontarget_kl_loss(..., backend="triton")` (on CPU: Triton's interpreter, TRITON_INTERPRET=1)
  kl_nontarget_torch   `nontarget_kl_loss(..., backend="torch")`, the chunked PyTorch backend
  eager                the formula a user would write: F.cross_entropy + KL of masked log_softmax, through autograd
  torch_compile        `torch.compile` of that same formula (static shapes, compiled once per shape in the warm-up)
  liger_ce             Liger-Kernel's fused cross-entropy alone, where importable: a lower bound (no KL at all)

Fused-linear rows take hidden states instead of logits (hidden size --hidden; the LM head W is frozen, as with LoRA,
and shared by both passes). Their time includes the head's matmuls (two forward, one for the hidden-state gradient),
which the rows above leave out; their inputs are h, h_ref and W, so "peak MB" shows what the logits cost:
  kl_nontarget_linear  `nontarget_kl_linear_loss(h, h_ref, W, y)`: chunks of tokens, never N x V logits
  linear_logits        the same loss unfused: logits = h @ W.T (and h_ref @ W.T without grad), then `nontarget_kl_loss`

Time is the median of repeated calls after a warm-up (CUDA events on GPU, perf_counter on CPU); peak memory comes from
one separate call (see _common.py for how it is measured on each device). The byte floor is 3*N*V*bytes (read z and b,
write the gradient); "floor_x" is time / (floor / bandwidth), the bandwidth measured with a large device-to-device
copy unless --bandwidth is given.

Examples:
  python benchmarks/bench_kernel.py                       # full grid on the GPU
  python benchmarks/bench_kernel.py --N 16384 --V 128256 --dtype bf16
  python benchmarks/bench_kernel.py --device cpu --quick  # tiny CPU smoke run (< 1 min)
  python benchmarks/bench_kernel.py --device cpu --cpu-target  # design target: N=4096, V=32000, fp32 on CPU
  python benchmarks/bench_kernel.py --device cpu --N 2048 --V 32768 --dtype fp32 \
      --impls kl_nontarget_linear linear_logits
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _early_device() -> str | None:
    """The --device value, read before anything imports triton (the interpreter flag must be set first)."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    if "--cpu-target" in argv:
        return "cpu"
    return None


if _early_device() == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
LINEAR_IMPLS = ("kl_nontarget_linear", "linear_logits")
ALL_IMPLS = ("kl_nontarget_triton", "kl_nontarget_torch", "eager", "torch_compile", "liger_ce") + LINEAR_IMPLS
FULL_N = (4096, 16384, 32768)
FULL_V = (32000, 128256, 151936, 262144)
QUICK_CPU = dict(N=(16,), V=(512, 2048), dtype=("fp32", "bf16"))
QUICK_GPU = dict(N=(4096,), V=(32000, 128256), dtype=("bf16",))
CPU_TARGET = dict(N=(4096,), V=(32000,), dtype=("fp32",))
GPU_TARGET = dict(N=16384, V=128256, dtype="bf16")


# ---------------------------------------------------------------------------------------------------------------
# the implementations


def eager_formula(logits, ref_logits, labels, kl_weight=1.0, ignore_index=-100):
    """CE + kl_weight * KL(base non-target || adapted non-target), written the straightforward way.

    Mean over valid positions, like `nontarget_kl_loss(reduction="mean")`. No upcast: the ops run in the logits'
    dtype (the cheapest eager variant; an upcast to fp32 would only add time and memory).
    """
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    valid = labels != ignore_index
    gold = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels.clamp_min(0)[:, None], True)
    log_q = F.log_softmax(logits.masked_fill(gold, float("-inf")), dim=-1)
    log_p = F.log_softmax(ref_logits.masked_fill(gold, float("-inf")), dim=-1)
    kl_rows = (log_p.exp() * (log_p - log_q)).masked_fill(gold, 0.0).sum(-1)
    kl = (kl_rows * valid).sum() / valid.sum().clamp_min(1)
    return ce + kl_weight * kl


def make_impl(name: str, device: str, kl_weight: float):
    """A callable (z, b, y) -> scalar loss, or raise RuntimeError('skipped: ...') when not available here."""
    if name in ("kl_nontarget_triton", "kl_nontarget_torch"):
        from kl_nontarget.ops.logits_loss import nontarget_kl_loss

        backend = "triton" if name.endswith("triton") else "torch"
        if backend == "triton":
            try:
                import triton  # noqa: F401
            except ImportError as err:
                raise RuntimeError(f"skipped: triton is not importable ({err})") from err
            if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError("skipped: Triton on CPU needs TRITON_INTERPRET=1 before triton is imported")
        return lambda z, b, y: nontarget_kl_loss(z, b, y, kl_weight=kl_weight, backend=backend)
    if name == "eager":
        return lambda z, b, y: eager_formula(z, b, y, kl_weight)
    if name == "torch_compile":
        if not hasattr(torch, "compile"):
            raise RuntimeError("skipped: this torch has no torch.compile")
        torch._dynamo.reset()  # one static-shape compilation per shape; never a stale cache between shapes
        compiled = torch.compile(eager_formula, dynamic=False)
        return lambda z, b, y: compiled(z, b, y, kl_weight)
    if name == "liger_ce":
        if device != "cuda":
            raise RuntimeError("skipped: Liger-Kernel runs on CUDA only")
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except Exception as err:  # noqa: BLE001 - any import failure means: not available
            raise RuntimeError(f"skipped: liger_kernel is not importable ({type(err).__name__})") from err
        ce = LigerCrossEntropyLoss(ignore_index=-100)
        # Liger writes its gradient over the input buffer: it runs last for each shape (see run_shape).
        return lambda z, b, y: ce(z, y)
    raise ValueError(f"unknown impl {name!r}; choose from {ALL_IMPLS}")


def make_linear_impl(name: str, kl_weight: float):
    """A callable (h, h_ref, W, y) -> scalar loss for the fused-linear rows."""
    if name == "kl_nontarget_linear":
        from kl_nontarget.ops.linear_loss import nontarget_kl_linear_loss

        return lambda h, rh, w, y: nontarget_kl_linear_loss(h, rh, w, y, kl_weight=kl_weight)
    if name == "linear_logits":
        from kl_nontarget.ops.logits_loss import nontarget_kl_loss

        def unfused(h, rh, w, y):
            z = h @ w.t()
            with torch.no_grad():
                b = rh @ w.t()
            return nontarget_kl_loss(z, b, y, kl_weight=kl_weight)

        return unfused
    raise ValueError(f"unknown fused-linear impl {name!r}; choose from {LINEAR_IMPLS}")


# ---------------------------------------------------------------------------------------------------------------
# one shape


def make_inputs(n, v, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, v, device=device, dtype=dtype, generator=gen).mul_(2.0)
    b = torch.randn(n, v, device=device, dtype=dtype, generator=gen).mul_(0.5).add_(z)  # a nearby base model
    y = torch.randint(0, v, (n,), device=device, generator=gen)
    return z.requires_grad_(True), b, y


def make_linear_inputs(n, v, d, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, dtype=dtype, generator=gen)
    rh = torch.randn(n, d, device=device, dtype=dtype, generator=gen).mul_(0.25).add_(h)  # a nearby base model
    w = torch.randn(v, d, device=device, dtype=dtype, generator=gen).mul_(2.0 / d ** 0.5)  # logits of std ~2
    y = torch.randint(0, v, (n,), device=device, generator=gen)
    return h.requires_grad_(True), rh, w, y


def _estimate_eager_bytes(n, v, itemsize):
    # inputs (2) + the eager formula's temporaries at its peak (about six logits-sized tensors and a bool mask)
    return n * v * (8 * itemsize + 1)


def run_shape(n, v, dtype_name, impls, args, bandwidth_gbps):
    device = args.device
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    floor_bytes = 3 * n * v * itemsize
    floor_ms = floor_bytes / (bandwidth_gbps * 1e9) * 1e3 if bandwidth_gbps else None
    base = dict(bench="kernel", N=n, V=v, dtype=dtype_name)
    rows = []

    def row(impl, status, **kw):
        r = dict(base, impl=impl, ms=None, peak_mb=None, extra_mb=None, floor_x=None, status=status,
                 floor_ms=C.finite_or_none(floor_ms))
        if device == "cpu":
            r["threads"] = torch.get_num_threads()
        r.update(kw)
        return r

    logit_impls = [i for i in impls if i not in LINEAR_IMPLS]
    linear_impls = [i for i in impls if i in LINEAR_IMPLS]
    if device == "cpu":
        avail = C.mem_available_bytes()
        need = _estimate_eager_bytes(n, v, itemsize)
        if avail is not None and need > 0.8 * avail:
            note = (f"not run: about {need / 2**30:.1f} GiB needed, {avail / 2**30:.1f} GiB available "
                    "(a CPU allocation failure can kill the process instead of raising)")
            return [row(i, "oom", note=note) for i in impls]

    def measure(impl, f, inputs, grad_leaf, input_bytes, **extra):
        state = {}

        def drop_grad():
            grad_leaf.grad = None
            state.pop("loss", None)

        def step():
            loss = f(*inputs)
            loss.backward()
            state["loss"] = loss

        try:
            # One untimed call first (compilation, autotuning, lazy loading), then one call for peak memory;
            # both count as warm-up calls for the timing.
            step()
            drop_grad()
            if device == "cuda":
                C.free_memory(device)
            peak_mb, extra_mb = C.peak_call(step, device, input_bytes)
            loss_value = float(state["loss"].detach())
            ms = C.time_ms(step, device, warmup=max(0, args.warmup - 2), reps=args.reps, before=drop_grad)
            rows.append(row(impl, "ok", ms=ms, peak_mb=C.finite_or_none(peak_mb),
                            extra_mb=C.finite_or_none(extra_mb),
                            floor_x=C.finite_or_none(ms / floor_ms) if floor_ms else None,
                            loss=C.finite_or_none(loss_value), **extra))
        except Exception as err:  # noqa: BLE001 - record and go on with the next implementation
            status = "oom" if C.is_oom(err) else "error"
            rows.append(row(impl, status, note=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                            if str(err) else type(err).__name__, **extra))
        finally:
            drop_grad()
            state.clear()
            if device == "cuda":
                C.free_memory(device)

    if logit_impls:
        try:
            z, b, y = make_inputs(n, v, dtype, device)
        except Exception as err:  # noqa: BLE001
            C.free_memory(device)
            status = "oom" if C.is_oom(err) else "error"
            return [row(i, status, note=f"inputs: {type(err).__name__}: {str(err)[:200]}") for i in impls]
        input_bytes = 2 * n * v * itemsize + y.numel() * 8

        # Liger overwrites z with its gradient, so it goes last.
        for impl in sorted(logit_impls, key=lambda i: i == "liger_ce"):
            try:
                f = make_impl(impl, device, args.kl_weight)
            except RuntimeError as err:
                if str(err).startswith("skipped:"):
                    rows.append(row(impl, "skipped", note=str(err)[len("skipped: "):]))
                    continue
                raise
            measure(impl, f, (z, b, y), z, input_bytes)
            f = None
        del z, b, y
        C.free_memory(device)

    if linear_impls:  # after the logits above are freed: these rows' peak holds hidden states, not logits
        d = args.hidden
        try:
            h, rh, w, y = make_linear_inputs(n, v, d, dtype, device)
        except Exception as err:  # noqa: BLE001
            C.free_memory(device)
            status = "oom" if C.is_oom(err) else "error"
            return rows + [row(i, status, hidden=d, note=f"inputs: {type(err).__name__}: {str(err)[:200]}")
                           for i in linear_impls]
        input_bytes = (2 * n * d + v * d) * itemsize + y.numel() * 8
        for impl in linear_impls:
            measure(impl, make_linear_impl(impl, args.kl_weight), (h, rh, w, y), h, input_bytes, hidden=d)
        del h, rh, w, y
        C.free_memory(device)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# reporting


def print_table(rows, out=sys.stdout):
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["N"], r["V"], r["dtype"]), {})[r["impl"]] = r
    headers = ["N", "V", "dtype", "impl", "ms", "x floor", "peak MB", "extra MB", "speed vs eager",
               "peak / eager", "extra / eager", "status"]
    table = []
    for (n, v, dt), impls in by_shape.items():
        eager = impls.get("eager")
        for name, r in impls.items():
            ok = r["status"] == "ok"
            speed = peak_ratio = extra_ratio = None
            if ok and eager and eager["status"] == "ok" and name != "eager":
                speed = eager["ms"] / r["ms"] if r["ms"] else None
                if r.get("peak_mb") is not None and eager.get("peak_mb"):
                    peak_ratio = r["peak_mb"] / eager["peak_mb"]
                if r.get("extra_mb") is not None and eager.get("extra_mb"):
                    extra_ratio = r["extra_mb"] / eager["extra_mb"]
            status = r["status"] if ok else f"{r['status']}: {r.get('note', '')}"
            table.append([n, v, dt, name, C.fmt(r["ms"], ".3g" if (r["ms"] or 0) < 10 else ".1f"),
                          C.fmt(r["floor_x"], ".2f"), C.fmt(r["peak_mb"], ".0f"), C.fmt(r["extra_mb"], ".0f"),
                          C.fmt(speed, ".2f") + ("x" if speed else ""),
                          C.fmt(peak_ratio, ".2f"), C.fmt(extra_ratio, ".2f"), status])
    print(C.markdown_table(headers, table), file=out)


def check_targets(rows, device):
    """Lines comparing the rows with the targets (docs/design.md, "Cost and targets"), where the grid contains the
    target shape."""
    idx = {(r["impl"], r["N"], r["V"], r["dtype"]): r for r in rows if r["status"] == "ok"}
    lines = []
    if device == "cpu":
        t, e = idx.get(("kl_nontarget_torch", 4096, 32000, "fp32")), idx.get(("eager", 4096, 32000, "fp32"))
        if t and e:
            speed = e["ms"] / t["ms"]
            mem = t["extra_mb"] / e["extra_mb"] if t.get("extra_mb") is not None and e.get("extra_mb") else None
            ok = speed >= 1.5 and mem is not None and mem <= 0.5
            lines.append(f"CPU target (N=4096, V=32000, fp32, torch backend vs eager): {speed:.2f}x faster "
                         f"(goal >= 1.5x), extra peak memory {C.fmt(mem, '.2f')}x of eager's (goal <= 0.5x): "
                         f"{'MET' if ok else 'MISSED'}")
    else:
        key = (GPU_TARGET["N"], GPU_TARGET["V"], GPU_TARGET["dtype"])
        t = idx.get(("kl_nontarget_triton",) + key)
        if t:
            e, c = idx.get(("eager",) + key), idx.get(("torch_compile",) + key)
            parts = [f"floor_x {C.fmt(t['floor_x'])} (goal <= 1.3)"]
            if e:
                parts.append(f"{e['ms'] / t['ms']:.2f}x faster than eager (goal >= 5x)")
                parts.append(f"peak {t['peak_mb'] / e['peak_mb']:.2f}x of eager's (goal <= 0.5x)")
            if c:
                parts.append(f"{c['ms'] / t['ms']:.2f}x faster than torch.compile (goal >= 2x)")
            lines.append("GPU target (N=16384, V=128256, bf16): " + "; ".join(parts))
    for (impl, n, v, dt), r in sorted(idx.items(), key=lambda kv: kv[0][1:]):
        u = idx.get(("linear_logits", n, v, dt))
        if impl == "kl_nontarget_linear" and u:
            mem = (f"{r['peak_mb'] / u['peak_mb']:.2f}x its peak memory" if r.get("peak_mb") and u.get("peak_mb")
                   else "peak memory not measured")
            lines.append(f"Fused linear (N={n}, V={v}, {dt}, d={r.get('hidden')}): {u['ms'] / r['ms']:.2f}x the "
                         f"speed of the unfused logits path, {mem}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="a tiny grid (CPU: seconds; GPU: two shapes)")
    p.add_argument("--cpu-target", action="store_true",
                   help="the CPU target: N=4096, V=32000, fp32, torch backend vs eager (implies --device cpu)")
    p.add_argument("--N", type=int, nargs="+", help="token counts (default: 4096 16384 32768)")
    p.add_argument("--V", type=int, nargs="+", help="vocabulary sizes (default: 32000 128256 151936 262144)")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), help="default: bf16 fp32")
    p.add_argument("--impls", nargs="+", choices=ALL_IMPLS, help="default depends on the device")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing, at least 2 happen (default 5 GPU, 2 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls; the median is reported (default 20 GPU, 3 CPU)")
    p.add_argument("--bandwidth", type=float, default=None, help="peak bandwidth in GB/s instead of measuring it")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--block", type=int, default=None,
                   help="cap of the Triton kernel's vocabulary block (a power of two; default: the launcher's)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden size d of the fused-linear rows (default 4096 on GPU, 64 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<device-slug>.json)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    if args.cpu_target:
        if args.device == "cuda":
            p.error("--cpu-target runs on the CPU")
        args.device = "cpu"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.block is not None and (args.block < 16 or args.block & (args.block - 1)):
        p.error(f"--block must be a power of two >= 16, got {args.block}")
    cpu = args.device == "cpu"
    if args.quick:
        grid = QUICK_CPU if cpu else QUICK_GPU
    elif cpu:
        grid = CPU_TARGET  # the full grid needs tens of GB per shape: not a CPU job
    else:
        grid = dict(N=FULL_N, V=FULL_V, dtype=("bf16", "fp32"))
    args.N = args.N or list(grid["N"])
    args.V = args.V or list(grid["V"])
    args.dtype = args.dtype or list(grid["dtype"])
    if args.impls is None:
        if cpu:
            args.impls = ["kl_nontarget_torch", "eager"] + (["kl_nontarget_triton"] + list(LINEAR_IMPLS)
                                                           if args.quick else [])
        else:
            args.impls = ["kl_nontarget_triton", "eager", "torch_compile", "liger_ce"] + list(LINEAR_IMPLS)
    if args.hidden is None:
        args.hidden = 64 if cpu else 4096
    if args.warmup is None:
        args.warmup = 2 if cpu else 5
    if args.reps is None:
        args.reps = (2 if args.quick else 3) if cpu else 20
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The Triton interpreter's numpy ops warn on the -inf arithmetic the kernel masks out afterwards.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\..*")
    if args.block:  # compare block sizes without editing the launcher
        from kl_nontarget.ops import triton_rows

        cap = args.block
        triton_rows.default_block_size = lambda v, dtype: min(1 << max(v - 1, 0).bit_length(), cap)
    if args.bandwidth:
        bw, bw_source = args.bandwidth, "given (--bandwidth)"
    else:
        bw, bw_source = C.measure_bandwidth_gbps(args.device), "measured (device-to-device copy)"
    dev_name = C.device_name(args.device)
    vers = C.versions()
    print(f"# bench_kernel on {dev_name}: torch {vers['torch']}, triton {vers['triton']}; "
          f"bandwidth {bw:.1f} GB/s ({bw_source})")
    if args.device == "cpu":
        print(f"# CPU peak memory: {C.cpu_memory_method()}")
    rows = []
    for dtype_name in args.dtype:
        for n in args.N:
            for v in args.V:
                rows += run_shape(n, v, dtype_name, args.impls, args, bw)
    print()
    print_table(rows)
    for line in check_targets(rows, args.device):
        print()
        print(line)
    if not args.no_save:
        meta = {"kernel_meta": {"bandwidth_gbps": bw, "bandwidth_source": bw_source, "warmup": args.warmup,
                                "reps": args.reps, "kl_weight": args.kl_weight, "block_cap": args.block,
                                "memory": ("torch.cuda.max_memory_allocated after reset_peak_memory_stats"
                                           if args.device == "cuda" else C.cpu_memory_method()),
                                "threads": torch.get_num_threads()}}
        path = C.save_results(args.out or C.default_out(args.device), args.device, rows, meta)
        print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
