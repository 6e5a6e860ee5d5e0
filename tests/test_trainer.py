"""NonTargetKLTrainer and the base distribution (kl_nontarget/models/introspection.py) on tiny CPU models."""

import copy
import warnings

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, Trainer

from kl_nontarget.models.base_pass import base_forward
from kl_nontarget.models.introspection import tuner_layers
from kl_nontarget.models.reference import TrainedAdapterWarning
from kl_nontarget.training import batch_rows as batch_module
from kl_nontarget.training.batch_rows import compute_batch_logits, supports_logits_mask
from kl_nontarget.training.options import RegularizerOptions
from kl_nontarget.training.trainer import NonTargetKLTrainer

from tiny_models import (
    LORA_TARGETS,
    assert_same_state,
    collate,
    independent_loss,
    load_model,
    peft_model,
    perturb_trainable,
    sgd_args,
    toy_token_batches,
    trainable_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


DATA = toy_token_batches(8, seed=3)


# -- compute_loss against an independent float64 computation --------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("options", [dict(kl_weight=0.7), dict(kl_weight=2.0, temperature=1.7, kl_direction="reverse")])
def test_compute_loss_matches_float64_reference(model_dirs, tmp_path, arch, options):
    model = peft_model(model_dirs, arch)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), **options)
    batch = collate(DATA[:4])
    num_items = torch.tensor(23)

    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    ref_loss, ref_ce, ref_kl = independent_loss(model, batch, num_items_in_batch=23, **options)
    ref_loss.backward()
    assert ref_kl > 1e-3  # the adapter has moved: the comparison is not trivial
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    sums = trainer.component_log.sums("train")
    torch.testing.assert_close(sums["ce"].double(), ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums["kl"].double(), ref_kl, rtol=1e-5, atol=1e-6)


def test_logits_mask_and_fallback_agree(model_dirs, monkeypatch):
    # transformers >= 5.21 slices logits with a boolean logits_to_keep; older versions slice the full logits.
    model = peft_model(model_dirs)
    batch = collate(DATA[:4])
    assert supports_logits_mask(model)
    masked = compute_batch_logits(model, batch)
    monkeypatch.setattr(batch_module, "supports_logits_mask", lambda m: False)
    full = compute_batch_logits(model, batch)
    assert full.outputs.logits.dim() == 3 and masked.outputs.logits.dim() == 2
    torch.testing.assert_close(masked.logits, full.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.ref_logits, full.ref_logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(masked.labels, full.labels)
    assert masked.labels.numel() == int((batch["labels"][:, 1:] != -100).sum())


def test_kl_is_zero_before_the_adapter_moves(model_dirs, tmp_path):
    model = peft_model(model_dirs, moved=False)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, max_steps=1), train_dataset=DATA)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["nontarget_kl"] == 0.0
    assert first["ce_loss"] == pytest.approx(first["loss"], rel=1e-6)


def test_kl_weight_zero_reproduces_plain_trainer(model_dirs, tmp_path):
    common = dict(max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    plain_model = peft_model(model_dirs)
    plain = Trainer(model=plain_model, args=sgd_args(tmp_path / "a", **common), train_dataset=DATA)
    plain.train()
    ours_model = peft_model(model_dirs)
    ours = NonTargetKLTrainer(model=ours_model, args=sgd_args(tmp_path / "b", **common), train_dataset=DATA,
                              kl_weight=0.0)
    ours.train()
    plain_losses = [log["loss"] for log in plain.state.log_history if "loss" in log]
    our_logs = [log for log in ours.state.log_history if "loss" in log]
    assert [log["loss"] for log in our_logs] == pytest.approx(plain_losses, rel=1e-5)
    assert [log["ce_loss"] for log in our_logs] == pytest.approx(plain_losses, rel=1e-5)
    assert_same_state(trainable_state(plain_model), trainable_state(ours_model), atol=1e-5)


def test_accumulation_equals_one_big_batch(model_dirs, tmp_path):
    # Uneven supervised-token counts per example: only normalising by the window's token count makes these equal.
    counts = [int((r["labels"][1:] != -100).sum()) for r in DATA]
    assert len(set(counts)) > 2
    states, logs = [], []
    for name, bs, accum in [("big", 4, 1), ("accum", 2, 2)]:
        model = peft_model(model_dirs)
        before = trainable_state(model)
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path / name, per_device_train_batch_size=bs,
                                                                gradient_accumulation_steps=accum),
                                     train_dataset=DATA, kl_weight=1.5)
        trainer.train()
        states.append(trainable_state(model))
        logs.append([[log[k] for k in ("loss", "ce_loss", "nontarget_kl")]
                     for log in trainer.state.log_history if "loss" in log])
    assert any(not torch.equal(before[n], states[0][n]) for n in before)
    assert_same_state(states[0], states[1], atol=1e-6)
    torch.testing.assert_close(torch.tensor(logs[0]), torch.tensor(logs[1]), rtol=1e-5, atol=1e-6)


def test_logs_average_the_window_and_evaluation_reports_components(model_dirs, tmp_path):
    model = peft_model(model_dirs)
    kl_weight = 0.5
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, max_steps=4, logging_steps=2,
                                                            per_device_train_batch_size=2,
                                                            gradient_accumulation_steps=2),
                                 train_dataset=DATA, eval_dataset=DATA[:6], kl_weight=kl_weight)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == [2, 4]
    for log in logs:
        assert log["nontarget_kl"] > 0
        assert log["loss"] == pytest.approx(log["ce_loss"] + kl_weight * log["nontarget_kl"], rel=1e-4)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_ce_loss", "eval_nontarget_kl"} <= metrics.keys()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce_loss"] + kl_weight * metrics["eval_nontarget_kl"],
                                                 rel=1e-5)
    # eval_loss weights per-batch means by batch size (6 examples, batches of 4 and 2): recompute it that way.
    expected = []
    for rows in (DATA[:4], DATA[4:6]):
        with torch.no_grad():
            expected.append((independent_loss(model, collate(rows), kl_weight=kl_weight)[1].item(), len(rows)))
    ce = sum(v * n for v, n in expected) / 6
    assert metrics["eval_ce_loss"] == pytest.approx(ce, rel=1e-5)
    named = trainer.evaluate(metric_key_prefix="heldout")  # the components follow the caller's prefix
    assert named["heldout_nontarget_kl"] == pytest.approx(metrics["eval_nontarget_kl"], rel=1e-6)
    assert not any(k.startswith("eval_") for k in named)


# -- the base distribution: flags, merged adapters, warnings -----------------------------------------------------


def test_requires_grad_flags_and_train_mode_survive(model_dirs, tmp_path):
    model = peft_model(model_dirs)
    frozen = [p for n, p in model.named_parameters() if "layers.0" in n and "lora_A" in n]
    for p in frozen:
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))
    model.train()
    loss = trainer.compute_loss(model, collate(DATA[:4]))
    loss.backward()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in frozen)


def test_merged_adapter_is_refused(model_dirs, tmp_path):
    model = peft_model(model_dirs)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))
    model.unmerge_adapter()
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))
    model.merge_adapter()  # merged after the trainer was built: refused at the next step
    with pytest.raises(ValueError, match="merged"):
        trainer.compute_loss(model, collate(DATA[:2]))


def test_a_plain_model_needs_ref_model(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="ref_model"):
        NonTargetKLTrainer(model=load_model(model_dirs, "llama"), args=sgd_args(tmp_path))


@pytest.mark.parametrize("kwargs, error", [
    (dict(kl_weight=-1.0), ValueError), (dict(kl_weight=float("nan")), ValueError), (dict(kl_weight="1"), TypeError),
    (dict(kl_weight=True), TypeError), (dict(temperature=0.0), ValueError), (dict(kl_direction="both"), ValueError),
])
def test_bad_options_are_rejected(model_dirs, tmp_path, kwargs, error):
    with pytest.raises(error):
        NonTargetKLTrainer(model=peft_model(model_dirs, moved=False), args=sgd_args(tmp_path), **kwargs)


def test_options_object_is_held_and_read_through(model_dirs, tmp_path):
    options = RegularizerOptions(kl_weight=0.25, temperature=2.0, kl_direction="reverse", fused_linear=False)
    trainer = NonTargetKLTrainer(model=peft_model(model_dirs, moved=False), args=sgd_args(tmp_path), options=options)
    assert trainer.options is options
    assert (trainer.kl_weight, trainer.temperature, trainer.kl_direction, trainer.fused_linear) == \
        (0.25, 2.0, "reverse", False)
    keywords = NonTargetKLTrainer(model=peft_model(model_dirs, moved=False), args=sgd_args(tmp_path), kl_weight=0.25,
                                  temperature=2.0, kl_direction="reverse", fused_linear=False)
    assert keywords.options == options
    with pytest.raises(ValueError, match="either options="):
        NonTargetKLTrainer(model=peft_model(model_dirs, moved=False), args=sgd_args(tmp_path), options=options,
                           kl_weight=2.0)


def test_bad_batches_are_rejected(model_dirs, tmp_path):
    model = peft_model(model_dirs)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))
    batch = collate(DATA[:2])
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="shape"):
        trainer.compute_loss(model, {**batch, "labels": batch["labels"][:, :-1]})
    with pytest.raises(TypeError, match="integer"):
        trainer.compute_loss(model, {**batch, "labels": batch["labels"].float()})
    with pytest.raises(TypeError, match="ref_model"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), ref_model=42)
    with pytest.raises(ValueError, match="separate"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), ref_model=model)


@pytest.mark.parametrize("case", ["bias", "unfrozen"])
def test_warns_when_disabled_adapters_are_not_the_base(model_dirs, tmp_path, case):
    # (Inits that rewrite the base weights, PiSSA say, get a snapshot of their initial adapter instead: test_variants.)
    config = {"bias": LoraConfig(r=4, target_modules=["q_proj"], bias="all"),
              "unfrozen": LoraConfig(r=4, target_modules=["q_proj"])}[case]
    model = get_peft_model(load_model(model_dirs, "llama"), config)
    if case == "unfrozen":
        model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="ref_model"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))


def test_modules_to_save_disabled_is_the_base(model_dirs, tmp_path):
    # PEFT trains a copy of a modules_to_save module and runs the original when adapters are disabled: no warning.
    base = load_model(model_dirs, "llama")
    batch = collate(DATA[:2])
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    perturb_trainable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", TrainedAdapterWarning)  # the adapter was moved on purpose
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))
    out = base_forward(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)


# -- training features --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(model_dirs, tmp_path, reentrant):
    states = []
    for gc in (False, True):
        model = peft_model(model_dirs)
        extra = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant}) \
            if gc else {}
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path / str(gc), **extra), train_dataset=DATA)
        trainer.train()
        states.append(trainable_state(model))
    assert_same_state(states[0], states[1], atol=1e-5)


def test_resume_from_checkpoint(model_dirs, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    model = peft_model(model_dirs)
    NonTargetKLTrainer(model=model, args=sgd_args(tmp_path / "full", **common), train_dataset=DATA).train()
    expected = trainable_state(model)

    model = peft_model(model_dirs)
    NonTargetKLTrainer(model=model, args=sgd_args(tmp_path / "cut", **{**common, "max_steps": 2}),
                       train_dataset=DATA).train()
    checkpoint = tmp_path / "cut" / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    model = peft_model(model_dirs)  # fresh adapter weights: the checkpoint must restore them
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path / "cut", **common), train_dataset=DATA)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_same_state(expected, trainable_state(model), atol=1e-5)
    logs = [log for log in trainer.state.log_history if "loss" in log and log["step"] > 2]
    assert [log["step"] for log in logs] == [3, 4] and all("nontarget_kl" in log for log in logs)


@pytest.mark.parametrize("kind", ["dora", "loha", "ia3"])
def test_other_adapter_types(model_dirs, tmp_path, kind):
    config = {"dora": LoraConfig(r=4, target_modules=LORA_TARGETS, use_dora=True),
              "loha": LoHaConfig(r=4, target_modules=LORA_TARGETS),
              "ia3": IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])}
    model = peft_model(model_dirs, config=config[kind], moved=False)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, max_steps=1), train_dataset=DATA)
    batch = collate(DATA[:4])
    with torch.no_grad():
        _, ce, kl = independent_loss(model, batch)
    assert kl.item() == pytest.approx(0.0, abs=1e-10)  # a fresh adapter is the identity
    perturb_trainable(model, scale=0.2)
    loss = trainer.compute_loss(model, dict(batch))
    ref_loss, _, ref_kl = independent_loss(model, batch)
    assert ref_kl > 1e-4
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    trainer.train()
    assert trainer.state.log_history[0]["nontarget_kl"] > 0


def test_no_hooks_left_merge_and_unload_and_plain_peft_load(model_dirs, tmp_path):
    model = peft_model(model_dirs)

    def hooks(m):
        return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) + len(x._backward_hooks) for x in m.modules())

    before = hooks(model)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, gradient_checkpointing=True),
                                 train_dataset=DATA)
    trainer.train()
    assert hooks(model) <= before + 1  # at most PEFT's own input-grad hook for gradient checkpointing
    model.save_pretrained(tmp_path / "adapter")
    batch = collate(DATA[:2])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    reloaded = PeftModel.from_pretrained(load_model(model_dirs, "llama"), tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    assert type(merged) is LlamaForCausalLM and not tuner_layers(merged)
    assert "forward" not in vars(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_full_fine_tuning_with_ref_model(model_dirs, tmp_path, bf16):
    model = load_model(model_dirs, "llama")
    ref = copy.deepcopy(model).train()
    # bf16: the ref_model runs under the same autocast as the trained model, so the first KL is exactly 0
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, learning_rate=0.05, bf16=bf16),
                                 train_dataset=DATA, ref_model=ref)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    batch = collate(DATA[:4])
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        assert loss.item() == pytest.approx(independent_loss(model, batch, ref_model=ref)[0].item(), rel=1e-5)
    trainer.train()
    assert trainer.state.log_history[0]["nontarget_kl"] == 0.0
    assert trainer.state.log_history[1]["nontarget_kl"] > 0
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss.double(), independent_loss(model, batch, ref_model=ref)[0].detach(),
                               rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in ref.parameters())


def test_bf16_mixed_precision_and_compute_metrics(model_dirs, tmp_path):
    model = peft_model(model_dirs)
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {}

    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, bf16=True, learning_rate=0.05),
                                 train_dataset=DATA, eval_dataset=DATA[:4], compute_metrics=compute_metrics)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(torch.isfinite(torch.tensor([log["loss"], log["nontarget_kl"]])).all() for log in logs)
    metrics = trainer.evaluate()
    assert seen["shape"][:2] == (4, DATA[0]["input_ids"].shape[0])  # full logits when predictions are asked for
    assert "eval_nontarget_kl" in metrics


def test_average_tokens_across_devices_scaling(model_dirs, tmp_path, monkeypatch):
    # With a token count summed over ranks, each rank's loss is multiplied by the number of ranks (DDP then averages
    # the gradients), as Trainer.compute_loss does; without a count (evaluation) nothing is scaled.
    model = peft_model(model_dirs)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, average_tokens_across_devices=True))
    batch = collate(DATA[:4])
    with torch.no_grad():
        single = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(40))
        monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 4))
        scaled = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(40))
        unscaled = trainer.compute_loss(model, dict(batch))
    assert scaled.item() == pytest.approx(4 * single.item(), rel=1e-6)
    assert unscaled.item() == pytest.approx(independent_loss(model, batch)[0].item(), rel=1e-5)


def test_num_items_in_batch_counts_shifted_labels(model_dirs, tmp_path):
    model = peft_model(model_dirs)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))
    rows = [dict(r) for r in DATA[:4]]
    for r in rows:  # supervise position 0 too: it is never a prediction target
        r["labels"] = r["labels"].clone()
        r["labels"][0] = r["input_ids"][0]
    batches = [collate(rows[:2]), collate(rows[2:])]
    expected = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert int(trainer._get_num_items_in_batch(batches, torch.device("cpu"))) == expected
