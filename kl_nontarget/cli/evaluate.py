"""`kl-nontarget eval`: forgetting of a saved adapter against its base model, on a local text or JSON-lines file.

    kl-nontarget eval --adapter DIR --data FILE [--base MODEL] [--text-field text] [--max-length 512] ...
"""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    """The `eval` subcommand's parser, on the subparsers `sub` of `kl-nontarget`."""
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
    (`kl_nontarget.models.loading.resolve_model`)."""
    from pathlib import Path

    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kl_nontarget.evaluation.loader import padded_loader
    from kl_nontarget.evaluation.metrics import forgetting_metrics
    from kl_nontarget.models.loading import resolve_model

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


def run(args) -> int:
    """Evaluate the adapter of the parsed `args` and print the metrics: 0, or 2 for bad input."""
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
