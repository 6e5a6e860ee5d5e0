"""Row kernel: cross-entropy + non-target KL, loss and gradient in one launch.

One program handles one row (one supervised position) of V logits:

  pass 1  online statistics over vocabulary blocks, gold entry masked:
          max and rescaled exp-sums of the adapted logits z (at T=1 for the cross-entropy, at T for the KL),
          of the base logits b (at T), and the KL's weighted sum E[z - b] riding the same rescaling.
  pass 2  (only when a gradient is wanted) the gradient
              softmax(z) - onehot(y) + kl_weight * T * dKL/dz_T      (gold entry: KL part 0)
          times `grad_scale`, written in the logits' dtype, so the backward has nothing left to do.

Every statistic is float32 whatever the input dtype. The gold entry is masked inside the loop rather than
subtracted afterwards: `1 - p_y` is never formed, so the non-target distributions stay exact even when the gold
token holds all the mass. Maxima are taken on the raw logits and differences `x - max` are formed before the
1/T scaling, so logits of +-1e4 lose nothing to cancellation.

Loads are masked by `offs < V` only and the gold entry is replaced after the load (`tl.where`): a mask that also
depends on the label would stop the compiler from proving a vector of entries all-in or all-out, and every load
would be a scalar one. With a row stride and V divisible by 16 the loops issue 128-bit loads and stores
(`benchmarks/kernel_report.py` checks the compiled code).

Non-finite inputs: `-inf` means "masked" (probability 0). A NaN or `+inf` anywhere in a supervised row of z or b
(the gold entry included) makes that row's cross-entropy and KL NaN and its gradient row NaN. It is detected
without extra work per entry: such an entry turns the row's exp-sums into NaN (exp(NaN), or inf - inf once the max
is +inf), and the gold entries are checked on their own.

The kernel is pure: no torch.autograd, no models. `kl_nontarget.loss` launches it.
"""

import triton
import triton.language as tl


@triton.jit
def _safe(m):
    # A running max is -inf until a finite entry is seen; exp(x - (-inf)) would be NaN, so subtract 0 instead
    # (every x is then -inf as well and exp gives the 0 we want).
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _log1p(x):
    # log(1 + x) without losing x when it is tiny (Goldberg's trick); Triton has no portable log1p.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _fill_row(g_row, V, value: tl.constexpr, BLOCK_V: tl.constexpr):
    # The gradient row of a row with no gradient (ignored: zeros) or no defined loss (non-finite input: NaN).
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(g_row + offs, tl.full([BLOCK_V], value, dtype=g_row.dtype.element_ty), mask=offs < V)


@triton.jit
def nontarget_ce_kernel(
    z_ptr, z_stride,            # adapted logits (N, V), row stride in elements
    b_ptr, b_stride,            # base logits (N, V)
    labels_ptr,                 # (N,) int64
    grad_ptr, grad_stride,      # (N, V) output gradient, same dtype as z (unused when not COMPUTE_GRAD)
    ce_ptr, kl_ptr,             # (N,) float32 outputs: cross-entropy and non-target KL per row (0 when ignored)
    grad_scale_ptr,             # 0-dim float32: the factor the gradient is multiplied by (1/D for a mean)
    V, ignore_index,
    kl_weight, inv_temp, temp,
    REVERSE: tl.constexpr,      # KL(adapted || base) instead of KL(base || adapted)
    SCALED: tl.constexpr,       # temperature != 1: the KL needs its own exp-sum of z
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: N * V may exceed 2^31
    y = tl.load(labels_ptr + row)
    z_row = z_ptr + row * z_stride
    b_row = b_ptr + row * b_stride
    g_row = grad_ptr + row * grad_stride
    NEG_INF: tl.constexpr = float("-inf")

    if y == ignore_index:
        tl.store(ce_ptr + row, 0.0)
        tl.store(kl_ptr + row, 0.0)
        if COMPUTE_GRAD:
            _fill_row(g_row, V, 0.0, BLOCK_V)
    else:
        # ---- pass 1: statistics of the non-target entries -------------------------------------------------
        m_z = tl.full([], NEG_INF, tl.float32)   # max of z over j != y
        s_z1 = tl.zeros([], tl.float32)           # sum exp(z_j - m_z)             (T = 1, cross-entropy)
        s_zt = tl.zeros([], tl.float32)           # sum exp((z_j - m_z) / T)       (KL; equals s_z1 when T == 1)
        m_b = tl.full([], NEG_INF, tl.float32)
        s_bt = tl.zeros([], tl.float32)           # sum exp((b_j - m_b) / T)
        # forward: sum exp((b_j - m_b)/T) (b_j - z_j);  reverse: sum exp((z_j - m_z)/T) (z_j - b_j)
        w = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_row = offs < V
            is_gold = offs == y
            z = tl.load(z_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
            b = tl.load(b_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
            z = tl.where(is_gold, NEG_INF, z)
            b = tl.where(is_gold, NEG_INF, b)

            m_z_new = tl.maximum(m_z, tl.max(z, axis=0))
            m_b_new = tl.maximum(m_b, tl.max(b, axis=0))
            dz = z - _safe(m_z_new)
            db = b - _safe(m_b_new)
            alpha_z = tl.exp(m_z - _safe(m_z_new))

            e_z1 = tl.exp(dz)
            if SCALED:
                e_zt = tl.exp(dz * inv_temp)
                alpha_zt = tl.exp((m_z - _safe(m_z_new)) * inv_temp)
                s_zt = s_zt * alpha_zt + tl.sum(e_zt, axis=0)
            else:
                e_zt = e_z1
                alpha_zt = alpha_z
            e_bt = tl.exp(db * inv_temp)
            alpha_bt = tl.exp((m_b - _safe(m_b_new)) * inv_temp)

            # Entries where the weight is 0 (masked, -inf) must add 0, not 0 * inf = NaN.
            if REVERSE:
                w = w * alpha_zt + tl.sum(tl.where(e_zt > 0, e_zt * (z - b), 0.0), axis=0)
            else:
                w = w * alpha_bt + tl.sum(tl.where(e_bt > 0, e_bt * (b - z), 0.0), axis=0)

            s_z1 = s_z1 * alpha_z + tl.sum(e_z1, axis=0)
            s_bt = s_bt * alpha_bt + tl.sum(e_bt, axis=0)
            m_z = m_z_new
            m_b = m_b_new
        if not SCALED:
            s_zt = s_z1

        # ---- cross-entropy: logsumexp_all(z) - z_y = softplus(L(z) - z_y), L = non-target logsumexp -------
        z_y = tl.load(z_row + y).to(tl.float32)
        b_y = tl.load(b_row + y).to(tl.float32)
        # NaN or +inf anywhere in the row: the exp-sums are NaN then (see the module docstring), or it is at gold.
        bad = (s_z1 != s_z1) | (s_bt != s_bt) | (z_y != z_y) | (z_y == float("inf")) | (b_y != b_y) | (
            b_y == float("inf"))
        log_s_z1 = tl.log(s_z1)
        lz1 = m_z + log_s_z1                         # L(z), -inf when every non-target entry is -inf
        x = lz1 - z_y
        ce = tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))
        ce = tl.where(lz1 == NEG_INF, 0.0, ce)
        ce = tl.where(bad, float("nan"), ce)
        tl.store(ce_ptr + row, ce)

        # ---- non-target KL at temperature T -------------------------------------------------------------
        # log-normalisers relative to the raw maxima: L_T(z) = m_z / T + log s_zt, likewise for b.
        log_s_zt = tl.log(s_zt)
        log_s_bt = tl.log(s_bt)
        has_q = s_zt > 0
        has_p = s_bt > 0
        if REVERSE:
            # KL(q||p) = E_q[(z - b)/T] - L_T(z) + L_T(b)
            kl = inv_temp * (w / s_zt - (m_z - m_b)) - log_s_zt + log_s_bt
            kl = tl.where(has_p, kl, float("inf"))
            kl = tl.where(has_q, kl, 0.0)
        else:
            # KL(p||q) = E_p[(b - z)/T] - L_T(b) + L_T(z)
            kl = inv_temp * (w / s_bt - (m_b - m_z)) - log_s_bt + log_s_zt
            kl = tl.where(has_q, kl, float("inf"))
            kl = tl.where(has_p, kl, 0.0)
        kl = tl.maximum(kl, 0.0)  # rounding can leave a tiny negative; KL is never below 0
        kl = tl.where(bad, float("nan"), kl)
        tl.store(kl_ptr + row, kl)

        # ---- pass 2: the gradient -----------------------------------------------------------------------
        if COMPUTE_GRAD:
            if bad:
                _fill_row(g_row, V, float("nan"), BLOCK_V)
            else:
                scale = tl.load(grad_scale_ptr).to(tl.float32)
                # logsumexp over all entries, anchored at M = max(m_z, z_y) so a dominant gold logit cannot overflow.
                big = tl.maximum(m_z, z_y)
                s_all = s_z1 * tl.exp(m_z - big) + tl.exp(z_y - big)
                ms_z = _safe(m_z)
                # softmax(z)_j = exp(dz_j + log_soft), dz_j = z_j - m_z. Never form z_j - logsumexp(z) directly:
                # at |z| ~ 1e4 the float32 logsumexp alone carries an error of ~1e-3.
                log_soft = (ms_z - big) - tl.log(s_all)
                # softmax(z)_y - 1 = -(mass off the gold entry), computed without cancellation.
                g_gold = -(s_z1 * tl.exp(m_z - big) / s_all)
                c = kl_weight * temp  # d(T^2 KL_T)/dz = T * dKL_T/dz_T
                ms_b = _safe(m_b)
                # KL is 0 by definition (a constant) when base has no non-target mass: no KL gradient then.
                inv_s_zt = tl.where(has_q & has_p, 1.0 / s_zt, 0.0)
                inv_s_bt = tl.where(has_p, 1.0 / s_bt, 0.0)
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    in_row = offs < V
                    # The gold entry is not masked here: whatever its lanes compute is replaced by g_gold below.
                    z = tl.load(z_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
                    b = tl.load(b_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
                    dz = z - ms_z
                    g = tl.exp(dz + log_soft)                        # softmax(z) off the gold entry
                    if SCALED:
                        q = tl.exp(dz * inv_temp) * inv_s_zt
                    else:
                        q = tl.exp(dz) * inv_s_zt
                    p = tl.exp((b - ms_b) * inv_temp) * inv_s_bt
                    if REVERSE:
                        # d KL(q||p) / dz_T = q (log q - log p - KL); entries with q = 0 contribute 0.
                        log_ratio = (dz - (b - ms_b)) * inv_temp - log_s_zt + log_s_bt
                        dkl = tl.where(q > 0, q * (log_ratio - kl), 0.0)
                        dkl = tl.where(has_p, dkl, 0.0)
                    else:
                        dkl = q - p
                    g = g + c * dkl
                    g = tl.where(offs == y, g_gold, g)
                    tl.store(g_row + offs, (g * scale).to(g_row.dtype.element_ty), mask=in_row)
