#!/usr/bin/env python
"""Compiled facts of the Triton row kernel, without a GPU: registers, spills, load/store widths, bytes per row.

Every variant the launcher can launch (dtype x KL direction x temperature on/off x gradient on/off, with the block
size and warp count it picks) is compiled ahead of time for each target (sm_80, sm_90) with `triton.compile`, from
the same launch that `kl_nontarget.ops.triton_rows.launch_arguments` builds and with the specialisation attributes
Triton's JIT would add for those arguments (16-byte aligned pointers, integers divisible by 16). No driver is
needed: ptxas and cuobjdump ship inside the triton wheel.

Vocabularies: an aligned one (V = 128256: the row stride and V are multiples of 16, as for every common LLM
vocabulary padded to 64 or 128) and an unaligned one (V = 50257, GPT-2's: the JIT adds no divisibility attribute to
the stride or to V). Any V at or above the block cap compiles to the same code as one of these two; a small one
(V = 2000, bf16) covers the smaller blocks and 4 warps the launcher picks below the cap.

From the PTX it reads the loops (LLVM marks each loop header) and the global loads and stores in their bodies;
from `cuobjdump --dump-resource-usage` on the cubin the registers, local memory (spills) and shared memory.
Bytes per row follow from the loop structure: bytes moved per iteration (sum of access widths x threads) times the
iterations a row of V entries takes, against the floor of reading z and b once and writing the gradient once
(3·V·bytes; 2·V·bytes without a gradient).

Run with TRITON_INTERPRET unset (the script drops it: the interpreter replaces the compiled kernel). Writes
`benchmarks/results/kernel-static.json` (or `--out`) and prints a markdown table. Compiled results are kept in
Triton's cache, so a second run takes seconds.

Examples:
  python benchmarks/kernel_report.py                      # every variant, sm_80 and sm_90
  python benchmarks/kernel_report.py --dtype bf16 --target 90 --no-save
"""

from __future__ import annotations

import os

# The interpreter must be off before triton is imported: under it `triton.jit` returns an interpreted function.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; set so Triton does not warn about it

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "kernel-static.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = (80, 90)
ALIGNED_V = 128256
UNALIGNED_V = 50257
SMALL_V = 2000


# (V, dtypes): aligned and unaligned vocabularies at the block cap, and one small vocabulary (a smaller block and 4
# warps: what tiny test models get).
FAMILIES = ((ALIGNED_V, tuple(DTYPES)), (UNALIGNED_V, tuple(DTYPES)), (SMALL_V, ("bf16",)))


def variants(families=FAMILIES):
    """Every launch variant of `families`: dicts with dtype, V, reverse, temperature and grad."""
    out = []
    for v, dtypes in families:
        for dtype, reverse, temperature, grad in itertools.product(dtypes, (False, True), (1.0, 2.0), (True, False)):
            out.append(dict(dtype=dtype, V=v, reverse=reverse, temperature=temperature, grad=grad))
    return out


def launch(variant):
    """(args, meta) of the launcher for `variant`, on small CPU tensors of the variant's row shape."""
    from kl_nontarget.ops.triton_rows import launch_arguments

    dtype = DTYPES[variant["dtype"]]
    v = variant["V"]
    # Two rows, contiguous: row stride V, pointers from the CPU allocator (64-byte aligned, as CUDA's are 256).
    z = torch.zeros(2, v, dtype=dtype)
    b = torch.zeros(2, v, dtype=dtype)
    labels = torch.zeros(2, dtype=torch.int64)
    grad = torch.zeros(2, v, dtype=dtype) if variant["grad"] else None
    ce, kl = torch.zeros(2), torch.zeros(2)
    return launch_arguments(z, b, labels, grad, ce, kl, torch.ones(()), kl_weight=1.0,
                            temperature=variant["temperature"], ignore_index=-100, reverse=variant["reverse"])


def compile_launch(kernel, args, meta, capability):
    """`triton.compile` of `kernel` for sm_<capability> with exactly what its JIT would build for this launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    # The JIT's own binder gives the signature, the constexprs and the divisibility attributes of these arguments.
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(meta), bound, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__), attrs


def _tool(name):
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the cubin's one function, from `cuobjdump --dump-resource-usage`."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(x for x in text.splitlines() if "REG:" in x)
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")


def _width_bits(suffix: str) -> int:
    parts = suffix.strip(".").split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next(int(m.group(1)) for p in reversed(parts) if (m := re.fullmatch(r"[bfsu](\d+)", p)))
    return lanes * bits


def ptx_loops(ptx: str) -> list:
    """The loops of the PTX: for each, the widths (bits) of the global loads and stores in its body.

    A loop runs from a label LLVM marks as a loop header to the last branch back to that label.
    """
    lines = ptx.splitlines()
    loops = []
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if not m or "Loop Header" not in line + (lines[i + 1] if i + 1 < len(lines) else ""):
            continue
        label = m.group(1)
        back = [j for j in range(i + 1, len(lines)) if re.search(rf"\bbra(\.uni)?\s+{re.escape(label)};", lines[j])]
        if not back:
            continue
        loads, stores = [], []
        for text in lines[i:back[-1] + 1]:
            for kind, suffix in _ACCESS.findall(text):
                (loads if kind == "ld" else stores).append(_width_bits(suffix))
        loops.append(dict(loads=loads, stores=stores))
    return loops


def _role(loop):
    if loop["loads"] and loop["stores"]:
        return "grad"       # pass 2: reads z and b, writes the gradient
    if loop["loads"]:
        return "stats"      # pass 1: reads z and b
    return "fill"           # ignored rows: zeros into the gradient


def facts(variant, capability):
    """Compiled facts of one variant on one target (a flat dict, JSON-ready)."""
    from kl_nontarget.kernels.nontarget_ce import nontarget_ce_kernel

    args, meta = launch(variant)
    compiled, attrs = compile_launch(nontarget_ce_kernel, args, meta, capability)
    usage = resource_usage(compiled.asm["cubin"])
    loops = {}
    for loop in ptx_loops(compiled.asm["ptx"]):
        loops.setdefault(_role(loop), loop)
    itemsize = DTYPES[variant["dtype"]].itemsize
    v, block, threads = variant["V"], meta["BLOCK_V"], 32 * meta["num_warps"]
    iters = -(-v // block)
    read = sum(sum(loop["loads"]) // 8 * threads * iters for r, loop in loops.items() if r != "fill")
    written = sum(sum(loop["stores"]) // 8 * threads * iters for r, loop in loops.items() if r != "fill")
    # The last block is masked: what a row really moves is (bytes per block entry) x V.
    read, written = read * v // (iters * block), written * v // (iters * block)
    floor = (3 if variant["grad"] else 2) * v * itemsize
    streamed = [w for r, loop in loops.items() if r != "fill" for w in loop["loads"]]
    grad_stores = loops.get("grad", {}).get("stores", [])
    return dict(
        variant, kernel=nontarget_ce_kernel.fn.__name__, target=f"sm_{capability}", block=block,
        num_warps=meta["num_warps"],
        stride_divisible_by_16=any(a == ["tt.divisibility", 16] for a in attrs.get((1,), [])),
        registers=usage["reg"], spill_bytes=usage["local"], stack_bytes=usage["stack"], shared_bytes=usage["shared"],
        loops=sorted(loops),
        load_bits_min=min(streamed, default=None), load_bits_max=max(streamed, default=None),
        store_bits_min=min(grad_stores, default=None), store_bits_max=max(grad_stores, default=None),
        loads_per_iter={r: len(loop["loads"]) for r, loop in loops.items()},
        stores_per_iter={r: len(loop["stores"]) for r, loop in loops.items()},
        bytes_read_per_row=read, bytes_written_per_row=written, floor_bytes_per_row=floor,
        bytes_over_floor=round((read + written) / floor, 3),
    )


def _facts_star(job):
    return facts(*job)


def collect(variant_list, targets, jobs=None, progress=True):
    """Facts of every (variant, target), compiled in `jobs` processes (default: the CPU count, at most 8)."""
    work = [(v, t) for v in variant_list for t in targets]
    jobs = jobs or min(8, os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(work), desc="compiling", unit="kernel", file=sys.stderr)
    out = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for row in pool.map(_facts_star, work):
            out.append(row)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return out


def markdown(rows) -> str:
    head = ("| dtype | V | KL | T | grad | target | regs | spills | shared | load bits | store bits "
            "| loads/iter (stats, grad) | bytes/row vs floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        loads = r["loads_per_iter"]
        lines.append(
            f"| {r['dtype']} | {r['V']} | {'rev' if r['reverse'] else 'fwd'} | {r['temperature']:g} "
            f"| {'yes' if r['grad'] else 'no'} | {r['target']} | {r['registers']} | {r['spill_bytes']} "
            f"| {r['shared_bytes']} | {r['load_bits_min']}" + (f"-{r['load_bits_max']}" if r['load_bits_max'] !=
                                                                r['load_bits_min'] else "")
            + f" | {r['store_bits_min'] if r['store_bits_min'] is not None else '-'} "
            f"| {loads.get('stats', 0)}, {loads.get('grad', '-')} | {r['bytes_over_floor']:.2f}x |")
    return "\n".join(lines)


def _rng(values):
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def summary(rows) -> str:
    """One line per (dtype, V, target) over its 8 variants: the README table."""
    head = ("| dtype | V | target | block x warps | registers | spills | load bits | store bits "
            "| loads/thread/iter (stats, grad) | bytes/row vs floor (grad / no grad) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    groups = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["V"], r["target"]), []).append(r)
    for (dtype, v, target), rs in groups.items():
        grad = [r for r in rs if r["grad"]]
        fwd = [r for r in rs if not r["grad"]]
        stores = [r["store_bits_min"] for r in grad] + [r["store_bits_max"] for r in grad]
        lines.append(
            f"| {dtype} | {v} | {target} | {rs[0]['block']} x {rs[0]['num_warps']} "
            f"| {_rng([r['registers'] for r in rs])} | {max(r['spill_bytes'] for r in rs)} "
            f"| {_rng([r['load_bits_min'] for r in rs] + [r['load_bits_max'] for r in rs])} "
            f"| {_rng(stores) if stores else '-'} "
            f"| {_rng([r['loads_per_iter'].get('stats', 0) for r in rs])}, "
            f"{_rng([r['loads_per_iter'].get('grad', 0) for r in grad]) if grad else '-'} "
            f"| {_rng([r['bytes_over_floor'] for r in grad]) if grad else '-'}x / "
            f"{_rng([r['bytes_over_floor'] for r in fwd]) if fwd else '-'}x |")
    return "\n".join(lines)


def compare(before, after) -> str:
    """Per variant, before -> after: registers, narrowest streaming load, loads per thread and iteration."""
    def key(r):
        return r["dtype"], r["V"], r["reverse"], r["temperature"], r["grad"], r["target"]

    old = {key(r): r for r in before}
    head = ("| dtype | V | KL | T | grad | target | registers | load bits | store bits | loads/thread/iter "
            "(stats) | block |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in after:
        o = old.get(key(r))
        if o is None:
            continue

        def arrow(field, fmt=str, o=o, r=r):
            a, b = fmt(o[field]), fmt(r[field])
            return a if a == b else f"{a} → {b}"

        lines.append(
            f"| {r['dtype']} | {r['V']} | {'rev' if r['reverse'] else 'fwd'} | {r['temperature']:g} "
            f"| {'yes' if r['grad'] else 'no'} | {r['target']} | {arrow('registers')} | {arrow('load_bits_min')} "
            f"| {arrow('store_bits_min', lambda x: '-' if x is None else str(x))} "
            f"| {o['loads_per_iter'].get('stats')} → {r['loads_per_iter'].get('stats')} | {arrow('block')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None, help="only these dtypes")
    p.add_argument("--V", nargs="+", type=int, default=None, help="these vocabularies, every dtype (default: "
                   f"{ALIGNED_V} and {UNALIGNED_V} in every dtype, {SMALL_V} in bf16)")
    p.add_argument("--target", nargs="+", type=int, default=list(TARGETS), help="compute capabilities (80, 90)")
    p.add_argument("--jobs", type=int, default=None, help="compiler processes (default: CPU count, at most 8)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    p.add_argument("--from", dest="from_json", type=Path, default=None,
                   help="read the rows of an earlier run instead of compiling (nothing is written)")
    p.add_argument("--summary", action="store_true", help="print the per-(dtype, V, target) summary table")
    p.add_argument("--compare", type=Path, default=None, help="print a before -> after table against this JSON")
    a = p.parse_args(argv)
    if a.from_json is not None:
        rows = json.loads(a.from_json.read_text())["rows"]
        a.no_save = True
    else:
        t0 = time.perf_counter()
        families = FAMILIES if a.V is None else tuple((v, tuple(DTYPES)) for v in a.V)
        if a.dtype:
            families = tuple((v, tuple(d for d in ds if d in a.dtype)) for v, ds in families)
        rows = collect(variants(families), a.target, a.jobs, progress=not a.quiet)
        seconds = time.perf_counter() - t0
        if not a.quiet:
            print(f"{len(rows)} kernels compiled in {seconds:.1f} s", file=sys.stderr)
    if a.compare is not None:
        print(compare(json.loads(a.compare.read_text())["rows"], rows))
    elif a.summary:
        print(summary(rows))
    elif not a.quiet:
        print(markdown(rows))
    if not a.no_save:
        doc = dict(triton=triton.__version__, torch=torch.__version__, python=sys.version.split()[0],
                   updated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   seconds=round(seconds, 1), rows=rows)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
        if not a.quiet:
            print(f"wrote {a.out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
