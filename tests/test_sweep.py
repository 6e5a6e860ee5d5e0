"""`kl-nontarget sweep` end to end on a tiny local model folder and local jsonl files (kl_nontarget/cli/sweep.py)."""

import json

import pytest

from kl_nontarget.cli import main

from tiny_models import messages_file, prompt_completion_file, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def sweep_flags(out):
    return ["--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate",
            "0.05", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
            "--max_length", "64", "--retention_samples", "4"]


def test_sweep_end_to_end(model_folder, tmp_path, capsys):
    train = prompt_completion_file(tmp_path / "train.jsonl")
    held_out = prompt_completion_file(tmp_path / "eval.jsonl", n=6, seed=9)
    out = tmp_path / "sweep"
    code = main(["sweep", "--model_name_or_path", str(model_folder), "--dataset_name", str(train), "--eval_dataset",
                 str(held_out), "--kl_weights", "0,0.3,1", "--baseline", "full_kl", *sweep_flags(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "frontier.png").stat().st_size > 1000
    runs = results["runs"]
    assert [(r["method"], r["kl_weight"]) for r in runs] == [("lora", 0.0), ("nontarget_kl", 0.3),
                                                             ("nontarget_kl", 1.0), ("full_kl", 0.3), ("full_kl", 1.0)]
    keys = {"task", "seed", "method", "kl_weight", "target_loss", "target_accuracy", "forgetting", "lf",
            "retention_ppl"}
    for r in runs:
        assert keys <= set(r) and r["task"] == "train" and r["seed"] == 0
        assert r["forgetting"] > 0 and r["target_loss"] > 0
    # Every run started from the base: its record holds the target loss before training, and no drift.
    assert results["base"]["forgetting"] == 0.0 and results["base"]["tasks"]["train"]["target_loss"] > 0
    # The regularizer keeps the model closer to its base than plain LoRA at the same steps and rate.
    lora = runs[0]["forgetting"]
    assert runs[2]["forgetting"] < lora
    for run in runs:
        tag = f"train-{run['method']}-{run['kl_weight']:g}-seed0"
        assert (out / "adapters" / tag / "adapter_config.json").exists()
    assert "least forgetting at matched target loss" in capsys.readouterr().out


def test_sweep_messages_and_user_retention_data(model_folder, tmp_path, capsys):
    data = messages_file(tmp_path / "chat.jsonl")
    retention = write_jsonl(tmp_path / "retention.jsonl",
                            [{"text": f"w{i} w{i + 1} w{i + 2} w{i + 3} ."} for i in range(6)])
    out = tmp_path / "sweep"
    code = main(["sweep", "--model_name_or_path", str(model_folder), "--dataset_name", str(data), "--eval_dataset",
                 str(data), "--kl_weights", "1", "--retention_data", str(retention), "--task_name", "chat",
                 *sweep_flags(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["lora", "nontarget_kl"]
    assert "full_kl" not in capsys.readouterr().out  # no baseline asked for: none reported
    assert results["config"]["extra"]["retention"] == str(retention)


def test_sweep_compares_peft_variants(model_folder, tmp_path, capsys):
    # Each variant over the whole grid, with its own learning rate chosen on half of the evaluation data.
    train = prompt_completion_file(tmp_path / "train.jsonl")
    held_out = prompt_completion_file(tmp_path / "eval.jsonl", n=6, seed=9)
    out = tmp_path / "sweep"
    code = main(["sweep", "--model_name_or_path", str(model_folder), "--dataset_name", str(train), "--eval_dataset",
                 str(held_out), "--kl_weights", "0,1", "--baseline", "full_kl", "--peft_variants", "lora,pissa,ia3",
                 "--learning_rates", "0.01,0.05", *sweep_flags(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["variant"], r["method"]) for r in runs] == [(v, m) for v in ("lora", "pissa", "ia3")
                                                           for m in ("lora", "nontarget_kl", "full_kl")]
    chosen = {name.split(" / ")[0]: c for name, c in results["base"]["tasks"]["train"]["adapters"].items()}
    assert set(results["base"]["tasks"]["train"]["adapters"]) == {f"{v} / q_proj,v_proj / r=4"
                                                                   for v in ("lora", "pissa", "ia3")}
    assert chosen["lora"]["lr"] in (0.01, 0.05) and chosen["ia3"]["lr"] in (0.1, 0.5)  # IA3's grid is scaled by 10
    assert all(set(c["sweep"]) == {str(lr * (10 if v == "ia3" else 1)) for lr in (0.01, 0.05)}
               for v, c in chosen.items())
    assert all(r["forgetting"] > 0 for r in runs if r["method"] != "lora" or r["variant"] != "pissa")
    printed = capsys.readouterr().out
    assert "train / pissa" in printed and "the panel's plain run's" in printed
    assert (out / "adapters" / "train-pissa-nontarget_kl-1-seed0" / "adapter_config.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--peft_variants", "lora,qlora9"], "unknown PEFT variant"),
    (["--learning_rates", "1e-3,x"], "--learning_rates must be comma-separated numbers"),
    (["--learning_rates", "0,1e-3"], "--learning_rates must be numbers > 0"),
    (["--peft_variants", "ia3", "--lora_target_modules", "all-linear"], "needs target module names or a preset"),
    (["--kl_weights", "0,-1"], "--kl_weights must be numbers >= 0"),
    (["--kl_weights", "0"], "at least one weight > 0"),
    (["--kl_weights", "a,b"], "comma-separated numbers"),
    (["--baseline", "mse"], "--baseline must be one of"),
    (["--seeds", "0"], "--seeds must be >= 1"),
])
def test_bad_grid_is_refused_before_training(model_folder, tmp_path, capsys, flags, message):
    train = prompt_completion_file(tmp_path / "train.jsonl")
    out = tmp_path / "never"
    code = main(["sweep", "--model_name_or_path", str(model_folder), "--dataset_name", str(train), *flags,
                 "--output_dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("kl-nontarget sweep: error:")
    assert not out.exists()


def test_sweep_needs_an_evaluation_split(model_folder, tmp_path, capsys):
    train = prompt_completion_file(tmp_path / "train.jsonl")
    code = main(["sweep", "--model_name_or_path", str(model_folder), "--dataset_name", str(train),
                 "--output_dir", str(tmp_path / "out")])
    assert code == 2 and "has no split" in capsys.readouterr().err


def test_sweep_shares_one_base_pass(model_folder, tmp_path, base_rows_counter):
    """--precompute_base true: the sweep's non-target KL runs share one cache, built by the first of them."""
    train = prompt_completion_file(tmp_path / "train.jsonl")
    held_out = prompt_completion_file(tmp_path / "eval.jsonl", n=6, seed=9)
    cache = tmp_path / "cache"
    code = main(["sweep", "--model_name_or_path", str(model_folder), "--dataset_name", str(train), "--eval_dataset",
                 str(held_out), "--kl_weights", "0.3,1,3", "--precompute_base", "true", "--base_cache_dir", str(cache),
                 *sweep_flags(tmp_path / "sweep")])
    assert code == 0
    assert len(list(cache.glob("*.arrow"))) == 1
    # the training data in batches of 4, once, plus the layout check; the three runs' 9 steps run no base pass
    runs = json.loads((tmp_path / "sweep" / "results.json").read_text())["runs"]
    assert [r["kl_weight"] for r in runs if r["method"] == "nontarget_kl"] == [0.3, 1.0, 3.0]
    examples = len(train.read_text().splitlines())
    assert base_rows_counter["calls"] == -(-examples // 4) + 1
