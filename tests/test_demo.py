"""The demo end to end on a tiny internal config, its pieces, and the `kl-nontarget eval` subcommand."""

import json
import math

import pytest
import torch

from kl_nontarget import cli
from kl_nontarget.demo import run_demo, tiny_config
from kl_nontarget.demo.base import load_or_pretrain
from kl_nontarget.demo.corpus import Grammar, build_tokenizer
from kl_nontarget.demo.tasks import TASKS, answer_map, build_task, split_pairs
from kl_nontarget.sweep.runs import FullKLTrainer, choose_baseline

RUN_KEYS = {"task", "variant", "targets", "r", "trainable_parameters", "seed", "method", "kl_weight", "target_loss",
            "target_accuracy", "forgetting", "lf", "retention_ppl"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cache = tmp_path_factory.mktemp("cache")
    results = run_demo(tiny_config(), out, cache_dir=cache, progress=False, log=lambda *a: None)
    return out, cache, results


def test_results_schema_and_files(demo_run):
    out, _, results = demo_run
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"runs", "base", "config", "versions", "seconds"}
    assert isinstance(data["seconds"], float) and data["seconds"] > 0
    cfg = tiny_config()
    assert len(data["runs"]) == len(cfg.tasks) * cfg.seeds * (1 + 2 * len(cfg.kl_weights))
    for run in data["runs"]:
        assert set(run) == RUN_KEYS
        assert run["task"] in ("shifted", "near") and run["method"] in ("lora", "nontarget_kl", "full_kl")
        assert isinstance(run["seed"], int) and isinstance(run["kl_weight"], float)
        assert (run["kl_weight"] == 0.0) == (run["method"] == "lora")
        for k in ("target_loss", "target_accuracy", "forgetting", "lf", "retention_ppl"):
            assert isinstance(run[k], float) and math.isfinite(run[k])
        assert 0.0 <= run["target_accuracy"] <= 1.0
        # forgetting is Lf - H(base) = KL(base || fine-tuned) >= 0, with Lf kept as its own key
        assert run["forgetting"] > 0
        assert run["lf"] == pytest.approx(run["forgetting"] + data["base"]["entropy"], rel=1e-5)
    assert {"entropy", "lf", "retention_ppl", "tasks"} <= set(data["base"])
    assert data["base"]["forgetting"] == 0.0
    assert data["base"]["lf"] == pytest.approx(data["base"]["entropy"], rel=1e-6)
    assert set(data["base"]["tasks"]) == {"shifted", "near"}
    assert {"lr", "steps"} <= set(data["base"]["tasks"]["shifted"])
    assert data["base"]["tasks"]["shifted"]["lr"] in cfg.lr_grid  # the sweep picked one of the grid
    assert {"torch", "transformers", "peft"} <= set(data["versions"])
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "base_heldout.txt").read_text().strip()


def test_base_model_is_cached(demo_run):
    _, cache, _ = demo_run
    model, tok, grammar, path, cached = load_or_pretrain(tiny_config().base, 0, cache, progress=False,
                                                         log=lambda *a: None)
    assert cached and path.parent == cache
    assert model.config.vocab_size == len(tok) == len(grammar.vocabulary)


def test_eval_subcommand_on_saved_adapter(demo_run, tmp_path, capsys):
    out, _, _ = demo_run
    adapter = out / "adapters" / "shifted-lora-0-seed0"
    assert (adapter / "adapter_config.json").exists()
    report = tmp_path / "metrics.json"
    rc = cli.main(["eval", "--adapter", str(adapter), "--data", str(out / "base_heldout.txt"), "--json", str(report),
                   "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert "Lf" in capsys.readouterr().out
    text_metrics = json.loads(report.read_text())
    assert text_metrics["lf_kl"] >= 0 and text_metrics["lf"] == pytest.approx(
        text_metrics["lf_kl"] + text_metrics["base_entropy"], rel=1e-5)
    # The same text as JSON lines gives the same numbers.
    lines = [ln for ln in (out / "base_heldout.txt").read_text().splitlines() if ln.strip()]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"content": ln}) + "\n" for ln in lines))
    report2 = tmp_path / "metrics2.json"
    assert cli.main(["eval", "--adapter", str(adapter), "--data", str(jsonl), "--text-field", "content",
                     "--json", str(report2), "--no-progress", "--device", "cpu"]) == 0
    assert json.loads(report2.read_text())["lf"] == pytest.approx(text_metrics["lf"], rel=1e-6)
    # A wrong field is a clear error, not a traceback.
    assert cli.main(["eval", "--adapter", str(adapter), "--data", str(jsonl), "--no-progress"]) == 2
    assert "--text-field" in capsys.readouterr().err


def test_cli_parser():
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--quick", "--seeds", "3", "--out", "x"])
    assert args.quick and args.seeds == 3 and args.out == "x" and args.model == "toy"
    assert parser.parse_args(["demo", "--model", "smollm2"]).model == "smollm2"
    assert cli.main([]) == 0


def test_tasks_are_what_they_claim():
    g = Grammar(0)
    tok = build_tokenizer(g.vocabulary)
    shifted, near = answer_map(g, "shifted"), answer_map(g, "near")
    verbs = {v for t in g.topics for v in t.verbs}
    assert all(x in verbs and g.topic_of_verb[x] is not g.topic_of_verb[v] for v, x in shifted.items())
    assert all(x in g.objects[v] for v, x in near.items())
    pairs = split_pairs(g)
    assert not set(pairs["train"]) & set(pairs["test"])
    data = build_task(g, tok, "shifted", dict(train=4, val=2, test=2))
    row = data["train"][0]
    assert sum(lbl != -100 for lbl in row["labels"]) == 2  # "X ."
    assert set(TASKS) == {"shifted", "near"}


def test_full_kl_trainer_loss():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 11, generator=g, requires_grad=True)
    b = torch.randn(6, 11, generator=g)
    y = torch.randint(0, 11, (6,), generator=g)
    trainer = FullKLTrainer.__new__(FullKLTrainer)  # only the loss method is exercised
    trainer.kl_weight, trainer.temperature = 0.7, 1.0
    loss, ce, kl = trainer.compute_regularized_loss(z, b, y, 9)
    p, logq = torch.softmax(b.double(), -1), torch.log_softmax(z.double(), -1)
    want_kl = (p * (p.log() - logq)).sum()
    want_ce = -logq.gather(1, y[:, None]).sum()
    assert loss.item() == pytest.approx(((want_ce + 0.7 * want_kl) / 9).item(), rel=1e-5)
    assert kl.item() == pytest.approx(want_kl.item() / 9, rel=1e-5)
    assert ce.item() == pytest.approx(want_ce.item() / 9, rel=1e-5)


def test_choose_baseline_prefers_fewer_steps_within_tolerance():
    history = {1e-3: [(10, 0.9), (20, 0.5)], 3e-3: [(10, 0.31), (20, 0.30), (30, 0.29)]}
    assert choose_baseline(history, 0.02) == (3e-3, 10, 0.31)
    assert choose_baseline(history, 0.0) == (3e-3, 30, 0.29)


def test_sweep_snapshot_equals_a_retrained_plain_lora_run(tmp_path):
    # The demo reuses the sweep's weights at the chosen step as the seed-0 plain-LoRA run: it must be that run.
    from kl_nontarget.demo.base import load_or_pretrain as _load
    from kl_nontarget.evaluation.loader import padded_loader
    from kl_nontarget.sweep.runs import ValidationCallback, finetune, lora_from_snapshot
    from kl_nontarget.sweep.variants import AdapterSpec

    cfg = tiny_config()
    model, tok, grammar, _, _ = _load(cfg.base, 0, tmp_path, progress=False, log=lambda *a: None)
    data = build_task(grammar, tok, "shifted", cfg.sizes)
    pad = tok.pad_token_id
    kw = dict(kl_weight=0.0, lr=1e-2, seed=0, batch_size=4, progress=False)
    cb = ValidationCallback(padded_loader(data["val"], pad), every=2)
    adapter = AdapterSpec()
    finetune(model, data["train"], pad, adapter, method="lora", steps=6, callbacks=[cb], **kw)
    assert sorted(cb.snapshots) == [2, 4, 6]
    again = finetune(model, data["train"], pad, adapter, method="lora", steps=4, **kw)
    restored = lora_from_snapshot(model, cb.snapshots[4], seed=0, adapter=adapter)
    trained = dict(again.named_parameters())
    for name, p in restored.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, trained[name], rtol=0, atol=0)
    assert any(p.abs().sum() > 0 for n, p in restored.named_parameters() if "lora_B" in n)
