"""The Triton backend: allocates the outputs and launches `kl_nontarget.kernels.nontarget_ce` over the rows.

Imported lazily by `kl_nontarget.loss`, so machines without Triton (or without a GPU) never import it. On CPU
tensors the kernel runs under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before Triton
is first imported.
"""

import torch
import triton

from kl_nontarget.kernels.nontarget_ce import nontarget_ce_kernel


def default_block_size(v: int, dtype: torch.dtype) -> int:
    """Vocabulary block per loop step: a power of two, at most 4096 float32 or 8192 16-bit values."""
    cap = 8192 if dtype.itemsize <= 2 else 4096
    return min(triton.next_power_of_2(max(v, 1)), cap)


def nontarget_ce_rows(logits, ref_logits, labels, *, kl_weight, temperature, ignore_index, reverse,
                      grad_scale, compute_grad, block_size=None):
    """Per-row CE and non-target KL of 2-D `logits`/`ref_logits` (N, V) and the scaled gradient.

    Same contract as `kl_nontarget.torch_impl.nontarget_ce_rows`: returns `(ce, kl, grad)`, `ce` and `kl` float32
    of shape (N,), `grad` (N, V) in the logits' dtype already multiplied by `grad_scale`, or None.
    """
    n, v = logits.shape
    device = logits.device
    ce = torch.empty(n, dtype=torch.float32, device=device)
    kl = torch.empty(n, dtype=torch.float32, device=device)
    # Every row of the gradient is written by the kernel (ignored rows with zeros): no memset needed.
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
    if n == 0:
        return ce, kl, grad
    block = block_size or default_block_size(v, logits.dtype)
    nontarget_ce_kernel[(n,)](
        logits, logits.stride(0), ref_logits, ref_logits.stride(0), labels,
        grad if compute_grad else logits, grad.stride(0) if compute_grad else 0,
        ce, kl, grad_scale.to(torch.float32),
        v, ignore_index,
        float(kl_weight), 1.0 / float(temperature), float(temperature),
        REVERSE=reverse, SCALED=float(temperature) != 1.0, COMPUTE_GRAD=compute_grad, BLOCK_V=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return ce, kl, grad
