"""The installed package: public names, the kernels' home, the console script."""

import subprocess
import sys

import kl_nontarget


def test_public_api_is_exported():
    for name in kl_nontarget.__all__:
        assert callable(getattr(kl_nontarget, name)), name


def test_kernels_ship_inside_the_package_only(tmp_path):
    # Run from an empty folder, so the repository's own kernels/ folder is not on the path.
    # "kernels" is another PyPI project's name: this package must never install a top-level module of that name.
    code = ("import importlib.util as u; "
            "print(u.find_spec('kl_nontarget.kernels.nontarget_ce') is not None, u.find_spec('kernels') is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.split() == ["True", "True"]


def test_importing_the_loss_does_not_import_transformers():
    code = "import sys, kl_nontarget; kl_nontarget.nontarget_kl_loss; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_console_script_prints_help():
    out = subprocess.run(["kl-nontarget", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "kl-nontarget" in out.stdout


# The module map of docs/design.md ("Architecture"): a module may import only modules of a lower level. The demo may
# import anything of the library (and itself); only the command line imports the demo.
LEVELS = {
    "options": 0, "distributed": 0, "kernels": 0, "models": 0,
    "torch_impl": 1, "triton_impl": 1, "config": 1,
    "plumbing": 2,
    "loss": 3, "linear": 3,
    "base_model": 4, "batching": 4,
    "lm_head": 5, "ref_adapter": 5, "integrations": 5,
    "batch": 6,
    "batch_loss": 7, "components": 7, "metrics": 7, "adaptive": 7, "base_cache": 7,
    "hook": 8, "retention": 8, "precompute": 8,
    "trainer": 9,
    "trl": 10, "callbacks": 10,
    "sweep": 11,
    "demo": 12,
    "sft_data": 13, "sft_launch": 14,
    "sft_cli": 15, "sweep_cli": 16,
    "cli": 17,
}


def _imported_modules(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.ImportFrom) and node.module == "kl_nontarget":  # from kl_nontarget import torch_impl
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kl_nontarget."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kl_nontarget."):
                    yield alias.name.split(".")[1]


def test_modules_import_only_downwards():
    from pathlib import Path

    package = Path(kl_nontarget.__file__).parent
    modules = {p.stem: p for p in package.glob("*.py") if p.stem != "__init__"}
    assert set(modules) <= set(LEVELS), f"add {sorted(set(modules) - set(LEVELS))} to LEVELS and docs/design.md"
    files = [(name, path) for name, path in modules.items()]
    files += [("demo", path) for path in (package / "demo").glob("*.py")]
    files += [("sweep", path) for path in (package / "sweep").glob("*.py")]
    upward = []
    for name, path in files:
        for target in _imported_modules(path):
            if target not in LEVELS:
                continue
            if LEVELS[target] >= LEVELS[name] and not (name == target and name in ("demo", "sweep")):
                upward.append(f"{path.relative_to(package)} imports kl_nontarget.{target}")
    assert not upward, upward
