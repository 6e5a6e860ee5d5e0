"""Float64 oracle for the tests: the formulas of docs/design.md ("The loss", "Gradients", "Reductions"), written as
plainly as possible."""

import torch


def nontarget_reference(logits, ref_logits, labels, *, kl_weight=1.0, temperature=1.0, ignore_index=-100,
                        kl_direction="forward"):
    """Per-row (ce, kl) in float64 through autograd-friendly ops; rows with ignored labels give 0.

    Uses masked log-softmax on float64 copies: the non-target distribution is the softmax with the gold entry
    set to -inf. Returns tensors shaped like `labels`.
    """
    v = logits.shape[-1]
    z = logits.double().reshape(-1, v)
    b = ref_logits.double().reshape(-1, v)
    y = labels.reshape(-1)
    valid = y != ignore_index
    ys = torch.where(valid, y, torch.zeros_like(y))
    gold = torch.nn.functional.one_hot(ys, v).bool()

    ce = torch.logsumexp(z, -1) - z.gather(1, ys[:, None]).squeeze(1)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    zt = torch.where(gold, neg_inf, z / temperature)
    bt = torch.where(gold, neg_inf, b / temperature)
    # A row with no finite non-target entry has no distribution; give log_softmax finite stand-ins there (the
    # KL of such rows is set to 0 below) so that no NaN reaches the gradient.
    dead_z = torch.isneginf(zt).all(-1, keepdim=True)
    dead_b = torch.isneginf(bt).all(-1, keepdim=True)
    log_q = torch.log_softmax(torch.where(dead_z, torch.zeros_like(zt), zt), -1)
    log_p = torch.log_softmax(torch.where(dead_b, torch.zeros_like(bt), bt), -1)
    if kl_direction == "forward":
        w, a, c = log_p.exp(), log_p, log_q
    else:
        w, a, c = log_q.exp(), log_q, log_p
    # Entries with zero weight count 0; mask their logs first so no NaN reaches the gradient either.
    live = w > 0
    zeros = torch.zeros_like(w)
    terms = w * (torch.where(live, a, zeros) - torch.where(live, c, zeros))
    kl = terms.sum(-1)
    # Rows whose weighting distribution has no non-target mass (every other entry -inf) have KL 0 by definition.
    dead = (dead_b if kl_direction == "forward" else dead_z).squeeze(-1)
    kl = torch.where(dead, torch.zeros_like(kl), kl)
    zero = torch.zeros_like(ce)
    ce = torch.where(valid, ce, zero)
    kl = torch.where(valid, kl, zero)
    return ce.reshape(labels.shape), kl.reshape(labels.shape)


def loss_reference(logits, ref_logits, labels, *, kl_weight=1.0, temperature=1.0, ignore_index=-100,
                   kl_direction="forward", reduction="mean", num_items_in_batch=None):
    """(loss, ce, kl) reduced as `nontarget_kl_loss` documents, in float64."""
    ce, kl = nontarget_reference(logits, ref_logits, labels, kl_weight=kl_weight, temperature=temperature,
                                 ignore_index=ignore_index, kl_direction=kl_direction)
    rows = ce + kl_weight * temperature ** 2 * kl
    if reduction == "none":
        return rows, ce, kl
    if reduction == "sum":
        d = 1.0
    elif num_items_in_batch is not None:
        d = max(float(num_items_in_batch), 1.0)
    else:
        d = max(int((labels != ignore_index).sum()), 1)
    return rows.sum() / d, ce.sum() / d, kl.sum() / d
