import importlib.metadata
import os

import pytest


def _has_axolotl() -> bool:
    # The installed distribution, not find_spec("axolotl"): tests/axolotl/ itself would pass for a namespace package.
    try:
        importlib.metadata.distribution("axolotl")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# tests/axolotl/ runs in axolotl's own environment (its pins conflict with this package's; tests/axolotl/run.sh).
collect_ignore = [] if _has_axolotl() else ["axolotl"]

# Triton's interpreter must be on before triton is first imported: the kernels then run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`-n 2`, the CI command) each worker has one core: one thread each, or two workers' thread pools
# oversubscribe the cores and every torch op slows down many times. Set before torch is first imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
_INTERPRET = os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True)
def _environment_kept():
    """Fails the test that changes TRITON_INTERPRET for the rest of the run (every later Triton test would fail)."""
    yield
    assert os.environ.get("TRITON_INTERPRET") == _INTERPRET, "this test changed TRITON_INTERPRET and did not restore it"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Saved tiny models (`llama`, `gemma2`: soft-capped) and a tokenizer (`tokenizer`), built once per run."""
    from tiny_models import tiny_llama, tiny_softcapped, tiny_tokenizer

    root = tmp_path_factory.mktemp("models")
    tiny_llama(root / "llama")
    tiny_softcapped(root / "gemma2")
    tiny_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def model_folder(model_dirs, tmp_path_factory):
    """A checkpoint folder as a user has one: the tiny Llama with its tokenizer (and chat template)."""
    import shutil

    from tiny_models import tiny_tokenizer

    folder = tmp_path_factory.mktemp("checkpoint") / "tiny-llama"
    shutil.copytree(model_dirs / "llama", folder)
    tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models on shared cores run far slower with thread oversubscription."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def base_rows_counter(monkeypatch):
    """Counts the base passes ("calls") and the sequences they run on ("rows"): every base pass goes through
    kl_nontarget.training.batch_rows.base_forward."""
    import kl_nontarget.training.batch_rows as batch_module

    seen = {"rows": 0, "calls": 0}
    original = batch_module.base_forward

    def counting(model, kwargs, **kw):
        seen["calls"] += 1
        seen["rows"] += int(kwargs["input_ids"].shape[0])
        return original(model, kwargs, **kw)

    monkeypatch.setattr(batch_module, "base_forward", counting)
    return seen
