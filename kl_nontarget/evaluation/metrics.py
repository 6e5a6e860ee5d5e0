"""Forgetting metrics: how far a fine-tuned causal LM has drifted from its base model.

All functions compare next-token distributions at the supervised positions of a dataloader (labels != -100 after
the causal shift; when a batch has no "labels", every attended token counts):

- `lf`: Kalajdzievski's forgetting loss (2024), the cross-entropy of the fine-tuned model's next-token distribution
  q against the base model's p, averaged over tokens: mean_t sum_j -p_t(j) log q_t(j).
- `lf_kl`: the same minus the base's own entropy, i.e. mean KL(p || q); 0 for an unchanged model.
- `retention_ppl`: perplexity of the fine-tuned model on the data's own tokens (the base's is `base_ppl`).
- `accuracy` / `accuracy_drift`: top-1 next-token accuracy and its change from the base.

The base model is either a separate model (`base_model=`) or the same PEFT model with its adapters disabled.
Everything runs under `torch.no_grad()`, batched, with a tqdm bar.
"""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from kl_nontarget.models.base_pass import adapter_activated, adapters_disabled
from kl_nontarget.models.introspection import device_of, has_adapters, unwrap_model
from kl_nontarget.models.reference import INITIAL_ADAPTER, base_rewriting_init

__all__ = ["kl_decomposition", "token_statistics", "evaluate_lm", "forgetting_metrics", "base_model_context"]


def _xlogy_p(p, logp):
    # p * log p with 0 * log 0 = 0 (logp may be -inf where p == 0)
    return torch.where(p > 0, p * logp, torch.zeros_like(p))


def kl_decomposition(base_logits, logits, labels):
    """Per-row (full, binary, nontarget) KL(base || adapted), computed independently.

    full = KL(p || q) over the whole vocabulary; binary = KL_binary(p_y || q_y), the two-outcome KL of "gold or
    not"; nontarget = KL between p and q with the gold entry removed and renormalised. They satisfy
    full = binary + (1 - p_y) * nontarget (docs/design.md, "Why drop the gold token"). Rows are the leading
    dimensions; labels index the gold token of each row (no ignore_index handling here).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    b = base_logits.to(dtype)
    y = labels.long().unsqueeze(-1)
    log_q = torch.log_softmax(z, -1)
    log_p = torch.log_softmax(b, -1)
    p = log_p.exp()
    full = (_xlogy_p(p, log_p) - torch.where(p > 0, p * log_q, torch.zeros_like(p))).sum(-1)
    lp_y, lq_y = log_p.gather(-1, y).squeeze(-1), log_q.gather(-1, y).squeeze(-1)
    p_y = lp_y.exp()
    log1m_p = torch.log1p(-p_y)
    log1m_q = torch.log1p(-lq_y.exp())
    binary = p_y * (lp_y - lq_y) + torch.where(p_y < 1, (1 - p_y) * (log1m_p - log1m_q), torch.zeros_like(p_y))
    neg_inf = torch.full(y.shape, float("-inf"), dtype=dtype, device=y.device)
    log_pt = torch.log_softmax(b.scatter(-1, y, neg_inf), -1)
    log_qt = torch.log_softmax(z.scatter(-1, y, neg_inf), -1)
    pt = log_pt.exp()
    nontarget = (_xlogy_p(pt, log_pt) - torch.where(pt > 0, pt * log_qt, torch.zeros_like(pt))).sum(-1)
    return full, binary, nontarget


def token_statistics(logits, labels, base_logits=None, ignore_index=-100):
    """Sums over the rows whose label is not `ignore_index` (rows and labels already aligned, no shift).

    Returns a dict of Python floats: `tokens`, `nll` (sum -log q_y), `correct` (argmax == label) and, with
    `base_logits`, `cross_entropy` (sum_t sum_j -p log q, the Lf numerator), `base_entropy`, `kl` (sum KL(p||q)),
    `base_nll`, `base_correct` and `agree` (same argmax).
    """
    vocab = logits.shape[-1]
    keep = labels.reshape(-1) != ignore_index
    y = labels.reshape(-1)[keep].long()
    z = logits.reshape(-1, vocab)[keep]
    dtype = torch.promote_types(z.dtype, torch.float32)
    log_q = torch.log_softmax(z.to(dtype), -1)
    out = {"tokens": float(keep.sum()),
           "nll": float(-log_q.gather(1, y[:, None]).sum()),
           "correct": float((log_q.argmax(1) == y).sum())}
    if base_logits is not None:
        log_p = torch.log_softmax(base_logits.reshape(-1, vocab)[keep].to(dtype), -1)
        p = log_p.exp()
        cross = -torch.where(p > 0, p * log_q, torch.zeros_like(p)).sum(1)
        entropy = -_xlogy_p(p, log_p).sum(1)
        kl = (_xlogy_p(p, log_p) - torch.where(p > 0, p * log_q, torch.zeros_like(p))).sum(1)
        out.update(cross_entropy=float(cross.sum()), base_entropy=float(entropy.sum()), kl=float(kl.sum()),
                   base_nll=float(-log_p.gather(1, y[:, None]).sum()),
                   base_correct=float((log_p.argmax(1) == y).sum()),
                   agree=float((log_p.argmax(1) == log_q.argmax(1)).sum()))
    return out


@contextlib.contextmanager
def base_model_context(model, base_model=None):
    """Yields a callable that runs the base model: `base_model` itself, or `model` with its adapters disabled.

    The adapters are disabled as in training (`base_pass.adapters_disabled`): every requires_grad flag and train/eval
    mode is restored afterwards, and merged adapters are refused. When the active adapter's init rewrote the base
    weights (PiSSA, OLoRA, ...), disabling it does not give the base: the snapshot of the initial adapter that the
    trainers make (`reference.initial_reference`) is activated instead, and without one a ValueError asks for
    `base_model=`.
    """
    if base_model is not None:
        yield base_model
        return
    if not has_adapters(model):
        raise TypeError(f"{type(model).__name__} has no adapters to disable: pass the base model explicitly "
                        "(base_model=...) or a PEFT model")
    init = base_rewriting_init(model)
    if init is None:
        with adapters_disabled(model):
            yield model
        return
    if INITIAL_ADAPTER not in unwrap_model(model).peft_config:
        raise ValueError(f"init_lora_weights={init!r} rewrote the base weights, so the model with its adapter "
                         "disabled is not the base: pass base_model=<the original model>, or snapshot the initial "
                         f"adapter first (kl_nontarget.models.reference.initial_reference(model), as the trainers do)")
    with adapter_activated(model, INITIAL_ADAPTER):
        yield model


def _prepare(batch, device):
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(batch).items()}
    labels = batch.pop("labels", None)
    if labels is None:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
    return batch, labels


@contextlib.contextmanager
def _eval_mode(*models):
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def _logits(model, inputs):
    return model(**inputs).logits[:, :-1]


def evaluate_lm(model, dataloader, *, ignore_index=-100, progress=True, desc="eval"):
    """Loss, perplexity and top-1 accuracy of a causal LM on the supervised tokens of `dataloader`.

    Also `sequence_accuracy`: the fraction of sequences whose supervised tokens are all predicted (teacher-forced
    argmax), the exact-match accuracy of short answers.
    """
    device = device_of(model)
    sums = {"tokens": 0.0, "nll": 0.0, "correct": 0.0}
    seqs = seq_ok = 0
    with torch.no_grad(), _eval_mode(model):
        for batch in tqdm(dataloader, desc=desc, disable=not progress, leave=False):
            inputs, labels = _prepare(batch, device)
            logits = _logits(model, inputs)
            shifted = labels[:, 1:]
            stats = token_statistics(logits, shifted, ignore_index=ignore_index)
            for k in sums:
                sums[k] += stats[k]
            valid = shifted != ignore_index
            hit = (logits.argmax(-1) == shifted) | ~valid
            has = valid.any(1)
            seqs += int(has.sum())
            seq_ok += int((hit.all(1) & has).sum())
    n = max(sums["tokens"], 1.0)
    loss = sums["nll"] / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": sums["correct"] / n,
            "sequence_accuracy": seq_ok / max(seqs, 1), "tokens": int(sums["tokens"])}


def forgetting_metrics(model, dataloader, *, base_model=None, ignore_index=-100, progress=True, desc="forgetting"):
    """Compare `model` with its base on `dataloader` (typically held-out text from the base model's domain).

    Args:
        model: the fine-tuned causal LM (a PEFT model, or any model when `base_model` is given).
        dataloader: batches with "input_ids", optional "attention_mask" and optional "labels" (unshifted).
        base_model: the reference; None means `model` with adapters disabled.

    Returns a dict: `lf` (cross-entropy of the fine-tuned predictions against the base predictions),
    `lf_kl` (mean KL(base || fine-tuned) = lf - base_entropy), `base_entropy`, `retention_ppl` and `base_ppl`
    (perplexities on the data's tokens), `accuracy`, `base_accuracy`, `accuracy_drift` (accuracy - base_accuracy),
    `agreement` (fraction of positions where both argmaxes agree) and `tokens`.
    """
    device = device_of(model)
    keys = ("tokens", "nll", "correct", "cross_entropy", "base_entropy", "kl", "base_nll", "base_correct", "agree")
    sums = dict.fromkeys(keys, 0.0)
    with torch.no_grad(), _eval_mode(model, base_model):
        for batch in tqdm(dataloader, desc=desc, disable=not progress, leave=False):
            inputs, labels = _prepare(batch, device)
            with base_model_context(model, base_model) as base:
                base_inputs = {k: (v.to(device_of(base)) if isinstance(v, torch.Tensor) else v)
                               for k, v in inputs.items()}
                base_logits = _logits(base, base_inputs).to(device)
            # base_model=model (the base record of a demo or sweep): one forward gives both.
            logits = base_logits if base_model is model else _logits(model, inputs)
            stats = token_statistics(logits, labels[:, 1:], base_logits, ignore_index=ignore_index)
            for k in keys:
                sums[k] += stats[k]
    n = max(sums["tokens"], 1.0)
    nll, base_nll = sums["nll"] / n, sums["base_nll"] / n
    acc, base_acc = sums["correct"] / n, sums["base_correct"] / n
    return {"lf": sums["cross_entropy"] / n, "lf_kl": sums["kl"] / n, "base_entropy": sums["base_entropy"] / n,
            "retention_ppl": math.exp(min(nll, 700.0)), "base_ppl": math.exp(min(base_nll, 700.0)),
            "accuracy": acc, "base_accuracy": base_acc, "accuracy_drift": acc - base_acc,
            "agreement": sums["agree"] / n, "tokens": int(sums["tokens"])}
