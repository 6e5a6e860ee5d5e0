"""FSDP2 with a resharded root on CPU/gloo: the fused-linear loss must equal the logits path.

With `reshard_after_forward=True` on the root, the LM head's weight is a sharded DTensor again when the loss reads
it; the fused path gathers it. Two ranks train the same LoRA model for three SGD steps once through the fused-linear
loss and once through the logits, and rank 0 writes OUT/result.json (losses of both, whether the head weight was a
DTensor at the loss, the largest LoRA weight difference).

    torchrun --nproc_per_node 2 tests/distributed/fsdp_fused.py OUT
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny_models

# fsdp_base_pass.py lies beside this script, whose folder python and torchrun put on sys.path.
from fsdp_base_pass import logits_loss, lora_weights, sgd_steps, shard  # noqa: E402

from tiny_models import tiny_llama, toy_token_batches  # noqa: E402


def train(fused, data, rank, world):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.tensor import DTensor

    from kl_nontarget.models.lm_head import fused_heads
    from kl_nontarget.ops.linear_loss import nontarget_kl_linear_loss
    from kl_nontarget.training.batch_rows import compute_batch_hidden, head_tensors

    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                          init_lora_weights=False))
    shard(model, world, reshard_after_forward=True)
    dtensor = []

    def fused_loss(model, local, items):
        b = compute_batch_hidden(model, local, fused_heads(model)[0])
        dtensor.append(isinstance(model.get_output_embeddings().weight, DTensor))
        with head_tensors(b) as t:
            return nontarget_kl_linear_loss(t.hidden, t.ref_hidden, t.weight, t.labels, num_items_in_batch=items)

    losses = sgd_steps(model, data, fused_loss if fused else logits_loss, rank, world)
    return losses, lora_weights(model), dtensor


def main():
    from kl_nontarget.training.clean_exit import release_process_groups

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.use_deterministic_algorithms(True)
    data = toy_token_batches(12, seed=3)
    fused_losses, fused_weights, dtensor = train(True, data, rank, world)
    logits_losses, logits_weights, _ = train(False, data, rank, world)
    if rank == 0:
        diff = max((fused_weights[k] - logits_weights[k]).abs().max().item() for k in fused_weights)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"fused": fused_losses, "logits": logits_losses, "dtensor": dtensor, "max_diff": diff}, f)
    release_process_groups()  # finish gloo's collectives before the interpreter exits


if __name__ == "__main__":
    main()
