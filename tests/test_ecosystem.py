"""The trainers and the hook alongside the rest of the ecosystem: Liger-Kernel, continuing from an adapter
(`ref_adapter_name`), a reference model given by path, MoE router losses, component logging, SFT loss types and
`torch.compile`. Tiny models, a step or two each."""

import copy
import warnings

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer

from kl_nontarget import snapshot_adapter
from kl_nontarget.integrations.trl import nontarget_kl_loss_func
from kl_nontarget.models.reference import TrainedAdapterWarning, adapter_parameters
from kl_nontarget.training.trainer import NonTargetKLTrainer

from tiny_models import (
    assert_same_state,
    collate,
    independent_loss,
    load_model,
    lora_config,
    loss_and_grads,
    peft_model,
    sgd_args,
    toy_token_batches,
    trainable_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = toy_token_batches(8, seed=11)


# -- Liger-Kernel ---------------------------------------------------------------------------------------------------

LIGER_OFF = {"rope": False, "rms_norm": False, "swiglu": False}


def _liger_patch(model):
    """Patch the transformers model inside `model` with Liger's fused-loss forward (what use_liger_kernel does)."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    from kl_nontarget.models.introspection import patched_forward, transformers_model

    _apply_liger_kernel_to_instance(model=transformers_model(model), fused_linear_cross_entropy=True, **LIGER_OFF)
    assert patched_forward(model) is not None  # the instance forward is Liger's now


def test_liger_config_turns_off_fused_cross_entropy_and_trains(model_dirs, tmp_path):
    pytest.importorskip("liger_kernel")
    model = peft_model(model_dirs)
    # Liger's layer kernels stay off here: its RMSNorm kernel fails under Triton's CPU interpreter (liger 0.8.5).
    config = {**LIGER_OFF, "fused_linear_cross_entropy": True}
    args = sgd_args(tmp_path, use_liger_kernel=True, liger_kernel_config=config)
    with pytest.warns(UserWarning, match="fused_linear_cross_entropy"):
        trainer = NonTargetKLTrainer(model=model, args=args, train_dataset=DATA, eval_dataset=DATA[:4])
    assert args.liger_kernel_config == {**config, "fused_linear_cross_entropy": False}
    trainer.train()
    from kl_nontarget.models.introspection import patched_forward

    assert patched_forward(model) is None  # Liger was applied without its fused-loss forward
    metrics = trainer.evaluate()
    logs = [h for h in trainer.state.log_history if "ce_loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert metrics["eval_nontarget_kl"] > 0


def test_liger_patched_forward_takes_the_logits_path(model_dirs, tmp_path):
    # A forward Liger patched anyway (by hand, or under the hook): no boolean logits_to_keep, no skip_logits.
    model = peft_model(model_dirs, dtype=torch.float64)
    batch = collate(DATA[:4])
    expected = independent_loss(model, batch)[0].detach()
    _liger_patch(model)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), eval_dataset=DATA[:4])
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)).detach(), expected, rtol=1e-10, atol=1e-12)
    # Loss-only evaluation: the Trainer adds skip_logits=True for Liger.
    model.eval()
    loss, _, _ = trainer.prediction_step(model, {**batch, "skip_logits": True}, prediction_loss_only=True)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_liger_with_the_hook_under_a_plain_trainer(model_dirs, tmp_path):
    pytest.importorskip("liger_kernel")
    model = peft_model(model_dirs)
    loss_func = nontarget_kl_loss_func(model)
    args = sgd_args(tmp_path, use_liger_kernel=True,
                    liger_kernel_config={**LIGER_OFF, "fused_linear_cross_entropy": True})
    trainer = Trainer(model=model, args=args, train_dataset=DATA, eval_dataset=DATA[:4], compute_loss_func=loss_func)
    loss_func.bind(trainer).train()  # Trainer patches Liger's fused-loss forward in here
    from kl_nontarget.models.introspection import patched_forward

    assert patched_forward(model) is not None
    metrics = trainer.evaluate()  # loss-only evaluation: skip_logits is dropped for the unlabelled forward
    assert metrics["eval_nontarget_kl"] > 0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    loss_func.remove()


# -- continuing from an adapter --------------------------------------------------------------------------------------


def test_trained_adapter_warns_and_snapshot_is_the_reference(model_dirs, tmp_path):
    model = peft_model(model_dirs, dtype=torch.float64)  # adapter already moved away from zero
    with pytest.warns(TrainedAdapterWarning, match="snapshot_adapter"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))
    start = copy.deepcopy(model)  # the model as it starts, for an independent reference
    before = trainable_state(model)
    name = snapshot_adapter(model)
    assert name == "reference" and model.active_adapter == "default"
    assert trainable_state(model).keys() == before.keys()  # the copy is frozen, the trained adapter unchanged
    ref_params = dict(adapter_parameters(model, name))
    assert ref_params and not any(p.requires_grad for p in ref_params.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainedAdapterWarning)
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, max_steps=2), train_dataset=DATA,
                                     ref_adapter_name=name)
    batch = collate(DATA[:4])
    loss = trainer.compute_loss(model, dict(batch))
    ce_only = independent_loss(model, batch, kl_weight=0.0)[0].detach()
    torch.testing.assert_close(loss.detach(), ce_only, rtol=1e-10, atol=1e-12)  # KL exactly 0 at the start
    frozen = {n: p.detach().clone() for n, p in ref_params.items()}
    trainer.train()
    after = trainable_state(model)
    assert any(not torch.equal(after[n], before[n]) for n in before)  # the trained adapter moved...
    for n, p in adapter_parameters(model, name):  # ...the reference did not, and stays frozen
        assert torch.equal(p, frozen[n]) and not p.requires_grad
    assert model.active_adapter == "default" and trainable_state(model).keys() == before.keys()
    # The reference pass is the model as it started: compare with an independent float64 computation.
    expected = independent_loss(model, batch, ref_model=_enabled(start))[0].detach()
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)).detach(), expected, rtol=1e-10, atol=1e-12)


def _enabled(peft):
    """A PeftModel as a plain callable reference (adapters on, frozen)."""
    peft.requires_grad_(False)
    peft.eval()
    return peft


def test_ref_adapter_through_the_hook_equals_the_trainer(model_dirs, tmp_path):
    model = peft_model(model_dirs, dtype=torch.float64)
    start = _enabled(copy.deepcopy(model))
    snapshot_adapter(model, "start")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)  # the trained adapter moves on
    batch = collate(DATA[:4])
    expected = independent_loss(model, batch, ref_model=start)[0].detach()
    loss_func = nontarget_kl_loss_func(model, ref_adapter_name="start")
    outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    torch.testing.assert_close(loss_func(outputs, batch["labels"]).detach(), expected, rtol=1e-10, atol=1e-12)
    loss_func.remove()


def test_bad_ref_adapter_names_are_refused(model_dirs, tmp_path):
    model = peft_model(model_dirs, moved=False)
    with pytest.raises(ValueError, match="not an adapter"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), ref_adapter_name="missing")
    with pytest.raises(ValueError, match="being trained"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), ref_adapter_name="default")
    snapshot_adapter(model, "ref")
    with pytest.raises(ValueError, match="not both"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), ref_adapter_name="ref",
                           ref_model=load_model(model_dirs))
    with pytest.raises(ValueError, match="already has an adapter"):
        snapshot_adapter(model, "ref")
    with pytest.raises(ValueError, match="PeftModel"):
        snapshot_adapter(load_model(model_dirs))


# -- ref_model as a path ----------------------------------------------------------------------------------------------


def test_ref_model_by_path_is_loaded_like_the_model(model_dirs, tmp_path):
    path = str(model_dirs / "llama")
    model = load_model(model_dirs, dtype=torch.float64)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), ref_model=path)
    ref = trainer.ref_model
    assert ref.dtype == torch.float64 and not any(p.requires_grad for p in ref.parameters()) and not ref.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    batch = collate(DATA[:4])
    expected = independent_loss(model, batch, ref_model=load_model(model_dirs, dtype=torch.float64))[0].detach()
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)).detach(), expected, rtol=1e-10, atol=1e-12)
    chosen = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), ref_model=path,
                                ref_model_init_kwargs={"dtype": torch.float32})
    assert chosen.ref_model.dtype == torch.float32
    loss_func = nontarget_kl_loss_func(model, ref_model=path)  # the hook loads a path the same way
    assert loss_func.ref_model.dtype == torch.float64 and not loss_func.ref_model.training
    outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    torch.testing.assert_close(loss_func(outputs, batch["labels"]).detach(), expected, rtol=1e-10, atol=1e-12)
    loss_func.remove()
    with pytest.raises(ValueError, match="ref_model_init_kwargs"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), ref_model=load_model(model_dirs),
                           ref_model_init_kwargs={"dtype": torch.float32})


def test_prepared_ref_model_keeps_the_fused_path_under_mixed_precision(model_dirs, tmp_path):
    # accelerate's prepare_model wraps the reference's forward in autocast: not a patch that changes the logits.
    from kl_nontarget.models.introspection import patched_forward

    model = load_model(model_dirs)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, bf16=True), ref_model=load_model(model_dirs),
                                 fused_linear=True)
    assert "_original_forward" in trainer.ref_model.__dict__ and patched_forward(trainer.ref_model) is None
    assert trainer._fused_heads(model, needs_logits=False) is not None


# -- MoE router loss -----------------------------------------------------------------------------------------------


def _tiny_moe(arch="mixtral"):
    """A tiny Mixtral or Qwen2-MoE with LoRA, returning its router loss (coefficient 0.5)."""
    import transformers

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    else:
        config = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24,
                                             shared_expert_intermediate_size=24, num_experts=4, **common)
        cls = transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    return get_peft_model(cls(config), lora_config(target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_router_loss_is_added_like_the_parent_trainer(tmp_path, arch):
    model = _tiny_moe(arch)
    batch = collate(DATA[:4])
    plain = Trainer(model=model, args=sgd_args(tmp_path))
    ours = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), kl_weight=0.0)
    expected, expected_grads = loss_and_grads(plain, model, batch)
    with torch.no_grad():
        aux = model(**{k: v for k, v in batch.items() if k != "labels"}).aux_loss
    assert aux > 0  # the router loss matters in this comparison
    loss, grads = loss_and_grads(ours, model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_state(grads, expected_grads, atol=1e-7)
    # The hook under a plain Trainer adds it too.
    loss_func = nontarget_kl_loss_func(model, kl_weight=0.0)
    hooked = Trainer(model=model, args=sgd_args(tmp_path), compute_loss_func=loss_func)
    loss, grads = loss_and_grads(hooked, model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_state(grads, expected_grads, atol=1e-7)
    loss_func.remove()


# -- logging ----------------------------------------------------------------------------------------------------------


def test_hook_logs_components_like_the_trainer(model_dirs, tmp_path):
    runs = {}
    for kind in ("trainer", "hook"):
        model = peft_model(model_dirs)
        args = sgd_args(tmp_path / kind, max_steps=2)
        if kind == "trainer":
            trainer = NonTargetKLTrainer(model=model, args=args, train_dataset=DATA, eval_dataset=DATA[:4])
        else:
            loss_func = nontarget_kl_loss_func(model)
            trainer = loss_func.bind(Trainer(model=model, args=args, train_dataset=DATA, eval_dataset=DATA[:4],
                                             compute_loss_func=loss_func))
        trainer.train()
        metrics = trainer.evaluate()
        runs[kind] = ([h for h in trainer.state.log_history if "ce_loss" in h], metrics)
        if kind == "hook":
            loss_func.remove()
            assert "log" not in trainer.__dict__ and "evaluation_loop" not in trainer.__dict__
    (train_logs, metrics), (hook_logs, hook_metrics) = runs["trainer"], runs["hook"]
    assert len(hook_logs) == len(train_logs) == 2
    for a, b in zip(hook_logs, train_logs):
        for key in ("loss", "ce_loss", "nontarget_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    for key in ("eval_loss", "eval_ce_loss", "eval_nontarget_kl"):
        assert hook_metrics[key] == pytest.approx(metrics[key], rel=1e-4), key


def test_subclass_logs_its_term_under_its_own_name(model_dirs, tmp_path):
    class Named(NonTargetKLTrainer):
        regularizer_log_name = "full_kl"

        def compute_regularized_loss(self, logits, ref_logits, labels, num_items_in_batch):
            return super().compute_regularized_loss(logits, ref_logits, labels, num_items_in_batch)

    class Unnamed(Named):
        regularizer_log_name = None

    for cls, name in ((Named, "full_kl"), (Unnamed, "regularizer")):
        trainer = cls(model=peft_model(model_dirs), args=sgd_args(tmp_path, max_steps=1), train_dataset=DATA,
                      eval_dataset=DATA[:4])
        trainer.train()
        logged = trainer.state.log_history[0]
        assert name in logged and "nontarget_kl" not in logged
        metrics = trainer.evaluate()
        assert f"eval_{name}" in metrics and "eval_nontarget_kl" not in metrics


# -- torch.compile ----------------------------------------------------------------------------------------------------


def test_compiled_model_trains_like_the_uncompiled_one_and_the_hook_refuses_it(model_dirs, tmp_path):
    from tiny_models import perturb_trainable, tiny_llama

    def run(compile_):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(num_layers=1), lora_config())  # one layer: less for dynamo to trace
        perturb_trainable(model)
        args = sgd_args(tmp_path / str(compile_), max_steps=1, torch_compile=compile_,
                        torch_compile_backend="eager" if compile_ else None)
        trainer = NonTargetKLTrainer(model=model, args=args, train_dataset=DATA)
        trainer.train()
        if compile_:  # the Trainer did compile it
            assert is_compiled(trainer.model_wrapped)
            with pytest.raises(ValueError, match="torch.compile"):
                nontarget_kl_loss_func(trainer.model_wrapped)
        return trainable_state(model), trainer.state.log_history[0]

    from kl_nontarget.models.introspection import is_compiled

    (state, log), (compiled_state, compiled_log) = run(False), run(True)
    assert compiled_log["nontarget_kl"] == pytest.approx(log["nontarget_kl"], rel=1e-5) and log["nontarget_kl"] > 0
    assert compiled_log["loss"] == pytest.approx(log["loss"], rel=1e-5)
    assert_same_state(compiled_state, state, atol=1e-5)


# -- TRL: Liger, MoE, loss types --------------------------------------------------------------------------------------


def _sft_parts(model_dirs, tmp_path, **overrides):
    from datasets import Dataset
    from trl import SFTConfig

    from tiny_models import load_tokenizer, toy_prompt_completions

    # per_device_eval_batch_size=8 (TrainingArguments' default; sgd_args sets 4): evaluate() takes all 8 rows at once.
    args = sgd_args(tmp_path / "sft", cls=SFTConfig, **{"max_steps": 1, "max_length": 64,
                                                        "per_device_eval_batch_size": 8, **overrides})
    return dict(args=args, train_dataset=Dataset.from_list(toy_prompt_completions(8, seed=5)),
                processing_class=load_tokenizer(model_dirs))


def test_sft_subclass_with_liger_and_loss_types(model_dirs, tmp_path):
    pytest.importorskip("liger_kernel")
    from trl import SFTTrainer

    from kl_nontarget.integrations.trl import NonTargetKLSFTTrainer

    parts = _sft_parts(model_dirs, tmp_path, use_liger_kernel=True,
                       liger_kernel_config={**LIGER_OFF, "fused_linear_cross_entropy": True})
    with pytest.warns(UserWarning, match="fused_linear_cross_entropy"):
        trainer = NonTargetKLSFTTrainer(model=peft_model(model_dirs), eval_dataset=parts["train_dataset"], **parts)
    trainer.train()
    assert "nontarget_kl" in trainer.state.log_history[0]
    assert trainer.evaluate()["eval_nontarget_kl"] > 0
    with pytest.raises(ValueError, match="supported: 'nll'"):
        NonTargetKLSFTTrainer(model=peft_model(model_dirs), **_sft_parts(model_dirs, tmp_path, loss_type="dft"))
    # The hook with DFT: SFTTrainer itself refuses a compute_loss_func with loss_type="dft".
    model = peft_model(model_dirs)
    loss_func = nontarget_kl_loss_func(model)
    with pytest.raises(ValueError, match="dft"):
        SFTTrainer(model=model, compute_loss_func=loss_func, **_sft_parts(model_dirs, tmp_path, loss_type="dft"))
    loss_func.remove()


def test_sft_subclass_adds_the_router_loss_like_sft_trainer(model_dirs, tmp_path):
    from trl import SFTTrainer

    from kl_nontarget.integrations.trl import NonTargetKLSFTTrainer

    model = _tiny_moe()
    plain = SFTTrainer(model=copy.deepcopy(model), **_sft_parts(model_dirs, tmp_path))
    ours = NonTargetKLSFTTrainer(model=copy.deepcopy(model), kl_weight=0.0, **_sft_parts(model_dirs, tmp_path))
    hooked_model = copy.deepcopy(model)
    loss_func = nontarget_kl_loss_func(hooked_model, kl_weight=0.0)
    with pytest.warns(FutureWarning):  # TRL 1.16 deprecates compute_loss_func
        hooked = SFTTrainer(model=hooked_model, compute_loss_func=loss_func, **_sft_parts(model_dirs, tmp_path))
    batch = next(iter(plain.get_train_dataloader()))
    n = int((batch["labels"][:, 1:] != -100).sum())
    losses = []
    for trainer in (plain, ours, hooked):
        trainer.current_gradient_accumulation_steps = 1  # set by train() for each step
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(n))
        loss.backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
        losses.append((loss.detach(), grads))
    assert ours._metrics["train"]["aux_loss"][-1] > 0
    for loss, grads in losses[1:]:
        torch.testing.assert_close(loss, losses[0][0], rtol=1e-5, atol=1e-6)
        assert_same_state(grads, losses[0][1], atol=1e-7)
    loss_func.remove()


# -- QLoRA ------------------------------------------------------------------------------------------------------------


def test_qlora_4bit_base_fused_and_logits_paths(model_dirs, tmp_path):
    # bitsandbytes' CPU backend runs 4-bit (NF4) layers; the LM head stays a plain linear, so the fused path applies.
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    from tiny_models import tiny_llama

    tiny_llama(tmp_path / "llama64", hidden_size=64)  # bitsandbytes' CPU layout needs 64-wide blocks
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "llama64", quantization_config=quantization,
                                                device_map="cpu")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config())
    from tiny_models import perturb_trainable

    perturb_trainable(model, scale=0.1)
    batch = collate(DATA[:4])
    expected = independent_loss(model, batch)[0].detach()
    results = {}
    for fused in (True, False):
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), fused_linear=fused)
        results[fused] = loss_and_grads(trainer, model, batch)
        torch.testing.assert_close(results[fused][0].double(), expected, rtol=1e-4, atol=1e-5)
    assert_same_state(results[True][1], results[False][1], atol=1e-6, rtol=1e-4)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path, max_steps=1), train_dataset=DATA)
    trainer.train()
    assert trainer.state.log_history[0]["nontarget_kl"] > 0
