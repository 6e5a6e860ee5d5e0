"""What `kl-nontarget sft` trains on: the model path and the datasets, resolved and checked before anything is written.

- Models: a local checkpoint folder, a hub name, or (through `kl_nontarget.models.loading` where installed) a GGUF file
  or the name `smollm2` (`resolve_model_path`).
- Datasets: a hub name, a folder (saved with `save_to_disk`, or holding data files), or a local `.jsonl`/`.json`/
  `.parquet`/`.csv` file (`load_data`); TRL's `datasets:` mixture from a config file; every dataset must have a
  column SFTTrainer can train on (`check_columns`).
- With neither a model nor a dataset: the demo's self-made base model and its `shifted` task (`default_task`).

Every problem with the input is an `InputError` with a message that names it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["InputError", "DATA_FILE_TYPES", "model_forms", "resolve_model_path", "load_data", "load_datasets",
           "check_columns", "default_task"]

# suffix -> the `datasets` builder that reads it
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class InputError(Exception):
    """Bad input to `kl-nontarget sft`: the command prints the message and exits with code 2."""


def _looks_like_path(spec: str) -> bool:
    # Hub names look like "org/name"; these can only be local paths.
    return spec.startswith(("/", "./", "../", "~", ".\\")) or Path(spec).suffix.lower() in (*DATA_FILE_TYPES, ".gguf")


def model_forms() -> str:
    """The model specs this installation takes, for messages."""
    try:
        import kl_nontarget.models.loading  # noqa: F401
    except ImportError:
        return "a checkpoint folder or a hub name"
    return "a checkpoint folder, a .gguf file, the name smollm2 or a hub name"


def resolve_model_path(spec: str, cache_dir=None, log=print) -> str:
    """A path or hub name `from_pretrained` can load: `kl_nontarget.models.loading.resolve_model(spec)` where that
    module exists (GGUF files, `smollm2`), else `spec` itself. InputError for a local path that does not exist or is not
    a checkpoint."""
    try:
        from kl_nontarget.models.loading import resolve_model
    except ImportError:
        resolved = spec
    else:
        try:
            resolved = str(resolve_model(spec, cache_dir=cache_dir, log=log))
        except (FileNotFoundError, ModuleNotFoundError, ValueError) as err:
            raise InputError(str(err)) from None
    path = Path(resolved).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{spec}: not a model checkpoint folder (no config.json)")
        return str(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":  # resolve_model turns GGUF files into checkpoint folders
            raise InputError(f"{spec}: GGUF files need kl_nontarget.models.loading, which this installation lacks")
        raise InputError(f"{spec}: a file, not a model (pass {model_forms()})")
    if _looks_like_path(resolved):
        raise InputError(f"no such model folder or file: {spec}")
    return resolved  # a hub name


def load_data(spec: str, config_name: str | None = None, streaming: bool = False):
    """A `DatasetDict` (or `Dataset`) from a local data file, a folder or a hub name; InputError when unreadable."""
    from datasets import load_dataset, load_from_disk

    path = Path(spec).expanduser()
    try:
        if path.is_file():
            builder = DATA_FILE_TYPES.get(path.suffix.lower())
            if builder is None:
                raise InputError(f"{spec}: unsupported data file type {path.suffix!r} (use "
                                 f"{', '.join(DATA_FILE_TYPES)}, a dataset folder or a hub name)")
            return load_dataset(builder, data_files=str(path), streaming=streaming)
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return load_from_disk(str(path))  # saved with save_to_disk
            return load_dataset(str(path), name=config_name, streaming=streaming)
        if _looks_like_path(spec):
            raise InputError(f"no such data file or folder: {spec}")
        return load_dataset(spec, name=config_name, streaming=streaming)
    except InputError:
        raise
    except Exception as err:  # datasets raises many kinds (not found, malformed file, no network): one message
        raise InputError(f"cannot load the dataset {spec!r}: {type(err).__name__}: {err}") from None


def _split(data, split: str, spec: str, option: str):
    if not hasattr(data, "keys"):  # a single Dataset (save_to_disk of one split)
        return data
    if split not in data:
        raise InputError(f"{spec} has no split {split!r} (it has {', '.join(data)}); pass --{option}")
    return data[split]


def check_columns(dataset, text_field: str, what: str) -> None:
    """InputError unless `dataset` has a column SFTTrainer trains on (or it holds no examples)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # a streamed dataset may not know its columns before reading
        return
    columns = set(columns)
    if text_field in columns or "messages" in columns or {"prompt", "completion"} <= columns \
            or "input_ids" in columns:
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise InputError(f"{what} holds no examples")
        return
    hint = " ('prompt' needs a 'completion' column)" if "prompt" in columns else ""
    raise InputError(f"{what} has no column to train on{hint}: SFT needs '{text_field}' (text; set "
                     f"--dataset_text_field for another name), 'messages' (conversations), 'prompt' and 'completion', "
                     f"or 'input_ids' (tokenized); it has {', '.join(sorted(columns)) or 'no columns'}")


def load_datasets(script, mixture, *, text_field: str = "text", want_eval: bool = False):
    """(train, eval or None) from the script arguments (`dataset_name`, splits, `eval_dataset`) or a TRL mixture.

    The evaluation set is `eval_dataset` when given, else the test split of the training data when `want_eval`.
    """
    if mixture.datasets:  # as `trl sft`: a `datasets:` list in the config file wins over dataset_name
        from trl import get_dataset

        try:
            data = get_dataset(mixture)
        except Exception as err:
            raise InputError(f"cannot load the `datasets:` mixture: {type(err).__name__}: {err}") from None
        source = "the `datasets:` mixture"
    else:
        data = load_data(script.dataset_name, script.dataset_config, script.dataset_streaming)
        source = script.dataset_name
    train = _split(data, script.dataset_train_split, source, "dataset_train_split")
    check_columns(train, text_field, f"the training data ({source})")
    evaluation = None
    if script.eval_dataset is not None:
        extra = load_data(script.eval_dataset, None, script.dataset_streaming)
        # A file loads as a "train" split; a hub dataset or folder is read at its test split when it has one.
        split = script.dataset_test_split if hasattr(extra, "keys") and script.dataset_test_split in extra else "train"
        evaluation = _split(extra, split, script.eval_dataset, "dataset_test_split")
        check_columns(evaluation, text_field, f"the evaluation data ({script.eval_dataset})")
    elif want_eval:
        if not hasattr(data, "keys") or script.dataset_test_split not in data:
            raise InputError(f"eval_strategy is set but {source} has no split {script.dataset_test_split!r}: pass "
                             "--eval_dataset FILE or --dataset_test_split, or --eval_strategy no")
        evaluation = data[script.dataset_test_split]
        check_columns(evaluation, text_field, f"the evaluation data ({source})")
    return train, evaluation


def default_task(cache_dir=None, log=print, task: str = "shifted"):
    """(model path, train, eval) of the embedded default: the quick demo's base model (pretrained on first use and
    cached, like `kl-nontarget demo --quick`) and one of its tasks (`shifted`, or `near`) as prompt/completion
    text."""
    from datasets import Dataset

    from kl_nontarget.demo.base import load_or_pretrain
    from kl_nontarget.demo.config import quick_config
    from kl_nontarget.demo.tasks import task_examples

    cfg = quick_config()
    _model, _tokenizer, grammar, path, _cached = load_or_pretrain(cfg.base, cfg.base_seed, cache_dir=cache_dir,
                                                                  log=log)
    examples = task_examples(grammar, task, cfg.sizes, seed=0)

    def rows(split):
        return Dataset.from_list([{"prompt": " ".join(prompt), "completion": " " + " ".join(answer)}
                                  for prompt, answer in examples[split]])

    return str(path), rows("train"), rows("val")
