"""Fused-linear form of the loss: final hidden states in, no N x V logits in memory.

`nontarget_kl_linear_loss` takes the adapted and base models' final hidden states and the LM head instead of
their logits. Supervised tokens (labels != ignore_index) are processed in chunks; for each chunk both logit
blocks are formed, handed to the backend's row function (the same `nontarget_ce_rows` the logits path uses), and
the logits gradient is immediately pulled back through the head:

    grad_hidden[rows] = g @ W        grad_W += g^T @ hidden[rows]   (float32 accumulator)    grad_bias += sum(g)

so at most one chunk x V block of each kind exists at a time. All gradients are computed in the forward pass; the
backward only multiplies them by the incoming gradient (and does nothing when that is 1). The one exception is
`reduction="none"` with a head that needs a gradient: the per-row weights of grad_W are only known in the
backward, which then recomputes the chunks.

Logits are `softcap * tanh(logit_scale * (hidden @ W.T + bias) / softcap)` (or without the tanh when `softcap` is
None), which covers heads that scale (Cohere, Granite: pass 1 / logits_scaling) or soft-cap (Gemma 2/3) them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kl_nontarget.ops.checks import is_positive_number
from kl_nontarget.ops.params import (
    LABEL_DTYPES,
    RowParams,
    check_label_range,
    check_loss_options,
    graph_is_kept,
    resolve_backend,
    scale_saved_grads,
)

# Budget for one chunk's logits-sized blocks (adapted and base logits, their gradient, the soft-cap's tanh). On a CPU
# every chunk's matmuls read the whole head and short matmuls run slower per row; with SmolLM2's head (49152 x 576,
# N = 508, 2 threads) and 176-row chunks (128 MiB) the loss takes 0.84-0.86x the logits path's time, since it reuses
# its buffers and copies nothing; a larger budget gains a few percent more for the memory. README, "The fused path
# in the trainers".
CPU_CHUNK_BYTES = 128 * 2**20
CUDA_CHUNK_BYTES = 1 * 2**30


def default_chunk_size(num_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, *,
                       softcap: float | None = None, budget_bytes: int | None = None) -> int:
    """Tokens per chunk so that the chunk's logits-sized temporaries fit in `budget_bytes`.

    The default budget is 128 MiB on CPU and, on CUDA, 1 GiB or a quarter of the free device memory, whichever is
    smaller. Per token the chunk holds the adapted and base logits and their gradient in `dtype`, plus a float32
    tanh when soft-capping.
    """
    if budget_bytes is None:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            budget_bytes = max(64 * 2**20, min(CUDA_CHUNK_BYTES, free // 4))
        else:
            budget_bytes = CPU_CHUNK_BYTES
    per_row = vocab * (3 * dtype.itemsize + (8 if softcap is not None else 0))
    rows = max(1, budget_bytes // max(per_row, 1))
    if rows >= 64:
        rows -= rows % 64  # matmul-friendly
    num_rows = max(num_rows, 1)
    if rows < num_rows:
        # Chunks of even size: a small last chunk makes a slow matmul (every chunk reads the whole head).
        chunks = -(-num_rows // rows)
        even = -(-num_rows // chunks)
        rows = min(rows, -(-even // 8) * 8)
    return int(max(1, min(rows, num_rows)))


def _check_positive(name, value):
    if not is_positive_number(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_linear_inputs(hidden, ref_hidden, weight, labels, bias, ref_weight, logit_scale, softcap, chunk_size):
    named = [("hidden", hidden), ("ref_hidden", ref_hidden), ("weight", weight), ("labels", labels)]
    for name, t in named + [("bias", bias), ("ref_weight", ref_weight)]:
        if not isinstance(t, torch.Tensor) and not (t is None and name in ("bias", "ref_weight")):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    for name, t in (("ref_hidden", ref_hidden), ("weight", weight), ("bias", bias), ("ref_weight", ref_weight)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match hidden dtype {hidden.dtype}; cast them to one "
                            "dtype (the logits are computed in it)")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must be the LM head's (vocab_size, hidden_size) matrix, got shape "
                         f"{tuple(weight.shape)}")
    vocab, d = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != d:
        raise ValueError(f"hidden shape {tuple(hidden.shape)} must end in the hidden size {d} of weight "
                         f"(shape {tuple(weight.shape)}: (vocab_size, hidden_size))")
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden shape {tuple(ref_hidden.shape)} does not match hidden shape "
                         f"{tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden shape without the hidden dimension, "
                         f"{tuple(hidden.shape[:-1])} (labels are not shifted here)")
    if ref_weight is not None and ref_weight.shape != weight.shape:
        raise ValueError(f"ref_weight shape {tuple(ref_weight.shape)} does not match weight shape "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    devices = {t.device for t in (hidden, ref_hidden, weight, labels, bias, ref_weight) if t is not None}
    if len(devices) > 1:
        raise ValueError("hidden, ref_hidden, weight, labels, bias and ref_weight must be on one device, got "
                         f"{sorted(str(x) for x in devices)}")
    _check_positive("logit_scale", logit_scale)
    if softcap is not None:
        _check_positive("softcap", softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def head_logits(h, w, b, logit_scale=1.0, softcap=None, keep_tanh=False, out=None):
    """(logits in h's dtype, float32 tanh for the chain rule or None) of one chunk: the LM head's transform
    `softcap * tanh(logit_scale * (h @ w.T + b) / softcap)` (no tanh when `softcap` is None), written once.

    `out`: a contiguous (rows, V) buffer for `h @ w.T + b` (2-D `h`); without a soft-cap it holds the logits.
    """
    if out is None:
        x = F.linear(h, w, b)
    elif b is None:
        x = torch.mm(h, w.t(), out=out)
    else:
        x = torch.addmm(b, h, w.t(), out=out)
    if softcap is None:
        if logit_scale != 1.0:
            x.mul_(logit_scale)
        return x, None
    t = x if x.dtype in (torch.float32, torch.float64) else x.float()
    t.mul_(logit_scale / softcap).tanh_()
    logits = (t * softcap).to(h.dtype)
    return logits, (t if keep_tanh else None)


def head_logits_pair(h, hb, w, b, logit_scale=1.0, softcap=None, keep_tanh=False, out=None):
    """`head_logits` of the adapted rows `h` and the base rows `hb` through one head: one matmul of the stacked rows
    (the head's weight is read once per chunk instead of twice, and a taller matmul runs faster on a CPU).

    Returns (logits of h, logits of hb, float32 tanh of h's rows or None); the logits are views of one block, `out`
    (2 x rows, V) when given and there is no soft-cap.
    """
    n = h.shape[0]
    x, t = head_logits(torch.cat([h, hb]), w, b, logit_scale, softcap, keep_tanh, out=out)
    return x[:n], x[n:], (t[:n] if t is not None else None)


@dataclass(frozen=True)
class _Chunks:
    """Everything but the differentiable inputs: the chunk loop runs from here in forward and backward."""

    params: RowParams
    rows: torch.Tensor  # (n_supervised,) indices of the supervised rows
    chunk: int
    labels: torch.Tensor  # (N,) int64
    ref_hidden: torch.Tensor  # (N, d), detached
    ref_weight: torch.Tensor | None
    logit_scale: float
    softcap: float | None
    grad_scale: torch.Tensor  # the row gradients' factor: RowParams.grad_scale * logit_scale
    want: tuple  # (hidden, weight, bias) need a gradient

    def run(self, h2, weight, bias, *, grad_scale, want_h, want_w, want_b, row_weight=None):
        """Per-row (ce, kl) over all rows and the requested gradients (grad_w, grad_b in the parameter dtype).

        The logits gradient of each chunk is `grad_scale` times d(ce + kl_weight T^2 kl)/dlogits; with
        `row_weight` (N,) each row's contribution is further multiplied by its weight.
        """
        n = h2.shape[0]
        rows = self.rows
        compute_grad = want_h or want_w or want_b
        ce = torch.zeros(n, dtype=self.params.stat_dtype, device=h2.device)
        kl = torch.zeros(n, dtype=self.params.stat_dtype, device=h2.device)
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_h = torch.zeros_like(h2, memory_format=torch.contiguous_format) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if want_b else None
        h2 = h2.detach()
        w = weight.detach()
        b = bias.detach() if bias is not None else None
        rw = self.ref_weight if self.ref_weight is not None else w
        # One logits block and one gradient block serve every chunk: a fresh allocation of that size is new memory
        # on a CPU, and its first touch (page faults) costs about as much as a pass of the row function.
        width = min(self.chunk, rows.numel())
        logits_buf = grad_buf = None
        if self.ref_weight is None and width > 0:
            logits_buf = torch.empty(2 * width, w.shape[0], dtype=h2.dtype, device=h2.device)
        if compute_grad and width > 0:
            grad_buf = torch.empty(width, w.shape[0], dtype=h2.dtype, device=h2.device)
        # The chunk is computed in the inputs' dtype whatever autocast says (the gradients must match it).
        with torch.no_grad(), torch.autocast(h2.device.type, enabled=False):
            for start in range(0, rows.numel(), self.chunk):
                r = rows[start:start + self.chunk]
                m = r.numel()
                h = h2.index_select(0, r)
                hb = self.ref_hidden.index_select(0, r)
                if self.ref_weight is None:
                    z, zb, t = head_logits_pair(h, hb, w, b, self.logit_scale, self.softcap, keep_tanh=compute_grad,
                                                out=logits_buf[:2 * m])
                else:
                    z, t = head_logits(h, w, b, self.logit_scale, self.softcap, keep_tanh=compute_grad)
                    zb, _ = head_logits(hb, rw, b, self.logit_scale, self.softcap, False)
                del hb
                # z and zb are this chunk's own temporaries: the row function may overwrite them.
                c_ce, c_kl, g = self.params.rows(z, zb, self.labels.index_select(0, r), grad_scale=grad_scale,
                                                 compute_grad=compute_grad, scratch=True,
                                                 out=grad_buf[:m] if compute_grad else None)
                del z, zb
                ce.index_copy_(0, r, c_ce.to(ce.dtype))
                kl.index_copy_(0, r, c_kl.to(kl.dtype))
                if not compute_grad:
                    continue
                # g is already d/d(scaled logits) * logit_scale; the soft-cap adds d tanh = 1 - t^2.
                if t is not None:
                    g = t.mul_(t).neg_().add_(1.0).mul_(g).to(h.dtype)
                    del t
                rw_c = None
                if row_weight is not None:
                    rw_c = row_weight.index_select(0, r).to(h.dtype)[:, None]
                if want_h:
                    gh = g @ w
                    if rw_c is not None:
                        gh.mul_(rw_c)
                    grad_h.index_copy_(0, r, gh)
                    del gh
                if want_w:
                    hw = h if rw_c is None else h * rw_c
                    if g.dtype == acc_dtype:
                        grad_w.addmm_(g.t(), hw)
                    else:
                        grad_w.add_(g.t() @ hw)
                    del hw
                if want_b:
                    if rw_c is None:
                        grad_b.add_(g.sum(0, dtype=acc_dtype))
                    else:
                        grad_b.add_((g.t() @ rw_c).squeeze(1))
                del g
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return ce, kl, grad_h, grad_w, grad_b


class _NonTargetKLLinearFunction(torch.autograd.Function):
    """Loss of `nontarget_kl_linear_loss`; gradients computed in the forward, the backward only scales them."""

    @staticmethod
    def forward(ctx, h2, weight, bias, job):
        want_h, want_w, want_b = job.want
        ctx.want = job.want
        ctx.deferred = job.params.reduction == "none" and (want_w or want_b)
        if ctx.deferred:
            ctx.job = job
            # Per-row weights of grad_W arrive only with the backward: recompute the chunks there.
            ce, kl, *_ = job.run(h2, weight, bias, grad_scale=job.grad_scale, want_h=False, want_w=False,
                                 want_b=False)
            ctx.save_for_backward(h2, weight, bias)
        else:
            ce, kl, gh, gw, gb = job.run(h2, weight, bias, grad_scale=job.grad_scale, want_h=want_h, want_w=want_w,
                                         want_b=want_b)
            ctx.grads = (gh, gw, gb)
        loss, ce_out, kl_out = job.params.reduce(ce, kl)
        ctx.mark_non_differentiable(ce_out, kl_out)
        return loss, ce_out, kl_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        want_h, want_w, want_b = ctx.want
        keep = graph_is_kept()
        if ctx.deferred:
            h2, weight, bias = ctx.saved_tensors
            job = ctx.job
            if not keep:
                ctx.job = None
            _, _, gh, gw, gb = job.run(h2, weight, bias, grad_scale=job.grad_scale, want_h=want_h, want_w=want_w,
                                       want_b=want_b, row_weight=grad_loss.reshape(-1))
            return gh, gw, gb, None
        if ctx.grads is None:
            raise RuntimeError("nontarget_kl_linear_loss: backward called twice; pass retain_graph=True to the "
                               "first backward to keep its gradients")
        gh, gw, gb = ctx.grads
        if not keep:
            ctx.grads = None  # let the buffers go once autograd has taken them
        # reduction="none" reaches here with grad_h only: one weight per row.
        gh, gw, gb = scale_saved_grads(grad_loss, (gh, gw, gb), keep=keep)
        return gh, gw, gb, None


def nontarget_kl_linear_loss(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor,
                             labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                             ref_weight: torch.Tensor | None = None, logit_scale: float = 1.0,
                             softcap: float | None = None, kl_weight: float = 1.0, temperature: float = 1.0,
                             ignore_index: int = -100, reduction: str = "mean",
                             num_items_in_batch: int | torch.Tensor | None = None, kl_direction: str = "forward",
                             backend: str = "auto", chunk_size: int | None = None, return_components: bool = False
                             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nontarget_kl_loss` computed from final hidden states and the LM head, without materialising the logits.

    Equal, up to float rounding, to `nontarget_kl_loss(head(hidden), head_ref(ref_hidden), labels, ...)` with
    `head(x) = softcap * tanh(logit_scale * (x @ weight.T + bias) / softcap)` (no tanh when `softcap` is None) and
    `head_ref` the same with `ref_weight` (default: `weight`). Only supervised tokens are processed, `chunk_size` of
    them at a time, so at most chunk x V logits exist at once; gradients are computed during the forward.

    Args:
        hidden: (..., d) final hidden states of the model being trained (receives a gradient).
        ref_hidden: (..., d) final hidden states of the base model, same shape and dtype; constants.
        weight: (V, d) LM head of the adapted model. It receives a gradient (accumulated in float32) only when it
            requires one; it is also the base head unless `ref_weight` is given.
        labels: (...) integer gold ids aligned with the rows of `hidden` (no shifting is done here).
        bias: optional (V,) head bias, shared by both passes (it receives a gradient when it requires one).
        ref_weight: (V, d) base-model head when it differs from `weight` (no gradient).
        logit_scale: positive factor applied to the logits (before the soft-cap).
        softcap: soft-cap value c (logits = c * tanh(logits / c)), or None.
        kl_weight, temperature, ignore_index, reduction, num_items_in_batch, kl_direction, backend,
        return_components: as in `nontarget_kl_loss`.
        chunk_size: tokens per chunk; default from a memory budget (`default_chunk_size`).

    Returns:
        The loss, or `(loss, ce, kl)` with `return_components=True`.
    """
    _check_linear_inputs(hidden, ref_hidden, weight, labels, bias, ref_weight, logit_scale, softcap, chunk_size)
    check_loss_options(kl_weight=kl_weight, temperature=temperature, reduction=reduction, kl_direction=kl_direction,
                       backend=backend, num_items_in_batch=num_items_in_batch)
    vocab, d = weight.shape
    check_label_range(labels, vocab, ignore_index)
    backend = resolve_backend(backend, hidden.device)

    h2 = hidden.reshape(-1, d)
    y = labels.reshape(-1).to(torch.int64)
    rows = torch.nonzero(y != ignore_index).squeeze(1)
    params = RowParams.build(labels, y, backend=backend, kl_weight=kl_weight, temperature=temperature,
                             ignore_index=ignore_index, reduction=reduction, kl_direction=kl_direction,
                             num_items_in_batch=num_items_in_batch, input_dtype=hidden.dtype)
    if chunk_size is None:
        chunk_size = default_chunk_size(rows.numel(), vocab, hidden.dtype, hidden.device, softcap=softcap)

    want_h = hidden.requires_grad
    want_w = weight.requires_grad
    want_b = bias is not None and bias.requires_grad
    grad_on = torch.is_grad_enabled() and (want_h or want_w or want_b)
    # The logit scale is folded into the row function's gradient factor: its output is then d loss / d(x W^T + b)
    # up to the soft-cap's derivative.
    job = _Chunks(
        params=params, rows=rows, chunk=chunk_size, labels=y, ref_hidden=ref_hidden.detach().reshape(-1, d),
        ref_weight=ref_weight.detach() if ref_weight is not None else None,
        logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap),
        grad_scale=params.grad_scale * float(logit_scale), want=(want_h, want_w, want_b),
    )
    if grad_on:
        loss, ce, kl = _NonTargetKLLinearFunction.apply(h2, weight, bias, job)
    else:
        ce_rows, kl_rows, *_ = job.run(h2, weight, bias, grad_scale=job.grad_scale, want_h=False, want_w=False,
                                       want_b=False)
        loss, ce, kl = job.params.reduce(ce_rows, kl_rows)
    if return_components:
        return loss, ce.detach(), kl.detach()
    return loss
