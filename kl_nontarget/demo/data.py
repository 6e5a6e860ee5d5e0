"""The demo's batching: `kl_nontarget.batching` (the library's, shared with `kl-nontarget eval`)."""

from kl_nontarget.batching import PadCollator, RowsDataset, loader

__all__ = ["PadCollator", "RowsDataset", "loader"]
