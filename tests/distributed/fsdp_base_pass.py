"""FSDP2 (torch `fully_shard`) on CPU/gloo: the adapter-disabled base pass and the loss with sharded parameters.

accelerate turns FSDP on only for GPU-like devices, so the Trainer cannot run FSDP on a CPU machine; this script
drives the same pieces the Trainer uses (`compute_batch_logits` for the adapted and base passes, then the loss
normalised by the global token count and multiplied by the world size, as Trainer.compute_loss does) on a model
whose decoder layers and root are sharded with `fully_shard`. Each rank takes its share of every global batch;
after a few SGD steps rank 0 writes the full LoRA weights to OUT/weights.pt. fsdp_fused.py uses its functions
(`shard`, `sgd_steps`, `lora_weights`).

    python tests/distributed/fsdp_base_pass.py OUT                         # one process, the whole batch
    torchrun --nproc_per_node 2 tests/distributed/fsdp_base_pass.py OUT    # two ranks, sharded
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny_models

from tiny_models import collate, tiny_llama, toy_token_batches  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3
LR = 0.5


def shard(model, world, **root_options):
    """FSDP2 over `world` CPU ranks: `fully_shard` on every decoder layer of the PEFT-wrapped Llama, then on the root
    (with `root_options`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, **root_options)


def sgd_steps(model, data, loss_of, rank=0, world=1):
    """STEPS SGD steps at rate LR over global batches of GLOBAL_BATCH examples of `data`, each rank on its share;
    `loss_of(model, local_batch, items)` is a rank's loss, `items` the global count of supervised tokens. Returns
    each step's loss summed over the ranks."""
    from kl_nontarget.training.batch_rows import shifted_labels

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for step in range(STEPS):
        batch = collate(data[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH])
        items = int((shifted_labels(batch) != -100).sum())  # the global count, as the Trainer gathers it
        share = GLOBAL_BATCH // world
        local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
        loss = loss_of(model, local, items)
        # FSDP averages gradients over ranks; the count already covers all ranks, so undo the average.
        (loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        losses.append(total.item())
    return losses


def lora_weights(model):
    """The full (gathered, where sharded) LoRA weights by name."""
    state = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = full.detach().cpu().clone()
    return state


def logits_loss(model, local, items):
    from kl_nontarget import nontarget_kl_loss
    from kl_nontarget.training.batch_rows import compute_batch_logits

    logits = compute_batch_logits(model, local)
    return nontarget_kl_loss(logits.logits, logits.ref_logits, logits.labels, num_items_in_batch=items)


def main():
    out = sys.argv[1]
    from peft import LoraConfig, get_peft_model

    from kl_nontarget.training.clean_exit import release_process_groups

    distributed = "RANK" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()

    torch.use_deterministic_algorithms(True)
    model = tiny_llama(seed=0)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    model = get_peft_model(model, config)
    sharded = False
    if distributed:
        from torch.distributed.tensor import DTensor

        shard(model, world)
        sharded = any(isinstance(p, DTensor) for p in model.parameters())

    data = toy_token_batches(GLOBAL_BATCH * STEPS, seed=3)
    losses = sgd_steps(model, data, logits_loss, rank, world)
    state = lora_weights(model)
    if rank == 0:
        torch.save(state, os.path.join(out, "weights.pt"))
        with open(os.path.join(out, "info.json"), "w") as f:
            json.dump({"world_size": world, "sharded": sharded, "losses": losses}, f)
    if distributed:
        # Finish gloo's collectives before the interpreter exits (a bare exit can abort:
        # kl_nontarget/training/clean_exit.py).
        release_process_groups()


if __name__ == "__main__":
    main()
