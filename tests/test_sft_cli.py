"""`kl-nontarget sft` end to end (kl_nontarget/cli/sft.py, sft_data.py) on a tiny local model folder and local files."""

import json
import subprocess
import sys

import pytest
import torch

from kl_nontarget.cli import main

from tiny_models import messages_file, prompt_completion_file, toy_prompt_completions, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def fast_flags(out):
    return ["--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--learning_rate", "0.1", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
            "--max_length", "64", "--save_strategy", "no", "--disable_tqdm", "true"]


def log_history(out):
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def check_adapter(out, base, r=4):
    from peft import AutoPeftModelForCausalLM

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == r and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["base_model_name_or_path"] == str(base)
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().max() > 0 for p in trained)  # lora_B starts at zero: the adapter was trained


def test_prompt_completion_jsonl_end_to_end(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    data = prompt_completion_file(tmp_path / "train.jsonl")
    held_out = prompt_completion_file(tmp_path / "eval.jsonl", n=4, seed=9)
    rc = main(["sft", "--model_name_or_path", str(model_folder), "--dataset_name", str(data), "--kl_weight", "0.5",
               "--eval_dataset", str(held_out), *fast_flags(out)])
    assert rc == 0
    check_adapter(out, model_folder)
    history = log_history(out)
    logs = [h for h in history if "loss" in h]
    assert len(logs) == 2
    # eval_strategy "no" with an eval_dataset: evaluated once, at the end
    assert [h["step"] for h in history if "eval_nontarget_kl" in h] == [2]
    for h in logs:
        assert h["loss"] == pytest.approx(h["ce_loss"] + 0.5 * h["nontarget_kl"], rel=1e-4)
    assert logs[1]["nontarget_kl"] > 0  # the adapter moved after the first step
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.kl_weight == 0.5 and args.learning_rate == 0.1
    printed = capsys.readouterr().out
    assert "'nontarget_kl'" in printed  # the Trainer's own log lines
    assert "2 steps with kl_weight 0.5" in printed and f"adapter saved to {out}" in printed
    assert "merge_and_unload()" in printed and "evaluation (step 2): eval_ce_loss" in printed


def test_messages_jsonl_from_a_config_file_with_evaluation(model_folder, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "sft.yaml"
    config.write_text(f"""\
model_name_or_path: {model_folder}
dataset_name: {messages_file(tmp_path / "train.jsonl")}
eval_dataset: {messages_file(tmp_path / "eval.jsonl", n=4, seed=7)}
eval_strategy: steps
eval_steps: 2
per_device_eval_batch_size: 4
kl_weight: 0.3
kl_direction: reverse
kl_fused_linear: false
""")
    rc = main(["sft", "--config", str(config), *fast_flags(out)])
    assert rc == 0
    check_adapter(out, model_folder)
    history = log_history(out)
    assert all("nontarget_kl" in h for h in history if "loss" in h)
    evaluated = [h for h in history if "eval_nontarget_kl" in h]
    assert len(evaluated) == 1 and evaluated[0]["eval_nontarget_kl"] > 0
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.kl_weight, args.kl_direction, args.kl_fused_linear) == (0.3, "reverse", False)


def test_embedded_default_runs_without_model_or_data(tmp_path, monkeypatch, capsys):
    from kl_nontarget.demo import config as demo_config

    # The demo's tiny test settings stand in for its quick base model (which takes a minute to pretrain).
    monkeypatch.setattr(demo_config, "quick_config", demo_config.tiny_config)
    monkeypatch.setenv("KL_NONTARGET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["sft", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8",
               "--logging_steps", "1", "--disable_tqdm", "true"])
    assert rc == 0
    assert (out / "adapter_model.safetensors").is_file()
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.learning_rate == 1e-2  # the embedded default's, since none was given
    assert all("nontarget_kl" in h for h in log_history(out) if "loss" in h)
    assert "the demo's base model on its 'shifted' task" in capsys.readouterr().out


def bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kl_weight: 0.5\nkl_wieght: 0.3\n")
    return ["--config", str(path)]


def bad_kl_weight_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kl_weight: -0.5\n")
    return ["--config", str(path)]


def no_usable_column(tmp_path):
    return ["--dataset_name", str(write_jsonl(tmp_path / "qa.jsonl", [{"question": "w1 w2", "answer": "w3"}] * 4))]


def prompt_only(tmp_path):
    return ["--dataset_name", str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2"}] * 4))]


def broken_reference(tmp_path):
    # The reference is loaded last, after the Trainer made the output folder: the folder must be removed again.
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text("{}")
    return ["--use_peft", "false", "--ref_model_name_or_path", str(ref)]


@pytest.mark.parametrize("extra, message", [
    (["--kl_weight", "-0.5"], "kl_weight must be a finite number >= 0, got -0.5"),
    (["--kl_weight", "much"], "invalid float value: 'much'"),
    (bad_kl_weight_in_yaml, "kl_weight must be a finite number >= 0, got -0.5"),
    (["--kl_wieght", "0.5"], "unknown option(s): --kl_wieght (did you mean kl_weight?)"),
    (bad_config, "bad.yaml: kl_wieght (did you mean kl_weight?)"),
    (["--dataset_name", "missing.jsonl"], "no such data file or folder: missing.jsonl"),
    (no_usable_column, "has no column to train on: SFT needs 'text'"),
    (prompt_only, "('prompt' needs a 'completion' column)"),
    (["--model_name_or_path", "./no-such-model"], "no such model folder or file: ./no-such-model"),
    (["--use_peft", "false"], "full fine-tuning (use_peft false) needs a frozen reference"),
    (["--eval_strategy", "steps"], "has no split 'test'"),
    (broken_reference, "Unrecognized model in"),
])
def test_bad_input_is_one_message_exit_2_nothing_written(model_folder, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    data = prompt_completion_file(tmp_path / "train.jsonl")
    extra = extra(tmp_path) if callable(extra) else extra
    argv = ["sft", "--model_name_or_path", str(model_folder), "--dataset_name", str(data), *fast_flags(out)]
    rc = main(argv + extra)  # later flags win, as on any command line
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("kl-nontarget sft: error: ") and message in err[-1]
    assert not out.exists()


def test_model_without_dataset_and_dataset_without_model(model_folder, tmp_path, capsys):
    assert main(["sft", "--model_name_or_path", str(model_folder), "--output_dir", str(tmp_path / "o")]) == 2
    assert "no dataset: pass --dataset_name" in capsys.readouterr().err
    data = prompt_completion_file(tmp_path / "train.jsonl")
    assert main(["sft", "--dataset_name", str(data), "--output_dir", str(tmp_path / "o")]) == 2
    assert "no model: pass --model_name_or_path" in capsys.readouterr().err
    assert main(["sft", "--eval_dataset", str(data), "--output_dir", str(tmp_path / "o")]) == 2
    assert "--eval_dataset needs --model_name_or_path and --dataset_name" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_lists_ours_and_trl_options(capsys):
    assert main(["sft", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--kl_weight", "--kl_temperature", "--kl_fused_linear", "--ref_model_name_or_path", "--use_peft",
                 "--lora_r", "--dataset_name", "--eval_dataset", "--learning_rate", "--config"):
        assert flag in text, flag


def test_console_script_exit_code_for_bad_input(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "kl_nontarget.cli", "sft", "--output_dir", str(out),
                             "--kl_weight", "-1"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "kl-nontarget sft: error: kl_weight must be a finite number >= 0, got -1.0"
    assert result.stdout == "" and not out.exists()


def test_example_config_trains_with_local_model_and_data(model_folder, tmp_path):
    # examples/sft.yaml names hub resources; the command line points it at local ones (the command line wins).
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "sft.yaml"
    out = tmp_path / "out"
    data = prompt_completion_file(tmp_path / "train.jsonl")
    rc = main(["sft", "--config", str(example), "--model_name_or_path", str(model_folder), "--dataset_name", str(data),
               "--output_dir", str(out), "--dtype", "float32", "--eval_strategy", "no", "--max_steps", "2",
               "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
               "--max_length", "64", "--disable_tqdm", "true"])
    assert rc == 0
    config = json.loads((out / "adapter_config.json").read_text())
    targets = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert config["r"] == 16 and {"q_proj", "down_proj"} <= targets  # all-linear
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.kl_weight, args.learning_rate, args.num_train_epochs) == (1.0, 2e-4, 1)
    assert all("nontarget_kl" in h for h in log_history(out) if "loss" in h)


def test_model_path_goes_through_kl_nontarget_models_when_installed(model_folder, tmp_path, monkeypatch):
    import types

    from kl_nontarget.cli.sft_data import InputError, resolve_model_path

    calls = []

    def resolve_model(spec, cache_dir=None, log=print):
        calls.append((spec, cache_dir))
        return model_folder  # e.g. the checkpoint made from a GGUF file

    monkeypatch.setitem(sys.modules, "kl_nontarget.models.loading", types.SimpleNamespace(resolve_model=resolve_model))
    gguf = tmp_path / "model.gguf"
    assert resolve_model_path(str(gguf)) == str(model_folder) and calls == [(str(gguf), None)]
    # Without the module: the spec passes through (a hub name), local paths are checked.
    monkeypatch.setitem(sys.modules, "kl_nontarget.models.loading", None)
    assert resolve_model_path("org/some-model") == "org/some-model"
    assert resolve_model_path(str(model_folder)) == str(model_folder)
    with pytest.raises(InputError, match="no such model folder or file"):
        resolve_model_path(str(gguf))
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="GGUF files need kl_nontarget.models.loading"):
        resolve_model_path(str(gguf))
    with pytest.raises(InputError, match="not a model checkpoint folder"):
        resolve_model_path(str(tmp_path))


def test_local_dataset_forms(tmp_path):
    from datasets import Dataset, DatasetDict

    from kl_nontarget.cli.sft_data import InputError, load_data, load_datasets

    rows = toy_prompt_completions(6, seed=2)
    ds = Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "saved_dict"))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    ds.to_csv(str(tmp_path / "data.csv"), index=False)
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "part.jsonl", rows)
    for spec in ("saved", "saved_dict", "data.parquet", "data.csv", "files"):
        data = load_data(str(tmp_path / spec))
        train = data["train"] if hasattr(data, "keys") else data
        assert train.num_rows == 6 and train[0]["prompt"] == rows[0]["prompt"], spec
    (tmp_path / "notes.txt").write_text("w1 w2\n")
    with pytest.raises(InputError, match=r"unsupported data file type '.txt'"):
        load_data(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "w1"\n')
    with pytest.raises(InputError, match="cannot load the dataset"):
        load_data(str(tmp_path / "broken.jsonl"))

    # the evaluation split: a folder's test split, else a file's train split
    from kl_nontarget.cli.sft import parse_args

    run = parse_args(["--output_dir", "o", "--dataset_name", str(tmp_path / "saved_dict"), "--eval_strategy", "steps"])
    train, evaluation = load_datasets(run.script, run.mixture, want_eval=True)
    assert (train.num_rows, evaluation.num_rows) == (6, 2)
    run = parse_args(["--output_dir", "o", "--dataset_name", str(tmp_path / "saved"), "--eval_dataset",
                      str(tmp_path / "data.csv")])
    train, evaluation = load_datasets(run.script, run.mixture)
    assert (train.num_rows, evaluation.num_rows) == (6, 6)
    # TRL's `datasets:` mixture from a config file
    config = tmp_path / "mix.yaml"
    config.write_text(f"datasets:\n  - path: json\n    data_files: {tmp_path / 'files' / 'part.jsonl'}\n"
                      "test_split_size: 0.5\n")
    run = parse_args(["--config", str(config), "--output_dir", "o", "--eval_strategy", "steps"])
    train, evaluation = load_datasets(run.script, run.mixture, want_eval=True)
    assert (train.num_rows, evaluation.num_rows) == (3, 3)


# -- accelerate launch options, as `trl sft` takes them -------------------------------------------------------------


def test_accelerate_options_are_launch_arguments(tmp_path):
    from kl_nontarget.cli.sft import parse_args
    from kl_nontarget.cli.sft_data import InputError

    run = parse_args(["--output_dir", "o", "--num_processes", "2", "--kl_weight", "0.5", "--mixed_precision", "no"])
    assert run.launch_args == run.launch_cli == ["--num_processes", "2", "--mixed_precision", "no"]
    assert run.training.kl_weight == 0.5
    config = tmp_path / "sft.yaml"
    config.write_text("kl_weight: 0.5\nnum_processes: 2\ncpu: true\naccelerate_config: zero2\n")
    run = parse_args(["--config", str(config), "--output_dir", "o"])
    assert run.launch_args[0] == "--config_file" and run.launch_args[1].endswith("zero2.yaml")
    assert run.launch_args[2:] == ["--num_processes", "2", "--cpu"] and run.launch_cli == []
    with pytest.raises(InputError, match="accelerate launch option: .*invalid int value: 'two'"):
        parse_args(["--output_dir", "o", "--num_processes", "two"])


def test_relaunch_under_accelerate(tmp_path, monkeypatch, capsys):
    import os

    from accelerate.commands import launch

    from kl_nontarget.cli.sft_launch import LAUNCHED

    seen = []

    def fake_launch(args):
        seen.append((args, os.environ.get(LAUNCHED)))
        if len(seen) == 2:
            raise subprocess.CalledProcessError(returncode=2, cmd=["python"])

    monkeypatch.setattr(launch, "launch_command", fake_launch)
    argv = ["sft", "--output_dir", str(tmp_path / "o"), "--num_processes", "2", "--kl_weight", "0.5"]
    assert main(argv) == 0
    args, flag = seen[0]
    assert args.num_processes == 2 and args.module and args.training_script == "kl_nontarget.cli"
    assert args.training_script_args == ["sft", "--output_dir", str(tmp_path / "o"), "--kl_weight", "0.5"]
    assert flag == "1" and LAUNCHED not in os.environ  # set for the launched processes only
    assert main(argv) == 2  # the launched run's exit code
    # Inside a launched process the accelerate options are ignored: the run trains (here: fails on its input).
    monkeypatch.setenv(LAUNCHED, "1")
    assert main(["sft", "--output_dir", str(tmp_path / "o"), "--num_processes", "2", "--dataset_name", "x.jsonl"]) == 2
    assert len(seen) == 2 and "a dataset is given but no model" in capsys.readouterr().err


def test_single_process_accelerate_launch_end_to_end(model_folder, tmp_path):
    out = tmp_path / "out"
    data = prompt_completion_file(tmp_path / "train.jsonl")
    rc = main(["sft", "--model_name_or_path", str(model_folder), "--dataset_name", str(data), "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *fast_flags(out)])
    assert rc == 0
    check_adapter(out, model_folder)
    assert all("nontarget_kl" in h for h in log_history(out) if "loss" in h)
