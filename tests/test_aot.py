"""The Triton kernels compiled for real (sm_80 and sm_90), with no GPU: what the compiled code looks like.

`benchmarks/kernel_report.py` compiles every variant the launcher can launch, from the launcher's own argument list
(`triton_rows.launch_arguments`) with the JIT's specialisation attributes, and reads registers, spills and the
widths of the loops' global loads and stores from the PTX and cubin. It runs once per session in a subprocess: the
tests here run under TRITON_INTERPRET=1 (conftest), under which `triton.jit` gives interpreted functions that
cannot be compiled. Triton's cache keeps the compiled kernels, so a second run takes seconds.

Register bound: the kernel runs 8 warps (256 threads) per program at the block cap; at <= 128 registers a thread,
two programs fit in an SM's 65536 registers, so one program's reductions overlap the other's loads.
"""

import ast
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "kernel_report.py"
MAX_REGISTERS = 128
BITS = {"bf16": 16, "fp16": 16, "fp32": 32}



def _compiler_missing():
    """Why this triton cannot run the check here, or None. CI's triton (3.9) can."""
    import triton
    import triton.runtime.jit as jit

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        return "this triton wheel ships no NVIDIA tools (ptxas, cuobjdump)"
    if not (hasattr(jit, "create_function_from_signature") and hasattr(jit.JITFunction, "_pack_args")):
        return f"triton {triton.__version__} lacks the JIT binder kernel_report.py reuses"
    return None


pytestmark = pytest.mark.skipif(_compiler_missing() is not None, reason=str(_compiler_missing()))


def _compiler_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "kernel-static.json"
    proc = subprocess.run([sys.executable, str(REPORT), "--out", str(out), "--quiet"], cwd=ROOT, env=_compiler_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"kernel_report.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def _key(row):
    return row["kernel"], row["dtype"], row["V"], row["reverse"], row["temperature"], row["grad"], row["target"]


def _launched_kernels():
    """Names of the public @triton.jit functions in kernels/: every one of them is a kernel the package launches."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def test_every_variant_is_compiled_for_both_targets(report):
    expected = set()
    families = [(128256, ("bf16", "fp16", "fp32")), (50257, ("bf16", "fp16", "fp32")), (2000, ("bf16",))]
    for v, dtypes in families:
        for dtype, rev, t, grad, target in itertools.product(dtypes, (False, True), (1.0, 2.0), (True, False),
                                                             ("sm_80", "sm_90")):
            expected.add(("nontarget_ce_kernel", dtype, v, rev, t, grad, target))
    got = [_key(r) for r in report["rows"]]
    assert len(got) == len(set(got))
    assert set(got) == expected
    assert {r["kernel"] for r in report["rows"]} == _launched_kernels()


def test_no_spills_and_bounded_registers(report):
    for r in report["rows"]:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert 0 < r["registers"] <= MAX_REGISTERS, r


def test_aligned_rows_stream_with_128_bit_accesses(report):
    aligned = [r for r in report["rows"] if r["V"] % 16 == 0]
    assert aligned and all(r["stride_divisible_by_16"] for r in aligned)
    for r in aligned:
        assert r["load_bits_min"] == 128, r
        if r["grad"]:
            assert r["store_bits_min"] == 128, r


def test_unaligned_rows_compile_without_the_divisibility_attribute(report):
    unaligned = [r for r in report["rows"] if r["V"] == 50257]
    assert unaligned
    for r in unaligned:
        assert not r["stride_divisible_by_16"]
        # Nothing proves a vector of entries aligned: one element per access (the cost the README states).
        assert r["load_bits_min"] == BITS[r["dtype"]], r


def test_each_pass_reads_a_row_once(report):
    for r in report["rows"]:
        item = BITS[r["dtype"]] // 8
        passes = 2 if r["grad"] else 1
        assert set(r["loops"]) == ({"stats", "grad", "fill"} if r["grad"] else {"stats"}), r
        assert r["bytes_read_per_row"] == passes * 2 * r["V"] * item, r
        assert r["bytes_written_per_row"] == (r["V"] * item if r["grad"] else 0), r


def test_the_check_sees_scalar_loads(tmp_path):
    """The PTX reading is not vacuous: a label-dependent load mask, the old pattern, compiles to 16-bit loads."""
    (tmp_path / "scalar_kernel.py").write_text(textwrap.dedent('''
        import sys
        sys.path.insert(0, sys.argv[1])
        import kernel_report as K
        import json, torch, triton
        import triton.language as tl

        @triton.jit
        def masked_sum(x_ptr, out_ptr, y, V, BLOCK: tl.constexpr):
            acc = tl.zeros([], tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                acc += tl.sum(tl.load(x_ptr + offs, mask=(offs < V) & (offs != y), other=0.0).to(tl.float32))
            tl.store(out_ptr, acc)

        x = torch.zeros(4096, dtype=torch.bfloat16)
        compiled, _ = K.compile_launch(masked_sum, (x, torch.zeros(1), 5, 4096), dict(BLOCK=2048, num_warps=8), 90)
        print(json.dumps(K.ptx_loops(compiled.asm["ptx"])))
    '''))
    proc = subprocess.run([sys.executable, str(tmp_path / "scalar_kernel.py"), str(REPORT.parent)], cwd=tmp_path,
                          env=_compiler_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loops = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(loops) == 1 and loops[0]["loads"] and max(loops[0]["loads"]) == 16, loops
