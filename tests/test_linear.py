"""nontarget_kl_linear_loss against the logits path: nontarget_kl_loss on the materialised logits.

Float64 comparisons run on odd shapes with small chunks (several chunks and a ragged tail). The Triton backend runs
through Triton's interpreter on CPU (tests/conftest.py), so its shapes stay tiny. The memory test runs the real
thing at N = 16384, V = 32768 in a subprocess and reads the process's peak resident memory.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kl_nontarget.ops.linear_loss import CPU_CHUNK_BYTES, default_chunk_size, nontarget_kl_linear_loss
from kl_nontarget.ops.logits_loss import nontarget_kl_loss

GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def head(x, w, b=None, logit_scale=1.0, softcap=None):
    """The logits the fused loss stands for, materialised through autograd."""
    z = torch.nn.functional.linear(x, w, b) * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def make(shape=(3, 7), d=5, vocab=37, dtype=torch.float64, *, bias=False, ref_weight=False, ignore_frac=0.3,
         seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = dict(inputs=dict(
        hidden=torch.randn(*shape, d, generator=gen).to(dtype),
        ref_hidden=torch.randn(*shape, d, generator=gen).to(dtype),
        weight=(torch.randn(vocab, d, generator=gen) * 0.8).to(dtype),
    ))
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = -100
    t["labels"] = labels
    t["bias"] = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    t["ref_weight"] = (torch.randn(vocab, d, generator=gen) * 0.8).to(dtype) if ref_weight else None
    t["grad_out"] = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    return t


def both_paths(t, *, grad_out=None, w_grad=True, h_grad=True, logit_scale=1.0, softcap=None, chunk_size=None,
               backend="torch", **kw):
    """(loss, ce, kl, grads) of the fused loss and of the logits path; grads = (hidden, weight, bias)."""
    results = []
    for fused in (True, False):
        h = t["inputs"]["hidden"].clone().requires_grad_(h_grad)
        w = t["inputs"]["weight"].clone().requires_grad_(w_grad)
        b = t["bias"].clone().requires_grad_() if t["bias"] is not None else None
        rh = t["inputs"]["ref_hidden"]
        rw = t["ref_weight"]
        if fused:
            loss, ce, kl = nontarget_kl_linear_loss(h, rh, w, t["labels"], bias=b, ref_weight=rw,
                                                    logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size,
                                                    backend=backend, return_components=True, **kw)
        else:
            z = head(h, w, b, logit_scale, softcap)
            with torch.no_grad():
                zb = head(rh, rw if rw is not None else w, b, logit_scale, softcap)
            loss, ce, kl = nontarget_kl_loss(z, zb, t["labels"], backend=backend, return_components=True, **kw)
        if grad_out is None:
            (loss.sum() if loss.dim() else loss).backward()
        else:
            loss.backward(grad_out.to(loss.dtype) if loss.dim() else torch.tensor(grad_out, dtype=loss.dtype))
        grads = (h.grad, w.grad, None if b is None else b.grad)
        results.append((loss.detach(), ce, kl, grads))
    return results


def assert_match(fused, logits, *, dtype, loss_rtol=1e-10, loss_atol=1e-12):
    for name, got, want in zip(("loss", "ce", "kl"), fused[:3], logits[:3]):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=loss_rtol, atol=loss_atol, msg=f"{name} differs")
    for name, got, want in zip(("hidden", "weight", "bias"), fused[3], logits[3]):
        assert (got is None) == (want is None), f"grad of {name}: {got is None} vs {want is None}"
        if got is None:
            continue
        assert got.dtype == want.dtype, f"grad of {name} dtype"
        scale = want.double().abs().max().item() or 1.0
        err = (got.double() - want.double()).abs().max().item()
        assert err <= GRAD_RTOL[dtype] * scale + 1e-12, f"grad of {name}: error {err:.3g}, max |grad| {scale:.3g}"


FLOAT64_CASES = {
    "plain": dict(),
    "bias": dict(bias=True),
    "scale": dict(logit_scale=0.37),
    "softcap": dict(softcap=2.5, logit_scale=1.7),
    "ref_weight": dict(ref_weight=True, bias=True),
    "temperature": dict(temperature=2.0, kl_weight=0.3),
    "reverse": dict(kl_direction="reverse", temperature=0.7, softcap=4.0),
    "sum": dict(reduction="sum", bias=True),
    "none": dict(reduction="none", bias=True, softcap=3.0),
    "none_hidden_only": dict(reduction="none", w_grad=False),
    "num_items": dict(num_items_in_batch=40),
    "num_items_tensor": dict(num_items_in_batch=torch.tensor(9)),
    "kl_weight_0": dict(kl_weight=0.0),
    "weight_only": dict(h_grad=False, bias=True),
    "hidden_only": dict(w_grad=False, ref_weight=True),
    "one_chunk": dict(chunk_size=1000),
    "chunk_1": dict(chunk_size=1, kl_direction="reverse"),
}


@pytest.mark.parametrize("case", list(FLOAT64_CASES))
@pytest.mark.parametrize("grad_out", ["ones", "random"])
def test_float64_matches_logits_path(case, grad_out):
    kw = dict(FLOAT64_CASES[case])
    t = make(bias=kw.pop("bias", False), ref_weight=kw.pop("ref_weight", False), seed=len(case))
    kw.setdefault("chunk_size", 4)
    reduction = kw.get("reduction", "mean")
    g = None
    if grad_out == "random":
        g = t["grad_out"] if reduction == "none" else 1.7
    fused, logits = both_paths(t, grad_out=g, **kw)
    assert_match(fused, logits, dtype=torch.float64)
    if reduction == "none":
        assert fused[0].shape == t["labels"].shape


@pytest.mark.parametrize("shape, d, vocab", [((1,), 1, 2), ((2, 3, 4), 3, 11), ((50,), 8, 129), ((5, 1), 16, 3)])
def test_odd_shapes(shape, d, vocab):
    t = make(shape, d, vocab, bias=True, seed=vocab)
    fused, logits = both_paths(t, chunk_size=3, softcap=5.0, temperature=1.3)
    assert_match(fused, logits, dtype=torch.float64)


TRITON_CASES = {
    "plain": dict(),
    "reverse_temperature": dict(kl_direction="reverse", temperature=1.5, softcap=3.0),
    "bias_scale_sum": dict(bias=True, logit_scale=0.5, reduction="sum", ref_weight=True),
    "none": dict(reduction="none", bias=True),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_backend_matches_logits_path(case):
    kw = dict(TRITON_CASES[case])
    t = make((2, 5), 6, 40, torch.float32, bias=kw.pop("bias", False), ref_weight=kw.pop("ref_weight", False), seed=7)
    g = t["grad_out"] if kw.get("reduction") == "none" else 0.5
    fused, logits = both_paths(t, grad_out=g, backend="triton", chunk_size=3, **kw)
    assert_match(fused, logits, dtype=torch.float32, loss_rtol=1e-5, loss_atol=1e-6)


def test_triton_and_torch_backends_agree():
    t = make((3, 4), 6, 33, torch.float32, bias=True, seed=3)
    (tri, _), (tor, _) = (both_paths(t, backend=b, chunk_size=5, softcap=2.0, kl_direction="reverse")
                          for b in ("triton", "torch"))
    assert_match(tri, tor, dtype=torch.float32, loss_rtol=1e-5, loss_atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_low_precision_matches_logits_path(dtype, softcap):
    t = make((4, 9), 32, 300, dtype, bias=True, seed=11)
    fused, logits = both_paths(t, chunk_size=7, softcap=softcap, temperature=1.5, kl_weight=0.5)
    assert fused[0].dtype == torch.float32
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_match(fused, logits, dtype=dtype, loss_rtol=rtol, loss_atol=rtol)
    # and both are close to the float64 truth
    t64 = dict(t, inputs={k: v.double() for k, v in t["inputs"].items()}, bias=t["bias"].double())
    truth, _ = both_paths(t64, chunk_size=7, softcap=softcap, temperature=1.5, kl_weight=0.5)
    torch.testing.assert_close(fused[0].double(), truth[0], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_non_finite_hidden_states_make_their_rows_nan(backend, direction):
    # The fused path hands each chunk to the same row functions: NaN/+inf logits give NaN rows, -inf masks.
    t = make((7,), 5, 37, torch.float32, ignore_frac=0.0, seed=5)
    h, rh, w, y = t["inputs"]["hidden"], t["inputs"]["ref_hidden"], t["inputs"]["weight"], t["labels"]
    rh[0, 1] = float("nan")
    h[1, 2] = float("nan")
    rh[2, 0] = float("inf")  # +-inf logits, +inf among them
    h[6] = float("nan")
    y[6] = -100              # ignored: contributes nothing
    kw = dict(kl_direction=direction, backend=backend, chunk_size=3)
    hh = h.clone().requires_grad_()
    loss, ce, kl = nontarget_kl_linear_loss(hh, rh, w, y, reduction="none", return_components=True, **kw)
    for v in (loss, ce, kl):
        assert torch.isnan(v[:3]).all() and torch.isfinite(v[3:]).all() and v[6] == 0, v
    assert torch.isnan(nontarget_kl_linear_loss(h, rh, w, y, **kw))
    # Without the poisoned supervised rows the loss is finite, and so are the gradients.
    y[:3] = -100
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    loss = nontarget_kl_linear_loss(hh, rh, ww, y, **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocabulary_masked_by_a_minus_inf_bias(backend):
    # A padded head: -inf bias entries mask those tokens in both models; the gradients stay finite and exact.
    t = make((3, 4), 6, 40, torch.float32, bias=True, ignore_frac=0.0, seed=9)
    t["bias"][30:] = float("-inf")
    t["labels"] = t["labels"] % 30
    fused, logits = both_paths(t, backend=backend, chunk_size=5, kl_direction="reverse", temperature=1.3)
    for g in fused[3]:
        assert torch.isfinite(g).all()
    assert (fused[3][2][30:] == 0).all()
    assert_match(fused, logits, dtype=torch.float32, loss_rtol=1e-5, loss_atol=1e-6)


def test_default_chunk_size_and_no_grad_path():
    t = make((4, 6), 7, 50, bias=True, seed=5)
    fused, logits = both_paths(t, softcap=3.0)  # chunk_size from the budget
    assert_match(fused, logits, dtype=torch.float64)
    with torch.no_grad():
        loss = nontarget_kl_linear_loss(t["inputs"]["hidden"].clone().requires_grad_(), t["inputs"]["ref_hidden"],
                                        t["inputs"]["weight"], t["labels"], bias=t["bias"], softcap=3.0,
                                        chunk_size=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, fused[0], rtol=1e-12, atol=1e-12)
    frozen = nontarget_kl_linear_loss(t["inputs"]["hidden"], t["inputs"]["ref_hidden"], t["inputs"]["weight"],
                                      t["labels"], bias=t["bias"], softcap=3.0)
    assert not frozen.requires_grad
    torch.testing.assert_close(frozen, fused[0], rtol=1e-12, atol=1e-12)


def test_default_chunk_size_budget():
    cpu = torch.device("cpu")
    assert default_chunk_size(10, 32768, torch.float32, cpu) == 10
    rows = default_chunk_size(10**6, 32768, torch.float32, cpu)
    assert rows * 32768 * 12 <= CPU_CHUNK_BYTES and rows % 64 == 0
    # even chunks (multiples of 8): 400 rows of a 49152 vocabulary in chunks of 136, not 192 + 192 + 16
    assert default_chunk_size(400, 49152, torch.float32, cpu) == 136
    assert default_chunk_size(600, 1000, torch.float32, cpu, budget_bytes=12000 * 200) == 152
    assert default_chunk_size(10**6, 10**9, torch.float32, cpu) == 1
    assert default_chunk_size(10**6, 1000, torch.bfloat16, cpu, budget_bytes=6000 * 64) == 64
    assert default_chunk_size(0, 1000, torch.float32, cpu) == 1


def test_every_label_ignored():
    t = make((2, 3), 4, 9, bias=True, ignore_frac=1.1)
    fused, logits = both_paths(t, chunk_size=2)
    assert fused[0].item() == 0.0
    for g in fused[3]:
        assert torch.count_nonzero(g) == 0
    assert_match(fused, logits, dtype=torch.float64)


def test_ignored_rows_get_zero_gradient_and_custom_ignore_index():
    t = make((12,), 4, 9, ignore_frac=0.0, seed=2)
    t["labels"][::3] = 5
    fused, logits = both_paths(t, chunk_size=4, ignore_index=5, reduction="none")
    assert_match(fused, logits, dtype=torch.float64)
    assert torch.count_nonzero(fused[3][0][::3]) == 0
    assert torch.count_nonzero(fused[0][::3]) == 0


def test_reference_inputs_get_no_gradient():
    t = make(bias=False, ref_weight=True)
    rh = t["inputs"]["ref_hidden"].clone().requires_grad_()
    rw = t["ref_weight"].clone().requires_grad_()
    h = t["inputs"]["hidden"].clone().requires_grad_()
    nontarget_kl_linear_loss(h, rh, t["inputs"]["weight"], t["labels"], ref_weight=rw).backward()
    assert rh.grad is None and rw.grad is None and h.grad is not None


def test_backward_twice_with_retained_graph():
    t = make(bias=True)
    h = t["inputs"]["hidden"].clone().requires_grad_()
    w = t["inputs"]["weight"].clone().requires_grad_()
    loss = nontarget_kl_linear_loss(h, t["inputs"]["ref_hidden"], w, t["labels"], chunk_size=4)
    (2 * loss).backward(retain_graph=True)
    first = h.grad.clone(), w.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 1.5 * first[0])
    torch.testing.assert_close(w.grad, 1.5 * first[1])
    with pytest.raises(RuntimeError):
        loss.backward()


def test_autocast_does_not_change_the_computation():
    t = make((3, 5), 8, 40, torch.float32, bias=True)
    args = (t["inputs"]["hidden"], t["inputs"]["ref_hidden"], t["inputs"]["weight"], t["labels"])
    plain = nontarget_kl_linear_loss(*args, bias=t["bias"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = nontarget_kl_linear_loss(*args, bias=t["bias"])
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain)


def test_label_out_of_range():
    t = make()
    t["labels"][0, 0] = 37
    with pytest.raises(ValueError, match="out of range"):
        nontarget_kl_linear_loss(t["inputs"]["hidden"], t["inputs"]["ref_hidden"], t["inputs"]["weight"],
                                 t["labels"])


def _bad(name):
    t = make((2, 3), 4, 9, torch.float32)
    kw = dict(t["inputs"], labels=t["labels"])
    return {
        "hidden_int": (dict(kw, hidden=kw["hidden"].long()), TypeError, "floating-point"),
        "hidden_list": (dict(kw, hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
        "ref_dtype": (dict(kw, ref_hidden=kw["ref_hidden"].double()), TypeError, "ref_hidden dtype"),
        "weight_dtype": (dict(kw, weight=kw["weight"].bfloat16()), TypeError, "weight dtype"),
        "bias_dtype": (dict(kw, bias=torch.zeros(9, dtype=torch.float64)), TypeError, "bias dtype"),
        "labels_float": (dict(kw, labels=kw["labels"].float()), TypeError, "integer"),
        "weight_1d": (dict(kw, weight=kw["weight"][0]), ValueError, "vocab_size, hidden_size"),
        "hidden_size": (dict(kw, weight=kw["weight"][:, :3]), ValueError, "hidden size 3"),
        "ref_shape": (dict(kw, ref_hidden=kw["ref_hidden"][:1]), ValueError, "ref_hidden shape"),
        "labels_shape": (dict(kw, labels=kw["labels"][:, :2]), ValueError, "labels shape"),
        "ref_weight_shape": (dict(kw, ref_weight=kw["weight"][:5]), ValueError, "ref_weight shape"),
        "bias_shape": (dict(kw, bias=torch.zeros(8)), ValueError, "bias must have shape"),
        "device": (dict(kw, ref_hidden=kw["ref_hidden"].to("meta")), ValueError, "one device"),
        "logit_scale": (dict(kw, logit_scale=0.0), ValueError, "logit_scale"),
        "softcap": (dict(kw, softcap=float("inf")), ValueError, "softcap"),
        "chunk_size": (dict(kw, chunk_size=0), ValueError, "chunk_size"),
        "reduction": (dict(kw, reduction="avg"), ValueError, "reduction"),
        "direction": (dict(kw, kl_direction="both"), ValueError, "kl_direction"),
        "temperature": (dict(kw, temperature=0), ValueError, "temperature"),
        "kl_weight": (dict(kw, kl_weight=-1.0), ValueError, "kl_weight"),
        "backend": (dict(kw, backend="cuda"), ValueError, "backend"),
    }[name]


@pytest.mark.parametrize("name", ["hidden_int", "hidden_list", "ref_dtype", "weight_dtype", "bias_dtype",
                                  "labels_float", "weight_1d", "hidden_size", "ref_shape", "labels_shape",
                                  "ref_weight_shape", "bias_shape", "device", "logit_scale", "softcap", "chunk_size",
                                  "reduction", "direction", "temperature", "kl_weight", "backend"])
def test_bad_inputs(name):
    kw, error, match = _bad(name)
    with pytest.raises(error, match=match):
        nontarget_kl_linear_loss(kw.pop("hidden"), kw.pop("ref_hidden"), kw.pop("weight"), kw.pop("labels"), **kw)


# ---- memory ----------------------------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent("""
    import ctypes, json, resource, sys
    import torch
    torch.set_num_threads(2)
    from kl_nontarget.ops.linear_loss import nontarget_kl_linear_loss

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return None

    n, v, d = (int(x) for x in sys.argv[1:4])
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    ref_hidden = torch.randn(n, d, generator=gen)
    weight = (torch.randn(v, d, generator=gen) * 0.1).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    # Warm up on a few tokens so one-time allocations (thread pools, kernels) are not counted.
    nontarget_kl_linear_loss(hidden[:8], ref_hidden[:8], weight, labels[:8]).backward()
    hidden.grad = weight.grad = None
    try:  # hand freed heap memory back, so that a later peak cannot hide in it
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # reset the peak (VmHWM) to the current resident size; Linux >= 4.0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss"
    base = status("VmRSS:")
    loss = nontarget_kl_linear_loss(hidden, ref_hidden, weight, labels, kl_weight=0.5)
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None and torch.isfinite(loss)
    peak = status("VmHWM:") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra": peak - base, "method": method}))
""")


def _peak_extra(n, v, d):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(n), str(v), str(d)], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_does_not_grow_with_tokens():
    v, d = 32768, 64
    small = _peak_extra(2048, v, d)
    big = _peak_extra(16384, v, d)
    logits_bytes = 16384 * v * 4  # one float32 logits tensor at N = 16384: 2 GiB
    mib = 2**20
    report = f"extra peak: {small['extra'] / mib:.0f} MiB at N=2048, {big['extra'] / mib:.0f} MiB at N=16384"
    assert big["extra"] < logits_bytes / 8, report
    # The inputs' own gradients (N x d) grow with N: 3.5 MiB here; allow allocator noise on top.
    assert big["extra"] <= small["extra"] + 32 * mib, report
    print(report)


# ---- GPU -------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_logits_path(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 1000, 256, 50257
    h = torch.randn(n, d, device="cuda", generator=gen, dtype=dtype).requires_grad_()
    rh = torch.randn(n, d, device="cuda", generator=gen, dtype=dtype)
    w = (torch.randn(v, d, device="cuda", generator=gen) * 0.05).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
    labels[::7] = -100
    loss = nontarget_kl_linear_loss(h, rh, w, labels, softcap=30.0, chunk_size=256)
    loss.backward()
    gh, gw = h.grad, w.grad
    h.grad = w.grad = None
    ref = nontarget_kl_loss(head(h, w, softcap=30.0), head(rh, w, softcap=30.0).detach(), labels)
    ref.backward()
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, ref, rtol=rtol, atol=rtol)
    for got, want in ((gh, h.grad), (gw, w.grad)):
        err = (got.float() - want.float()).abs().max().item()
        assert err <= 5 * rtol * want.float().abs().max().item()
