"""Train a tiny LoRA model with NonTargetKLTrainer for a few SGD steps; run alone or under torchrun.

Used by tests/distributed/test_multiprocess.py: the same global batches (sequential order, per-device batch x
processes x accumulation = global batch) must give the same LoRA weights in one process as in several. Writes, from
rank 0, `OUT/weights.pt` (the trainable parameters) and, from every rank, `OUT/logs_rank{R}.json` (the Trainer's log
history, whose ce_loss / nontarget_kl must be the global values on every rank).

    python tests/distributed/ddp_train.py OUT --batch 4 --accum 1
    torchrun --nproc_per_node 2 tests/distributed/ddp_train.py OUT --batch 2 --accum 1
    torchrun --nproc_per_node 2 tests/distributed/ddp_train.py OUT --batch 2 --zero 3   # DeepSpeed ZeRO-3

With `--zero STAGE` the Trainer runs under accelerate's DeepSpeed plugin (TrainingArguments(deepspeed=...)) on
DeepSpeed's CPU accelerator; every rank also records what shows that DeepSpeed really ran (the model wrapped in a
DeepSpeedEngine, the LM head partitioned) and why precompute_base refuses. `--ref_model` passes the base model as a
separate ref_model (the Trainer wraps it in a DeepSpeedEngine of its own): the same reference as the disabled adapters.

Like a user's script, it ends without any teardown of its own: the trainer registered
`kl_nontarget.training.clean_exit.release_process_groups` to run at exit (each rank records that it did).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny_models

from tiny_models import collate, tiny_llama, toy_token_batches  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True, help="per-device batch size")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--zero", type=int, default=0, help="DeepSpeed ZeRO stage (0: no DeepSpeed)")
    parser.add_argument("--ref_model", action="store_true", help="a separate ref_model: the base model")
    parser.add_argument("--chunk_bytes", type=int, default=0, help="the fused loss's CPU chunk budget (0: default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the Trainer's own device and backend (benchmarks/gpu_run.sh, ZeRO-3 on 1 GPU)")
    args = parser.parse_args()
    counter = None
    if args.zero:
        from zero_train import Counter, start_deepspeed

        if args.device == "cpu":
            start_deepspeed()
        else:  # on a GPU the Trainer starts DeepSpeed on its CUDA accelerator itself; Counter needs it imported
            import deepspeed.runtime.zero  # noqa: F401
        counter = Counter()  # the fused loss's gathers and chunks over the whole run
    if args.chunk_bytes:
        import kl_nontarget.ops.linear_loss as linear_loss

        linear_loss.CPU_CHUNK_BYTES = args.chunk_bytes

    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import TrainingArguments

    from kl_nontarget import NonTargetKLTrainer
    from kl_nontarget.training.clean_exit import install_exit_handler

    class SequentialTrainer(NonTargetKLTrainer):
        # The same example order in every run: rank r then sees exactly its share of each global batch.
        def _get_train_sampler(self, *unused, **kwargs):
            return SequentialSampler(self.train_dataset)

    torch.use_deterministic_algorithms(True)
    model = tiny_llama(seed=0)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random A and B: the KL is non-zero from the first step
    model = get_peft_model(model, config)
    data = toy_token_batches(args.examples, seed=3)
    deepspeed = None
    if args.zero:
        # "auto" values are filled from TrainingArguments; persistence threshold 0 partitions even tiny parameters.
        deepspeed = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                     "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                     "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                     "zero_optimization": {"stage": args.zero, "stage3_param_persistence_threshold": 0,
                                           # accelerator.get_state_dict below gathers the whole weights
                                           "stage3_gather_16bit_weights_on_model_save": True}}

    training_args = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum, max_steps=args.steps, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=args.device == "cpu", seed=0, dataloader_drop_last=True,
        remove_unused_columns=False, ddp_backend="gloo" if "RANK" in os.environ and args.device == "cpu" else None,
        deepspeed=deepspeed)
    ref_model = tiny_llama(seed=0) if args.ref_model else None
    trainer = SequentialTrainer(model=model, args=training_args, train_dataset=data, data_collator=collate,
                                kl_weight=1.0, ref_model=ref_model)
    trainer.train()
    zero = {}
    if args.zero:
        gathers, chunks = counter.take()
        from kl_nontarget.training.precompute import static_blocker

        head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
        zero = {"engine": type(trainer.model_wrapped).__name__, "deepspeed_enabled": trainer.is_deepspeed_enabled,
                "head_partitioned": hasattr(head, "ds_id") and head.numel() == 0,
                "ref_engine": type(trainer.ref_model).__name__ if ref_model is not None else None,
                "precompute_blocker": static_blocker(trainer), "gathers": gathers, "chunks": chunks}

    rank = trainer.accelerator.process_index
    with open(os.path.join(args.out, f"logs_rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.accelerator.num_processes, "exit_handler": install_exit_handler(),
                   "log_history": trainer.state.log_history, "zero": zero}, f)
    # The unwrapped model's (not DDP's) state dict; under ZeRO-3 the engine gathers the whole weights.
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped if args.zero else trainer.model)
    if trainer.accelerator.is_main_process:
        trainable = {k: v.detach().cpu().clone() for k, v in state.items() if "lora_" in k}
        torch.save(trainable, os.path.join(args.out, "weights.pt"))


if __name__ == "__main__":
    main()
