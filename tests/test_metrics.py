"""kl_nontarget.evaluation.metrics against hand computations, the KL decomposition identity in float64 (docs/design.md,
"Why drop the gold token"), and the one-row toy of issue 5."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from kl_nontarget.evaluation.metrics import evaluate_lm, forgetting_metrics, kl_decomposition, token_statistics
from kl_nontarget.ops.logits_loss import nontarget_kl_loss

from tiny_models import perturb_trainable, tiny_llama


def _dist(logits):
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    s = sum(e)
    return [x / s for x in e]


def test_token_statistics_by_hand():
    z = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5], [3.0, 3.0, 3.0]])
    b = torch.tensor([[0.5, 0.5, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2, -100])
    s = token_statistics(z, y, b)
    rows = [(z[i].tolist(), b[i].tolist(), int(y[i])) for i in range(2)]
    cross = ent = kl = nll = base_nll = 0.0
    correct = base_correct = agree = 0
    for zi, bi, yi in rows:
        q, p = _dist(zi), _dist(bi)
        cross += -sum(pj * math.log(qj) for pj, qj in zip(p, q))
        ent += -sum(pj * math.log(pj) for pj in p)
        kl += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
        nll += -math.log(q[yi])
        base_nll += -math.log(p[yi])
        correct += q.index(max(q)) == yi
        base_correct += p.index(max(p)) == yi
        agree += q.index(max(q)) == p.index(max(p))
    assert s["tokens"] == 2
    for key, want in [("cross_entropy", cross), ("base_entropy", ent), ("kl", kl), ("nll", nll),
                      ("base_nll", base_nll), ("correct", correct), ("base_correct", base_correct),
                      ("agree", agree)]:
        assert s[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key
    assert s["cross_entropy"] == pytest.approx(s["kl"] + s["base_entropy"], rel=1e-6)


def test_token_statistics_masked_vocabulary_entries():
    # -inf base logits (padded vocabulary) contribute nothing and give no NaN.
    z = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, float("-inf"), float("-inf")]])
    s = token_statistics(z, torch.tensor([1]), b)
    assert all(math.isfinite(v) for v in s.values())
    q, p = _dist([0.0, 1.0, 2.0, 0.0]), _dist([0.0, 1.0])
    assert s["cross_entropy"] == pytest.approx(-(p[0] * math.log(q[0]) + p[1] * math.log(q[1])), rel=1e-6)


def test_kl_identity_float64():
    # docs/design.md, "Why drop the gold token": KL_full = KL_binary(p_y || q_y) + (1 - p_y) * KL_nontarget,
    # including confident rows.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 50, generator=g, dtype=torch.float64) * 3
    b = torch.randn(64, 50, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 50, (64,), generator=g)
    b[:8, :].scatter_(1, y[:8, None], 15.0)   # base confident on the gold token
    z[8:16, :].scatter_(1, y[8:16, None], 15.0)  # adapted confident
    b[16:24, :].scatter_(1, y[16:24, None], -15.0)  # base strongly disprefers gold
    full, binary, nontarget = kl_decomposition(b, z, y)
    assert full.dtype == torch.float64
    p_y = torch.softmax(b, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(full, binary + (1 - p_y) * nontarget, rtol=1e-10, atol=1e-12)
    # Each term against an independent float64 computation.
    p, q = torch.softmax(b, -1), torch.softmax(z, -1)
    torch.testing.assert_close(full, (p * (p.log() - q.log())).sum(-1), rtol=1e-9, atol=1e-12)
    mask = torch.nn.functional.one_hot(y, 50).bool()
    pt = p.masked_fill(mask, 0) / (1 - p_y)[:, None]
    qt = q.masked_fill(mask, 0) / (1 - q.gather(1, y[:, None]))
    want_nt = torch.where(mask, torch.zeros_like(pt), pt * (pt / qt).log()).sum(-1)
    torch.testing.assert_close(nontarget, want_nt, rtol=1e-8, atol=1e-10)
    # ... and the library's loss computes the same non-target KL.
    _, _, kl_rows = nontarget_kl_loss(z, b, y, reduction="none", return_components=True, backend="torch")
    torch.testing.assert_close(kl_rows, nontarget, rtol=1e-8, atol=1e-10)


def _train_one_row(objective, steps, lr):
    torch.manual_seed(0)
    b = torch.tensor([4.0, 2.0, 1.0, 0.0, -1.0, -7.0], dtype=torch.float64)  # gold y = 5, P_y ~ 1.6e-5
    y = torch.tensor([5])
    z = b.clone().requires_grad_()
    opt = torch.optim.SGD([z], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        objective(z[None], b[None], y).backward()
        opt.step()
    return z.detach(), b, y


@pytest.mark.parametrize("lam", [0.3, 3.0])
def test_one_row_toy_full_kl_stalls(lam):
    def full(z, b, y):
        ce = torch.nn.functional.cross_entropy(z, y)
        return ce + lam * torch.nn.functional.kl_div(torch.log_softmax(z, -1), torch.log_softmax(b, -1),
                                                     log_target=True, reduction="batchmean")
    z, b, y = _train_one_row(full, steps=800, lr=1.0)
    p_y = torch.softmax(b, -1)[5].item()
    q_y = torch.softmax(z, -1)[5].item()
    assert q_y == pytest.approx((1 + lam * p_y) / (1 + lam), abs=1e-4)


@pytest.mark.parametrize("lam", [1.0, 3.0])
def test_one_row_toy_nontarget_kl_goes_to_one(lam):
    def nontarget(z, b, y):
        return nontarget_kl_loss(z, b, y, kl_weight=lam, backend="torch")
    z, b, y = _train_one_row(nontarget, steps=600, lr=2.0)
    q_y = torch.softmax(z, -1)[5].item()
    assert q_y > 0.995
    _, _, nontarget_kl = kl_decomposition(b[None], z[None], y)
    assert nontarget_kl.item() < 1e-3  # starts at 0, pushed up by CE early on, pulled back


@pytest.fixture(scope="module")
def peft_pair():
    base = tiny_llama(seed=3)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0))
    return base, model


def _batches(n=3, bsz=4, seq=10, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (bsz, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0
        ids[0, 7:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_forgetting_zero_for_untouched_adapter(peft_pair):
    base, model = peft_pair
    m = forgetting_metrics(model, _batches(), progress=False)  # LoRA B starts at zero: the model is the base
    assert m["lf_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["lf"] == pytest.approx(m["base_entropy"], rel=1e-6)
    assert m["retention_ppl"] == pytest.approx(m["base_ppl"], rel=1e-5)
    assert m["accuracy_drift"] == 0.0 and m["agreement"] == 1.0
    assert m["tokens"] == 3 * (4 * 9 - 3)  # shifted positions, less the 3 padded ones per batch


def test_forgetting_metrics_match_manual_and_base_model(peft_pair):
    base, model0 = peft_pair
    model = copy.deepcopy(model0)
    perturb_trainable(model, scale=0.5)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = _batches()
    via_disable = forgetting_metrics(model, batches, progress=False)
    via_base = forgetting_metrics(model, batches, base_model=base, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored after disable_adapter
    for k in via_disable:
        assert via_disable[k] == pytest.approx(via_base[k], rel=1e-5, abs=1e-7), k
    # Manual computation over all batches.
    cross = ent = nll = 0.0
    n = 0
    with torch.no_grad():
        for batch in batches:
            zl = model(**batch).logits[:, :-1].double()
            bl = base(**batch).logits[:, :-1].double()
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
            keep = labels != -100
            lq, lp = zl.log_softmax(-1)[keep], bl.log_softmax(-1)[keep]
            cross += -(lp.exp() * lq).sum().item()
            ent += -(lp.exp() * lp).sum().item()
            nll += -lq.gather(1, labels[keep][:, None]).sum().item()
            n += int(keep.sum())
    assert via_disable["lf"] == pytest.approx(cross / n, rel=1e-5)
    assert via_disable["lf_kl"] == pytest.approx((cross - ent) / n, rel=1e-4)
    assert via_disable["lf_kl"] > 1e-3
    assert via_disable["retention_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_forgetting_needs_a_base():
    with pytest.raises(TypeError, match="base_model"):
        forgetting_metrics(tiny_llama(), _batches(1), progress=False)


def test_evaluate_lm_by_hand():
    model = tiny_llama(seed=1)
    batch = _batches(1)[0]
    labels = batch["input_ids"].clone()
    labels[:, :5] = -100  # a "prompt"
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    m = evaluate_lm(model, [batch], progress=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    assert m["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    keep = target != -100
    hit = logits.argmax(-1) == target
    assert m["accuracy"] == pytest.approx(hit[keep].float().mean().item())
    assert m["sequence_accuracy"] == pytest.approx((hit | ~keep).all(1).float().mean().item())
    assert m["tokens"] == int(keep.sum())
