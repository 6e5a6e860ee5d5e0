"""DeepSpeed ZeRO-2/3 on CPU/gloo: the regularized loss on partitioned parameters must train like one process.

`deepspeed.initialize` directly (the Trainer's own run is ds_trainer.py): a tiny LoRA Llama, untied and tied heads,
the loss through the logits path and through the fused-linear path, the base pass with the adapters disabled. Each
rank takes its share of every global batch; the loss is normalised by the global supervised-token count and multiplied
by the world size, as Trainer.compute_loss does (DeepSpeed averages the gradients over the ranks). Without torchrun
the same steps run in one process without DeepSpeed: the reference.

Writes OUT/result.json (per variant: each step's summed loss / ce / kl, whether the head was partitioned, and per
fused step the number of GatheredParameters entries and of chunks the fused loss ran) and OUT/<variant>.pt (the LoRA
weights, whole).

    python tests/distributed/zero_train.py OUT                                  # one process, the reference
    torchrun --nproc_per_node 2 tests/distributed/zero_train.py OUT --stage 3   # two ranks, ZeRO-3 (or --stage 2)
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny_models

from tiny_models import collate, tiny_llama, toy_token_batches  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3
LR = 0.5
CHUNK = 4  # rows per chunk of the fused loss: every step runs several chunks (about 20 supervised rows per rank)
PATHS = ("logits", "fused")


def start_deepspeed():
    """Import DeepSpeed on its CPU accelerator over gloo. Its CPU communication would JIT-compile a shared-memory
    op (a C++ build: minutes, and a compiler) that gloo does not need, so that build is skipped."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


class Counter:
    """Counts the entries of `deepspeed.runtime.zero.GatheredParameters` (where lm_head.py takes it from) and the
    chunks of the fused loss (calls of linear_loss.head_logits_pair, one per chunk when both passes share a head)."""

    def __init__(self):
        import kl_nontarget.ops.linear_loss as linear_loss

        self.gathers = self.chunks = 0
        self.on_gather = None  # called at each gather's entry
        pair = linear_loss.head_logits_pair

        def counted_pair(*args, **kwargs):
            self.chunks += 1
            return pair(*args, **kwargs)

        linear_loss.head_logits_pair = counted_pair
        if "deepspeed" in sys.modules:
            import deepspeed.runtime.zero as zero

            gathered = zero.GatheredParameters
            counter = self

            class CountedGather(gathered):
                def __enter__(self):
                    counter.gathers += 1
                    if counter.on_gather is not None:
                        counter.on_gather()
                    return super().__enter__()

            zero.GatheredParameters = CountedGather

    def take(self):
        found, self.gathers, self.chunks = (self.gathers, self.chunks), 0, 0
        return found


def step_loss(path, model, unwrapped, local, items):
    """(loss, ce, kl) of one rank's share: the adapted pass, the base pass with the adapters disabled, the loss."""
    from kl_nontarget import nontarget_kl_loss
    from kl_nontarget.models.lm_head import fused_heads
    from kl_nontarget.ops.linear_loss import nontarget_kl_linear_loss
    from kl_nontarget.training.batch_rows import compute_batch_hidden, compute_batch_logits, head_tensors

    if path == "logits":
        b = compute_batch_logits(model, local, unwrapped=unwrapped)
        return nontarget_kl_loss(b.logits, b.ref_logits, b.labels, num_items_in_batch=items, return_components=True)
    heads, reason = fused_heads(unwrapped)
    assert heads is not None, reason
    b = compute_batch_hidden(model, local, heads, unwrapped=unwrapped)
    with head_tensors(b) as t:
        return nontarget_kl_linear_loss(t.hidden, t.ref_hidden, t.weight, t.labels, ref_weight=t.ref_weight,
                                        num_items_in_batch=items, chunk_size=CHUNK, return_components=True)


def lora_model(tied):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed=0, tie_word_embeddings=tied)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random A and B: the KL is non-zero from the first step
    return get_peft_model(model, config)


def train(deepspeed, stage, tied, path, data, counter, rank, world):
    """STEPS SGD steps of one variant; (record, whole LoRA weights)."""
    from kl_nontarget.training.batch_rows import shifted_labels

    model = lora_model(tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine = model
    if deepspeed is not None:
        config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
                  "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9,
                  # Every parameter partitioned, however small (by default ZeRO-3 keeps those under 1e5 elements
                  # whole after their first use, the whole tiny model included).
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    head = model.get_output_embeddings().weight
    record = {"partitioned": [], "steps": [], "counts": []}
    engine.train()
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        batch = collate(data[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH])
        items = int((shifted_labels(batch) != -100).sum())  # the global count, as the Trainer gathers it
        local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
        counter.take()
        # Read where the loss reads the head: after the forward passes, before its own gather.
        counter.on_gather = lambda: record["partitioned"].append(hasattr(head, "ds_id") and head.numel() == 0)
        if path == "logits":
            record["partitioned"].append(hasattr(head, "ds_id") and head.numel() == 0)
        loss, ce, kl = step_loss(path, engine, model, local, items)
        record["counts"].append(counter.take())
        if deepspeed is not None:
            engine.backward(loss * world)
            engine.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        total = torch.stack([loss.detach(), ce, kl]).double()
        if world > 1:
            dist.all_reduce(total)
        record["steps"].append(total.tolist())
    counter.on_gather = None
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    gather = deepspeed.zero.GatheredParameters([p for _, p in lora]) if stage == 3 else None
    with gather if gather is not None else torch.no_grad():
        weights = {n: p.detach().clone() for n, p in lora}
    return record, weights


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--stage", type=int, default=0, help="ZeRO stage (2 or 3) under torchrun; 0: no DeepSpeed")
    parser.add_argument("--heads", default="untied,tied", help="which LM heads, of untied and tied")
    args = parser.parse_args()
    distributed = "RANK" in os.environ
    assert distributed == (args.stage in (2, 3)), "--stage 2/3 under torchrun, no --stage in one process"
    deepspeed = start_deepspeed() if distributed else None
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.use_deterministic_algorithms(True)
    counter = Counter()
    data = toy_token_batches(GLOBAL_BATCH * STEPS, seed=3)
    result = {"world_size": world, "stage": args.stage}
    for heads, path in [(heads, path) for heads in args.heads.split(",") for path in PATHS]:
        assert heads in ("untied", "tied"), heads
        tied, name = heads == "tied", f"{heads}-{path}"
        start = time.perf_counter()
        record, weights = train(deepspeed, args.stage, tied, path, data, counter, rank, world)
        record["seconds"] = time.perf_counter() - start
        result[name] = record
        if rank == 0:
            torch.save(weights, os.path.join(args.out, f"{name}.pt"))
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f)
    if distributed:
        from kl_nontarget.training.clean_exit import release_process_groups

        release_process_groups()  # finish gloo's collectives before the interpreter exits


if __name__ == "__main__":
    main()
