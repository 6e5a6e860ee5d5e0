"""A test-only axolotl plugin that records every training step of the run it is registered in.

`RecorderPlugin.post_trainer_create` wraps the trainer's `training_step`: before each call it keeps a copy of the
batch, of `num_items_in_batch` and of the trainable parameters; after it, the returned loss and the trainable
parameters' gradients (the backward of that one micro-batch, before any clipping or optimizer step). The records of
the last run are `RecorderPlugin.steps`.
"""

from __future__ import annotations

import torch
from axolotl.integrations.base import BasePlugin


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class RecorderPlugin(BasePlugin):
    steps: list[dict] = []
    trainer_class: type | None = None

    def post_trainer_create(self, cfg, trainer):
        RecorderPlugin.steps = steps = []
        RecorderPlugin.trainer_class = type(trainer)
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None, *args, **kwargs):
            params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            record = {"inputs": {k: _copy(v) for k, v in inputs.items()}, "num_items": _copy(num_items_in_batch),
                      "params": params}
            for p in model.parameters():
                p.grad = None  # only this micro-batch's gradient (gradient_accumulation_steps is 1)
            loss = original(model, inputs, num_items_in_batch, *args, **kwargs)
            record["loss"] = loss.detach().clone()
            record["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                               if p.requires_grad and p.grad is not None}
            steps.append(record)
            return loss

        trainer.training_step = training_step
