"""Adaptive kl_weight: the controller, the trainers steering towards kl_target, checkpoints, the hook."""

import json

import pytest
import torch
from transformers import Trainer

from kl_nontarget import NonTargetKLTrainer, RegularizerOptions, nontarget_kl_loss_func
from kl_nontarget.training.adaptive_weight import MAX_WEIGHT, MIN_WEIGHT, AdaptiveKLWeight, next_weight

from tiny_models import collate, peft_model, sgd_args, toy_token_batches


def test_controller_step():
    assert next_weight(1.0, 2.0, 1.0) == pytest.approx(1.02)  # error clipped at +0.2, rate 0.1
    assert next_weight(1.0, 1.05, 1.0) == pytest.approx(1.005)
    assert next_weight(1.0, 0.0, 1.0) == pytest.approx(0.98)
    assert next_weight(1.0, 1.0, 1.0) == 1.0
    assert next_weight(1.0, float("nan"), 1.0) == 1.0
    assert next_weight(MAX_WEIGHT, 10.0, 1.0) == MAX_WEIGHT and next_weight(MIN_WEIGHT, 0.0, 1.0) == MIN_WEIGHT


@pytest.mark.parametrize("kl_target, kl_weight", [(0.0, 1.0), (-1.0, 1.0), (float("inf"), 1.0), (0.1, 0.0)])
def test_bad_kl_target(kl_target, kl_weight):
    with pytest.raises(ValueError, match="kl_target|kl_weight"):
        RegularizerOptions(kl_weight=kl_weight, kl_target=kl_target)


def _train(model_dirs, tmp_path, kl_target, steps=4, **overrides):
    model = peft_model(model_dirs)  # adapters moved off zero: the KL is well above 0 from the first step
    args = sgd_args(tmp_path, max_steps=steps, learning_rate=0.05, **overrides)
    trainer = NonTargetKLTrainer(model=model, args=args, train_dataset=toy_token_batches(32, seed=2),
                                 data_collator=collate, kl_weight=1.0, kl_target=kl_target)
    return trainer


@pytest.mark.parametrize("kl_target, direction", [(1e-4, 1), (1e3, -1)], ids=["kl-above-target", "kl-below-target"])
def test_trainer_moves_the_weight_towards_the_target(model_dirs, tmp_path, one_thread, kl_target, direction):
    trainer = _train(model_dirs, tmp_path, kl_target)
    trainer.train()
    weights = [e["kl_weight"] for e in trainer.state.log_history if "kl_weight" in e]
    assert len(weights) == 4  # logged at every logging step
    # Each step moves the weight by the full 2% in the direction that brings the KL towards the target.
    for i, w in enumerate(weights, start=1):
        assert w == pytest.approx((1 + 0.02 * direction) ** i, rel=1e-9)
    assert trainer.kl_weight == weights[-1] and trainer.options.kl_weight == weights[-1]


def test_fixed_weight_logs_no_kl_weight(model_dirs, tmp_path, one_thread):
    trainer = _train(model_dirs, tmp_path, None, steps=2)
    trainer.train()
    assert not any("kl_weight" in e for e in trainer.state.log_history) and trainer.kl_weight == 1.0


@pytest.mark.parametrize("restore_flag", [False, True])
def test_checkpoint_round_trip(model_dirs, tmp_path, one_thread, restore_flag):
    # Uninterrupted: 4 steps. Interrupted: the checkpoint of step 2, resumed to step 4 by a new trainer.
    full = _train(model_dirs, tmp_path / "full", 1e-4)
    full.train()
    common = dict(save_strategy="steps", save_steps=2, restore_callback_states_from_checkpoint=restore_flag)
    first = _train(model_dirs, tmp_path / "run", 1e-4, **common)
    first.train()
    checkpoint = tmp_path / "run" / "out" / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["AdaptiveKLWeight"]
    assert saved["args"]["kl_weight"] == pytest.approx(1.02 ** 2, rel=1e-9)
    resumed = _train(model_dirs, tmp_path / "run", 1e-4, **common)
    assert resumed.kl_weight == 1.0  # before resuming: the configured start
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.kl_weight == pytest.approx(full.kl_weight, rel=1e-12) == pytest.approx(1.02 ** 4, rel=1e-9)
    assert sum(isinstance(cb, AdaptiveKLWeight) for cb in resumed.callback_handler.callbacks) == 1


@pytest.mark.parametrize("kl_target, direction", [(1e-4, 1), (1e3, -1)])
def test_hook_adapts_per_training_call(model_dirs, tmp_path, one_thread, kl_target, direction):
    model = peft_model(model_dirs)
    loss_func = nontarget_kl_loss_func(model, kl_weight=1.0, kl_target=kl_target)
    trainer = Trainer(model=model, args=sgd_args(tmp_path, max_steps=3, learning_rate=0.05),
                      train_dataset=toy_token_batches(32, seed=2), data_collator=collate, compute_loss_func=loss_func)
    loss_func.bind(trainer).train()
    assert loss_func.kl_weight == pytest.approx((1 + 0.02 * direction) ** 3, rel=1e-9)
    before = loss_func.kl_weight
    with torch.no_grad():  # evaluation calls leave the weight alone
        batch = collate(toy_token_batches(4, seed=9))
        model.eval()
        loss_func(model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"])
    assert loss_func.kl_weight == before
    loss_func.remove()
