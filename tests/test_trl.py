"""NonTargetKLSFTTrainer and the compute_loss_func hook (kl_nontarget/integrations/trl.py) on tiny CPU models."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from kl_nontarget.integrations.trl import NonTargetKLSFTTrainer, nontarget_kl_loss_func
from kl_nontarget.models.introspection import tuner_layers
from kl_nontarget.training.options import RegularizerOptions
from kl_nontarget.training.trainer import NonTargetKLTrainer

from tiny_models import (
    assert_same_state,
    collate,
    independent_loss,
    load_model,
    load_tokenizer,
    lora_config,
    peft_model,
    perturb_trainable,
    sgd_args,
    toy_prompt_completions,
    toy_token_batches,
    trainable_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sft_args(tmp_path, **overrides):
    # bf16 left at TRL's default (test_hook_and_subclass_train_identically_in_sft asserts it is on).
    return sgd_args(tmp_path, cls=SFTConfig, **{"max_steps": 3, "max_length": 64, **overrides})


def prompt_completion(n=16):
    return Dataset.from_list(toy_prompt_completions(n, seed=5))


def conversational(n=12):
    rows = toy_prompt_completions(n, seed=6)
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v for k, v in batch.items()}


def count_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def hooks_of(loss_func, model):
    return [h for m in model.modules() for h in m._forward_pre_hooks.values()
            if getattr(h, "__self__", None) is loss_func]


# -- the SFT subclass ----------------------------------------------------------------------------------------------


def test_sft_subclass_prompt_completion_matches_reference_and_trains(model_dirs, tmp_path):
    tokenizer = load_tokenizer(model_dirs)
    trainer = NonTargetKLSFTTrainer(model=load_model(model_dirs), args=sft_args(tmp_path),
                                    train_dataset=prompt_completion(), eval_dataset=prompt_completion(8),
                                    processing_class=tokenizer,
                                    peft_config=lora_config(), kl_weight=0.8, temperature=1.3)
    model = trainer.model
    perturb_trainable(model)
    assert "forward" not in vars(model.get_base_model())  # TRL's fused-LM-head patch is not needed and removed
    batch = first_batch(trainer)
    # completion-only loss: the prompt tokens are masked in the labels SFT built
    assert ((batch["labels"] == -100) & (batch["attention_mask"] == 1)).any()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(17))
    expected, _, kl = independent_loss(model, batch, kl_weight=0.8, temperature=1.3, num_items_in_batch=17)
    assert kl > 1e-3
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)

    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for log in logs:
        assert {"ce_loss", "nontarget_kl", "entropy", "mean_token_accuracy", "num_tokens"} <= log.keys()
        assert log["loss"] == pytest.approx(log["ce_loss"] + 0.8 * 1.3 ** 2 * log["nontarget_kl"], rel=1e-4)
    metrics = trainer.evaluate()
    assert {"eval_ce_loss", "eval_nontarget_kl", "eval_entropy"} <= metrics.keys()

    merged = model.merge_and_unload()
    assert type(merged) is LlamaForCausalLM and not tuner_layers(merged) and "forward" not in vars(merged)


def test_sft_subclass_conversational(model_dirs, tmp_path):
    tokenizer = load_tokenizer(model_dirs)
    model = peft_model(model_dirs)
    trainer = NonTargetKLSFTTrainer(model=model, args=sft_args(tmp_path, max_steps=2), train_dataset=conversational(),
                                    processing_class=tokenizer)
    batch = first_batch(trainer)
    assert ((batch["labels"] == -100) & (batch["attention_mask"] == 1)).any()
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss.double(), independent_loss(model, batch)[0].detach(), rtol=1e-5, atol=1e-6)
    trainer.train()
    assert trainer.state.log_history[0]["nontarget_kl"] > 0


def test_sft_subclass_packing_padding_free(model_dirs, tmp_path):
    tokenizer = load_tokenizer(model_dirs)
    model = peft_model(model_dirs)
    trainer = NonTargetKLSFTTrainer(model=model, args=sft_args(tmp_path, max_steps=2, packing=True, max_length=48,
                                                               per_device_train_batch_size=2),
                                    train_dataset=prompt_completion(), processing_class=tokenizer)
    batch = first_batch(trainer)
    assert "position_ids" in batch and "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert int((batch["position_ids"] == 0).sum()) > 1  # several sequences in one row
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss.double(), independent_loss(model, batch)[0].detach(), rtol=1e-5, atol=1e-6)
    trainer.train()
    assert all(log["nontarget_kl"] > 0 for log in trainer.state.log_history if "loss" in log)


# -- the hook ------------------------------------------------------------------------------------------------------


def test_hook_and_subclass_train_identically_in_sft(model_dirs, tmp_path):
    # Both through TRL's peft_config path (SFTTrainer wraps the model; the hook then sits on the inner model).
    tokenizer = load_tokenizer(model_dirs)
    common = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    torch.manual_seed(0)
    sub = NonTargetKLSFTTrainer(model=load_model(model_dirs), args=sft_args(tmp_path / "a", **common),
                                train_dataset=prompt_completion(), processing_class=tokenizer,
                                peft_config=lora_config(), kl_weight=2.0)
    assert sub.args.bf16  # TRL's default: both passes run under accelerate's bf16 autocast
    sub.train()
    assert sub.state.log_history[0]["nontarget_kl"] == 0.0  # same precision for both passes: exactly 0 at first

    plain = load_model(model_dirs)
    hook = nontarget_kl_loss_func(plain, kl_weight=2.0)
    assert len(hooks_of(hook, plain)) == 2  # the inputs, and the autocast state at the input embeddings
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):  # TRL 1.16 deprecates compute_loss_func
        via_hook = SFTTrainer(model=plain, args=sft_args(tmp_path / "b", **common), train_dataset=prompt_completion(),
                              processing_class=tokenizer, peft_config=lora_config(), compute_loss_func=hook)
    hook.bind(via_hook).train()
    assert hook._captured is None  # nothing kept between steps
    assert_same_state(trainable_state(sub.model), trainable_state(via_hook.model), atol=1e-5)
    sub_losses = [log["loss"] for log in sub.state.log_history if "loss" in log]
    assert sub.state.log_history[-2]["nontarget_kl"] > 0
    assert [log["loss"] for log in via_hook.state.log_history if "loss" in log] == pytest.approx(sub_losses, rel=1e-5)
    before = count_hooks(plain)
    hook.remove()
    assert count_hooks(plain) == before - 2 and not hooks_of(hook, plain)


def test_hook_on_peft_model_matches_reference_in_sft(model_dirs, tmp_path):
    tokenizer = load_tokenizer(model_dirs)
    model = peft_model(model_dirs)
    hook = nontarget_kl_loss_func(model, kl_weight=0.5, kl_direction="reverse")
    with pytest.warns(FutureWarning):
        trainer = SFTTrainer(model=model, args=sft_args(tmp_path, max_steps=2), train_dataset=prompt_completion(),
                             processing_class=tokenizer, compute_loss_func=hook)
    batch = first_batch(trainer)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(20))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():  # a training forward with gradients would hand its hidden states to the attached hook
        expected = independent_loss(model, batch, kl_weight=0.5, kl_direction="reverse", num_items_in_batch=20)[0]
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    trainer.train()
    assert len(hooks_of(hook, model)) == 2
    hook.remove()
    assert not hooks_of(hook, model)


def test_hook_with_transformers_trainer_matches_subclass(model_dirs, tmp_path):
    data = toy_token_batches(8, seed=4)
    args = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, learning_rate=0.5,
                optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
                save_strategy="no", seed=0, disable_tqdm=True)
    sub_model = peft_model(model_dirs)
    NonTargetKLTrainer(model=sub_model, args=TrainingArguments(str(tmp_path / "a"), **args), train_dataset=data,
                       kl_weight=1.5).train()
    hook_model = peft_model(model_dirs)
    hook = nontarget_kl_loss_func(hook_model, kl_weight=1.5)
    trainer = Trainer(model=hook_model, args=TrainingArguments(str(tmp_path / "b"), **args), train_dataset=data,
                      compute_loss_func=hook)
    hook.bind(trainer).train()
    named = trainer.evaluate(data[:4], metric_key_prefix="heldout")  # the hook's components follow the prefix
    assert named["heldout_nontarget_kl"] > 0 and "eval_nontarget_kl" not in named
    hook.remove()
    assert_same_state(trainable_state(sub_model), trainable_state(hook_model), atol=1e-6)


def test_hook_logs_through_the_trainer_it_is_bound_to(model_dirs, tmp_path):
    # Two trainers in one process, each with its own hook: each logs exactly what its own loss computed, as the
    # subclass logs it, whatever code calls the hook.
    data = toy_token_batches(8, seed=4)
    args = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=0.5, optim="sgd", logging_steps=1,
                lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    reference = NonTargetKLTrainer(model=peft_model(model_dirs), args=TrainingArguments(str(tmp_path / "r"), **args),
                                   train_dataset=data, kl_weight=1.5)
    reference.train()
    models = {name: peft_model(model_dirs) for name in "ab"}
    hooks = {name: nontarget_kl_loss_func(models[name], kl_weight=w) for name, w in (("a", 1.5), ("b", 0.0))}
    trainers = {name: Trainer(model=models[name], args=TrainingArguments(str(tmp_path / name), **args),
                              train_dataset=data, compute_loss_func=hooks[name]) for name in "ab"}
    with pytest.raises(ValueError, match="compute_loss_func is not this loss function"):
        hooks["a"].bind(trainers["b"])
    assert hooks["a"].bind(trainers["a"]) is trainers["a"] and hooks["b"].bind(trainers["b"]) is trainers["b"]

    def called_from_a_method_of(self, hook):  # `self` is the other trainer, as in one of its callbacks
        with torch.no_grad():
            outputs = models["a"](**{k: v for k, v in collate(data[:2]).items() if k != "labels"})
        return hook(outputs, collate(data[:2])["labels"])

    models["a"].eval()
    called_from_a_method_of(trainers["b"], hooks["a"])
    assert hooks["a"].trainer is trainers["a"] and hooks["b"].trainer is trainers["b"]
    assert hooks["a"].component_log.sums("eval")["weight"] == 2 and hooks["b"].component_log.sums("eval")["weight"] == 0
    trainers["b"].train()
    trainers["a"].train()
    logged = {name: [h["nontarget_kl"] for h in trainer.state.log_history if "nontarget_kl" in h]
              for name, trainer in trainers.items()}
    expected = [h["nontarget_kl"] for h in reference.state.log_history if "nontarget_kl" in h]
    assert logged["a"] == pytest.approx(expected, rel=1e-5) and logged["a"][-1] > 0
    assert len(logged["b"]) == 2 and logged["b"][-1] > 0 and logged["b"][-1] != pytest.approx(logged["a"][-1])
    for hook in hooks.values():
        hook.remove()
    assert hooks["a"].trainer is None and "log" not in trainers["a"].__dict__  # the wrapping is undone


def test_unbound_hook_trains_and_warns_once(model_dirs, tmp_path):
    model = peft_model(model_dirs)
    hook = nontarget_kl_loss_func(model)
    trainer = Trainer(model=model, args=sgd_args(tmp_path, max_steps=2, logging_steps=1),
                      train_dataset=toy_token_batches(8, seed=4), compute_loss_func=hook)
    with pytest.warns(UserWarning, match="not bound to a Trainer") as record:
        trainer.train()
    assert sum("not bound" in str(w.message) for w in record) == 1
    assert all("nontarget_kl" not in h for h in trainer.state.log_history)
    hook.remove()


def test_hook_with_ref_model_under_bf16_matches_subclass(model_dirs, tmp_path):
    # Full fine-tuning under accelerate's bf16 autocast: the hook replays the autocast around ref_model's pass.
    data = toy_token_batches(8, seed=4)
    args = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=0.05, optim="sgd", logging_steps=1,
                report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, bf16=True)
    sub_model, hook_model = load_model(model_dirs), load_model(model_dirs)
    sub = NonTargetKLTrainer(model=sub_model, args=TrainingArguments(str(tmp_path / "a"), **args), train_dataset=data,
                             ref_model=load_model(model_dirs))
    sub.train()
    hook = nontarget_kl_loss_func(hook_model, ref_model=load_model(model_dirs))
    via_hook = Trainer(model=hook_model, args=TrainingArguments(str(tmp_path / "b"), **args), train_dataset=data,
                       compute_loss_func=hook)
    hook.bind(via_hook).train()
    hook.remove()
    assert sub.state.log_history[0]["nontarget_kl"] == 0.0
    assert via_hook.state.log_history[0]["loss"] == sub.state.log_history[0]["ce_loss"]  # KL exactly 0 at first
    assert [log["loss"] for log in via_hook.state.log_history[:2]] == \
        pytest.approx([log["loss"] for log in sub.state.log_history[:2]], rel=1e-5)


def test_hook_full_fine_tuning_with_ref_model(model_dirs, tmp_path):
    model = load_model(model_dirs)
    ref = copy.deepcopy(model)
    hook = nontarget_kl_loss_func(model, ref_model=ref)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    batch = collate(toy_token_batches(4, seed=2))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    assert hook(None, batch["labels"]).item() == pytest.approx(
        independent_loss(model, batch, ref_model=ref)[0].item(), rel=1e-6)
    hook.remove()


def test_hook_errors(model_dirs, tmp_path):
    with pytest.raises(TypeError):
        nontarget_kl_loss_func("model")
    with pytest.raises(ValueError, match="kl_weight"):
        nontarget_kl_loss_func(peft_model(model_dirs), kl_weight=-0.1)
    with pytest.raises(ValueError, match="kl_direction"):
        nontarget_kl_loss_func(peft_model(model_dirs), kl_direction="up")

    model = peft_model(model_dirs)
    options = RegularizerOptions(kl_weight=0.5, kl_direction="reverse")
    hook = nontarget_kl_loss_func(model, options=options)
    assert hook.options is options and (hook.kl_weight, hook.kl_direction) == (0.5, "reverse")
    hook.remove()
    hook = nontarget_kl_loss_func(model)
    labels = collate(toy_token_batches(2))["labels"]
    with pytest.raises(RuntimeError, match="no forward"):
        hook(None, labels)
    hook.remove()
    with pytest.raises(RuntimeError, match="removed"):
        hook(None, labels)

    merged = peft_model(model_dirs)
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        nontarget_kl_loss_func(merged)

    # A plain model may still be wrapped by SFTTrainer(peft_config=...): the check waits for the first step.
    plain = load_model(model_dirs)
    hook = nontarget_kl_loss_func(plain)
    trainer = Trainer(model=plain, args=TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                                          disable_tqdm=True), train_dataset=toy_token_batches(4),
                      compute_loss_func=hook)
    with pytest.raises(ValueError, match="ref_model"):
        trainer.train()
    hook.remove()


def test_subclass_rejects_what_it_does_not_support(model_dirs, tmp_path):
    tokenizer = load_tokenizer(model_dirs)
    with pytest.raises(ValueError, match="compute_loss_func"):
        NonTargetKLSFTTrainer(model=peft_model(model_dirs), args=sft_args(tmp_path), train_dataset=prompt_completion(),
                              processing_class=tokenizer, compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="loss_type"):
        NonTargetKLSFTTrainer(model=peft_model(model_dirs), args=sft_args(tmp_path, loss_type="dft"),
                              train_dataset=prompt_completion(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="ref_model"):
        NonTargetKLSFTTrainer(model=load_model(model_dirs), args=sft_args(tmp_path), train_dataset=prompt_completion(),
                              processing_class=tokenizer)
