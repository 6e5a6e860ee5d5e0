"""The axolotl tests' setup: they run only where axolotl is installed (its own environment, `.venv-axolotl`, which
tests/axolotl/run.sh builds); elsewhere tests/conftest.py leaves this folder out of the collection.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest

# Before axolotl (and huggingface_hub, which reads them at import): no hub, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
try:  # the installed distribution: this folder itself would pass for a namespace package `axolotl`
    importlib.metadata.distribution("axolotl")
except importlib.metadata.PackageNotFoundError:
    collect_ignore_glob = ["test_*.py"]

@pytest.fixture(scope="session")
def axolotl_dir(tmp_path_factory):
    """A temp folder with `model/` (the tiny Llama and its tokenizer) and `data.jsonl` (alpaca rows)."""
    from axolotl_runs import alpaca_rows
    from tiny_models import tiny_llama, tiny_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("axolotl")
    tiny_llama(root / "model")
    tiny_tokenizer(root / "model")
    write_jsonl(root / "data.jsonl", alpaca_rows())
    return root
