"""axolotl with `NonTargetKLPlugin`: real runs of examples/axolotl.yaml (axolotl's own config loading, dataset
preparation, model and LoRA loading, trainer builder and training loop) on a tiny Llama, CPU, float32.

Three runs of 3 steps, once per module: the plugin (kl_weight 1), the plugin with kl_weight 0, plain axolotl. Every
step's batch, parameters, loss and gradients are recorded (`recorder.RecorderPlugin`) and compared with
`NonTargetKLTrainer` on the same batch and parameters, and with plain axolotl.
"""

from __future__ import annotations

import json

import pytest
import torch

from axolotl_runs import (
    GRAD_TOL,
    LOSS_TOL,
    PLAIN_GRAD_TOL,
    PLAIN_LOSS_TOL,
    PLUGIN,
    RECORDER,
    example_config,
    load_config,
    max_diff,
    reference_step,
    run_axolotl,
)


@pytest.fixture(scope="module")
def kl_run(axolotl_dir):
    return run_axolotl(example_config(axolotl_dir, "kl"))


@pytest.fixture(scope="module")
def zero_and_plain_runs(axolotl_dir):
    # SGD: Adam's first steps are about lr * sign(gradient), which turns float rounding in a gradient element near
    # zero into a full-size update; SGD keeps the two runs' parameters as close as their gradients.
    zero = run_axolotl(example_config(axolotl_dir, "kl0", kl_weight=0.0, optimizer="sgd"))
    plain = run_axolotl(example_config(axolotl_dir, "plain", plugins=(RECORDER,), optimizer="sgd"))
    return zero, plain


def test_axolotl_builds_its_trainer_with_the_regularizer(kl_run):
    from axolotl.core.trainers.base import AxolotlTrainer

    from kl_nontarget.training.trainer import NonTargetKLMixin

    cfg, trainer, steps = kl_run
    assert isinstance(trainer, AxolotlTrainer) and isinstance(trainer, NonTargetKLMixin)
    mro = type(trainer).__mro__
    assert mro.index(AxolotlTrainer) < mro.index(NonTargetKLMixin)  # axolotl's methods first, ours under them
    assert trainer.kl_weight == 1.0 and cfg.kl_fused_linear == "auto" and len(steps) == 3
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:  # kl_weight 1, T 1: loss = ce_loss + nontarget_kl (the logged values are rounded)
        assert entry["loss"] == pytest.approx(entry["ce_loss"] + entry["nontarget_kl"], abs=2e-4)
    assert logs[0]["nontarget_kl"] == 0.0 and logs[-1]["nontarget_kl"] > 0  # the adapter starts at zero, then moves
    # Completion-only labels as axolotl builds them (train_on_inputs: false): the prompt is masked.
    labels = steps[0]["inputs"]["labels"]
    assert (labels == -100).any() and (labels != -100).any()


# The reference trainer is built on an adapter that has moved (steps 2, 3): that is the point, not a mistake.
@pytest.mark.filterwarnings("ignore::kl_nontarget.models.reference.TrainedAdapterWarning")
def test_every_step_equals_nontarget_kl_trainer(kl_run, axolotl_dir, tmp_path):
    cfg, _, steps = kl_run
    report = []
    for i, step in enumerate(steps):
        loss, grads, sums = reference_step(axolotl_dir, cfg, step, tmp_path)
        loss_diff, grad_diff = float((loss - step["loss"]).abs()), max_diff(grads, step["grads"])
        report.append(dict(step=i + 1, loss=float(loss), kl=float(sums["kl"]), loss_diff=loss_diff,
                           grad_max_diff=grad_diff, grad_max=max(float(g.abs().max()) for g in grads.values())))
        torch.testing.assert_close(step["loss"], loss, **LOSS_TOL, msg=f"step {i + 1}")
        for name, grad in grads.items():
            torch.testing.assert_close(step["grads"][name], grad, **GRAD_TOL, msg=f"step {i + 1}: {name}")
    assert report[-1]["kl"] > 1e-6  # by step 3 the KL and its gradient are not trivially zero
    print("\naxolotl vs NonTargetKLTrainer:", json.dumps(report))


def test_kl_weight_zero_reproduces_plain_axolotl(zero_and_plain_runs):
    from axolotl.core.trainers.base import AxolotlTrainer

    (_, zero_trainer, zero), (_, plain_trainer, plain) = zero_and_plain_runs
    assert type(plain_trainer) is AxolotlTrainer and type(zero_trainer) is not AxolotlTrainer
    assert len(zero) == len(plain) == 3
    report = []
    for i, (a, b) in enumerate(zip(zero, plain)):
        for key, value in b["inputs"].items():
            assert torch.equal(a["inputs"][key], value), f"step {i + 1}: {key}"
        report.append(dict(step=i + 1, loss=float(b["loss"]), loss_diff=float((a["loss"] - b["loss"]).abs()),
                           param_max_diff=max_diff(a["params"], b["params"]),
                           grad_max_diff=max_diff(a["grads"], b["grads"])))
    print("\nkl_weight 0 vs plain axolotl:", json.dumps(report))
    for i, (a, b) in enumerate(zip(zero, plain)):
        torch.testing.assert_close(a["params"], b["params"], **GRAD_TOL, msg=f"step {i + 1}: parameters")
        torch.testing.assert_close(a["loss"], b["loss"], **PLAIN_LOSS_TOL, msg=f"step {i + 1}: loss")
        torch.testing.assert_close(a["grads"], b["grads"], **PLAIN_GRAD_TOL, msg=f"step {i + 1}: gradients")


def test_the_saved_adapter_loads_in_plain_peft(kl_run, axolotl_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, trainer, _ = kl_run
    base = AutoModelForCausalLM.from_pretrained(str(axolotl_dir / "model"), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, cfg.output_dir).eval()
    trained = trainer.model.eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
        with loaded.disable_adapter():
            assert (loaded(input_ids=ids).logits - expected).abs().max() > 1e-4  # the adapter did train


@pytest.mark.parametrize("key,value", [("kl_weight", -1), ("kl_direction", "sideways"), ("kl_temperature", 0),
                                       ("kl_fused_linear", "maybe"), ("kl_target", -0.5),
                                       ("precompute_base", "sometimes")])
def test_a_bad_value_fails_at_config_load(axolotl_dir, key, value):
    with pytest.raises(Exception, match=key) as info:
        load_config(example_config(axolotl_dir, f"bad-{key}", **{key: value}))
    assert "ValidationError" in type(info.value).__name__ or isinstance(info.value, ValueError)


@pytest.mark.parametrize("key,value", [("reward_model", True), ("rl", "dpo"), ("cut_cross_entropy", True),
                                       ("liger_fused_linear_cross_entropy", True), ("orpo_alpha", 0.1)])
def test_what_the_plugin_cannot_train_is_refused_at_config_load(axolotl_dir, key, value):
    with pytest.raises(Exception, match=rf"{PLUGIN}: {key}"):
        load_config(example_config(axolotl_dir, f"refused-{key}", **{key: value}))
