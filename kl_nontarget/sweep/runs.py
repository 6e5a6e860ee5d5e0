"""One LoRA fine-tuning run of a sweep, through the real Trainer classes, and its evaluation.

Methods:
- `lora`: plain cross-entropy, `transformers.Trainer`;
- `nontarget_kl`: `NonTargetKLTrainer` (CE + kl_weight * KL(base_nontarget || adapted_nontarget));
- `full_kl`: `FullKLTrainer`, a `NonTargetKLTrainer` subclass whose regularizer is the full-vocabulary
  KL(base || adapted), the baseline the non-target KL is compared with.

Every run at a given seed starts from the same adapter initialisation (torch is seeded right before `get_peft_model`)
and sees the batches in the same order (the Trainer's `seed` / `data_seed`). The adapter is an
`kl_nontarget.sweep.variants.AdapterSpec`: LoRA by default, or DoRA, PiSSA, VeRA, ... (`VARIANTS`).
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from kl_nontarget.evaluation.loader import PadCollator, RowsDataset
from kl_nontarget.evaluation.metrics import evaluate_lm, forgetting_metrics
from kl_nontarget.sweep.progress import TqdmCallback, quiet_trainer
from kl_nontarget.sweep.variants import AdapterSpec
from kl_nontarget.training.trainer import NonTargetKLTrainer

METHODS = ("lora", "nontarget_kl", "full_kl")


class FullKLTrainer(NonTargetKLTrainer):
    """CE + kl_weight * T^2 * KL(base || adapted) over the whole vocabulary (the baseline regularizer)."""

    regularizer_log_name = "full_kl"  # logged as full_kl / eval_full_kl, not as nontarget_kl

    def compute_regularized_loss(self, logits, ref_logits, labels, num_items_in_batch):
        valid = labels != -100
        z, b, y = logits[valid].float(), ref_logits[valid].float(), labels[valid]
        t = self.temperature
        ce = F.cross_entropy(z, y, reduction="sum")
        kl = F.kl_div(F.log_softmax(z / t, -1), F.log_softmax(b / t, -1), log_target=True, reduction="sum")
        denom = valid.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=z.device)
        denom = denom.to(z.device, torch.float32).clamp_min(1)
        loss = (ce + self.kl_weight * t * t * kl) / denom
        return loss, ce.detach() / denom, kl.detach() / denom


class ValidationCallback(TrainerCallback):
    """Evaluates the target loss on a validation loader every `every` steps (for the learning-rate sweep).

    It also keeps the trainable (adapter) weights at each of those steps: with a constant learning rate, the same
    seed and data order, the sweep's weights at step S are those of a plain-LoRA run of S steps, so the demo
    reuses them instead of training that run again.
    """

    def __init__(self, loader, every):
        self.loader, self.every, self.history, self.snapshots = loader, every, [], {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.history.append((state.global_step, evaluate_lm(model, self.loader, progress=False)["loss"]))
            self.snapshots[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                                 if p.requires_grad}


def lora_from_snapshot(base_model, snapshot, seed, adapter: AdapterSpec):
    """A fresh adapter model (same init as `finetune`) holding the adapter weights of a sweep snapshot."""
    model = adapter.model(base_model, seed)
    params = dict(model.named_parameters())
    missing = set(snapshot) - set(params)
    if missing:
        raise KeyError(f"snapshot parameters not in the adapter model: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)
    model.eval()
    return model


def finetune(base_model, train_rows, pad_id, adapter: AdapterSpec, *, method, kl_weight, lr, steps, seed, batch_size,
             callbacks=(), desc="run", progress=True, precompute_base=False, base_cache_dir=None, ref_model=None):
    """Trains a fresh `adapter` on `train_rows` and returns the PEFT model.

    `precompute_base`, `base_cache_dir`: the non-target KL runs' base hidden-state cache (`NonTargetKLTrainer`), so
    the runs of a sweep on one base model and data share one base pass. `ref_model`: the regularized runs' reference,
    instead of `base_model` (the adapter disabled).
    """
    from transformers import Trainer, TrainingArguments

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    model = adapter.model(base_model, seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch_size, max_steps=steps,
                                 learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                                 logging_strategy="no", save_strategy="no", report_to=[], seed=seed, data_seed=seed,
                                 disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
                                 remove_unused_columns=False)
        common = dict(model=model, args=args, train_dataset=RowsDataset(train_rows), data_collator=PadCollator(pad_id),
                      optimizers=(adapter.optimizer(model, lr), None))
        if method == "lora":
            trainer = Trainer(**common)
        else:
            if method == "nontarget_kl":
                trainer = NonTargetKLTrainer(**common, kl_weight=kl_weight, precompute_base=precompute_base,
                                             base_cache_dir=base_cache_dir, ref_model=ref_model)
            else:  # the full KL needs the base logits: no cache
                trainer = FullKLTrainer(**common, kl_weight=kl_weight, ref_model=ref_model)
        quiet_trainer(trainer)
        trainer.add_callback(TqdmCallback(desc, disable=not progress))
        for cb in callbacks:
            trainer.add_callback(cb)
        trainer.train()
    model.eval()
    return model


def evaluate_run(model, test_loader, heldout_loader, base_model, progress=False):
    """Target loss / exact-match accuracy on the task's test split, forgetting on held-out base text against
    `base_model`, the original model (an adapter whose init rewrote the base weights, PiSSA say, cannot be disabled
    to give it).

    `forgetting` is Lf - H(base) = KL(base || fine-tuned) (0 for an unchanged model), `lf` the cross-entropy itself.
    """
    target = evaluate_lm(model, test_loader, progress=progress, desc="target")
    forget = forgetting_metrics(model, heldout_loader, base_model=base_model, progress=progress, desc="forgetting")
    return {"target_loss": target["loss"], "target_accuracy": target["sequence_accuracy"],
            "target_token_accuracy": target["accuracy"], "forgetting": forget["lf_kl"], "lf": forget["lf"],
            "retention_ppl": forget["retention_ppl"], "accuracy_drift": forget["accuracy_drift"]}


def choose_baseline(history_by_lr, tolerance):
    """(lr, steps) best for plain LoRA: lowest validation loss, then the fewest steps within `tolerance` of it.

    `history_by_lr` maps lr -> [(step, val_loss)]. Fewer steps at an equal loss favours the baseline (less drift).
    """
    points = [(loss, step, lr) for lr, hist in history_by_lr.items() for step, loss in hist]
    best = min(p[0] for p in points)
    ok = [p for p in points if p[0] <= best + tolerance]
    loss, step, lr = min(ok, key=lambda p: (p[1], p[0]))
    return lr, step, loss
