"""The forgetting lab (kl_nontarget/lab/): sequential tasks with merges, the power-law fit, and the module-preset
comparison of the sweep; each through its command on a tiny model, and the fit on synthetic data."""

import json

import numpy as np
import pytest
import torch

from kl_nontarget.cli import main
from kl_nontarget.lab.power_law import fit_power_law
from kl_nontarget.lab.sequence import merged

from tiny_models import collate, peft_model, prompt_completion_file, toy_token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def common_flags(out):
    return ["--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate",
            "0.05", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
            "--max_length", "64", "--retention_samples", "4"]


# -- merging ---------------------------------------------------------------------------------------------------------


def test_a_merge_keeps_the_adapted_logits(model_dirs):
    model = peft_model(model_dirs)  # an adapter away from zero
    batch = collate(toy_token_batches(3, seed=2))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapted = model(**inputs).logits
    plain, error = merged(model, batch)
    assert not hasattr(plain, "peft_config") and type(plain).__name__ == "LlamaForCausalLM"
    # float32: W + BA summed once instead of W x + B (A x): rounding of logits of size ~10, nothing more
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, adapted, atol=1e-4, rtol=1e-5)
    assert 0 <= error < 1e-4


def test_a_merge_that_changes_the_logits_is_refused(model_dirs, monkeypatch):
    model = peft_model(model_dirs)
    original = model.merge_and_unload

    def sloppy(*args, **kwargs):
        out = original(*args, **kwargs)
        with torch.no_grad():
            out.lm_head.weight.add_(0.5)
        return out

    monkeypatch.setattr(model, "merge_and_unload", sloppy)
    with pytest.raises(ValueError, match="merging the adapter changed the logits"):
        merged(model, collate(toy_token_batches(2)))


# -- sequences -------------------------------------------------------------------------------------------------------


def test_sequence_end_to_end(model_folder, tmp_path, capsys):
    first = prompt_completion_file(tmp_path / "first.jsonl", n=12, seed=1)
    second = prompt_completion_file(tmp_path / "second.jsonl", n=12, seed=2)
    out = tmp_path / "seq"
    code = main(["sequence", "--model_name_or_path", str(model_folder), "--stages", f"{first},{second}",
                 "--kl_weights", "0,1", "--lora_ranks", "2,4", *common_flags(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert [(s["r"], s["kl_weight"], s["stage"], s["task"]) for s in stages] == [
        (r, w, stage, task) for r in (2, 4) for w in (0.0, 1.0) for stage, task in ((1, "first"), (2, "second"))]
    for s in stages:
        assert list(s["target_loss"]) == ["first", "second"][:s["stage"]]  # every task seen so far
        assert s["forgetting"] > 0 and s["merge_error"] < 1e-4
    # The second stage starts from the first one's merged model, and the regularizer keeps it closer to the base.
    by = {(s["r"], s["kl_weight"], s["stage"]): s for s in stages}
    assert by[(4, 0.0, 2)]["forgetting"] != by[(4, 0.0, 1)]["forgetting"]
    assert by[(4, 1.0, 2)]["forgetting"] < by[(4, 0.0, 2)]["forgetting"]
    assert results["config"]["reference"] == "previous"
    assert (out / "sequence.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "forgets" in printed and "as much as plain LoRA" in printed


def test_sequence_towards_the_original_and_its_toy_form(model_folder, tmp_path):
    first = prompt_completion_file(tmp_path / "a.jsonl", n=10, seed=3)
    second = prompt_completion_file(tmp_path / "b.jsonl", n=10, seed=4)
    out = tmp_path / "orig"
    assert main(["sequence", "--model_name_or_path", str(model_folder), "--stages", f"{first},{second}",
                 "--kl_weights", "1", "--reference", "original", *common_flags(out)]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["reference"] == "original"
    toy = tmp_path / "toy"
    assert main(["sequence", "--output_dir", str(toy), "--max_steps", "2", "--kl_weights", "0",
                 "--retention_samples", "2", "--per_device_train_batch_size", "8"]) == 0
    assert [s["task"] for s in json.loads((toy / "results.json").read_text())["stages"]] == ["shifted", "near"]


@pytest.mark.parametrize("flags, message", [
    (["--stages", "DATA"], "at least two datasets"),
    (["--stages", "DATA,DATA", "--reference", "nearest"], "--reference must be one of"),
    (["--stages", "DATA,DATA", "--lora_ranks", "0,4"], "--lora_ranks must be integers >= 1"),
    (["--stages", "DATA,DATA", "--eval_stages", "DATA"], "one dataset per --stages entry"),
    (["--stages", "DATA,DATA", "--lora_target_modules", "attn"], "unknown target_modules preset 'attn'"),
])
def test_bad_sequences_are_refused(model_folder, tmp_path, capsys, flags, message):
    data = str(prompt_completion_file(tmp_path / "d.jsonl", n=8))
    flags = [f.replace("DATA", data) for f in flags]
    out = tmp_path / "never"
    assert main(["sequence", "--model_name_or_path", str(model_folder), *flags, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("kl-nontarget sequence: error:")
    assert not out.exists()


# -- the power law ---------------------------------------------------------------------------------------------------


def _synthetic(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [(n, s, (0.02 * n ** 0.3 * s ** 0.5 + 2.0) * (1 + noise * rng.standard_normal()))
            for n in (1e3, 4e3, 1.6e4, 6.4e4) for s in (4, 8, 16, 32, 64)]


def test_the_fit_recovers_known_exponents():
    exact = fit_power_law(_synthetic(), bootstrap=20)
    assert exact.a == pytest.approx(0.3, abs=1e-3) and exact.b == pytest.approx(0.5, abs=1e-3)
    assert exact.E == pytest.approx(2.0, abs=1e-3) and exact.A == pytest.approx(0.02, rel=1e-2)
    assert exact.r2 > 0.9999
    noisy = fit_power_law(_synthetic(noise=0.003, seed=1), bootstrap=100)
    assert abs(noisy.a - 0.3) < 0.05 and abs(noisy.b - 0.5) < 0.05 and abs(noisy.E - 2.0) < 0.1
    assert 0 < noisy.a_std < 0.05 and 0 < noisy.b_std < 0.05  # the bootstrap sees the noise
    assert noisy.predict(1e3, 4) == pytest.approx(_synthetic()[0][2], rel=0.02)


@pytest.mark.parametrize("points, message", [
    ([(1e3, 4, 2.1), (1e3, 8, 2.2), (4e3, 4, 2.3), (4e3, 8, 2.4)], "at least 5 points"),
    ([(1e3, s, 2.0 + s / 100) for s in (1, 2, 4, 8, 16)], "2 parameter counts"),
    ([(0, 4, 2.1)] + _synthetic()[:5], "N > 0"),
])
def test_the_fit_refuses_too_few_or_bad_points(points, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(points)


def test_powerlaw_end_to_end(model_folder, tmp_path, capsys):
    train = prompt_completion_file(tmp_path / "train.jsonl", n=12)
    out = tmp_path / "law"
    code = main(["powerlaw", "--model_name_or_path", str(model_folder), "--dataset_name", str(train),
                 "--lora_ranks", "1,4", "--target_presets", "attention,mlp_up_gate", "--measure_steps", "1,2,3",
                 "--kl_weights", "0,1", *common_flags(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["fits"]) == {"plain LoRA", "non-target KL λ=1"}
    points = [p for p in results["points"] if p["method"] == "plain LoRA"]
    assert len(points) == 4 * 3 and len({p["trainable_parameters"] for p in points}) == 4
    assert all(p["lf"] > results["base"]["entropy"] - 1e-6 for p in points)  # Lf >= H: the base is the minimum
    for fit in results["fits"].values():
        assert np.isfinite([fit["a"], fit["b"], fit["E"]]).all() and fit["E"] < min(p["lf"] for p in points) + 1
    assert (out / "powerlaw.png").read_bytes()[:4] == b"\x89PNG"
    assert "Lf = A * N^a * S^b + E" in capsys.readouterr().out


def test_powerlaw_with_too_few_points_is_refused(model_folder, tmp_path, capsys):
    train = prompt_completion_file(tmp_path / "train.jsonl", n=8)
    code = main(["powerlaw", "--model_name_or_path", str(model_folder), "--dataset_name", str(train),
                 "--lora_ranks", "4", "--measure_steps", "1,2", "--output_dir", str(tmp_path / "never")])
    assert code == 2 and "too few points to fit" in capsys.readouterr().err


# -- module presets in the sweep -------------------------------------------------------------------------------------


def test_sweep_compares_target_presets(model_folder, tmp_path, capsys):
    train = prompt_completion_file(tmp_path / "train.jsonl")
    held_out = prompt_completion_file(tmp_path / "eval.jsonl", n=6, seed=9)
    out = tmp_path / "presets"
    code = main(["sweep", "--model_name_or_path", str(model_folder), "--dataset_name", str(train), "--eval_dataset",
                 str(held_out), "--kl_weights", "0,1", "--target_presets", "attention,mlp_up_gate,all-linear",
                 *common_flags(out)])
    assert code == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["targets"], r["method"]) for r in runs] == [(t, m) for t in ("attention", "mlp_up_gate", "all-linear")
                                                           for m in ("lora", "nontarget_kl")]
    params = {r["targets"]: r["trainable_parameters"] for r in runs}
    assert params["all-linear"] > params["attention"] > 0 and params["all-linear"] > params["mlp_up_gate"] > 0
    assert "train / mlp_up_gate" in capsys.readouterr().out


def test_sft_resolves_a_preset(model_folder, tmp_path):
    train = prompt_completion_file(tmp_path / "train.jsonl", n=8)
    out = tmp_path / "sft"
    assert main(["sft", "--model_name_or_path", str(model_folder), "--dataset_name", str(train),
                 "--lora_target_modules", "mlp_up_gate", "--output_dir", str(out), "--max_steps", "1",
                 "--per_device_train_batch_size", "4", "--report_to", "none"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["gate_proj", "up_proj"]
