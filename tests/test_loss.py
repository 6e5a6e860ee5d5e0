"""nontarget_kl_loss on both backends against the float64 reference (tests/oracle.py).

The Triton backend runs on CPU tensors through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so its shapes stay small; GPU-marked tests compile it for real and skip without CUDA.
"""

import math

import pytest
import torch

from kl_nontarget import NonTargetKLLoss, nontarget_kl_loss
from kl_nontarget.ops import triton_rows

from oracle import loss_reference

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance of the gradient, set by the dtype it is stored in.
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(shape, vocab, dtype=torch.float32, scale=3.0, ignore_frac=0.25, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    ref = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = -100
    return logits, ref, labels


def run_loss(logits, ref, labels, **kw):
    """Loss, components and gradient of our implementation."""
    z = logits.clone().requires_grad_()
    loss, ce, kl = nontarget_kl_loss(z, ref, labels, return_components=True, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), ce, kl, z.grad


def run_reference(logits, ref, labels, **kw):
    kw.pop("backend", None)
    z = logits.double().requires_grad_()
    loss, ce, kl = loss_reference(z, ref.double(), labels, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), ce.detach(), kl.detach(), z.grad


def assert_close_to_reference(logits, ref, labels, *, loss_rtol=2e-5, loss_atol=1e-5, **kw):
    loss, ce, kl, grad = run_loss(logits, ref, labels, **kw)
    r_loss, r_ce, r_kl, r_grad = run_reference(logits, ref, labels, **kw)
    for name, got, want in (("loss", loss, r_loss), ("ce", ce, r_ce), ("kl", kl, r_kl)):
        assert not torch.isnan(got).any(), f"{name} has NaN"
        torch.testing.assert_close(got.double(), want, rtol=loss_rtol, atol=loss_atol, msg=f"{name} differs")
    assert grad.dtype == logits.dtype
    assert torch.isfinite(grad).all(), "gradient has NaN or inf"
    scale = r_grad.abs().max().item() or 1.0
    err = (grad.double() - r_grad).abs().max().item()
    assert err <= GRAD_RTOL[logits.dtype] * scale + 1e-7, f"gradient error {err:.3g} (max |grad| {scale:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_random_inputs_match_reference(backend, dtype, direction):
    logits, ref, labels = make_inputs((9,), 67, dtype)
    assert_close_to_reference(logits, ref, labels, kl_weight=0.7, kl_direction=direction, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_temperature(backend, temperature, direction):
    logits, ref, labels = make_inputs((6,), 45)
    assert_close_to_reference(logits, ref, labels, kl_weight=1.3, temperature=temperature, kl_direction=direction,
                              backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_3d_inputs(backend, reduction):
    logits, ref, labels = make_inputs((2, 5), 33)
    assert_close_to_reference(logits, ref, labels, reduction=reduction, kl_weight=0.5, backend=backend)
    loss = nontarget_kl_loss(logits, ref, labels, reduction=reduction, backend=backend)
    assert loss.shape == (labels.shape if reduction == "none" else ())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(backend, as_tensor):
    logits, ref, labels = make_inputs((8,), 29)
    n = 21  # more tokens than this micro-batch holds, as under gradient accumulation
    d = torch.tensor(n) if as_tensor else n
    assert_close_to_reference(logits, ref, labels, num_items_in_batch=d, backend=backend)
    valid = int((labels != -100).sum())
    by_count = nontarget_kl_loss(logits, ref, labels, backend=backend)
    by_items = nontarget_kl_loss(logits, ref, labels, num_items_in_batch=d, backend=backend)
    torch.testing.assert_close(by_items * n, by_count * valid, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiple_blocks_with_ragged_tail(backend, monkeypatch):
    # Force a vocabulary block much smaller than V, not dividing it, so the online max/sum crosses many blocks.
    monkeypatch.setattr(triton_rows, "default_block_size", lambda v, dtype: 16)
    for vocab in (17, 50, 103):
        logits, ref, labels = make_inputs((5,), vocab, scale=6.0)
        assert_close_to_reference(logits, ref, labels, kl_weight=2.0, backend=backend)
        assert_close_to_reference(logits, ref, labels, kl_weight=2.0, temperature=1.7, kl_direction="reverse",
                                  backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits(backend, dtype):
    logits, ref, labels = make_inputs((6,), 40, dtype, scale=1.0)
    signs = torch.randint(0, 2, logits.shape) * 2 - 1
    logits = (signs * 1e4 + torch.randn(logits.shape)).to(dtype)
    ref = (torch.randint(0, 2, ref.shape) * 2e4 - 1e4).to(dtype)
    # Huge values give huge losses; compare relatively.
    assert_close_to_reference(logits, ref, labels, kl_weight=0.3, backend=backend, loss_rtol=1e-5, loss_atol=1e-3)
    assert_close_to_reference(logits, ref, labels, kl_weight=0.3, kl_direction="reverse", backend=backend,
                              loss_rtol=1e-5, loss_atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gold_token_holds_all_the_mass(backend):
    logits, ref, labels = make_inputs((6,), 31, scale=1.0, ignore_frac=0.0)
    rows = torch.arange(6)
    logits[rows, labels] = 60.0  # softmax(z)_y rounds to 1 in float32
    ref[rows, labels] = 80.0
    assert_close_to_reference(logits, ref, labels, kl_weight=1.0, backend=backend)
    _, ce, kl, grad = run_loss(logits, ref, labels, backend=backend)
    # The non-target distributions stay exact: KL between two well-defined distributions, not 0/0.
    assert kl.item() > 0.01
    assert (grad[rows, labels] < 0).all() and (grad[rows, labels] > -1e-20).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_padded_vocabulary_at_minus_inf(backend, direction):
    logits, ref, labels = make_inputs((7,), 40, ignore_frac=0.0)
    labels = labels % 30
    logits[:, 30:] = float("-inf")
    ref[:, 30:] = float("-inf")
    assert_close_to_reference(logits, ref, labels, kl_weight=0.8, kl_direction=direction, backend=backend)
    _, _, _, grad = run_loss(logits, ref, labels, backend=backend, kl_direction=direction)
    assert (grad[:, 30:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_with_only_the_gold_entry_finite(backend):
    logits, ref, labels = make_inputs((3,), 12, ignore_frac=0.0)
    logits[0] = float("-inf")
    ref[0] = float("-inf")
    logits[0, labels[0]] = 1.0
    ref[0, labels[0]] = 2.0
    loss, ce, kl, grad = run_loss(logits, ref, labels, backend=backend, reduction="none")
    assert kl[0] == 0 and ce[0] == 0 and (grad[0] == 0).all()
    assert_close_to_reference(logits, ref, labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_label_ignored(backend):
    logits, ref, labels = make_inputs((4, 3), 21)
    labels[:] = -100
    loss, ce, kl, grad = run_loss(logits, ref, labels, backend=backend)
    assert loss.item() == 0 and ce.item() == 0 and kl.item() == 0
    assert (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row(backend):
    logits, ref, labels = make_inputs((1,), 19, ignore_frac=0.0)
    assert_close_to_reference(logits, ref, labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_kl_when_models_agree(backend):
    logits, _, labels = make_inputs((5,), 23)
    ref = logits.clone()
    ref[torch.arange(5), labels.clamp_min(0)] += 5.0  # the gold entry does not enter the non-target KL
    _, _, kl, _ = run_loss(logits, ref, labels, backend=backend)
    assert abs(kl.item()) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_gradient_leaves_gold_logit_alone(backend):
    logits, ref, labels = make_inputs((6,), 30, ignore_frac=0.0)
    _, _, _, g_ce = run_loss(logits, ref, labels, backend=backend, kl_weight=0.0)
    _, _, _, g_both = run_loss(logits, ref, labels, backend=backend, kl_weight=5.0)
    rows = torch.arange(6)
    torch.testing.assert_close(g_both[rows, labels], g_ce[rows, labels], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.4])
def test_inputs_are_left_unchanged(backend, dtype, ignore_frac):
    # The torch backend works in place on its chunk copies (and on the fused path's own temporaries): the caller's
    # logits must come back untouched, with every row supervised (slices) and with some ignored (gathered rows).
    logits, ref, labels = make_inputs((9,), 37, dtype=dtype, ignore_frac=ignore_frac, seed=3)
    z, b = logits.clone().requires_grad_(), ref.clone()
    nontarget_kl_loss(z, b, labels, backend=backend, kl_weight=0.7, temperature=1.5).backward()
    assert torch.equal(z.detach(), logits) and torch.equal(b, ref)
    assert z.grad.abs().sum() > 0


def test_backends_agree_without_grad():
    logits, ref, labels = make_inputs((3, 4), 26)
    with torch.no_grad():
        a = nontarget_kl_loss(logits, ref, labels, backend="torch", return_components=True)
        b = nontarget_kl_loss(logits, ref, labels, backend="triton", return_components=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert not a[0].requires_grad


def test_gradcheck_torch_backend_float64():
    logits, ref, labels = make_inputs((4,), 9, torch.float64, ignore_frac=0.2, seed=3)
    for kw in (dict(), dict(kl_direction="reverse", temperature=1.5), dict(reduction="none", kl_weight=2.0)):
        def f(z, kw=kw):
            return nontarget_kl_loss(z, ref, labels, backend="torch", **kw)
        assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_module_wrapper_matches_function():
    logits, ref, labels = make_inputs((5,), 18)
    module = NonTargetKLLoss(kl_weight=0.4, temperature=1.5, backend="torch")
    torch.testing.assert_close(
        module(logits, ref, labels, num_items_in_batch=9),
        nontarget_kl_loss(logits, ref, labels, kl_weight=0.4, temperature=1.5, backend="torch",
                          num_items_in_batch=9))
    assert "kl_weight=0.4" in repr(module)


def test_reference_logits_get_no_gradient():
    logits, ref, labels = make_inputs((4,), 15)
    ref = ref.clone().requires_grad_()
    z = logits.clone().requires_grad_()
    nontarget_kl_loss(z, ref, labels, backend="torch").backward()
    assert ref.grad is None and z.grad is not None


def test_backward_twice_with_retained_graph():
    logits, ref, labels = make_inputs((4,), 15, ignore_frac=0.0)
    z = logits.clone().requires_grad_()
    loss = 2.0 * nontarget_kl_loss(z, ref, labels, backend="torch")
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * first)


def test_scaled_backward():
    logits, ref, labels = make_inputs((6,), 20)
    _, _, _, grad = run_loss(logits, ref, labels, backend="torch")
    z = logits.clone().requires_grad_()
    (3.0 * nontarget_kl_loss(z, ref, labels, backend="torch")).backward()
    torch.testing.assert_close(z.grad, 3.0 * grad)


# ---- non-finite inputs: NaN / +inf make a row NaN, -inf masks, a finite loss has a finite gradient ----------------

NAN, INF = float("nan"), float("inf")
# (tensor, where, value) per supervised row; the last supervised row stays clean.
POISON = [("ref", "other", NAN), ("ref", "gold", NAN), ("logits", "other", NAN), ("logits", "gold", NAN),
          ("ref", "other", INF), ("ref", "gold", INF), ("logits", "other", INF), ("logits", "gold", INF)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_nan_or_plus_inf_in_a_supervised_row_makes_it_nan(backend, dtype, direction):
    check_non_finite_rows(backend, dtype, direction, "cpu")


def check_non_finite_rows(backend, dtype, direction, device):
    rows = len(POISON) + 2
    logits, ref, labels = make_inputs((rows,), 37, dtype, ignore_frac=0.0)
    clean = (logits.clone(), ref.clone())
    for r, (which, where, value) in enumerate(POISON):
        t = ref if which == "ref" else logits
        col = labels[r] if where == "gold" else (labels[r] + 1 + r) % 37
        t[r, col] = value
    labels[-1] = -100  # an ignored row full of NaN contributes nothing
    logits[-1, 3] = NAN
    ref[-1, ::2] = NAN
    kw = dict(kl_weight=0.7, kl_direction=direction, backend=backend, temperature=1.5)
    logits, ref, labels = (t.to(device) for t in (logits, ref, labels))
    loss, ce, kl, grad = run_loss(logits, ref, labels, reduction="none", **kw)
    loss, ce, kl, grad = (t.cpu() for t in (loss, ce, kl, grad))
    bad = len(POISON)
    for t in (loss, ce, kl):
        assert torch.isnan(t[:bad]).all(), t
        assert torch.isfinite(t[bad:]).all() and t[-1] == 0, t
    assert torch.isnan(grad[:bad]).all() and (grad[-1] == 0).all()
    # The clean row is what it is without the poisoned ones.
    r_loss, r_ce, r_kl, r_grad = run_reference(clean[0], clean[1], labels.cpu(), reduction="none", **kw)
    torch.testing.assert_close(loss[bad].double(), r_loss[bad], rtol=2e-5, atol=1e-5)
    assert (grad[bad].double() - r_grad[bad]).abs().max() <= GRAD_RTOL[dtype] * r_grad[bad].abs().max() + 1e-7
    for reduction in ("mean", "sum"):
        assert torch.isnan(nontarget_kl_loss(logits, ref, labels, reduction=reduction, **kw))
        with torch.no_grad():
            assert torch.isnan(nontarget_kl_loss(logits, ref, labels, reduction=reduction, **kw))
    # Only the ignored row is poisoned: the loss is finite and so is its gradient.
    labels[:bad] = -100
    loss, _, _, grad = run_loss(logits, ref, labels, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def _hostile_row(logits, ref, y, kind, gen):
    """Make one row hostile in a way that keeps its loss finite (see the cases of the test below)."""
    v = logits.shape[0]
    some = torch.randperm(v, generator=gen)[: v // 3]
    some = some[some != y]
    if kind == "huge":
        logits.copy_((torch.randint(0, 2, (v,), generator=gen) * 2 - 1) * 1e4 + torch.randn(v, generator=gen))
        ref.copy_((torch.randint(0, 2, (v,), generator=gen) * 2 - 1) * 1e4)
    elif kind == "gold_all_mass":
        logits[y], ref[y] = 90.0, 120.0
    elif kind == "shared_mask":       # a padded vocabulary
        logits[some] = -INF
        ref[some] = -INF
    elif kind == "base_mask":         # base gives 0 where the adapted model does not: forward KL stays finite
        ref[some] = -INF
    elif kind == "adapted_mask":      # the adapted model gives 0 where base does not: reverse KL stays finite
        logits[some] = -INF
    elif kind == "dead_base":         # base has no non-target mass: KL 0 in the forward direction
        ref[torch.arange(v) != y] = -INF
    elif kind == "dead_adapted":      # the adapted model has none: KL 0 in the reverse direction
        logits[torch.arange(v) != y] = -INF
    elif kind == "dead_both":
        logits[torch.arange(v) != y] = -INF
        ref[torch.arange(v) != y] = -INF
    elif kind == "masked_gold":       # base's gold entry is -inf: it takes no part in the KL anyway
        ref[y] = -INF


FINITE_KINDS = {
    "forward": ["plain", "huge", "gold_all_mass", "shared_mask", "base_mask", "dead_base", "dead_both",
                "masked_gold"],
    "reverse": ["plain", "huge", "gold_all_mass", "shared_mask", "adapted_mask", "dead_adapted", "dead_both",
                "masked_gold"],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_finite_loss_has_a_finite_gradient_on_hostile_rows(backend, direction, temperature):
    kinds = FINITE_KINDS[direction]
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    logits, ref, labels = make_inputs((2 * len(kinds),), 29, ignore_frac=0.0, seed=int(gen.initial_seed()))
    for r in range(labels.numel()):
        _hostile_row(logits[r], ref[r], int(labels[r]), kinds[r % len(kinds)], gen)
    kw = dict(kl_weight=0.9, kl_direction=direction, temperature=temperature, backend=backend)
    loss, _, _, grad = run_loss(logits, ref, labels, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close_to_reference(logits, ref, labels, loss_rtol=1e-5, loss_atol=1e-3, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_is_infinite_where_only_the_weighting_distribution_has_mass(backend, direction):
    # Forward KL(base || adapted) with adapted -inf where base has mass (or the reverse case): +inf, never NaN.
    logits, ref, labels = make_inputs((2,), 19, ignore_frac=0.0)
    other = (labels[0] + 1) % 19
    (logits if direction == "forward" else ref)[0, other] = -INF
    _, ce, kl = nontarget_kl_loss(logits, ref, labels, kl_direction=direction, backend=backend, reduction="none",
                                  return_components=True)
    assert kl[0] == INF and torch.isfinite(kl[1]) and torch.isfinite(ce).all()


# ---- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_label", [-1, 20, 1000])
def test_label_out_of_range(backend, bad_label):
    logits, ref, labels = make_inputs((4,), 20)
    labels[1] = bad_label
    with pytest.raises(ValueError, match=f"label {bad_label} is out of range"):
        nontarget_kl_loss(logits, ref, labels, backend=backend)


@pytest.mark.parametrize("change, error, match", [
    (lambda z, b, y: (z, b[:, :-1], y), ValueError, "ref_logits shape"),
    (lambda z, b, y: (z, b, y[:-1]), ValueError, "labels shape"),
    (lambda z, b, y: (z, b.double(), y), TypeError, "dtype"),
    (lambda z, b, y: (z.long(), b.long(), y), TypeError, "floating-point"),
    (lambda z, b, y: (z, b, y.float()), TypeError, "integer"),
    (lambda z, b, y: (z, b.to("meta"), y), ValueError, "one device"),
    (lambda z, b, y: (z.numpy(), b, y), TypeError, "torch.Tensor"),
])
def test_bad_inputs(change, error, match):
    logits, ref, labels = make_inputs((4,), 10)
    z, b, y = change(logits, ref, labels)
    with pytest.raises(error, match=match):
        nontarget_kl_loss(z, b, y, backend="torch")


@pytest.mark.parametrize("kw, match", [
    (dict(reduction="avg"), "reduction"),
    (dict(kl_direction="both"), "kl_direction"),
    (dict(backend="cuda"), "backend"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(kl_weight=-1.0), "kl_weight"),
    (dict(num_items_in_batch=torch.ones(2)), "num_items_in_batch"),
])
def test_bad_options(kw, match):
    logits, ref, labels = make_inputs((4,), 10)
    with pytest.raises(ValueError, match=match):
        nontarget_kl_loss(logits, ref, labels, **kw)


@pytest.mark.parametrize("kw", [dict(kl_weight="1"), dict(kl_weight=True), dict(temperature=None)])
def test_non_numeric_options(kw):
    logits, ref, labels = make_inputs((4,), 10)
    with pytest.raises(TypeError, match="must be a number"):
        nontarget_kl_loss(logits, ref, labels, **kw)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    logits, ref, labels = make_inputs((4,), 10)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        nontarget_kl_loss(logits, ref, labels, backend="triton")


# ---- real GPU ----------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 262144])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gpu_kernel_large_vocab(vocab, dtype, direction):
    logits, ref, labels = make_inputs((16,), vocab, dtype, scale=4.0)
    logits[0, -100:] = float("-inf")
    ref[0, -100:] = float("-inf")
    labels[0] = labels[0] % (vocab - 100) if labels[0] >= 0 else labels[0]
    cu = [t.cuda() for t in (logits, ref, labels)]
    loss, ce, kl, grad = run_loss(*cu, kl_weight=0.5, kl_direction=direction, backend="triton")
    r_loss, r_ce, r_kl, r_grad = run_reference(logits, ref, labels, kl_weight=0.5, kl_direction=direction)
    for got, want in ((loss, r_loss), (ce, r_ce), (kl, r_kl)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-5)
    err = (grad.double().cpu() - r_grad).abs().max().item()
    assert err <= GRAD_RTOL[dtype] * r_grad.abs().max().item() + 1e-7
    print(f"V={vocab} {dtype} {direction}: loss err {abs(loss.item() - r_loss.item()):.3g}, grad err {err:.3g}")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gpu_non_finite_rows(dtype, direction):
    # The compiled kernel's max/exp treat NaN as the hardware does, not as numpy does in the interpreter.
    check_non_finite_rows("triton", dtype, direction, "cuda")
