"""precompute_base: the base hidden-state cache (kl_nontarget/training/base_cache.py,
kl_nontarget/training/precompute.py).

Exactness: training with the cache gives the losses and weights of training without it. The cached rows come from a
base pass over batches of other compositions (in dataset order) than the shuffled training batches, and float32
matmuls over differently shaped batches round differently (~1e-7 relative per row); two SGD steps at a learning rate
of 0.5 carry that to ~1e-6 in the weights. The tolerance (atol 2e-5, rtol 1e-4) is above that and far below what a
wrong row would do (the KL and its gradient change by O(1) relative).
"""

import warnings

import pytest
import torch

from kl_nontarget.training.base_cache import INDEX_KEY, CacheMismatch, IndexCollator
from kl_nontarget.training.options import RegularizerOptions
from kl_nontarget.training.trainer import NonTargetKLTrainer

from tiny_models import (
    assert_same_state,
    collate,
    peft_model,
    sgd_args,
    toy_token_batches,
    trainable_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TRAINING_ARGS = ("max_steps", "num_train_epochs", "eval_strategy", "eval_steps", "gradient_accumulation_steps",
                 "per_device_train_batch_size")


def train(model_dirs, tmp_path, data, *, name="run", kl_weight=0.7, eval_data=None, **kwargs):
    model = peft_model(model_dirs)
    options = dict(max_steps=3)
    options.update({k: kwargs.pop(k) for k in list(kwargs) if k in TRAINING_ARGS})
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path / name, **options), train_dataset=data,
                                 eval_dataset=eval_data, data_collator=collate, kl_weight=kl_weight, **kwargs)
    trainer.train()
    losses = [log[key] for log in trainer.state.log_history for key in ("loss", "eval_loss") if key in log]
    return trainer, losses, trainable_state(model)


def test_cached_training_equals_uncached(model_dirs, tmp_path, base_rows_counter):
    """With gradient accumulation (2 micro-batches of 2 per step) and an evaluation after every step."""
    data, eval_data = toy_token_batches(12, seed=3), toy_token_batches(5, seed=8)
    run = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, eval_strategy="steps", eval_steps=1,
               eval_data=eval_data)
    _, plain_losses, plain_state = train(model_dirs, tmp_path, data, name="plain", **run)
    assert base_rows_counter["calls"] == 3 * 2 + 3 * 2  # a base pass per micro-batch and per eval batch (4 + 1)

    base_rows_counter.update(rows=0, calls=0)
    trainer, losses, state = train(model_dirs, tmp_path, data, name="cached", precompute_base=True,
                                   base_cache_dir=tmp_path / "cache", **run)
    cache = trainer.base_precompute.caches["train"]
    assert cache.computed and len(cache) == len(data) and len(trainer.base_precompute.caches["eval"]) == 5
    # each dataset once, then the layout check (3 sequences each), and nothing during the steps and evaluations
    assert base_rows_counter["rows"] == len(data) + 3 + len(eval_data) + 3
    assert len(losses) == 6
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), atol=2e-5, rtol=1e-4)
    assert_same_state(state, plain_state, atol=2e-5)
    assert INDEX_KEY not in trainer.train_dataset[0]  # the run's keyed dataset is put back


def test_two_epochs_and_a_sweep_use_one_base_pass(model_dirs, tmp_path, base_rows_counter):
    data = toy_token_batches(8, seed=4)
    cache_dir = tmp_path / "cache"
    trainer, _, _ = train(model_dirs, tmp_path, data, name="epochs", precompute_base=True, base_cache_dir=cache_dir,
                          max_steps=-1, num_train_epochs=2)
    assert trainer.state.global_step == 4  # 2 epochs of 2 batches
    after_first = base_rows_counter["rows"]
    assert after_first == len(data) + 3
    for weight in (0.1, 0.5, 2.0):  # the sweep: three runs on the same base and data share the cache
        trainer, losses, _ = train(model_dirs, tmp_path, data, name=f"w{weight}", kl_weight=weight,
                                   precompute_base=True, base_cache_dir=cache_dir)
        assert not trainer.base_precompute.caches["train"].computed
        assert all(torch.isfinite(torch.tensor(losses)))
    assert base_rows_counter["rows"] == after_first  # no base pass at all in the sweep
    assert len(list(cache_dir.glob("*.arrow"))) == 1


def test_other_data_or_base_weights_make_a_new_cache(model_dirs, tmp_path, base_rows_counter):
    cache_dir = tmp_path / "cache"
    data = toy_token_batches(8, seed=4)
    train(model_dirs, tmp_path, data, name="a", precompute_base=True, base_cache_dir=cache_dir, max_steps=1)
    changed = [dict(row) for row in data]
    changed[5] = {**changed[5], "input_ids": changed[5]["input_ids"].flip(0)}
    trainer, _, _ = train(model_dirs, tmp_path, changed, name="b", precompute_base=True, base_cache_dir=cache_dir,
                          max_steps=1)
    assert trainer.base_precompute.caches["train"].computed
    model = peft_model(model_dirs)
    with torch.no_grad():
        model.get_base_model().model.norm.weight[0] += 1e-3  # a small change to one base weight
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path / "c", max_steps=1), train_dataset=data,
                                 data_collator=collate, precompute_base=True, base_cache_dir=cache_dir)
    trainer.train()
    assert trainer.base_precompute.caches["train"].computed
    assert len(list(cache_dir.glob("*.arrow"))) == 3
    assert base_rows_counter["rows"] == 3 * (len(data) + 3)


def test_refuses_or_falls_back_where_it_cannot_apply(model_dirs, tmp_path, base_rows_counter):
    data = toy_token_batches(8, seed=4)
    common = dict(train_dataset=data, data_collator=collate, base_cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="fused-linear path is not available"):
        NonTargetKLTrainer(model=peft_model(model_dirs), args=sgd_args(tmp_path), fused_linear=False,
                           precompute_base=True, **common)
    with pytest.warns(UserWarning, match="base pass runs at every step"):
        train(model_dirs, tmp_path, data, name="auto", fused_linear=False, precompute_base="auto",
              base_cache_dir=tmp_path / "cache", max_steps=2)
    assert base_rows_counter["calls"] == 2

    # An iterable dataset has no stable example positions.
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    trainer = NonTargetKLTrainer(model=peft_model(model_dirs), args=sgd_args(tmp_path / "it"), precompute_base=True,
                                 **{**common, "train_dataset": Stream()})
    with pytest.raises(ValueError, match="not map-style"):
        trainer.train()


def test_a_collator_that_mixes_examples_is_not_cached(model_dirs, tmp_path):
    """A collator whose batch differs from its examples collated alone cannot be keyed: refused, or base pass."""
    data = toy_token_batches(8, seed=4)

    def shuffling_collate(rows):  # reverses the tokens of the whole batch: not each example's own positions
        batch = collate(rows)
        return {k: v.flip(0) if len(rows) > 1 else v for k, v in batch.items()}

    trainer = NonTargetKLTrainer(model=peft_model(model_dirs), args=sgd_args(tmp_path), train_dataset=data,
                                 data_collator=shuffling_collate, precompute_base=True,
                                 base_cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="cannot be keyed"):
        trainer.train()
    assert not list((tmp_path / "cache").glob("*.arrow"))


def test_cache_rows_check_tokens(model_dirs, tmp_path):
    data = toy_token_batches(6, seed=4)
    trainer, _, _ = train(model_dirs, tmp_path, data, precompute_base=True, base_cache_dir=tmp_path / "cache",
                          max_steps=1)
    cache = trainer.base_precompute.caches["train"]
    batch = IndexCollator(collate)([{**data[i], INDEX_KEY: i} for i in (4, 1)])
    target = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    mask = target != -100
    rows = cache.rows(batch[INDEX_KEY], batch["input_ids"][mask], target[mask])
    assert rows.shape == (int(mask.sum()), 32) and rows.dtype == torch.float32
    with pytest.raises(CacheMismatch, match="differ"):
        cache.rows(batch[INDEX_KEY].flip(0), batch["input_ids"][mask], target[mask])
    with pytest.raises(CacheMismatch):
        cache.rows(torch.tensor([99]), batch["input_ids"][mask], target[mask])


def test_hook_refuses_precompute_base(model_dirs):
    from kl_nontarget.training.loss_func import nontarget_kl_loss_func

    with pytest.raises(ValueError, match="trainer option"):
        nontarget_kl_loss_func(peft_model(model_dirs), options=RegularizerOptions(precompute_base=True))
    model = peft_model(model_dirs, moved=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        nontarget_kl_loss_func(model).remove()  # the default: no warning
    with pytest.warns(UserWarning, match="trainer option"):
        nontarget_kl_loss_func(model, options=RegularizerOptions(precompute_base="auto")).remove()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sft_cached_equals_uncached(model_dirs, tmp_path, layout, base_rows_counter):
    """TRL's prepared dataset (completion-only labels) and its collator: padded, or packed rows concatenated without
    padding (several packed rows, each of several sequences, in one row per batch)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from kl_nontarget.integrations.trl import NonTargetKLSFTTrainer

    from tiny_models import load_tokenizer, toy_prompt_completions

    tokenizer = load_tokenizer(model_dirs)
    data = Dataset.from_list(toy_prompt_completions(12, seed=5))
    results = []
    for cached in (False, True):
        packed = layout == "packed"
        args = sgd_args(tmp_path / f"out{cached}", cls=SFTConfig, per_device_train_batch_size=2 if packed else 4,
                        max_steps=3, packing=packed, max_length=24 if packed else 64,
                        bf16=False)  # float32: see the module docstring
        model = peft_model(model_dirs)
        trainer = NonTargetKLSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                        kl_weight=0.7, precompute_base=cached, base_cache_dir=tmp_path / "cache")
        base_rows_counter.update(rows=0, calls=0)
        trainer.train()
        if packed:
            batch = next(iter(trainer.get_train_dataloader()))
            assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) > 2
        results.append(([log["loss"] for log in trainer.state.log_history if "loss" in log], trainable_state(model),
                        base_rows_counter["calls"]))
    batches = -(-len(trainer.train_dataset) // args.per_device_train_batch_size)
    (plain_losses, plain_state, plain_calls), (losses, state, calls) = results
    assert plain_calls == 3
    assert calls == batches + 1  # the data once, the layout check, and no base pass during the steps
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), atol=2e-5, rtol=1e-4)
    assert_same_state(state, plain_state, atol=2e-5)


@pytest.mark.parametrize("setup", ["full_fine_tuning_ref_model", "gemma2_softcap"])
def test_cached_equals_uncached_other_setups(model_dirs, tmp_path, setup, base_rows_counter):
    """A separate frozen ref_model (the trained model's own weights all move), and a soft-capped head."""
    import copy

    from tiny_models import load_model, perturb_trainable

    data = toy_token_batches(8, seed=6)
    results = []
    for cached in (False, True):
        if setup == "gemma2_softcap":
            model, extra = peft_model(model_dirs, "gemma2"), {}
        else:
            model = load_model(model_dirs)
            extra = {"ref_model": copy.deepcopy(model)}
            perturb_trainable(model, scale=0.02)
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path / str(cached)), train_dataset=data,
                                     data_collator=collate, kl_weight=0.7, precompute_base=cached,
                                     base_cache_dir=tmp_path / "cache", **extra)
        base_rows_counter.update(rows=0, calls=0)
        trainer.train()
        results.append(([log["loss"] for log in trainer.state.log_history if "loss" in log], trainable_state(model),
                        base_rows_counter["rows"]))
    (plain_losses, plain_state, plain_rows), (losses, state, rows) = results
    assert plain_rows == 2 * 4 and rows == len(data) + 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), atol=2e-5, rtol=1e-4)
    assert_same_state(state, plain_state, atol=2e-5)
