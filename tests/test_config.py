"""The config dataclasses (kl_nontarget/training/config.py, NonTargetKLSFTConfig): fields, parsing, the trainers reading
them."""

import dataclasses
import warnings

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments
from trl import DPOConfig, ModelConfig, ScriptArguments, SFTConfig
from trl.scripts.utils import DatasetMixtureConfig

from kl_nontarget import NonTargetKLConfig, RegularizerOptions
from kl_nontarget.cli.sft import parse_args
from kl_nontarget.cli.sft_data import InputError
from kl_nontarget.integrations.trl import NonTargetKLSFTConfig, NonTargetKLSFTTrainer
from kl_nontarget.training.config import OPTION_OF_FIELD, NonTargetKLArguments
from kl_nontarget.training.trainer import NonTargetKLTrainer

from tiny_models import (
    collate,
    independent_loss,
    load_model,
    load_tokenizer,
    lora_config,
    peft_model,
    sgd_args,
    toy_prompt_completions,
    toy_token_batches,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = toy_token_batches(8, seed=3)
OURS = [f.name for f in dataclasses.fields(NonTargetKLArguments)]
# Options that differ from every default, as the config fields and as the RegularizerOptions they mean.
CUSTOM = dict(kl_weight=0.25, kl_temperature=1.5, kl_direction="reverse", kl_fused_linear=False, kl_target=0.05)
CUSTOM_OPTIONS = RegularizerOptions(kl_weight=0.25, temperature=1.5, kl_direction="reverse", fused_linear=False,
                                    kl_target=0.05)


def cpu_args(cls, tmp_path, **overrides):
    if issubclass(cls, SFTConfig):
        overrides = {"max_length": 64, "bf16": False, "gradient_checkpointing": False, **overrides}
    return sgd_args(tmp_path, cls=cls, **overrides)


# -- the fields --------------------------------------------------------------------------------------------------------


def test_every_option_has_one_config_field_and_no_name_clashes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "importing from trl.experimental"
        from trl.experimental.gkd import GKDConfig

    assert sorted(OPTION_OF_FIELD.values()) == sorted(f.name for f in dataclasses.fields(RegularizerOptions))
    assert set(OPTION_OF_FIELD) <= set(OURS)
    for parent in (TrainingArguments, SFTConfig, GKDConfig, DPOConfig, ModelConfig, ScriptArguments,
                   DatasetMixtureConfig):
        clashes = set(OURS) & {f.name for f in dataclasses.fields(parent)}
        assert not clashes, (parent.__name__, clashes)
    for cls in (NonTargetKLConfig, NonTargetKLSFTConfig):
        names = [f.name for f in dataclasses.fields(cls)]
        assert names[-len(OURS):] == OURS  # after the parent's: positional TrainingArguments(output_dir) still works
        assert all(dataclasses.fields(cls)[names.index(n)].metadata.get("help") for n in OURS)


def test_options_from_object_asks_the_config():
    config = NonTargetKLConfig("out", **CUSTOM)
    assert RegularizerOptions.from_object(config) == CUSTOM_OPTIONS  # kl_temperature is read, not skipped
    assert RegularizerOptions.from_object(config, kl_weight=2.0) == CUSTOM_OPTIONS.replace(kl_weight=2.0)


def test_defaults_and_to_dict():
    config = NonTargetKLConfig("out")
    assert config.regularizer_options() == RegularizerOptions()
    saved = NonTargetKLConfig("out", kl_weight=2, **{k: v for k, v in CUSTOM.items() if k != "kl_weight"}).to_dict()
    assert {k: saved[k] for k in CUSTOM} == {**CUSTOM, "kl_weight": 2.0}
    assert type(saved["kl_weight"]) is float
    assert saved["ref_model_name_or_path"] is None and saved["ref_model_init_kwargs"] is None


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("AUTO", "auto"), ("true", True), ("False", False),
                                             ("yes", True), ("0", False), (True, True), (False, False)])
def test_fused_linear_spellings(value, expected):
    got = NonTargetKLConfig("out", kl_fused_linear=value).kl_fused_linear
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(kl_weight=-1.0), ValueError, "kl_weight must be a finite number >= 0"),
    (dict(kl_weight="0.5"), TypeError, "kl_weight must be a number, got str"),
    (dict(kl_temperature=0.0), ValueError, "kl_temperature: temperature must be a finite number > 0"),
    (dict(kl_direction="sideways"), ValueError, "kl_direction must be one of"),
    (dict(kl_fused_linear="maybe"), ValueError, "kl_fused_linear: fused_linear must be True, False or 'auto'"),
    (dict(kl_target=0.0), ValueError, "kl_target must be a finite number > 0"),
    (dict(ref_model_init_kwargs="{dtype: float32}"), ValueError, "ref_model_init_kwargs must be a JSON object"),
    (dict(ref_model_init_kwargs="[1, 2]"), TypeError, "ref_model_init_kwargs must be a dict"),
    (dict(ref_model_name_or_path=3), TypeError, "ref_model_name_or_path must be a string"),
])
@pytest.mark.parametrize("cls", [NonTargetKLConfig, NonTargetKLSFTConfig])
def test_bad_values_name_the_field(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(output_dir="out", **kwargs)


def test_sft_config_trains_in_float32_without_a_bf16_device():
    from kl_nontarget.integrations.trl import _bf16_device_available

    config = NonTargetKLSFTConfig(output_dir="out")  # SFTConfig(output_dir="out") raises on a CPU-only machine
    assert config.bf16 is (True if _bf16_device_available() else False)
    assert NonTargetKLSFTConfig(output_dir="out", use_cpu=True).bf16 is True  # TRL's default where it applies
    assert NonTargetKLSFTConfig(output_dir="out", bf16=False).bf16 is False


# -- parsing -----------------------------------------------------------------------------------------------------------

YAML = """\
model_name_or_path: some/model
dataset_name: data.jsonl
learning_rate: 1.0e-4
lora_r: 8
kl_weight: 0.25
kl_temperature: 1.5
kl_direction: reverse
kl_fused_linear: false
kl_target: 0.05
ref_model_name_or_path: ./base
ref_model_init_kwargs:
  dtype: bfloat16
"""


def test_yaml_sets_every_option(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text(YAML)
    run = parse_args(["--config", str(path), "--output_dir", str(tmp_path / "out")])
    assert run.training.regularizer_options() == CUSTOM_OPTIONS
    assert run.training.ref_model_name_or_path == "./base"
    assert run.training.ref_model_init_kwargs == {"dtype": "bfloat16"}
    assert run.training.learning_rate == 1e-4 and run.model.lora_r == 8 and run.model.use_peft is True
    assert run.model.model_name_or_path == "some/model" and run.script.dataset_name == "data.jsonl"
    assert {"kl_weight", "learning_rate", "output_dir"} <= run.given
    # the command line wins over the file; YAML's "1e-2" (a string to YAML) is read as the number
    path.write_text(YAML.replace("kl_weight: 0.25", "kl_weight: 1e-2"))
    assert parse_args(["--config", str(path), "--output_dir", "o"]).training.kl_weight == 0.01
    assert parse_args(["--config", str(path), "--output_dir", "o", "--kl_weight", "3"]).training.kl_weight == 3.0
    assert not (tmp_path / "out").exists()


def test_flags_set_every_option():
    run = parse_args(["--output_dir", "o", "--kl_weight", "0.25", "--kl-temperature", "1.5", "--kl_direction",
                      "reverse", "--kl_fused_linear", "false", "--kl_target", "0.05", "--ref_model_name_or_path",
                      "./base",
                      "--ref_model_init_kwargs", '{"dtype": "float32"}', "--use_peft", "false", "--eval_dataset",
                      "eval.jsonl"])
    assert run.training.regularizer_options() == CUSTOM_OPTIONS
    assert run.training.ref_model_init_kwargs == {"dtype": "float32"}
    assert run.model.use_peft is False and run.script.eval_dataset == "eval.jsonl"
    assert parse_args(["--output_dir", "o", "--kl_fused_linear", "true"]).training.kl_fused_linear is True
    assert parse_args(["--output_dir", "o"]).training.regularizer_options() == RegularizerOptions()


def test_transformers_parser_reads_the_plain_config():
    (config,) = HfArgumentParser(NonTargetKLConfig).parse_args_into_dataclasses(
        ["--output_dir", "o", "--kl_weight", "0.25", "--kl_temperature", "1.5", "--kl_direction", "reverse",
         "--kl_fused_linear", "no", "--kl_target", "5e-2"])
    assert config.regularizer_options() == CUSTOM_OPTIONS


@pytest.mark.parametrize("argv, message", [
    (["--kl_wieght", "0.5"], "unknown option(s): --kl_wieght"),
    (["--kl_weight", "abc"], "invalid float value: 'abc'"),
    (["--kl_weight", "-1"], "kl_weight must be a finite number >= 0"),
    (["--kl_direction", "up"], "invalid choice: 'up' (choose from 'forward', 'reverse')"),
    (["--config", "missing.yaml"], "no such config file: missing.yaml"),
])
def test_bad_arguments_are_one_input_error(argv, message):
    with pytest.raises(InputError) as info:
        parse_args(["--output_dir", "o", *argv])
    assert message in str(info.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("kl_weight: 0.5\nkl_wieght: 0.3\n")
    with pytest.raises(InputError, match=r"unknown option\(s\) in .*sft.yaml: kl_wieght"):
        parse_args(["--config", str(path)])


# -- the trainers ------------------------------------------------------------------------------------------------------


def test_trainer_reads_its_options_from_args(model_dirs, tmp_path):
    model = peft_model(model_dirs)
    trainer = NonTargetKLTrainer(model=model, args=cpu_args(NonTargetKLConfig, tmp_path, **CUSTOM), train_dataset=DATA)
    assert trainer.options == CUSTOM_OPTIONS
    batch = collate(DATA[:4])
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(19))
    expected, _, kl = independent_loss(model, batch, kl_weight=0.25, temperature=1.5, kl_direction="reverse",
                                       num_items_in_batch=19)
    assert kl > 1e-3
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    # keywords equal to the config's values, or left at their defaults, are not a conflict
    assert NonTargetKLTrainer(model=model, args=trainer.args, kl_weight=0.25).options == CUSTOM_OPTIONS
    mixed = NonTargetKLTrainer(model=model, args=cpu_args(NonTargetKLConfig, tmp_path, kl_weight=0.25),
                               temperature=1.5)
    assert (mixed.options.kl_weight, mixed.options.temperature) == (0.25, 1.5)


@pytest.mark.parametrize("keywords, named", [
    (dict(kl_weight=0.5), "kl_weight=0.5 (given to the trainer) but args.kl_weight=0.25"),
    (dict(temperature=3.0), "temperature=3.0 (given to the trainer) but args.kl_temperature=1.5"),
    (dict(fused_linear="auto", kl_direction="forward", options=RegularizerOptions(fused_linear=True)),
     "fused_linear=True (given to the trainer) but args.kl_fused_linear=False"),
])
def test_an_option_set_both_ways_differently_is_refused(model_dirs, tmp_path, keywords, named):
    with pytest.raises(ValueError, match="set both in the trainer's arguments and in args") as info:
        NonTargetKLTrainer(model=peft_model(model_dirs), args=cpu_args(NonTargetKLConfig, tmp_path, **CUSTOM),
                           **keywords)
    assert named in str(info.value)


def test_reference_model_from_the_config(model_dirs, tmp_path):
    args = cpu_args(NonTargetKLConfig, tmp_path, ref_model_name_or_path=str(model_dirs / "llama"),
                    ref_model_init_kwargs='{"dtype": "float32"}', learning_rate=0.05)
    model = load_model(model_dirs)  # full fine-tuning: no adapters to disable
    trainer = NonTargetKLTrainer(model=model, args=args, train_dataset=DATA)
    ref = trainer.ref_model
    assert ref is not None and ref is not model and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    trainer.train()
    assert trainer.state.log_history[0]["nontarget_kl"] == 0.0 and trainer.state.log_history[1]["nontarget_kl"] > 0
    with pytest.raises(ValueError, match="ref_model= was given and args.ref_model_name_or_path"):
        NonTargetKLTrainer(model=load_model(model_dirs), args=args, ref_model=load_model(model_dirs))


@pytest.mark.parametrize("cls", [NonTargetKLConfig, NonTargetKLSFTConfig])
def test_options_round_trip_through_training_args_bin(model_dirs, tmp_path, cls):
    args = cpu_args(cls, tmp_path, **CUSTOM, ref_model_init_kwargs={"dtype": "float32"})
    if cls is NonTargetKLSFTConfig:
        data = [{"prompt": r["prompt"], "completion": r["completion"]} for r in toy_prompt_completions(8, seed=1)]
        from datasets import Dataset

        trainer = NonTargetKLSFTTrainer(model=load_model(model_dirs), args=args, train_dataset=Dataset.from_list(data),
                                        processing_class=load_tokenizer(model_dirs),
                                        peft_config=lora_config())
    else:
        trainer = NonTargetKLTrainer(model=peft_model(model_dirs), args=args, train_dataset=DATA)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False)
    assert type(loaded) is cls
    assert loaded.regularizer_options() == CUSTOM_OPTIONS == trainer.options
    assert loaded.ref_model_init_kwargs == {"dtype": "float32"}
    assert loaded.to_dict() == args.to_dict()


def test_sft_trainer_accepts_the_plain_config(model_dirs, tmp_path):
    from datasets import Dataset

    args = cpu_args(NonTargetKLConfig, tmp_path, **CUSTOM)
    trainer = NonTargetKLSFTTrainer(load_model(model_dirs), args, train_dataset=Dataset.from_list(
        toy_prompt_completions(8, seed=1)), processing_class=load_tokenizer(model_dirs),
        peft_config=lora_config())
    assert isinstance(trainer.args, NonTargetKLSFTConfig) and trainer.options == CUSTOM_OPTIONS
    assert trainer.args.learning_rate == 0.5 and trainer.args.max_steps == 2
