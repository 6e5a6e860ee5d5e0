"""A compact tqdm bar for `transformers.Trainer` runs, and removal of the Trainer's own printing."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback


class TqdmCallback(TrainerCallback):
    """One tqdm bar per training run, labelled `desc`, updated every optimizer step."""

    def __init__(self, desc, disable=False):
        self.desc = desc
        self.disable = disable
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, disable=self.disable, leave=False, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def quiet_trainer(trainer):
    """Drop the Trainer's own progress bar and log printing (a sweep prints its own)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer
