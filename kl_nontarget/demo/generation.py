"""Batched generation for the real-model demo: left-padded prompts, one `generate` call, replies cut at their end.

One call for all prompts matters on the CPU: a decoding step on one short sequence is mostly fixed overhead, so
batching the prompts makes sampling and probing many times faster than one prompt at a time.
"""

from __future__ import annotations

import torch

from kl_nontarget.evaluation.retention import trim_at_stop


def stop_ids(tokenizer):
    """Token ids that end a reply: the EOS token and, for ChatML models, <|im_end|>."""
    ids = {tokenizer.eos_token_id}
    if "<|im_end|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, prompts, *, max_new_tokens, batch_size=32, **kwargs):
    """(prompt ids, new ids) per prompt; the new ids end at (and include) the first stop token, if any.

    `kwargs` go to `model.generate` (e.g. do_sample=True, temperature=1.0). The model's training mode is restored.
    """
    device = next(model.parameters()).device
    stops = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, seq in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[i, width - len(seq):] = torch.tensor(seq)
                mask[i, width - len(seq):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, **kwargs)
            for seq, new in zip(chunk, gen[:, width:].tolist()):
                out.append((seq, trim_at_stop(new, set(stops))))
    finally:
        model.train(was_training)
    return out
