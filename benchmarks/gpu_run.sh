#!/usr/bin/env bash
# One call on a GPU machine: the gpu-marked tests, the kernel benchmark grid and a training-step benchmark.
#
#   OUT=/path/to/results bash benchmarks/gpu_run.sh      # everything lands under $OUT (default: ./gpu-out)
#
# Needs only what the CUDA image has: torch, triton, transformers, peft (no trl, datasets or liger-kernel; no
# internet). Wheels carried in the git-ignored folder .whl/ (see benchmarks/README.md, "GPU run") are installed
# into a scratch folder first, never into the image's environment. The repository is not pip-installed either: a
# scratch copy of the package, with kernels/ placed where it ships (kl_nontarget.kernels), goes on PYTHONPATH.
#
# Each step has its own time limit (together under 9 minutes) and its log under $OUT; a failed step is recorded in
# $OUT/summary.txt and the next one still runs. Exit status: 0 when every step passed, 1 otherwise, 2 when there is
# no CUDA device (nothing is run).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-out}"
PY="${PYTHON:-python3}"
# Ceilings in seconds per step (tests, kernel grid at N=4096 and N=16384, training step, block-size check, ZeRO-3
# Trainer): 60 + 120 + 150 + 90 + 30 + 60 = 510, plus set-up, under 9 minutes. torch.compile once per shape is most
# of the grid's time.
T_TESTS="${T_TESTS:-60}"
T_KERNEL_SMALL="${T_KERNEL_SMALL:-120}"
T_KERNEL_LARGE="${T_KERNEL_LARGE:-150}"
T_STEP="${T_STEP:-90}"
T_BLOCK="${T_BLOCK:-30}"
# NonTargetKLTrainer under DeepSpeed ZeRO-3 on one GPU (only where deepspeed imports: a carried wheel).
T_ZERO3="${T_ZERO3:-60}"
# IMPLS="kl_nontarget_triton eager" runs a subset of bench_kernel.py's implementations (default: all of them).
IMPLS="${IMPLS:-}"

mkdir -p "$OUT" || { echo "gpu_run.sh: cannot create OUT=$OUT" >&2; exit 2; }
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# One interpreter start: prints the torch version and fails without a CUDA device (or without torch).
if ! TORCH_INFO="$("$PY" -c "import torch, sys; print('torch', torch.__version__); \
        sys.exit(0 if torch.cuda.is_available() else 1)" 2>"$OUT/cuda-check.txt")"; then
    note "gpu_run.sh: no CUDA device visible to torch (${TORCH_INFO:-torch not importable}): this script only runs \
on a GPU machine. Nothing was run."
    exit 2
fi

# Scratch space: the package as it ships, and any carried wheels.
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cp -r "$ROOT/kl_nontarget" "$STAGE/kl_nontarget"
rm -rf "$STAGE/kl_nontarget/kernels"
cp -r "$ROOT/kernels" "$STAGE/kl_nontarget/kernels"
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    if "$PY" -m pip install --quiet --no-index --no-deps --target "$STAGE/wheels" "$ROOT"/.whl/*.whl \
            > "$OUT/wheels.txt" 2>&1; then
        note "installed carried wheels: $(cd "$ROOT/.whl" && ls *.whl | tr '\n' ' ')"
    else
        note "could not install the carried wheels (see wheels.txt); going on without them"
    fi
fi
export PYTHONPATH="$STAGE:$STAGE/wheels${PYTHONPATH:+:$PYTHONPATH}"
# Compile the kernels for real: tests/conftest.py only switches the interpreter on where this is unset.
export TRITON_INTERPRET=0

"$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import importlib, platform, torch
print("device:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("triton", "transformers", "peft", "accelerate", "trl", "datasets", "liger_kernel", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:
        print(name, "missing:", type(err).__name__)
import kl_nontarget.kernels.nontarget_ce as k
print("kl_nontarget kernels from", k.__file__)
EOF
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
note "$(head -2 "$OUT/environment.txt" | tr '\n' ' ')"

FAILED=0
step() {  # step NAME SECONDS command...
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        note "$name: ok ($((SECONDS - t0)) s)"
    else
        FAILED=1
        note "$name: FAILED rc=$rc ($((SECONDS - t0)) s, limit $limit s); last lines of $name.log:"
        tail -5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY" > /dev/null
    fi
}

# 1. gpu-marked tests (pytest must be importable: the image or a carried wheel). Run from the scratch folder so
#    that the source tree's kl_nontarget/ (which lacks kernels/) does not shadow the staged package.
if "$PY" -c "import pytest" 2>/dev/null; then
    step gpu-tests "$T_TESTS" bash -c "cd '$STAGE' && '$PY' -m pytest -q -m gpu -p no:cacheprovider \
        --junitxml='$OUT/gpu-tests.xml' '$ROOT/tests/test_loss.py' '$ROOT/tests/test_linear.py'"
else
    FAILED=1
    note "gpu-tests: SKIPPED, pytest is not installed (carry its wheel in .whl/, see benchmarks/README.md)"
fi

# 2. kernel grid: bf16, V = 32000 / 128256 / 151936, N = 4096 and 16384 (every implementation that imports). One
#    call per N, each merging its rows into results.json, so a time-out loses one half, not the grid.
step bench-kernel-n4096 "$T_KERNEL_SMALL" "$PY" "$ROOT/benchmarks/bench_kernel.py" --device cuda --dtype bf16 \
    --N 4096 --V 32000 128256 151936 ${IMPLS:+--impls $IMPLS} --out "$OUT/results.json"
step bench-kernel-n16384 "$T_KERNEL_LARGE" "$PY" "$ROOT/benchmarks/bench_kernel.py" --device cuda --dtype bf16 \
    --N 16384 --V 32000 128256 151936 ${IMPLS:+--impls $IMPLS} --out "$OUT/results.json"

# 2b. the block-size choice (4096 entries; 8192 took more registers): the kernel alone at the target shape with the
#     old 16-bit cap, into its own file (same row identity as the grid's).
step bench-kernel-block8192 "$T_BLOCK" "$PY" "$ROOT/benchmarks/bench_kernel.py" --device cuda --dtype bf16 \
    --N 16384 --V 128256 --impls kl_nontarget_triton --block 8192 --out "$OUT/block-8192.json"

# 3. one LoRA training step, plain SFT vs SFT + non-target KL (trl harness where trl imports, else transformers).
step bench-step "$T_STEP" "$PY" "$ROOT/benchmarks/bench_step.py" --device cuda --harness auto --out "$OUT/results.json"

# 4. the Trainer under accelerate's DeepSpeed plugin, ZeRO-3 on 1 GPU: the script the CPU tests run on 2 gloo ranks
#    (tests/distributed/ddp_train.py --zero 3); it records that a DeepSpeedEngine trained with the head partitioned.
if "$PY" -c "import deepspeed, trl, datasets" 2>/dev/null; then
    step zero3-trainer "$T_ZERO3" bash -c "cd '$STAGE' && '$PY' -m torch.distributed.run --nproc_per_node 1 \
        '$ROOT/tests/distributed/ddp_train.py' '$OUT/zero3' --batch 4 --zero 3 --device cuda \
        && '$PY' -c \"import json, sys; z = json.load(open(sys.argv[1]))['zero']; print(z); \
sys.exit(0 if z['engine'] == 'DeepSpeedEngine' and z['head_partitioned'] and z['gathers'] == 3 else 1)\" \
        '$OUT/zero3/logs_rank0.json'"
else
    note "zero3-trainer: SKIPPED, deepspeed, trl or datasets is not importable (carry their wheels in .whl/)"
fi

note "results under $OUT; copy results.json to benchmarks/results/<device-slug>.json with the README tables"
exit $FAILED
