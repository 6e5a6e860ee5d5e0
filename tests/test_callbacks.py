"""ForgettingCallback and retention sets: forgetting measured during training, with any Trainer."""

import pytest
import torch
from transformers import Trainer

from kl_nontarget import ForgettingCallback
from kl_nontarget.evaluation.metrics import forgetting_metrics
from kl_nontarget.evaluation.retention import batches, rows_from_data, sample_from_base

import tiny_models
from tiny_models import (
    collate,
    perturb_trainable,
    sgd_args,
    tiny_llama,
    tiny_tokenizer,
    toy_texts,
    toy_token_batches,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def peft_model(model_dirs):
    return tiny_models.peft_model(model_dirs, moved=False)


def _trainer(model, tmp_path, callback, **overrides):
    args = sgd_args(tmp_path, eval_strategy="steps", eval_steps=3, max_steps=6, learning_rate=2.0, **overrides)
    data = toy_token_batches(24, seed=5)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8], data_collator=collate)
    callback.attach(trainer)
    return trainer


def _history(trainer, key):
    return [e[key] for e in trainer.state.log_history if key in e]


def test_plain_trainer_logs_forgetting_that_grows(tmp_path, tokenizer, peft_model, one_thread):
    callback = ForgettingCallback(tokenizer=tokenizer, num_samples=8, max_new_tokens=12)
    trainer = _trainer(peft_model, tmp_path, callback)
    before = trainer.evaluate()
    # LoRA starts at zero (B = 0): the model is its base, so nothing is forgotten yet.
    assert before["eval_forgetting"] == pytest.approx(0.0, abs=1e-6)
    base_ppl = before["eval_retention_ppl"]
    trainer.train()
    # train() starts a new log history: the evaluations at steps 3 and 6 (the end of training is step 6 too).
    drift = _history(trainer, "eval_forgetting")
    assert len(drift) == 2 and min(drift) > 0.05
    assert _history(trainer, "eval_retention_ppl")[-1] > base_ppl
    steps = [e["step"] for e in trainer.state.log_history if "eval_forgetting" in e]
    assert steps == [3, 6]


def test_callback_equals_forgetting_metrics_on_the_same_data(tmp_path, tokenizer, peft_model, one_thread):
    perturb_trainable(peft_model)
    data = [{"text": t} for t in toy_texts(10, seed=3)]
    callback = ForgettingCallback(retention_data=data, tokenizer=tokenizer, batch_size=3)
    got = callback.measure(peft_model)
    rows = rows_from_data(data, tokenizer)
    want = forgetting_metrics(peft_model, list(batches(rows, tokenizer.pad_token_id, 4)), progress=False)
    assert got["eval_forgetting"] == pytest.approx(want["lf_kl"], rel=1e-5)
    assert got["eval_retention_ppl"] == pytest.approx(want["retention_ppl"], rel=1e-5)
    assert want["lf_kl"] > 0.01


def test_sampled_retention_set_comes_from_the_base_and_leaves_rng_alone(tmp_path, tokenizer, peft_model):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    plain = sample_from_base(peft_model, tokenizer, num_samples=6, max_new_tokens=8, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    perturb_trainable(peft_model)  # a trained adapter: sampling still uses the base (adapters disabled)
    again = sample_from_base(peft_model, tokenizer, num_samples=6, max_new_tokens=8, seed=7)
    assert plain == again and len(plain) == 6
    for row in plain:
        prompt = sum(1 for y in row["labels"] if y == -100)
        assert 0 < prompt < len(row["input_ids"]) <= prompt + 8
        assert row["labels"][prompt:] == row["input_ids"][prompt:]
    assert any(p.requires_grad for p in peft_model.parameters())


def test_explicit_base_model(tmp_path, tokenizer):
    base = tiny_llama(tmp_path / "base")
    model = tiny_llama(seed=1)  # a different model: forgetting relative to `base` is clearly non-zero
    data = [{"input_ids": [1] + [4 + (i * 7 + j) % 100 for j in range(9)]} for i in range(6)]
    got = ForgettingCallback(retention_data=data, base_model=base).measure(model)
    same = ForgettingCallback(retention_data=data, base_model=base).measure(base)
    assert got["eval_forgetting"] > 0.1 and same["eval_forgetting"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("data, message", [
    ([{"prompt": "w1", "completion": "w2"}], "no usable text"),
    ([{"text": "  "}], "no usable text"),
    ([{"input_ids": [5]}], "no usable text"),
])
def test_bad_retention_data_is_refused_at_construction(data, message, tokenizer):
    with pytest.raises(ValueError, match=message):
        ForgettingCallback(retention_data=data, tokenizer=tokenizer)
    if "text" not in data[0]:
        with pytest.raises(ValueError, match=message):
            ForgettingCallback(retention_data=data)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_samples"):
        ForgettingCallback(num_samples=0)


def test_end_of_training_without_trainer_reference(tmp_path, tokenizer, peft_model, one_thread):
    # No evaluation during training: the callback measures at the end. Passed through `callbacks=` without the
    # trainer, it still records the values in the log history, and says what the integrations miss.
    callback = ForgettingCallback(tokenizer=tokenizer, num_samples=4, max_new_tokens=6)
    trainer = Trainer(model=peft_model, args=sgd_args(tmp_path, max_steps=2), train_dataset=toy_token_batches(8),
                      data_collator=collate, callbacks=[callback])
    with pytest.warns(UserWarning, match="without trainer="):
        trainer.train()
    entries = [e for e in trainer.state.log_history if "eval_forgetting" in e]
    assert len(entries) == 1 and entries[0]["step"] == 2 and entries[0]["eval_forgetting"] > 0


def test_sft_trainer_with_sampled_retention_set(tmp_path, model_dirs, one_thread):
    # trl.SFTTrainer on a PEFT model: the tokenizer comes from the trainer's processing_class.
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tiny_models import load_tokenizer, peft_model, toy_prompt_completions

    tok = load_tokenizer(model_dirs)
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=0.5,
                     optim="sgd", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=64)
    trainer = SFTTrainer(model=peft_model(model_dirs, moved=False), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(toy_prompt_completions(8, seed=5)))
    ForgettingCallback(trainer, num_samples=4, max_new_tokens=6).attach(trainer)
    trainer.train()
    entries = [e for e in trainer.state.log_history if "eval_forgetting" in e]
    assert len(entries) == 1 and entries[0]["eval_forgetting"] > 0 and entries[0]["eval_retention_ppl"] > 1
