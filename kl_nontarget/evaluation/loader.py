"""Token-id rows to batches: a list-backed dataset, a padding collator (labels -100 on padding) and
`padded_loader`, the evaluation loader of `kl-nontarget eval` and the demo."""

from __future__ import annotations

import torch


class RowsDataset(torch.utils.data.Dataset):
    """A dataset over dicts of token id lists ("input_ids", optional "labels")."""

    def __init__(self, rows: list[dict]):
        self.rows = list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class PadCollator:
    """Right-pads "input_ids" with `pad_id`; "labels" default to the input ids; padding gets label -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r.get("labels", r["input_ids"]))
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padded_loader(rows, pad_id: int, batch_size: int = 32) -> torch.utils.data.DataLoader:
    """A DataLoader over `rows` (dicts of token-id lists) in order, padded with `PadCollator(pad_id)`."""
    return torch.utils.data.DataLoader(RowsDataset(rows), batch_size=batch_size, shuffle=False,
                                       collate_fn=PadCollator(pad_id))

