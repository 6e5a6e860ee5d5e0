"""axolotl's sample packing and chat-template labels with the plugin: one real run (the tiny Llama, CPU, float32) of
examples/axolotl.yaml with `sample_packing: true` and a `chat_template` dataset (assistant turns supervised), every
step equal to `NonTargetKLTrainer` on the recorded packed batch (`position_ids` restarting at each sequence)."""

from __future__ import annotations

import pytest
import torch

from axolotl_runs import GRAD_TOL, LOSS_TOL, example_config, reference_step, run_axolotl


@pytest.fixture(scope="module")
def packed_run(axolotl_dir):
    from tiny_models import messages_file

    data = messages_file(axolotl_dir / "messages.jsonl", n=24, seed=6)
    dataset = {"path": str(data), "ds_type": "json", "type": "chat_template", "chat_template": "tokenizer_default",
               "field_messages": "messages", "roles_to_train": ["assistant"]}
    return run_axolotl(example_config(axolotl_dir, "packed", datasets=[dataset], sample_packing=True,
                                      pad_to_sequence_len=True, sequence_len=64, micro_batch_size=2, max_steps=2))


@pytest.mark.filterwarnings("ignore::kl_nontarget.models.reference.TrainedAdapterWarning")
def test_packed_chat_template_steps_equal_nontarget_kl_trainer(packed_run, axolotl_dir, tmp_path):
    cfg, trainer, steps = packed_run
    assert len(steps) == 2 and cfg.sample_packing
    inputs = steps[0]["inputs"]
    positions = inputs["position_ids"]
    assert int((positions[:, 1:] == 0).sum()) >= 1, "no row holds more than one sequence"
    labels = inputs["labels"]
    assert (labels == -100).any() and (labels != -100).any()  # user turns masked, assistant turns supervised
    for i, step in enumerate(steps):
        loss, grads, sums = reference_step(axolotl_dir, cfg, step, tmp_path)
        torch.testing.assert_close(step["loss"], loss, **LOSS_TOL, msg=f"step {i + 1}")
        for name, grad in grads.items():
            torch.testing.assert_close(step["grads"][name], grad, **GRAD_TOL, msg=f"step {i + 1}: {name}")
    assert float(sums["kl"]) > 0
    print("\npacked:", [float(s["loss"]) for s in steps], "kl", float(sums["kl"]))
