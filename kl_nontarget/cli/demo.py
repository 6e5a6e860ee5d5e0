"""`kl-nontarget demo`: learning versus forgetting on a self-made tiny base model, or on a real one (`--model`).

    kl-nontarget demo [--model toy|smollm2|PATH] [--out DIR] [--quick] [--seeds N] [--cache-dir DIR] [--threads N]
    kl-nontarget demo --model smollm2 --variants lora,dora,rslora,pissa,vera [--quick] [--seeds 2]
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


def add_parser(sub) -> None:
    """The `demo` subcommand's parser, on the subparsers `sub` of `kl-nontarget`."""
    demo = sub.add_parser("demo", help="learning vs forgetting, on a self-made tiny base model (CPU, no downloads) "
                          "or a real one (--model smollm2)",
                          description="Pretrains (or loads from the cache) a tiny Llama on a synthetic language, "
                          "fine-tunes LoRA adapters on two tasks with plain cross-entropy, + non-target KL and "
                          "+ full-vocabulary KL, and writes DIR/results.json and DIR/frontier.png. With --model "
                          "smollm2 (or a checkpoint folder / .gguf file of a chat model), the same experiment on "
                          "that pretrained model: questions about fictional people as the task, text sampled from the "
                          "base and probe questions to measure forgetting.")
    demo.add_argument("--model", default="toy", metavar="MODEL",
                      help="toy (default: the self-made base model), smollm2 (SmolLM2-135M-Instruct from the extra "
                      "kl-nontarget[smollm2]), or a chat model's checkpoint folder or .gguf file")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="output folder (default: kl-nontarget-demo, or kl-nontarget-demo-MODEL for a real model)")
    demo.add_argument("--quick", action="store_true",
                      help="a smaller run (toy: under a minute; smollm2: under 8 minutes on 2 cores; "
                           "--variants: one task, about 6 minutes on one core)")
    demo.add_argument("--seeds", type=int, default=None, metavar="N",
                      help="seeds per setting (default: 1; more seeds make the comparison more reliable)")
    demo.add_argument("--cache-dir", default=None, metavar="DIR",
                      help="where base models are cached: the pretrained toy model, or the checkpoint converted from "
                      "a GGUF file (default: $KL_NONTARGET_CACHE or ~/.cache/kl-nontarget)")
    demo.add_argument("--variants", default=None, metavar="V1,V2,...",
                      help="real models only: compare these PEFT variants (lora, dora, rslora, pissa, olora, loraplus, "
                      "vera, loha, lokr, ia3) on two tasks, each variant with its own learning rate chosen on "
                      "validation (the study of docs/demos.md; 'study' = lora,dora,rslora,pissa,vera)")
    demo.add_argument("--threads", type=int, default=None, metavar="N",
                      help="torch threads (default: torch's, one per core; 1 is faster on cores busy with other work)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    """Run the demo of the parsed `args`: 0, or 2 for bad input (one message on stderr)."""
    if args.seeds is not None and args.seeds < 1:
        print("kl-nontarget demo: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("kl-nontarget demo: --threads must be >= 1", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        # transformers 5.x warns about its own deprecated attribute on every Trainer run: noise in the demo's output.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if args.model == "toy":
            if args.variants is not None:
                print("kl-nontarget demo: --variants needs a real model (--model smollm2, or a chat model's path)",
                      file=sys.stderr)
                return 2
            from kl_nontarget.demo import default_config, quick_config, run_demo

            cfg = quick_config(args.seeds) if args.quick else default_config(args.seeds)
            run_demo(cfg, args.out or "kl-nontarget-demo", cache_dir=args.cache_dir, progress=not args.no_progress,
                     threads=args.threads)
            return 0
        from kl_nontarget.demo.pretrained import (
            STUDY_VARIANTS,
            pretrained_config,
            pretrained_quick_config,
            pretrained_variants_config,
            run_pretrained_demo,
        )
        from kl_nontarget.sweep.variants import parse_variants

        if args.variants is not None:
            try:
                variants = STUDY_VARIANTS if args.variants == "study" else parse_variants(args.variants)
            except ValueError as err:
                print(f"kl-nontarget demo: --variants: {err}", file=sys.stderr)
                return 2
            cfg = pretrained_variants_config(args.model, args.seeds, variants, quick=args.quick)
        else:
            cfg = (pretrained_quick_config if args.quick else pretrained_config)(args.model, args.seeds)
        out = args.out or f"kl-nontarget-demo-{Path(args.model).stem or 'model'}"
        try:
            run_pretrained_demo(cfg, out, cache_dir=args.cache_dir, progress=not args.no_progress,
                                threads=args.threads)
        except (ModuleNotFoundError, FileNotFoundError) as err:
            print(f"kl-nontarget demo: {err}", file=sys.stderr)
            return 2
    return 0
