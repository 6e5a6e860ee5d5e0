"""Tiny causal LMs and a local tokenizer for tests: built from configs, saved and reloaded, no downloads.

- `tiny_llama(path)`: a 2-layer Llama (hidden 32, vocabulary `VOCAB_SIZE`).
- `tiny_softcapped(path)`: a 2-layer Gemma2 with `final_logit_softcapping`, the second architecture whose logits the
  model's own forward transforms (soft-capping).
- `tiny_tokenizer(path=None)`: a word-level `PreTrainedTokenizerFast` over `WORDS` plus special tokens, whose size
  is at most `VOCAB_SIZE`, with a minimal chat template.
- `toy_texts(n)`, `toy_prompt_completions(n)`: deterministic toy data in that vocabulary.
- `write_jsonl(path, rows)`, `prompt_completion_file(path)`, `messages_file(path)`: that data as jsonl files.

Every builder seeds torch itself, so two calls with the same arguments give the same weights.
"""

from __future__ import annotations

import json
import os
import random

import torch

VOCAB_SIZE = 128
# Every linear projection of a Llama-style decoder layer: where the tests put their adapters.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS) - 4)] + ["user:", "assistant:", "?", "."]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _save_and_load(model, path):
    """Round-trip through save_pretrained/from_pretrained, as a user's checkpoint would."""
    from transformers import AutoModelForCausalLM

    if path is None:
        return model
    path = os.fspath(path)
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def tiny_llama(path=None, *, seed=0, vocab_size=VOCAB_SIZE, hidden_size=32, num_layers=2,
               tie_word_embeddings=False, **config_kwargs):
    """A tiny LlamaForCausalLM in float32 (its LM head the input embedding with `tie_word_embeddings`); saved to and
    loaded from `path` when given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=tie_word_embeddings, **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _scale_lm_head(model)
    return _save_and_load(model, path)


def tiny_softcapped(path=None, *, seed=0, vocab_size=VOCAB_SIZE, hidden_size=32, num_layers=2, softcap=2.0,
                    **config_kwargs):
    """A tiny Gemma2ForCausalLM whose forward soft-caps the logits at `softcap` (tanh(z / c) * c)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          max_position_embeddings=128, sliding_window=16, final_logit_softcapping=softcap,
                          attn_logit_softcapping=50.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          **config_kwargs)
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config)
    return _save_and_load(model, path)


# One tiny config per architecture of kl_nontarget.models.architectures.ARCHITECTURES (by model_type), with the
# settings that make its logit transform matter.
TINY_ARCHITECTURES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {}, "phi": {}, "phi3": {},
    "gemma2": dict(final_logit_softcapping=2.0), "gemma3_text": dict(final_logit_softcapping=3.0),
    "cohere": dict(logit_scale=0.3), "granite": dict(logits_scaling=4.0),
}


def tiny_causal_lm(model_type, *, seed=0, vocab_size=96, **overrides):
    """A one-layer CausalLM of `model_type` (a key of `TINY_ARCHITECTURES`), float32, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, **{**TINY_ARCHITECTURES[model_type], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _scale_lm_head(model, factor=8.0):
    # Random init gives nearly uniform next-token distributions; sharper ones make the tests more telling.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)


def tiny_tokenizer(path=None):
    """A word-level fast tokenizer over `WORDS` (whitespace-split), with bos/eos/pad/unk and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    if path is not None:
        tokenizer.save_pretrained(os.fspath(path))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(os.fspath(path))
    return tokenizer


def toy_texts(n, *, seed=0, min_words=4, max_words=12):
    """`n` deterministic whitespace-separated sentences of random lengths over `WORDS`."""
    rng = random.Random(seed)
    words = WORDS[:40]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def toy_prompt_completions(n, *, seed=0):
    """`n` prompt/completion pairs: the completion reverses the prompt's words (uneven lengths)."""
    rng = random.Random(seed)
    words = WORDS[:40]
    rows = []
    for _ in range(n):
        prompt = [rng.choice(words) for _ in range(rng.randint(2, 6))]
        completion = list(reversed(prompt))[: rng.randint(1, len(prompt))]
        rows.append({"prompt": " ".join(prompt) + " ?", "completion": " " + " ".join(completion) + " ."})
    return rows


def write_jsonl(path, rows):
    """Write `rows` (dicts) to `path` as JSON lines; returns `path`."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prompt_completion_file(path, n=16, seed=5):
    """A jsonl file of `toy_prompt_completions(n, seed=seed)`."""
    return write_jsonl(path, toy_prompt_completions(n, seed=seed))


def messages_file(path, n=12, seed=6):
    """A jsonl file of the same pairs as conversations: {"messages": [user prompt, assistant completion]}."""
    return write_jsonl(path, [{"messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["completion"]}]}
                              for r in toy_prompt_completions(n, seed=seed)])


def toy_token_batches(n, *, seed=0, seq_len=12, vocab_size=VOCAB_SIZE, prompt_max=6):
    """`n` examples {input_ids, attention_mask, labels} with right padding and masked prompts (uneven counts)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, seq_len + 1, (1,), generator=g))
        ids = torch.randint(4, vocab_size, (length,), generator=g)
        prompt = int(torch.randint(1, min(prompt_max, length - 1) + 1, (1,), generator=g))
        labels = ids.clone()
        labels[:prompt] = -100
        pad = seq_len - length
        rows.append({
            "input_ids": torch.cat([ids, torch.zeros(pad, dtype=torch.long)]),
            "attention_mask": torch.cat([torch.ones(length, dtype=torch.long), torch.zeros(pad, dtype=torch.long)]),
            "labels": torch.cat([labels, torch.full((pad,), -100, dtype=torch.long)]),
        })
    return rows


def collate(rows):
    """Stack a list of equally long examples (as `toy_token_batches` makes) into a batch."""
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}


def independent_loss(model, batch, *, kl_weight=1.0, temperature=1.0, kl_direction="forward",
                     num_items_in_batch=None, ref_model=None):
    """(loss, ce, kl) in float64 from the full logits of `model` and of its base, independently of the library.

    The base logits come from `ref_model` or from `model.disable_adapter()` (a PEFT model); the labels are shifted
    here (logits[:, :-1] against labels[:, 1:]) and `tests/oracle.py` does the rest. The loss keeps the graph to
    `model`, so its gradient can be compared too.
    """
    from oracle import loss_reference

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    with torch.no_grad():
        if ref_model is not None:
            base = ref_model(**inputs).logits
        else:
            with model.disable_adapter():
                base = model(**inputs).logits
    return loss_reference(logits[:, :-1], base[:, :-1], batch["labels"][:, 1:], kl_weight=kl_weight,
                          temperature=temperature, kl_direction=kl_direction,
                          num_items_in_batch=num_items_in_batch)


def perturb_trainable(model, scale=0.3, seed=1):
    """Move every trainable parameter by Gaussian noise (an adapter that has already learned something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def sgd_args(tmp_path, *, cls=None, **overrides):
    """Arguments for short deterministic CPU runs in tests: plain SGD at a constant rate, batch 4, 2 steps.

    `cls`: the arguments class (TrainingArguments by default; e.g. trl's SFTConfig); `overrides` go to it as well.
    """
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                  max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                  report_to=[], use_cpu=True, save_strategy="no", seed=0, dataloader_num_workers=0,
                  disable_tqdm=True)
    kwargs.update(overrides)
    return cls(**kwargs)


def load_model(model_dirs, arch="llama", dtype=torch.float32):
    """A tiny model saved under `model_dirs` (the `model_dirs` fixture of conftest.py): "llama" or "gemma2"."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dirs / arch, dtype=dtype)


def load_tokenizer(model_dirs):
    """The tokenizer saved under `model_dirs` (conftest.py's fixture): `tiny_tokenizer`'s, without building it again."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(os.fspath(model_dirs / "tokenizer"))


def lora_config(**overrides):
    """LoRA r=4 on LORA_TARGETS, the adapter most tests train."""
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LORA_TARGETS, **overrides})


def peft_model(model_dirs, arch="llama", *, dtype=torch.float32, config=None, seed=0, moved=True):
    """A PEFT model on a saved tiny model; `moved`: adapters perturbed away from zero, so the KL is not trivially 0."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(model_dirs, arch, dtype), config or lora_config())
    if moved:
        perturb_trainable(model)
    return model


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_state(a, b, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=name)


def loss_and_grads(trainer, model, batch, num_items_in_batch=None):
    """(loss, {name: gradient} of the trainable parameters) of one `trainer.compute_loss` on `batch`; grads cleared."""
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads
