"""The Triton backend: allocates the outputs and launches `kl_nontarget.kernels.nontarget_ce` over the rows.

Imported lazily by `kl_nontarget.ops.logits_loss`, so machines without Triton (or without a GPU) never import it. On CPU
tensors the kernel runs under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before Triton
is first imported.
"""

import torch
import triton

from kl_nontarget.kernels.nontarget_ce import nontarget_ce_kernel


def default_block_size(v: int, dtype: torch.dtype) -> int:
    """Vocabulary block per loop step: a power of two, at most 4096 entries whatever the dtype.

    With 8 warps a 4096-entry block is 16 entries per thread and tensor: two 128-bit loads of 16-bit values (four of
    float32), and at most ~100 registers in every variant, so two programs fit on an SM (65536 registers / 256
    threads = 128 each) and one's reductions overlap the other's loads. An 8192-entry block of 16-bit values took up
    to 161 registers (one program per SM) for the same bytes in flight (`benchmarks/kernel_report.py`).
    """
    return min(triton.next_power_of_2(max(v, 1)), 4096)


def nontarget_ce_rows(logits, ref_logits, labels, *, kl_weight, temperature, ignore_index, reverse,
                      grad_scale, compute_grad, block_size=None, scratch=False, out=None):
    """Per-row CE and non-target KL of 2-D `logits`/`ref_logits` (N, V) and the scaled gradient.

    Same contract as `kl_nontarget.ops.torch_rows.nontarget_ce_rows`: returns `(ce, kl, grad)`, `ce` and `kl` float32
    of shape (N,), `grad` (N, V) in the logits' dtype already multiplied by `grad_scale`, or None; `out` is a
    buffer for `grad`. `scratch` is accepted for that contract and has no effect: the kernel never writes its inputs.
    """
    n = logits.shape[0]
    device = logits.device
    ce = torch.empty(n, dtype=torch.float32, device=device)
    kl = torch.empty(n, dtype=torch.float32, device=device)
    # Every row of the gradient is written by the kernel (ignored rows with zeros): no memset needed.
    grad = None
    if compute_grad:
        grad = out if out is not None else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n == 0:
        return ce, kl, grad
    args, meta = launch_arguments(logits, ref_logits, labels, grad, ce, kl, grad_scale, kl_weight=kl_weight,
                                  temperature=temperature, ignore_index=ignore_index, reverse=reverse,
                                  block_size=block_size)
    nontarget_ce_kernel[(n,)](*args, **meta)
    return ce, kl, grad


def launch_arguments(logits, ref_logits, labels, grad, ce, kl, grad_scale, *, kl_weight, temperature, ignore_index,
                     reverse, block_size=None):
    """The row kernel's launch: `(args, meta)` for `nontarget_ce_kernel[(n,)](*args, **meta)`.

    `args` are the runtime arguments in the kernel's order, `meta` its constexprs and `num_warps`. `grad` is the
    (N, V) gradient buffer, or None for a forward only. The launcher and the ahead-of-time compilation check
    (`benchmarks/kernel_report.py`) both build the launch here, so the compiled variants are exactly the launched
    ones.
    """
    v = logits.shape[1]
    compute_grad = grad is not None
    block = block_size or default_block_size(v, logits.dtype)
    args = (logits, logits.stride(0), ref_logits, ref_logits.stride(0), labels,
            grad if compute_grad else logits, grad.stride(0) if compute_grad else 0,
            ce, kl, grad_scale.to(torch.float32),
            v, ignore_index,
            float(kl_weight), 1.0 / float(temperature), float(temperature))
    meta = dict(REVERSE=bool(reverse), SCALED=float(temperature) != 1.0, COMPUTE_GRAD=compute_grad, BLOCK_V=block,
                num_warps=8 if block >= 4096 else 4)
    return args, meta
