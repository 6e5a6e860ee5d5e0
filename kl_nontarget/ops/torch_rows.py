"""The PyTorch backend: the row kernel's math in plain tensor ops, for machines without a GPU.

Same contract as the Triton launcher in `kl_nontarget.ops.logits_loss`: per-row cross-entropy and non-target KL
(float32, or float64 for float64 inputs) and, when asked, the gradient of `ce + kl_weight * T^2 * kl` times
`grad_scale`, in the logits' dtype. Rows are processed in chunks so the temporaries stay a few chunk x V tensors; the
only N x V allocation is the gradient itself. Ignored rows are skipped entirely (their gradient rows are 0). A NaN or
+inf anywhere in a supervised row makes its statistics and gradient row NaN, as in the kernel; -inf means probability 0.

On a CPU the time goes into full passes over chunk x V tensors (and, with several threads, into one OpenMP
barrier per op): the code keeps their number low. `grad_scale` is folded into per-row factors, the forward
direction's gradient is two fused passes (`mul_`, `addcmul_`), the KL sum needs no `where`, and when every row is
supervised the chunks are slices (one copy in, and in float32 the gradient is written in place).
"""

import math

import torch

# Budget for one chunk's temporaries (about six chunk x V tensors in the compute dtype live at once).
_CHUNK_BYTES = 96 * 2**20


def _safe(m: torch.Tensor) -> torch.Tensor:
    """A row max that is -inf (nothing but masked entries) becomes 0, so `x - max` never gives NaN."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _rows(z_in, b_in, y, *, kl_weight, temperature, reverse, compute_grad, cdtype, scale=None, out=None,
          scratch=False):
    """Loss statistics (and gradient times `scale`) for a chunk of valid rows. Returns (ce, kl, grad or None).

    `out`, when given, is a contiguous (rows, V) tensor of dtype `cdtype` that becomes the gradient (no copy).
    `scratch`: `z_in` and `b_in` are the caller's temporaries and are overwritten (no working copies).
    """
    inv_t = 1.0 / temperature
    scaled = temperature != 1.0
    idx = y[:, None]
    # Working copies: every later step writes into z and b in place.
    z = z_in if scratch and z_in.dtype == cdtype else z_in.to(cdtype, copy=True)
    b = b_in if scratch and b_in.dtype == cdtype else b_in.to(cdtype, copy=True)
    z_y = z.gather(1, idx).squeeze(1)
    b_y = b.gather(1, idx).squeeze(1)
    # Mask the gold entry in both rows: everything below is over the non-target entries only.
    z.scatter_(1, idx, float("-inf"))
    b.scatter_(1, idx, float("-inf"))
    m_z = z.amax(1)
    m_b = b.amax(1)
    z.sub_(_safe(m_z)[:, None])  # z - max: exact for near-max entries, so +-1e4 logits lose nothing
    b.sub_(_safe(m_b)[:, None])
    e_z1 = torch.exp(z, out=out) if (compute_grad and out is not None) else torch.exp(z)
    s_z1 = e_z1.sum(1)
    if scaled:
        z.mul_(inv_t)
        b.mul_(inv_t)
        e_zt = torch.exp(z)
        s_zt = e_zt.sum(1)
    else:
        e_zt, s_zt = e_z1, s_z1
    e_bt = torch.exp(b)
    s_bt = e_bt.sum(1)
    log_s_zt = torch.log(s_zt)
    log_s_bt = torch.log(s_bt)
    # NaN or +inf anywhere in a row makes its exp-sums NaN (exp(NaN), or inf - inf once the max is +inf); the gold
    # entries, masked above, are checked on their own. Such rows get NaN statistics and a NaN gradient.
    bad = torch.isnan(s_z1) | torch.isnan(s_bt) | torch.isnan(z_y) | torch.isnan(b_y) | (z_y == math.inf) | (
        b_y == math.inf)
    has_q = s_zt > 0
    has_p = s_bt > 0

    # Cross-entropy = softplus(L(z) - z_y), L the non-target logsumexp at T = 1.
    lz1 = m_z + torch.log(s_z1)
    ce = torch.nn.functional.softplus(lz1 - z_y)
    ce = torch.where(lz1 == float("-inf"), torch.zeros_like(ce), ce)

    # Non-target KL at temperature T. `z` and `b` now hold (x - max) / T.
    if reverse:
        diff = z - b                                  # (log q - log p) up to the row constants
        weights, s_w = e_zt, s_zt
        const = log_s_bt - log_s_zt
        missing, present = has_p, has_q
    else:
        diff = b - z
        weights, s_w = e_bt, s_bt
        const = log_s_zt - log_s_bt
        missing, present = has_q, has_p
    # 0 * (-inf) from masked entries (weight 0, difference -inf or NaN) must count 0: nansum drops those NaNs. A
    # positive weight times +inf (the other distribution has no mass there) stays +inf.
    terms = diff.mul(weights) if reverse else diff.mul_(weights)  # the reverse gradient still needs `diff`
    kl = torch.nansum(terms, 1) / s_w + const
    kl = torch.where(missing, kl, torch.full_like(kl, math.inf))
    kl = torch.where(present, kl, torch.zeros_like(kl)).clamp_min(0.0)
    del terms
    any_bad = bool(bad.any())
    if any_bad:
        nan = torch.full_like(ce, math.nan)
        ce = torch.where(bad, nan, ce)
        kl = torch.where(bad, nan, kl)
    if not compute_grad:
        return ce, kl, None

    c = kl_weight * temperature
    if scale is None:
        scale = torch.ones((), dtype=cdtype, device=z.device)
    # KL is 0 by definition (a constant) when base has no non-target mass: no KL gradient then (q = 0 below).
    inv_s_zt = torch.where(has_q & has_p, 1.0 / s_zt, torch.zeros_like(s_zt))
    inv_s_bt = torch.where(has_p, 1.0 / s_bt, torch.zeros_like(s_bt))
    # softmax over all entries, anchored at max(m_z, z_y) so a dominant gold logit cannot overflow.
    big = torch.maximum(m_z, z_y)
    s_off = s_z1 * torch.exp(m_z - big)
    s_all = s_off + torch.exp(z_y - big)
    factor = torch.where(m_z > float("-inf"), torch.exp(_safe(m_z) - big) / s_all, torch.zeros_like(s_all))
    if reverse:
        # d KL(q||p) / dz_T = q (log q - log p - KL)
        q = e_zt * inv_s_zt[:, None]  # a new tensor: e_zt may be e_z1, which becomes the gradient below
        log_ratio = diff.add_((log_s_bt - log_s_zt - kl)[:, None])
        dkl = torch.where(q > 0, q * log_ratio, torch.zeros_like(q))
        dkl = torch.where(has_p[:, None], dkl, torch.zeros_like(dkl))
        del q, e_bt, diff
        grad = e_z1.mul_((factor * scale)[:, None])  # softmax(z) off the gold entry
        grad.add_(dkl.mul_(c * scale))
    else:
        # softmax(z) off gold + c (q - p), q = e_zt / s_zt, p = e_bt / s_bt: one pass for the first two terms when
        # T = 1 (then e_zt is e_z1), and one fused multiply-add per remaining term.
        del diff
        if scaled:
            grad = e_z1.mul_((factor * scale)[:, None])
            grad.addcmul_(e_zt, (c * scale * inv_s_zt)[:, None])
        else:
            grad = e_z1.mul_(((factor + c * inv_s_zt) * scale)[:, None])
        grad.addcmul_(e_bt, (-c * scale * inv_s_bt)[:, None])
        del e_bt
    # Gold entry: softmax(z)_y - 1 = -(mass off the gold entry), without cancellation; KL part 0.
    grad.scatter_(1, idx, (-(s_off / s_all) * scale)[:, None])
    if any_bad:
        grad.masked_fill_(bad[:, None], math.nan)
    return ce, kl, grad


def nontarget_ce_rows(logits, ref_logits, labels, *, kl_weight, temperature, ignore_index, reverse,
                      grad_scale, compute_grad, chunk_rows=None, scratch=False, out=None):
    """Per-row CE and non-target KL of 2-D `logits`/`ref_logits` (N, V), and the scaled gradient.

    Returns `(ce, kl, grad)`: `ce`, `kl` of shape (N,) (0 at ignored rows), `grad` (N, V) in the logits' dtype
    already multiplied by `grad_scale` (a 0-dim tensor), or None when `compute_grad` is False. With `scratch=True`
    the caller gives up `logits` and `ref_logits` (temporaries it drops afterwards): they are overwritten instead of
    copied, two passes fewer over each chunk. `out`, a contiguous tensor like `logits`, receives the gradient
    (a caller that reuses one buffer saves the first-touch cost of a new N x V allocation).
    """
    n, v = logits.shape
    cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ce = torch.zeros(n, dtype=cdtype, device=logits.device)
    kl = torch.zeros(n, dtype=cdtype, device=logits.device)
    rows = torch.nonzero(labels != ignore_index).squeeze(1)
    all_rows = rows.numel() == n
    grad = None
    if compute_grad:
        # Every supervised row is written below; only the ignored ones need zeros.
        if out is not None:
            grad = out if all_rows else out.zero_()
        else:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if all_rows else \
                torch.zeros_like(logits, memory_format=torch.contiguous_format)
    scale = grad_scale.to(device=logits.device, dtype=cdtype)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_BYTES // (6 * v * (8 if cdtype == torch.float64 else 4)))
    opts = dict(kl_weight=kl_weight, temperature=temperature, reverse=reverse, compute_grad=compute_grad,
                cdtype=cdtype, scale=scale)
    for start in range(0, rows.numel(), chunk_rows):
        if all_rows:  # rows start..stop: slices, and in the compute dtype the gradient is written in place
            stop = min(start + chunk_rows, n)
            grad_rows = grad[start:stop] if compute_grad and grad.dtype == cdtype else None
            c_ce, c_kl, c_grad = _rows(logits[start:stop], ref_logits[start:stop], labels[start:stop],
                                       out=grad_rows, scratch=scratch, **opts)
            ce[start:stop] = c_ce
            kl[start:stop] = c_kl
            if compute_grad and c_grad is not grad_rows:
                grad[start:stop].copy_(c_grad)
            continue
        r = rows[start:start + chunk_rows]
        # index_select makes new tensors: they are the scratch copies.
        c_ce, c_kl, c_grad = _rows(logits.index_select(0, r), ref_logits.index_select(0, r),
                                   labels.index_select(0, r), scratch=True, **opts)
        ce.index_copy_(0, r, c_ce)
        kl.index_copy_(0, r, c_kl)
        if compute_grad:
            grad.index_copy_(0, r, c_grad.to(grad.dtype))
    return ce, kl, grad
