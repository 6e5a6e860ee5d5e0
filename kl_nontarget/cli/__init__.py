"""The `kl-nontarget` command line: one module per command.

    kl-nontarget demo [--model toy|smollm2|PATH] [--out DIR] [--quick] [--seeds N] ...     (cli/demo.py)
    kl-nontarget eval --adapter DIR --data FILE [--base MODEL] ...                          (cli/evaluate.py)
    kl-nontarget sft [--config FILE.yaml] [every `trl sft` option] [--kl_weight W] ...      (cli/sft.py)
    kl-nontarget sweep [the sft options] [--kl_weights 0,0.1,0.3,1] [--baseline full_kl] ... (cli/sweep.py)
    kl-nontarget sequence --stages a.jsonl,b.jsonl [--reference previous] [--lora_ranks 4,16]   (cli/sequence.py)
    kl-nontarget powerlaw [--lora_ranks 2,8,32] [--measure_steps 4,8,16,32] ...                  (cli/powerlaw.py)
"""

from __future__ import annotations

import argparse
import sys

from kl_nontarget.cli import demo, evaluate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kl-nontarget", description="LoRA fine-tuning with a non-target KL "
                                     "regularizer against forgetting.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_parser(sub)
    # Listed for --help only: main() hands `sft` and everything after it to cli/sft.py (TRL's parser), and
    # `sweep` to cli/sweep.py.
    sub.add_parser("sft", add_help=False, help="supervised fine-tuning with the non-target KL: `trl sft` plus "
                   "--kl_weight ...; takes --config FILE.yaml (kl-nontarget sft --help lists the options)")
    sub.add_parser("sweep", add_help=False, help="the learning-vs-forgetting frontier on your model and data: plain "
                   "LoRA and the non-target KL at several kl_weights (kl-nontarget sweep --help lists the options)")
    sub.add_parser("sequence", add_help=False, help="tasks trained in order, the adapter merged after each: every "
                   "task's loss and forgetting per stage (kl-nontarget sequence --help)")
    sub.add_parser("powerlaw", add_help=False, help="forgetting against trained parameters and steps, and the fit "
                   "Lf = A N^a S^b + E (kl-nontarget powerlaw --help)")
    evaluate.add_parser(sub)
    return parser


def main(argv=None) -> int:
    """`kl-nontarget COMMAND ...`: the exit status (0 on success, 2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sft"]:
        from kl_nontarget.cli.sft import main as sft_main

        return sft_main(argv[1:])
    if argv[:1] == ["sweep"]:
        from kl_nontarget.cli.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] == ["sequence"]:
        from kl_nontarget.cli.sequence import main as sequence_main

        return sequence_main(argv[1:])
    if argv[:1] == ["powerlaw"]:
        from kl_nontarget.cli.powerlaw import main as powerlaw_main

        return powerlaw_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        return demo.run(args)
    if args.command == "eval":
        return evaluate.run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2
