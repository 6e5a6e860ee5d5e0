"""The base hidden-state cache (`precompute_base`): the base model's final hidden states at the supervised positions,
computed once over a dataset, stored on disk and reused at every step, epoch and run on the same model and data.

On the fused-linear path the loss needs only the base model's final hidden states (N x d, not N x V logits), and the
base model does not change while adapters train. So one no-grad pass over the data replaces the base pass of every
step (see docs/design.md, "The base hidden-state cache").

Keying. Every example of the (prepared) dataset gets its row number in an extra column, `INDEX_KEY`
(`with_index`); `IndexCollator` takes it out of the features before the real collator runs and puts the indices of the
batch, in order, next to the batch. Whatever the layout the collator builds (padding on either side, padding-free
concatenation, packed rows), the supervised positions of a batch taken row-major are those of its examples in order,
so the batch's base rows are the cached rows of its examples concatenated. Each cached example also keeps the token
and the gold next token at each of its positions; a batch whose tokens differ from the cached ones is never served.

One file per (base model, data, collation) fingerprint (`cache_fingerprint`) in `base_cache_dir`: a mismatch makes a
new cache rather than reusing a wrong one. A cache is an Arrow file written by pyarrow and memory-mapped by
`datasets.Dataset.from_file`, one row per example: `index`, `input_ids` and `labels` at its supervised positions,
and `hidden`, the raw bytes of its (rows, d) hidden states in the dtype the loss uses them in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kl_nontarget.models.loading import default_cache_dir as package_cache_dir
from kl_nontarget.training.batch_rows import IGNORE_INDEX, shifted_labels

INDEX_KEY = "kl_base_index"
FORMAT_VERSION = 1
# Relative tolerance of the layout check (the same example's base rows computed in two different batches): batched
# matmuls of different shapes round differently, an attention leak between examples moves the rows by O(1).
LAYOUT_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}
LAYOUT_RTOL_LOW_PRECISION = 3e-2

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}


class CacheUnavailable(Exception):
    """The cache cannot serve this training run (the message says why); the caller falls back or refuses."""


class CacheMismatch(Exception):
    """A batch whose examples do not match the cached rows (tokens, labels or row counts differ)."""


def default_cache_dir() -> Path:
    """`base_hidden` in the package's cache folder (`kl_nontarget.models.loading.default_cache_dir`:
    `$KL_NONTARGET_CACHE`, else `$XDG_CACHE_HOME/kl-nontarget`, else `~/.cache/kl-nontarget`)."""
    return package_cache_dir() / "base_hidden"


# --------------------------------------------------------------------------------------------------------------------
# Keying: an index column and the collator that carries it


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset of dict examples, each returned with its position under `INDEX_KEY`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        example = self.dataset[i]
        return {**example, INDEX_KEY: i}


def with_index(dataset):
    """`dataset` with an `INDEX_KEY` column (row numbers); CacheUnavailable where examples have no stable position."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__") \
            or not hasattr(dataset, "__len__"):
        raise CacheUnavailable(f"the dataset ({type(dataset).__name__}) is not map-style (indexable, with a length), "
                               "so its examples cannot be keyed")
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        if INDEX_KEY in dataset.column_names:
            dataset = dataset.remove_columns(INDEX_KEY)
        return dataset.add_column(INDEX_KEY, np.arange(len(dataset), dtype=np.int64))
    if len(dataset) and not isinstance(dataset[0], dict):
        raise CacheUnavailable(f"the dataset's examples are {type(dataset[0]).__name__}, not dicts: no room for an "
                               "example index")
    return IndexedDataset(dataset)


class IndexCollator:
    """Wraps a collator: takes `INDEX_KEY` out of the features and puts the batch's indices (int64, in feature
    order) in the batch under the same key. Features without the key pass through untouched."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, features):
        keyed = [isinstance(f, dict) and INDEX_KEY in f for f in features]
        if not any(keyed):
            return self.collator(features)
        if not all(keyed):
            raise ValueError(f"some examples of this batch carry {INDEX_KEY!r} and some do not")
        indices = [int(f[INDEX_KEY]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != INDEX_KEY} for f in features])
        batch[INDEX_KEY] = torch.tensor(indices, dtype=torch.int64)
        return batch


def pop_index(inputs: dict) -> tuple[dict, torch.Tensor | None]:
    """(the batch without `INDEX_KEY`, its example indices or None)."""
    if INDEX_KEY not in inputs:
        return inputs, None
    return {k: v for k, v in inputs.items() if k != INDEX_KEY}, inputs[INDEX_KEY]


# --------------------------------------------------------------------------------------------------------------------
# The fingerprint


def _feed(h, value) -> None:
    """Hash one value of an example or a batch: tensors and arrays by dtype, shape and bytes; lists as arrays."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.view(torch.int16)
        value = value.contiguous().numpy()
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except ValueError:  # ragged
            h.update(b"[")
            for v in value:
                _feed(h, v)
            h.update(b"]")
            return
        if value.dtype == object:
            h.update(repr(value.tolist()).encode())
            return
    if isinstance(value, np.ndarray):
        h.update(f"{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for k in sorted(value):
            h.update(str(k).encode())
            _feed(h, value[k])
    else:
        h.update(repr(value).encode())


def hash_tensors(h, named: Iterable[tuple[str, torch.Tensor]], chunk_elements: int = 1 << 24) -> None:
    """Feed every byte of the named tensors into `h` (a copy to the CPU of at most `chunk_elements` at a time)."""
    for name, t in named:
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), chunk_elements):
            part = flat[start:start + chunk_elements].contiguous().cpu()
            h.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")


def hash_examples(h, examples: Iterable[dict]) -> int:
    """Feed every example (every key, every value) into `h`; returns how many there were."""
    n = 0
    for example in examples:
        _feed(h, example)
        n += 1
    return n


def fingerprint_prefix(*, weights: Iterable[tuple[str, torch.Tensor]], facts: dict):
    """The hasher after the format version, `facts` and `weights`: the part of `cache_fingerprint` that every dataset
    of one base model shares, so several datasets hash the weights once (`fingerprint_from` continues a copy)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"kl_nontarget base cache v{FORMAT_VERSION}".encode())
    _feed(h, {k: facts[k] for k in sorted(facts)})
    hash_tensors(h, weights)
    return h


def fingerprint_from(prefix, *, examples: Iterable[dict], collate: Callable, probe: Sequence[dict]) -> str:
    """`cache_fingerprint` from its `fingerprint_prefix` (left as it is: the hashing goes on in a copy)."""
    h = prefix.copy()
    h.update(b"examples")
    h.update(str(hash_examples(h, examples)).encode())
    inner = collate
    while hasattr(inner, "collator") or hasattr(inner, "data_collator"):
        h.update(type(inner).__qualname__.encode())
        inner = getattr(inner, "collator", None) or inner.data_collator
    h.update(f"{type(inner).__module__}.{getattr(inner, '__qualname__', type(inner).__qualname__)}".encode())
    attrs = getattr(inner, "__dict__", {})
    _feed(h, {k: v for k, v in attrs.items() if isinstance(v, (bool, int, float, str, type(None)))})
    if probe:
        _feed(h, dict(collate(list(probe))))
    return h.hexdigest()


def cache_fingerprint(*, weights: Iterable[tuple[str, torch.Tensor]], examples: Iterable[dict], collate: Callable,
                      probe: Sequence[dict], facts: dict) -> str:
    """A hex digest of everything the cached rows depend on.

    - `weights`: every parameter and buffer of the base model, by value (all of their bytes; see
      docs/design.md, "The base hidden-state cache", for why not a cheaper proxy);
    - `examples`: the prepared examples as the collator receives them (token ids, labels, any other column), so the
      tokenisation and the data preparation are covered by what they produced;
    - `collate` and `probe`: the collator's class and simple attributes, and its output on a few examples;
    - `facts`: the rest (model config, dtype, autocast, device type, library versions).
    """
    return fingerprint_from(fingerprint_prefix(weights=weights, facts=facts), examples=examples, collate=collate,
                            probe=probe)


# --------------------------------------------------------------------------------------------------------------------
# The store


@dataclass
class BaseHiddenCache:
    """One cache file, memory-mapped: the base rows of every example of one dataset."""

    table: object  # datasets.Dataset with columns index, input_ids, labels, hidden
    dtype: torch.dtype
    hidden_size: int
    path: Path
    fingerprint: str
    computed: bool  # whether this process computed it (False: found on disk)

    def __len__(self):
        return len(self.table)

    def rows(self, indices: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The (N, d) base rows of the examples `indices`, in order, after checking that their tokens and gold labels
        are the batch's (`input_ids`, `labels`: the batch's, at its supervised positions, row-major).

        Raises CacheMismatch otherwise (a different dataset, a collator that changed, a layout the keying misses).
        """
        keys = [int(i) for i in indices.reshape(-1).tolist()]
        if any(k < 0 or k >= len(self.table) for k in keys):
            raise CacheMismatch(f"example index out of range for a cache of {len(self.table)} examples")
        found = self.table[keys]
        if list(found["index"]) != keys:
            raise CacheMismatch("the cache's rows are not in example order")
        ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in found["input_ids"]]) if keys else np.zeros(0)
        gold = np.concatenate([np.asarray(x, dtype=np.int64) for x in found["labels"]]) if keys else np.zeros(0)
        batch_ids = input_ids.detach().cpu().numpy()
        batch_gold = labels.detach().cpu().numpy()
        if ids.shape != batch_ids.shape:
            raise CacheMismatch(f"the batch has {batch_ids.size} supervised positions, its examples' cached rows "
                                f"{ids.size}")
        if not (np.array_equal(ids, batch_ids) and np.array_equal(gold, batch_gold)):
            raise CacheMismatch("the batch's tokens or labels at its supervised positions differ from the cached "
                                "ones")
        return self._rows_from_blob(bytearray().join(found["hidden"]))  # one copy of the (N, d) block

    def example_rows(self, i: int) -> torch.Tensor:
        """The (rows, d) base hidden states of example `i`."""
        return self._rows_from_blob(bytearray(self.table[i]["hidden"]))

    def _rows_from_blob(self, blob: bytearray) -> torch.Tensor:
        """The (rows, d) tensor over the raw bytes `blob`, without a copy (a bytearray: torch.frombuffer warns on a
        read-only buffer such as bytes)."""
        hidden = torch.frombuffer(blob, dtype=self.dtype) if blob else torch.zeros(0, dtype=self.dtype)
        return hidden.view(-1, self.hidden_size)

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    @property
    def num_rows(self) -> int:
        """Cached positions (supervised tokens) over all examples."""
        return int(json.loads(self.path.with_suffix(".json").read_text())["positions"])


def _paths(cache_dir, fingerprint) -> tuple[Path, Path]:
    root = Path(cache_dir)
    return root / f"{fingerprint}.arrow", root / f"{fingerprint}.json"


def load_cache(cache_dir, fingerprint: str, num_examples: int) -> BaseHiddenCache | None:
    """The finished cache of `fingerprint` in `cache_dir`, or None (absent, unfinished, or not matching)."""
    import datasets

    path, meta_path = _paths(cache_dir, fingerprint)
    if not (path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        table = datasets.Dataset.from_file(str(path))
    except (OSError, ValueError):
        return None
    if meta.get("version") != FORMAT_VERSION or meta.get("examples") != num_examples or len(table) != num_examples:
        return None
    return BaseHiddenCache(table=table, dtype=_DTYPES[meta["dtype"]], hidden_size=int(meta["hidden_size"]),
                           path=path, fingerprint=fingerprint, computed=False)


def build_cache(*, cache_dir, fingerprint: str, features, collate: Callable,
                base_rows: Callable[[dict], object], batch_size: int, progress: bool = True,
                description: str = "base hidden states") -> BaseHiddenCache:
    """Run the base pass over `features` (in order, `batch_size` at a time) and write the cache of `fingerprint`.

    `base_rows(batch)` returns a `kl_nontarget.training.batch_rows.BaseRows` for a collated batch (moving it to the
    model's device as needed). Each batch's rows are split between its examples by the supervised-position count each
    example has when collated alone; a batch whose count differs, or whose tokens differ from the lone collation's,
    cannot be keyed (CacheUnavailable). Afterwards a few examples are run again in a different batch (`check_layout`).
    """
    import pyarrow as pa
    from tqdm.auto import tqdm

    path, meta_path = _paths(cache_dir, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(features)
    schema = pa.schema([("index", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("hidden", pa.large_binary())])
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    dtype, hidden_size, positions = None, None, 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            bar = tqdm(total=n, desc=f"Precomputing {description}", unit="ex", disable=not progress)
            for start in range(0, n, batch_size):
                chunk = [features[i] for i in range(start, min(n, start + batch_size))]
                per_example = split_rows(collate, chunk, base_rows(collate(chunk)))
                if dtype is None and per_example:
                    dtype, hidden_size = per_example[0][2].dtype, per_example[0][2].shape[-1]
                columns = {"index": [], "input_ids": [], "labels": [], "hidden": []}
                for offset, (ids, gold, hidden) in enumerate(per_example):
                    columns["index"].append(start + offset)
                    columns["input_ids"].append(ids.tolist())
                    columns["labels"].append(gold.tolist())
                    columns["hidden"].append(_to_bytes(hidden.to(dtype)))
                    positions += ids.numel()
                writer.write_batch(pa.record_batch(columns, schema=schema))
                bar.update(len(chunk))
            bar.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = {"version": FORMAT_VERSION, "examples": n, "positions": positions,
            "dtype": str(dtype or torch.float32), "hidden_size": int(hidden_size or 0)}
    meta_path.write_text(json.dumps(meta))
    cache = load_cache(cache_dir, fingerprint, n)
    cache.computed = True
    return cache


def split_rows(collate, chunk, rows) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, labels, hidden) of each example of `chunk`, cut from the batch's `rows` (a `BaseRows`).

    The rows are stored in the dtype the loss uses them in: the autocast dtype when the head ran under autocast.
    """
    alone = [collate([f]) for f in chunk]  # each example collated by itself, once
    targets = [shifted_labels(batch) for batch in alone]
    counts = [int((target != IGNORE_INDEX).sum()) for target in targets]
    if sum(counts) != rows.hidden.shape[0]:
        raise CacheUnavailable(f"a batch of {len(chunk)} examples has {rows.hidden.shape[0]} supervised positions, "
                               f"but its examples have {sum(counts)} when collated one at a time: the collator does "
                               "not keep each example's positions, so they cannot be keyed")
    enabled, dtype = rows.autocast
    hidden = rows.hidden.detach()
    if enabled and dtype is not None and hidden.is_floating_point():
        hidden = hidden.to(dtype)
    out, start = [], 0
    for lone, target, count in zip(alone, targets, counts):
        mask = target != IGNORE_INDEX
        ids, gold = rows.input_ids[start:start + count].cpu(), rows.labels[start:start + count].cpu()
        if not (torch.equal(lone["input_ids"][mask].cpu(), ids) and torch.equal(target[mask].cpu(), gold)):
            raise CacheUnavailable("an example's tokens or labels differ between its batch and its lone collation "
                                   "(a collator that is not deterministic, or that reorders tokens): the positions "
                                   "cannot be keyed")
        out.append((ids.to(torch.int32), gold.to(torch.int32), hidden[start:start + count].cpu().contiguous()))
        start += count
    return out


def check_layout(cache: BaseHiddenCache, features, collate, base_rows) -> None:
    """Run a few examples again in another batch (the last, the first and the middle one, in that order: other
    padding, other offsets) and compare with the cached rows; CacheUnavailable when they differ beyond rounding
    (for example attention leaking between the examples of a padding-free batch)."""
    n = len(features)
    picks = list(dict.fromkeys([n - 1, 0, n // 2]))
    if n < 2:
        return
    chunk = [features[i] for i in picks]
    again = split_rows(collate, chunk, base_rows(collate(chunk)))
    rtol = LAYOUT_RTOL.get(cache.dtype, LAYOUT_RTOL_LOW_PRECISION)
    for i, (_ids, _gold, hidden) in zip(picks, again):
        cached = cache.example_rows(i).float()
        scale = max(float(cached.abs().max()) if cached.numel() else 0.0, 1e-6)
        err = float((hidden.float() - cached).abs().max()) if cached.numel() else 0.0
        if hidden.shape != cached.shape or err > rtol * scale:
            raise CacheUnavailable(f"example {i}'s base hidden states change with the batch it is in (max difference "
                                   f"{err:.3g} against {scale:.3g}): with this collation the base rows of an example "
                                   "depend on its neighbours, so they cannot be cached per example")


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
