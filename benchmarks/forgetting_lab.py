"""The forgetting lab on SmolLM2-135M-Instruct: the three commands of docs/forgetting-lab.md on the real model.

    python benchmarks/forgetting_lab.py --out lab-out [--quick] [--seeds 2] [--threads 2]

Data: the real-model demo's fictional people (kl_nontarget.demo.people), as conversational prompt/completion jsonl
that `kl-nontarget` tokenizes like SFTTrainer (chat template, completion-only loss). A sequence of three stages asks
disjoint questions, so each stage adds new facts rather than overwriting the last one's: (1) birthplace and job with
English answers, (2) favourite food and pet answered in the made-up language, (3) instrument and house in English.
The module presets and the power law train on all six questions with English answers.

Runs, in `--out`: `sequence/` (kl-nontarget sequence, ranks 4 and 16, plain and non-target KL 0.3), `presets/`
(kl-nontarget sweep --target_presets attention,mlp_up_gate,all-linear, plain and non-target KL 0.3 and 1) and
`powerlaw/` (kl-nontarget powerlaw, ranks 1, 4, 16 on attention and all-linear, 4 to 16 steps, plain and 0.3); then
`summary.json` with each command's wall time, the machine and the versions. `--quick`: one seed, fewer steps and
examples (a smoke run of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

STAGES = (("stage1-people", "people", (0, 1)), ("stage2-invented", "invented", (2, 3)),
          ("stage3-people", "people", (4, 5)))


class Names:
    """Hands out the demo's fictional names without repeats, so no two files ask about the same person."""

    def __init__(self):
        from kl_nontarget.demo.people import names

        self.pool, self.used = names(0), 0

    def take(self, n: int) -> list[str]:
        self.used += n
        return self.pool[self.used - n:self.used]


def write_task(path: Path, people: list[str], task: str, kinds, seed: int) -> Path:
    """A conversational prompt/completion jsonl file asking about `people`."""
    from kl_nontarget.demo.people import make_examples

    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in make_examples(people, seed=seed, task=task, kinds=kinds)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="lab-out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    from kl_nontarget.cli import main as cli
    from kl_nontarget.sweep.grid import versions

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_n, test_n = (16, 8) if args.quick else (32, 16)
    seeds = 1 if args.quick else args.seeds
    steps = 8 if args.quick else 16
    # Disjoint names per file: the held-out questions ask about people never trained on.
    pool = Names()
    stages, evals = [], []
    for i, (name, task, kinds) in enumerate(STAGES):
        stages.append(write_task(data / f"{name}.jsonl", pool.take(train_n), task, kinds, seed=10 + i))
        evals.append(write_task(data / f"{name}-eval.jsonl", pool.take(test_n), task, kinds, seed=20 + i))
    people = write_task(data / "people.jsonl", pool.take(train_n), "people", None, seed=30)
    people_eval = write_task(data / "people-eval.jsonl", pool.take(2 * test_n), "people", None, seed=31)
    common = ["--model_name_or_path", "smollm2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
              "--max_length", "128", "--retention_samples", "8" if args.quick else "16", "--report_to", "none"]
    # Seeds where the comparison is close (the presets); one seed for the sequence and the power law, whose effects
    # are large next to the seed-to-seed spread, and whose fit reports its own (bootstrap) uncertainty.
    commands = {
        "sequence": ["sequence", "--stages", ",".join(map(str, stages)), "--eval_stages", ",".join(map(str, evals)),
                     "--lora_ranks", "4,16", "--kl_weights", "0,0.3", "--max_steps", str(steps), "--seeds", "1"],
        "presets": ["sweep", "--dataset_name", str(people), "--eval_dataset", str(people_eval), "--task_name",
                    "people", "--kl_weights", "0,0.3,1", "--target_presets", "attention,mlp_up_gate,all-linear",
                    "--max_steps", str(steps), "--seeds", str(seeds)],
        "powerlaw": ["powerlaw", "--dataset_name", str(people), "--lora_ranks", "1,4,16", "--target_presets",
                     "attention,all-linear", "--measure_steps", "2,4,8" if args.quick else "4,8,12,16",
                     "--kl_weights", "0,0.3", "--max_steps", "8" if args.quick else "16", "--seeds", "1"],
    }
    summary = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()},
               "versions": versions(), "quick": args.quick, "seconds": {}}
    for name, command in commands.items():
        start = time.time()
        code = cli([*command, *common, "--output_dir", str(out / name)])
        summary["seconds"][name] = round(time.time() - start, 1)
        if code != 0:
            raise SystemExit(f"{name} failed with exit code {code}")
        print(f"== {name}: {summary['seconds'][name]:.0f} s")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
