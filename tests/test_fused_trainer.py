"""The fused-linear path of the trainers and the hook (final hidden states in, no N x V logits) against the logits path.

Every comparison runs both paths on the same model and batch: loss and gradients of the LoRA parameters (and of the
head under full fine-tuning) in float64, both KL directions, a plain head (Llama) and a soft-capped one (Gemma2).
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM

from kl_nontarget.integrations.trl import NonTargetKLSFTTrainer, nontarget_kl_loss_func
from kl_nontarget.models.lm_head import HEAD_TRANSFORMS, head_input_captured, linear_head
from kl_nontarget.training.trainer import NonTargetKLTrainer

from tiny_models import (
    TINY_ARCHITECTURES,
    collate,
    independent_loss,
    load_model,
    load_tokenizer,
    loss_and_grads,
    peft_model,
    perturb_trainable,
    sgd_args,
    tiny_causal_lm,
    toy_prompt_completions,
    toy_token_batches,
)

HERE = os.path.dirname(os.path.abspath(__file__))


pytestmark = pytest.mark.usefixtures("one_thread")


class HeadRows:
    """Counts the rows the LM head projects (its output rows) in each call."""

    def __init__(self, model):
        head = model.get_output_embeddings()
        self.rows = []
        self.handle = head.register_forward_hook(lambda m, a, out: self.rows.append(out[..., 0].numel()))

    def remove(self):
        self.handle.remove()


def loss_grads_and_sums(trainer, model, batch, num_items):
    """`loss_and_grads`, and the sums the trainer's component log holds after it."""
    loss, grads = loss_and_grads(trainer, model, batch, num_items)
    return loss, grads, {k: float(v) for k, v in trainer.component_log.sums("train").items()}


DATA = toy_token_batches(8, seed=3)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_fused_equals_logits_path_float64(model_dirs, tmp_path, arch, direction):
    model = peft_model(model_dirs, arch, dtype=torch.float64)
    options = dict(kl_weight=1.3, temperature=1.4, kl_direction=direction)
    batch = collate(DATA[:4])
    results = {}
    for fused in (True, False):
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), fused_linear=fused, **options)
        rows = HeadRows(model)
        results[fused] = loss_grads_and_sums(trainer, model, batch, torch.tensor(23))
        rows.remove()
        n = int((batch["labels"][:, 1:] != -100).sum())
        # fused: the head projects one position per sequence, on both passes; logits: every supervised position
        # (every position where transformers < 5.21 cannot select them)
        assert rows.rows == [4, 4] if fused else (len(rows.rows) == 2 and min(rows.rows) >= n)
    (loss, grads, sums), (ref_loss, ref_grads, ref_sums) = results[True], results[False]
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-13)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-13, msg=name)
    assert sums == pytest.approx(ref_sums, rel=1e-12)
    expected, _, kl = independent_loss(model, batch, num_items_in_batch=23, **options)
    assert kl > 1e-3
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-12)


def test_full_fine_tuning_with_ref_model_trains_the_head(model_dirs, tmp_path):
    # A trainable head and a separate ref_model head: grad of the head weight through the fused loss.
    model = load_model(model_dirs, dtype=torch.float64)
    ref = copy.deepcopy(model)
    perturb_trainable(model, scale=0.02)
    batch = collate(DATA[:4])
    results = {}
    for fused in (True, False):
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), ref_model=ref, fused_linear=fused,
                                     kl_direction="reverse")
        results[fused] = loss_grads_and_sums(trainer, model, batch, None)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-12, atol=1e-13)
    assert results[True][1]["lm_head.weight"].abs().max() > 0
    for name, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][name], rtol=1e-10, atol=1e-13, msg=name)


def test_hook_fused_equals_logits_path_float64(model_dirs):
    batch = collate(DATA[:4])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    results = {}
    for fused in (True, False):
        model = peft_model(model_dirs, "gemma2", dtype=torch.float64)
        hook = nontarget_kl_loss_func(model, kl_weight=0.7, kl_direction="reverse", fused_linear=fused)
        model.train()
        outputs = model(**inputs)
        assert outputs.logits.shape[1] == (1 if fused else batch["input_ids"].shape[1])
        loss = hook(outputs, batch["labels"], num_items_in_batch=torch.tensor(19))
        loss.backward()
        results[fused] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        hook.remove()
        assert not any(len(m._forward_pre_hooks) for m in model.modules())
        with torch.no_grad():  # an evaluation forward keeps its logits
            assert model(**inputs).logits.shape[1] == batch["input_ids"].shape[1]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-12, atol=1e-13)
    for name, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][name], rtol=1e-10, atol=1e-13, msg=name)


def test_sft_subclass_fused_equals_logits_path(model_dirs, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    tokenizer = load_tokenizer(model_dirs)
    data = Dataset.from_list(toy_prompt_completions(8, seed=5))
    results = {}
    for fused in (True, False):
        model = peft_model(model_dirs, dtype=torch.float32)
        args = SFTConfig(output_dir=str(tmp_path / str(fused)), per_device_train_batch_size=4, max_steps=1,
                         report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, max_length=64)
        trainer = NonTargetKLSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                        kl_weight=0.8, fused_linear=fused)
        batch = next(iter(trainer.get_train_dataloader()))
        loss, grads, sums = loss_grads_and_sums(trainer, model, batch, torch.tensor(15))
        metrics = {k: trainer._metrics["train"][k][-1] for k in ("entropy", "mean_token_accuracy")}
        results[fused] = (loss, grads, sums, metrics)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert results[True][2] == pytest.approx(results[False][2], rel=1e-5)
    assert results[True][3] == pytest.approx(results[False][3], rel=1e-5)


def test_compute_regularized_loss_override_takes_the_logits(model_dirs, tmp_path):
    seen = []

    class FullKLTrainer(NonTargetKLTrainer):
        def compute_regularized_loss(self, logits, ref_logits, labels, num_items_in_batch):
            seen.append(tuple(logits.shape))
            return super().compute_regularized_loss(logits, ref_logits, labels, num_items_in_batch)

    model = peft_model(model_dirs, dtype=torch.float64)
    batch = collate(DATA[:4])
    trainer = FullKLTrainer(model=model, args=sgd_args(tmp_path))
    loss = trainer.compute_loss(model, dict(batch))
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [(n, model.config.vocab_size)]
    torch.testing.assert_close(loss, independent_loss(model, batch)[0].detach(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="compute_regularized_loss"):
        FullKLTrainer(model=model, args=sgd_args(tmp_path), fused_linear=True)


@pytest.mark.parametrize("case", ["lora_on_lm_head", "modules_to_save"])
def test_wrapped_heads_fall_back_to_logits(model_dirs, tmp_path, case):
    config = {"lora_on_lm_head": LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
              "modules_to_save": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])}[case]
    model = peft_model(model_dirs, dtype=torch.float64, config=config)
    assert linear_head(model)[0] is None
    with pytest.raises(ValueError, match="nn.Linear"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), fused_linear=True)
    with pytest.raises(ValueError, match="nn.Linear"):
        nontarget_kl_loss_func(model, fused_linear=True)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))
    batch = collate(DATA[:4])
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, independent_loss(model, batch)[0].detach(), rtol=1e-10, atol=1e-12)


def test_batch_asking_for_hidden_states_takes_the_logits_path(model_dirs, tmp_path):
    # The fused path returns the final hidden states in the outputs' hidden_states field.
    model = peft_model(model_dirs, dtype=torch.float64)
    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path))
    batch = collate(DATA[:4])
    rows = HeadRows(model)
    loss = trainer.compute_loss(model, {**batch, "output_hidden_states": True})
    rows.remove()
    assert min(rows.rows) > 4
    torch.testing.assert_close(loss, independent_loss(model, batch)[0].detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("value", ["yes", 1, None, "AUTO"])
def test_bad_fused_linear_values(model_dirs, tmp_path, value):
    model = peft_model(model_dirs, dtype=torch.float64, moved=False)
    with pytest.raises(ValueError, match="fused_linear"):
        NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), fused_linear=value)
    with pytest.raises(ValueError, match="fused_linear"):
        nontarget_kl_loss_func(model, fused_linear=value)


def test_evaluation_without_predictions_is_fused_and_with_predictions_has_logits(model_dirs, tmp_path):
    model = peft_model(model_dirs, dtype=torch.float32)
    eval_data = DATA[:6]
    metrics = {}
    for fused in (True, False):
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), eval_dataset=eval_data, kl_weight=0.5,
                                     fused_linear=fused)
        rows = HeadRows(model)
        metrics[fused] = trainer.evaluate()
        rows.remove()
        assert max(rows.rows) <= 4 if fused else max(rows.rows) > 4
    for key in ("eval_loss", "eval_ce_loss", "eval_nontarget_kl"):
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-5)
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {}

    trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path), eval_dataset=eval_data, kl_weight=0.5,
                                 compute_metrics=compute_metrics)
    with_predictions = trainer.evaluate()
    assert seen["shape"][:2] == (6, DATA[0]["input_ids"].shape[0])
    assert with_predictions["eval_loss"] == pytest.approx(metrics[True]["eval_loss"], rel=1e-5)


def test_bf16_autocast_first_kl_is_exactly_zero_and_matches_logits(model_dirs, tmp_path):
    logs = {}
    for fused in (True, False):
        model = peft_model(model_dirs, dtype=torch.float32, moved=False)
        trainer = NonTargetKLTrainer(model=model, args=sgd_args(tmp_path / str(fused), bf16=True, max_steps=2),
                                     train_dataset=DATA, fused_linear=fused)
        trainer.train()
        logs[fused] = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[True][0]["nontarget_kl"] == 0.0  # both passes project through the same bf16 head
    for a, b in zip(logs[True], logs[False]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
        assert a["ce_loss"] == pytest.approx(b["ce_loss"], rel=2e-2)


# -- the architectures whose logit transform the fused path reproduces --------------------------------------------

def test_every_known_architecture_is_checked():
    checked = set()
    for model_type in TINY_ARCHITECTURES:
        config = AutoConfig.for_model(model_type)
        checked.add(AutoModelForCausalLM._model_mapping[type(config)].__name__)
    assert checked == set(HEAD_TRANSFORMS)


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHITECTURES))
def test_head_transform_reproduces_the_models_logits(model_type):
    model = tiny_causal_lm(model_type).double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # logits large enough for soft-capping to matter
    head, reason = linear_head(model)
    assert head is not None, reason
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with head_input_captured(head.module) as capture:
            assert model(input_ids=ids).logits.shape == (2, 1, 96)
        logits = torch.nn.functional.linear(capture.take("model"), head.module.weight, head.module.bias)
        logits = logits * head.logit_scale
        if head.softcap is not None:
            logits = head.softcap * torch.tanh(logits / head.softcap)
    assert (head.logit_scale != 1.0) == (model_type in ("cohere", "granite"))
    assert (head.softcap is not None) == (model_type in ("gemma2", "gemma3_text"))
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


def test_unknown_architecture_falls_back(model_dirs):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    head, reason = linear_head(model)
    assert head is None and "GPT2LMHeadModel" in reason


# -- memory: no N x V logits on the fused path --------------------------------------------------------------------

def test_fused_training_step_never_builds_the_logits(tmp_path):
    """V = 32768, hidden 64, 4 x 256 tokens: the head projects one position per sequence on the fused path, and the
    step's peak RSS stays well below that of the logits path (measured in a subprocess)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_mib = result["logits_mib"]  # one float32 N x V tensor
    fused, plain = result["fused"], result["logits"]
    assert max(fused["head_rows"]) <= result["batch"]
    assert max(plain["head_rows"]) == result["tokens"]
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert plain["peak_delta_mib"] > 2 * logits_mib  # the measurement sees the logits when they exist
    # The fused step's extra memory is its chunk buffers (a fixed budget, whatever N), here about one logits tensor.
    assert fused["peak_delta_mib"] < 0.5 * plain["peak_delta_mib"]
    print(json.dumps(result))


MEMORY_PROBE = r'''
import gc, json, resource, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments
from tiny_models import tiny_llama
import kl_nontarget.ops.linear_loss
from kl_nontarget.training.trainer import NonTargetKLTrainer

# The chunk budget this measurement is calibrated with: 128 rows here. The default CPU budget (larger, for matmul
# speed) gives 256-row chunks, whose buffers are about 1.2 logits tensors at this small N: still a fixed amount,
# whatever N, which is the point (tests/test_linear.py checks the default budget).
kl_nontarget.ops.linear_loss.CPU_CHUNK_BYTES = 64 * 2**20

def peak_mib():
    # VmHWM is this process's own peak: ru_maxrss also counts the parent's RSS at exec (Linux keeps the larger
    # of the two across execve), so after the suite's big tests it would hide every peak measured here.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def trim():
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass

torch.set_num_threads(1)
B, T, V = 4, 256, 32768
model = get_peft_model(tiny_llama(vocab_size=V, hidden_size=64, num_layers=1),
                       LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
args = TrainingArguments(output_dir=sys.argv[1], report_to=[], use_cpu=True, disable_tqdm=True)
g = torch.Generator().manual_seed(0)
ids = torch.randint(4, V, (B, T), generator=g)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
small = {k: v[:1, :16] for k, v in batch.items()}
rows = []
model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(out[..., 0].numel()))
result = {"batch": B, "tokens": B * (T - 1), "logits_mib": B * (T - 1) * V * 4 / 2**20}
for fused in (True, False):  # fused first: the peak RSS only grows
    trainer = NonTargetKLTrainer(model=model, args=args, fused_linear=fused)
    trainer.compute_loss(model, dict(small)).backward()  # warm up
    model.zero_grad(set_to_none=True)
    trim()
    rows.clear()
    before = peak_mib()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    result["fused" if fused else "logits"] = {"peak_delta_mib": peak_mib() - before, "loss": loss.item(),
                                              "head_rows": list(rows)}
    del loss
    model.zero_grad(set_to_none=True)
    trim()
print(json.dumps(result))
'''
