"""LoRA variants: inits that rewrite the base weights (PiSSA, OLoRA, LoftQ) get the model as it starts as their
reference, with no second copy of the model; the sweep compares variants (`kl_nontarget.sweep.variants`)."""

import logging

import pytest
import torch
from transformers import Trainer

from kl_nontarget import nontarget_kl_loss_func, snapshot_adapter
from kl_nontarget.evaluation.metrics import forgetting_metrics
from kl_nontarget.models import reference
from kl_nontarget.models.base_pass import base_forward
from kl_nontarget.models.reference import INITIAL_ADAPTER, base_rewriting_init
from kl_nontarget.sweep.variants import VARIANTS, AdapterSpec, parse_variants
from kl_nontarget.training.trainer import NonTargetKLTrainer

from tiny_models import LORA_TARGETS, collate, load_model, lora_config, sgd_args, toy_token_batches

pytestmark = pytest.mark.usefixtures("one_thread")
REWRITING = ["pissa", "olora"]


def _rewriting_model(model_dirs, init, **config):
    from peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(load_model(model_dirs), lora_config(init_lora_weights=init, **config))


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _base_weight(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()


@pytest.mark.parametrize("init", REWRITING)
def test_snapshot_of_a_base_rewriting_adapter_leaves_the_base_weights_alone(model_dirs, init):
    batch = collate(toy_token_batches(2, seed=1))
    original = _logits(load_model(model_dirs), batch)
    model = _rewriting_model(model_dirs, init)
    residual = _base_weight(model)
    torch.testing.assert_close(_logits(model, batch), original, atol=1e-5, rtol=1e-5)  # residual + initial adapter
    snapshot_adapter(model)  # used to re-run the init on the base weights for the copy
    assert torch.equal(_base_weight(model), residual)
    torch.testing.assert_close(_logits(model, batch), original, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", REWRITING)
def test_base_rewriting_init_trains_against_the_model_as_it_starts(model_dirs, tmp_path, init, caplog, monkeypatch):
    data = toy_token_batches(8, seed=4)
    batch = collate(data[:4])
    original = _logits(load_model(model_dirs), batch)
    model = _rewriting_model(model_dirs, init)
    assert base_rewriting_init(model) == init
    with model.disable_adapter(), torch.no_grad():  # what the default base pass would have used
        residual_only = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert (residual_only - original).abs().max() > 1e-2
    monkeypatch.setattr(reference, "_SNAPSHOTS_LOGGED", set())
    with caplog.at_level(logging.WARNING, logger="kl_nontarget"):
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, max_steps=4, learning_rate=0.3),
                                     train_dataset=data, kl_weight=1.0)
    assert trainer.ref_adapter_name == INITIAL_ADAPTER
    assert sum("rewrote the base weights" in r.message for r in caplog.records) == 1
    base = base_forward(model, {k: v for k, v in batch.items() if k != "labels"},
                        ref_adapter_name=trainer.ref_adapter_name).logits
    torch.testing.assert_close(base, original, atol=1e-5, rtol=1e-5)  # the original, un-adapted model
    trainer.train()
    kls = [h["nontarget_kl"] for h in trainer.state.log_history if "nontarget_kl" in h]
    assert kls[0] < 1e-10 and kls[-1] > 1e-4  # 0 at the first step (float rounding), then positive
    # Forgetting is measured against the same reference: the original model, not the residual.
    loader = [batch]
    via_snapshot = forgetting_metrics(model, loader, progress=False)
    explicit = forgetting_metrics(model, loader, base_model=load_model(model_dirs), progress=False)
    assert via_snapshot["lf_kl"] == pytest.approx(explicit["lf_kl"], rel=1e-4, abs=1e-7) and explicit["lf_kl"] > 0


def test_hook_snapshots_a_base_rewriting_init_too(model_dirs):
    model = _rewriting_model(model_dirs, "pissa")
    loss_func = nontarget_kl_loss_func(model)
    assert loss_func.ref_adapter_name == INITIAL_ADAPTER and INITIAL_ADAPTER in model.peft_config
    loss_func.remove()


def test_a_chosen_reference_is_kept(model_dirs, tmp_path):
    model = _rewriting_model(model_dirs, "pissa")
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), train_dataset=toy_token_batches(4),
                                 ref_model=load_model(model_dirs))
    assert trainer.ref_adapter_name is None and INITIAL_ADAPTER not in model.peft_config
    model = _rewriting_model(model_dirs, "olora")
    name = snapshot_adapter(model, "mine")
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), train_dataset=toy_token_batches(4),
                                 ref_adapter_name=name)
    assert trainer.ref_adapter_name == "mine" and INITIAL_ADAPTER not in model.peft_config
    # A second trainer on the same model reuses the first one's snapshot.
    model = _rewriting_model(model_dirs, "pissa")
    first = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), train_dataset=toy_token_batches(4))
    second = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), train_dataset=toy_token_batches(4))
    assert first.ref_adapter_name == second.ref_adapter_name == INITIAL_ADAPTER and len(model.peft_config) == 2


def test_forgetting_of_a_rewritten_base_without_its_snapshot_is_refused(model_dirs):
    model = _rewriting_model(model_dirs, "pissa")
    with pytest.raises(ValueError, match="rewrote the base weights"):
        forgetting_metrics(model, [collate(toy_token_batches(2))], progress=False)


def test_loftq_by_name_gets_the_snapshot_too(model_dirs, tmp_path):
    # PEFT's LoftQ init runs on CUDA only (peft/utils/loftq_utils.py), so on the CPU the config is marked afterwards:
    # the reference follows the init's name, whatever produced the weights.
    model = _rewriting_model(model_dirs, True)
    model.peft_config["default"].init_lora_weights = "loftq"
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), train_dataset=toy_token_batches(4))
    assert trainer.ref_adapter_name == INITIAL_ADAPTER


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PEFT's LoftQ init needs CUDA")
def test_loftq_reference_is_the_quantized_start(model_dirs, tmp_path):
    # LoftQ puts quantized weights in the base and the quantization residual's low-rank part in the adapter: the model
    # as it starts approximates the original (up to LoftQ's error); that start is the reference, as documented.
    from peft import LoftQConfig, LoraConfig, get_peft_model

    batch = collate(toy_token_batches(2, seed=1))
    original = _logits(load_model(model_dirs), batch)
    model = get_peft_model(load_model(model_dirs), LoraConfig(r=4, target_modules=LORA_TARGETS,
                                                              init_lora_weights="loftq",
                                                              loftq_config=LoftQConfig(loftq_bits=4)))
    start = _logits(model, batch)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), train_dataset=toy_token_batches(4))
    base = base_forward(model, {k: v for k, v in batch.items() if k != "labels"},
                        ref_adapter_name=trainer.ref_adapter_name).logits
    torch.testing.assert_close(base, start, atol=1e-6, rtol=1e-6)
    error = (start - original).abs().max()
    assert 0 < error < 0.5 * original.abs().max()


# --------------------------------------------------------------------------------------------------------------------
# The variant table


def test_parse_variants():
    assert parse_variants("lora, DoRA,pissa,lora") == ("lora", "dora", "pissa")
    with pytest.raises(ValueError, match="unknown PEFT variant"):
        parse_variants("lora,qlora9")
    with pytest.raises(ValueError, match="no PEFT variant"):
        parse_variants(" , ")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_builds_trains_and_starts_at_the_base(model_dirs, tmp_path, variant):
    data = toy_token_batches(4, seed=2)
    batch = collate(data)
    original = _logits(load_model(model_dirs), batch)
    adapter = AdapterSpec(variant, r=4, alpha=8)
    model = adapter.model(load_model(model_dirs), seed=0)
    torch.testing.assert_close(_logits(model, batch), original, atol=1e-5, rtol=1e-5)  # no-op at the start
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = adapter.optimizer(model, 1e-2)
    assert (optimizer is not None) == (variant == "loraplus")
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, max_steps=2), train_dataset=data,
                                 optimizers=(optimizer, None))
    trainer.train()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert moved, f"{variant}: nothing trained"
    kls = [h["nontarget_kl"] for h in trainer.state.log_history if "nontarget_kl" in h]
    assert kls[0] < 1e-8  # the reference is the model as it starts, for every variant


def test_loraplus_trains_b_faster(model_dirs):
    adapter = AdapterSpec("loraplus", r=4, alpha=8)
    model = adapter.model(load_model(model_dirs), seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {}
    for group in adapter.optimizer(model, 1e-3).param_groups:
        if group["params"]:  # PEFT also makes an (empty, here) group for embedding adapters
            groups.setdefault(group["lr"], []).extend(names[id(p)] for p in group["params"])
    assert sorted(groups) == [1e-3, 16e-3]
    assert all("lora_B" in n for n in groups[16e-3]) and not any("lora_B" in n for n in groups[1e-3])


def test_plain_trainer_with_a_rewriting_init_measures_forgetting_against_the_start(model_dirs, tmp_path):
    # ForgettingCallback on a plain Trainer: it snapshots the initial adapter itself before sampling.
    from kl_nontarget import ForgettingCallback
    from kl_nontarget.evaluation.retention import batches

    model = _rewriting_model(model_dirs, "olora")
    trainer = Trainer(model=model, args=sgd_args(tmp_path, max_steps=2), train_dataset=toy_token_batches(4))
    callback = ForgettingCallback(trainer, retention_data=toy_token_batches(4, seed=7)).attach(trainer)
    trainer.train()
    assert INITIAL_ADAPTER in model.peft_config
    forgetting = [h["eval_forgetting"] for h in trainer.state.log_history if "eval_forgetting" in h]
    rows = list(batches(callback.rows, pad_id=0))
    explicit = forgetting_metrics(model, rows, base_model=load_model(model_dirs), progress=False)
    assert forgetting[-1] == pytest.approx(explicit["lf_kl"], rel=1e-3) and forgetting[-1] > 0
