"""`precompute_base` in the trainers: prepare the base hidden-state caches before training and serve each batch's rows.

`BasePrecompute` is held by a `NonTargetKLMixin` trainer as `trainer.base_precompute`. At `train()` (and a standalone
`evaluate()`), `prepare` checks that the cache can apply, computes or finds the cache of the train and eval datasets
(`kl_nontarget.training.base_cache`), adds the example-index column and wraps the collator; `restore` puts the datasets
back afterwards. At every loss call, `base_hidden` returns the batch's cached rows, or None when the base pass must run.

Where the cache cannot apply (no fused-linear path, a base model that changes during training, several processes, a
dataset or collator whose examples cannot be keyed), `precompute_base=True` raises and `"auto"` warns once and runs the
base pass at every step, as without the option.
"""

from __future__ import annotations

import warnings

import torch

from kl_nontarget.models.introspection import (
    _adapter_parameter_ids,
    device_of,
    to_device,
    trainable_base_parameters,
    transformers_model,
    unwrap_model,
)
from kl_nontarget.training.base_cache import (
    INDEX_KEY,
    CacheMismatch,
    CacheUnavailable,
    IndexCollator,
    build_cache,
    check_layout,
    default_cache_dir,
    fingerprint_from,
    fingerprint_prefix,
    load_cache,
    with_index,
)
from kl_nontarget.training.batch_rows import compute_base_rows, shifted_labels
from kl_nontarget.training.step_loss import step_heads

SPLITS = (("train", "train_dataset", "per_device_train_batch_size"),
          ("eval", "eval_dataset", "per_device_eval_batch_size"))


def base_weights(model, ref_model=None) -> list[tuple[str, torch.Tensor]]:
    """The base model's parameters and buffers by name: `ref_model`'s, or `model`'s without its adapters."""
    source = unwrap_model(ref_model if ref_model is not None else model)
    skip = set() if ref_model is not None else _adapter_parameter_ids(source)
    named = [(n, p) for n, p in source.named_parameters() if id(p) not in skip]
    return named + list(source.named_buffers())


def static_blocker(trainer) -> str | None:
    """Why the cache cannot apply to this trainer whatever the data, or None."""
    try:
        import datasets  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        return "the cache is stored with the `datasets` package, which is not installed"
    if getattr(trainer, "ref_adapter_name", None) is not None:
        return "the reference is an adapter (ref_adapter_name), which the cache does not support yet"
    if trainer._overrides_regularized_loss():
        return f"{type(trainer).__name__} overrides compute_regularized_loss, which needs the base logits"
    unwrapped = unwrap_model(trainer.model)
    if _zero3(trainer):
        # The cache is keyed by a hash of the base weights, which a ZeRO-3 rank holds only a shard of (an empty
        # tensor per parameter): the key would not identify the model.
        return ("the model is partitioned by DeepSpeed ZeRO-3 (the cache's fingerprint needs the whole base "
                "weights)")
    heads, reason = step_heads(unwrapped, trainer.ref_model, trainer.options)
    if heads is None:
        return f"the fused-linear path is not available ({reason}); the cache stores hidden states, not logits"
    if trainer.ref_model is None:
        moving = trainable_base_parameters(unwrapped)
        if moving:
            return (f"{len(moving)} base-model parameters are trainable ({moving[0]}, ...): the base changes during "
                    "training (pass ref_model=)")
    if trainer.args.world_size > 1:
        return "several processes train (the cache is single-process for now)"
    return None


def _zero3(trainer) -> bool:
    """Whether the trainer trains under DeepSpeed ZeRO stage 3, or its models' parameters are partitioned already."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        config = getattr(plugin, "deepspeed_config", None) or {}
        if str(config.get("zero_optimization", {}).get("stage", getattr(plugin, "zero_stage", ""))) == "3":
            return True
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    return any(hasattr(p, "ds_id") for m in models for p in m.parameters())


class BasePrecompute:
    """The caches of one trainer and their use; see the module docstring."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.caches: dict = {}  # split -> BaseHiddenCache
        self._originals: dict = {}
        self._warned = False
        self._prefix = None  # the fingerprint's hash of the base model, shared by the splits of one `prepare`
        self.base_passes = 0  # batches the base model ran on to build caches (for tests and logs)

    @property
    def mode(self):
        return self.trainer.options.precompute_base

    def refuse_or_warn(self, reason: str) -> None:
        if self.mode is True:
            raise ValueError(f"precompute_base=True, but the base hidden-state cache cannot be used: {reason}. Use "
                             "precompute_base='auto' to run the base pass at every step instead")
        if not self._warned:
            self._warned = True
            warnings.warn(f"precompute_base='auto': the base pass runs at every step, because {reason}", UserWarning,
                          stacklevel=4)

    # -- before training -----------------------------------------------------------------------------------------

    def prepare(self, splits=("train", "eval")) -> None:
        """Find or build the caches of `splits` and key their datasets; no-op when precompute_base is False."""
        if self.mode is False:
            return
        self.restore()
        self._prefix = None  # the base model may have changed since the last call
        reason = static_blocker(self.trainer)
        if reason is not None:
            self.refuse_or_warn(reason)
            return
        trainer = self.trainer
        for split, attr, batch_attr in SPLITS:
            dataset = getattr(trainer, attr, None)
            if split not in splits or dataset is None:
                continue
            if isinstance(dataset, dict):
                self.refuse_or_warn(f"the {split} dataset is a dict of datasets (not supported by the cache)")
                continue
            try:
                self.caches[split] = self._cache_for(dataset, getattr(trainer.args, batch_attr), split)
                indexed = with_index(dataset)
            except CacheUnavailable as err:
                self.caches.pop(split, None)
                self.refuse_or_warn(str(err))
                continue
            self._originals[attr] = dataset
            setattr(trainer, attr, indexed)
        if self.caches and not isinstance(trainer.data_collator, IndexCollator):
            trainer.data_collator = IndexCollator(trainer.data_collator)

    def restore(self) -> None:
        """Put back the datasets without their index column (the caches stay available)."""
        for attr, dataset in self._originals.items():
            setattr(self.trainer, attr, dataset)
        self._originals = {}

    def _features_and_collate(self, dataset, split):
        """The examples as the Trainer's dataloader hands them to the collator, and that collator."""
        trainer = self.trainer
        collate = trainer.data_collator
        if isinstance(collate, IndexCollator):
            collate = collate.collator
        try:
            import datasets
        except ImportError:  # pragma: no cover - static_blocker refused already
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            if INDEX_KEY in dataset.column_names:
                dataset = dataset.remove_columns(INDEX_KEY)
            return trainer._remove_unused_columns(dataset, description=split), collate
        return dataset, trainer._get_collator_with_removed_columns(collate, description=split)

    def _base_rows(self, batch):
        trainer = self.trainer
        model = unwrap_model(trainer.model)
        heads, _ = step_heads(model, trainer.ref_model, trainer.options)
        batch = to_device(dict(batch), device_of(model))
        self.base_passes += 1
        return compute_base_rows(model, batch, heads[1], ref_model=trainer.ref_model, unwrapped=model,
                                 base_context=trainer.accelerator.autocast())

    def _fingerprint_prefix(self):
        """`fingerprint_prefix` of the base model: its weights and the facts about it, the same for every split."""
        trainer = self.trainer
        model = unwrap_model(trainer.model)
        base = trainer.ref_model if trainer.ref_model is not None else model
        config = transformers_model(base).config
        facts = {
            "config": config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config),
            "attn": str(getattr(config, "_attn_implementation", None)),
            "device": device_of(model).type,
            "mixed_precision": str(trainer.accelerator.mixed_precision),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
        }
        return fingerprint_prefix(weights=base_weights(model, trainer.ref_model), facts=facts)

    def _cache_for(self, dataset, batch_size, split):
        features, collate = self._features_and_collate(dataset, split)
        if isinstance(features, torch.utils.data.IterableDataset) or not hasattr(features, "__len__"):
            raise CacheUnavailable(f"the {split} dataset is not map-style, so its examples cannot be keyed")
        n = len(features)
        if n == 0:
            raise CacheUnavailable(f"the {split} dataset is empty")
        trainer = self.trainer
        if self._prefix is None:  # hashing every byte of the weights is the slow part: once per `prepare`
            self._prefix = self._fingerprint_prefix()
        iterate = features.iter(batch_size=1000) if hasattr(features, "iter") else (features[i] for i in range(n))
        fingerprint = fingerprint_from(self._prefix, examples=iterate, collate=collate,
                                       probe=[features[i] for i in range(min(4, n))])
        root = trainer.options.base_cache_dir or default_cache_dir()
        cache = load_cache(root, fingerprint, n)
        if cache is None:
            progress = not trainer.args.disable_tqdm
            cache = build_cache(cache_dir=root, fingerprint=fingerprint, features=features, collate=collate,
                                base_rows=self._base_rows, batch_size=max(1, batch_size), progress=progress,
                                description=f"base hidden states ({split})")
            try:
                check_layout(cache, features, collate, self._base_rows)
            except CacheUnavailable:
                cache.path.unlink(missing_ok=True)
                cache.path.with_suffix(".json").unlink(missing_ok=True)
                raise
        return cache

    # -- at each step --------------------------------------------------------------------------------------------

    def base_hidden(self, inputs: dict, indices, training: bool, heads) -> torch.Tensor | None:
        """The batch's cached base rows (N, d), or None: no cache for it, or (with "auto") a mismatch."""
        cache = self.caches.get("train" if training else "eval")
        if cache is None or indices is None or heads is None:
            return None
        target = shifted_labels(inputs)
        mask = target != -100
        ids = inputs.get("input_ids")
        try:
            if not isinstance(ids, torch.Tensor):
                raise CacheMismatch("the batch has no input_ids")
            return cache.rows(indices, ids[mask], target[mask])
        except CacheMismatch as err:
            if self.mode is True:
                raise RuntimeError(f"precompute_base=True: the base hidden-state cache does not match this batch "
                                   f"({err}); it is never used for a batch it does not match") from err
            self.refuse_or_warn(f"the cache does not match a batch ({err})")
            return None


def _version(name):
    try:
        import importlib.metadata as md

        return md.version(name)
    except Exception:  # noqa: BLE001
        return None
