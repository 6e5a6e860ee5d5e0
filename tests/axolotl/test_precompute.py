"""`precompute_base: true` under axolotl: one real run of examples/axolotl.yaml (the tiny Llama, CPU, float32) in
which the base pass runs once over the data before training (axolotl's dataset and collator, keyed by our index
column) and never during the steps, each step equal to `NonTargetKLTrainer` with the base pass on the same batch."""

from __future__ import annotations

import pytest
import torch

from axolotl_runs import GRAD_TOL, LOSS_TOL, example_config, reference_step, run_axolotl


@pytest.fixture(scope="module")
def cached_run(axolotl_dir, tmp_path_factory):
    import kl_nontarget.training.batch_rows as batch_rows

    calls = []
    original = batch_rows.base_forward

    def counting(model, kwargs, **kw):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return original(model, kwargs, **kw)

    cache = tmp_path_factory.mktemp("base_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_rows, "base_forward", counting)
        run = run_axolotl(example_config(axolotl_dir, "cached", precompute_base=True, base_cache_dir=str(cache),
                                          max_steps=2))
    return run, calls


@pytest.mark.filterwarnings("ignore::kl_nontarget.models.reference.TrainedAdapterWarning")
def test_the_cached_base_gives_the_base_pass_steps(cached_run, axolotl_dir, tmp_path):
    (cfg, trainer, steps), calls = cached_run
    cache = trainer.base_precompute.caches.get("train")
    assert cache is not None and trainer.base_precompute.base_passes > 0
    # Every base pass of the run built or checked the cache (BasePrecompute counts those): none ran in the steps.
    assert len(calls) == trainer.base_precompute.base_passes, (len(calls), trainer.base_precompute.base_passes)
    for i, step in enumerate(steps):
        loss, grads, _ = reference_step(axolotl_dir, cfg, step, tmp_path)  # base pass per step
        torch.testing.assert_close(step["loss"], loss, **LOSS_TOL, msg=f"step {i + 1}")
        for name, grad in grads.items():
            torch.testing.assert_close(step["grads"][name], grad, **GRAD_TOL, msg=f"step {i + 1}: {name}")
