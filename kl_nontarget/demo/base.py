"""The demo's base model: a tiny Llama pretrained on the synthetic corpus with `transformers.Trainer`, cached.

The cache key is a hash of the model config, the corpus and pretraining settings and the seed, so a re-run with
the same settings loads the saved model (and its tokenizer) instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from kl_nontarget.demo.corpus import Grammar, build_tokenizer, pack
from kl_nontarget.evaluation.loader import RowsDataset
from kl_nontarget.models.loading import default_cache_dir
from kl_nontarget.sweep.progress import TqdmCallback, quiet_trainer

CORPUS_VERSION = 1  # bump when the grammar changes, so old cached base models are not reused


def model_config(vocab_size, base):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=base["hidden_size"], num_hidden_layers=base["layers"],
                       num_attention_heads=base["heads"], num_key_value_heads=base["heads"],
                       intermediate_size=base["intermediate_size"], max_position_embeddings=base["seq_len"] * 2,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def cache_key(base: dict, seed: int) -> str:
    blob = json.dumps({"base": base, "seed": seed, "corpus": CORPUS_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_corpus(grammar, tokenizer, base: dict, seed: int):
    """(train blocks, held-out blocks) of token ids, each block `seq_len` long."""
    def blocks(n_docs, doc_seed):
        docs = grammar.documents(n_docs, doc_seed)
        return pack([tokenizer.convert_tokens_to_ids(d.split()) for d in docs], base["seq_len"])

    return blocks(base["train_docs"], seed), blocks(base["heldout_docs"], seed + 7919)


def pretrain(grammar, tokenizer, base: dict, seed: int, out_dir: Path, progress=True):
    """Train the base model from scratch and save it (with the tokenizer) to `out_dir`."""
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(len(tokenizer), base))
    train_blocks, _ = base_corpus(grammar, tokenizer, base, seed)
    rows = [{"input_ids": b, "labels": b} for b in train_blocks]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=base["batch_size"],
                                 max_steps=base["steps"], learning_rate=base["lr"], lr_scheduler_type="cosine",
                                 warmup_steps=max(1, base["steps"] // 20), weight_decay=0.01,
                                 logging_strategy="no", save_strategy="no", report_to=[], seed=seed, data_seed=seed,
                                 disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=args, train_dataset=RowsDataset(rows), data_collator=default_data_collator)
        quiet_trainer(trainer)
        trainer.add_callback(TqdmCallback("pretraining base model", disable=not progress))
        trainer.train()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "demo_base.json").write_text(json.dumps({"base": base, "seed": seed, "corpus": CORPUS_VERSION},
                                                       indent=1))
    return model


def load_or_pretrain(base: dict, seed: int, cache_dir=None, progress=True, log=print):
    """Returns (model, tokenizer, grammar, path, cached)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    grammar = Grammar(seed=seed)
    path = Path(cache_dir or default_cache_dir()) / f"base-{cache_key(base, seed)}"
    if (path / "demo_base.json").exists():
        model = LlamaForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        log(f"base model: loaded from cache {path}")
        return model.eval(), tokenizer, grammar, path, True
    tokenizer = build_tokenizer(grammar.vocabulary)
    model = pretrain(grammar, tokenizer, base, seed, path, progress=progress)
    log(f"base model: pretrained and cached in {path}")
    return model, tokenizer, grammar, path, False
