"""The installed package: public names, the kernels' home, the console script."""

import subprocess
import sys
from pathlib import Path

import kl_nontarget


def test_public_api_is_exported():
    for name in kl_nontarget.__all__:
        assert callable(getattr(kl_nontarget, name)), name


def test_kernels_ship_inside_the_package_only(tmp_path):
    # Run from an empty folder, so the repository's own kernels/ folder is not on the path.
    # "kernels" is another PyPI project's name: this package must never install a top-level module of that name.
    # A PyPI `kernels` that something else installed (transformers >= 5.25 requires it) is fine; one from here is not.
    code = ("import importlib.util as u, pathlib, sys; s = u.find_spec('kernels'); "
            "print(u.find_spec('kl_nontarget.kernels.nontarget_ce') is not None, "
            "s is None or not pathlib.Path(s.origin).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve()))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.split() == ["True", "True"]


def test_importing_the_loss_does_not_import_transformers():
    code = "import sys, kl_nontarget; kl_nontarget.nontarget_kl_loss; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_console_script_prints_help():
    out = subprocess.run(["kl-nontarget", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "kl-nontarget" in out.stdout


# The layers of docs/design.md ("Architecture"), bottom to top: a module may import any module of a lower layer, and
# of its own folder only the modules listed before it (a folder's `__init__` and `__main__` come last). Folders on the
# same layer never import each other (training and evaluation). The kernels (repository folder kernels/) import
# nothing of the package.
LAYERS = {"kernels": 0, "ops": 1, "models": 2, "training": 3, "evaluation": 3, "integrations": 4, "sweep": 5,
          "lab": 6, "demo": 6, "cli": 7}
ORDER = {
    "ops": ["checks", "torch_rows", "triton_rows", "params", "logits_loss", "linear_loss"],
    "models": ["introspection", "architectures", "loading", "base_pass", "reference", "lm_head"],
    "training": ["options", "clean_exit", "component_log", "trainer_args", "config", "adaptive_weight", "batch_rows",
                 "step_loss", "base_cache", "precompute", "loss_func", "trainer"],
    "evaluation": ["loader", "metrics", "retention", "forgetting_callback"],
    "integrations": ["trl", "axolotl_args", "axolotl"],
    "sweep": ["progress", "variants", "report", "plot", "runs", "grid"],
    "lab": ["sequence", "power_law"],
    "demo": ["corpus", "config", "people", "tasks", "generation", "samples", "probes", "base", "runner", "pretrained"],
    "cli": ["sft_data", "sft_launch", "sft", "experiment", "sweep", "sequence", "powerlaw", "demo", "evaluate"],
}


def _imported_modules(source: str, folders: dict[str, set[str]]):
    """(folder, module) of every kl_nontarget import in `source`; module "__init__" for a folder itself."""
    import ast

    def named(folder, name):
        return (folder, name if name in folders.get(folder, ()) else "__init__")

    for node in ast.walk(ast.parse(source)):  # function-level (lazy) imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kl_nontarget":
            parts = node.module.split(".")[1:]
            if not parts:  # from kl_nontarget import ops
                yield from (named(alias.name, "__init__") for alias in node.names)
            elif len(parts) == 1:  # from kl_nontarget.ops import torch_rows (a module) or a name of ops/__init__
                yield from (named(parts[0], alias.name) for alias in node.names)
            else:
                yield named(parts[0], parts[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")[1:]
                if alias.name.startswith("kl_nontarget.") and parts:
                    yield named(parts[0], parts[1] if len(parts) > 1 else "__init__")


def _rank(folder, module):
    order = ORDER[folder] + ["__init__", "__main__"]
    return order.index(module)


def upward_imports(modules: dict[tuple[str, str], str]) -> list[str]:
    """The imports among `modules` ((folder, module) -> source) that break the layering, as readable lines."""
    folders = {}
    for folder, module in modules:
        folders.setdefault(folder, set()).add(module)
    folders["kernels"] = {"nontarget_ce"}
    bad = []
    for (folder, module), source in modules.items():
        for target_folder, target in _imported_modules(source, folders):
            if target_folder == folder:
                ok = _rank(folder, target) < _rank(folder, module)
            else:
                ok = LAYERS[target_folder] < LAYERS[folder]
            if not ok:
                bad.append(f"{folder}/{module} imports {target_folder}/{target}")
    return bad


def _package_modules():
    from pathlib import Path

    package = Path(kl_nontarget.__file__).parent
    return {(path.parent.name, path.stem): path.read_text() for path in package.glob("*/*.py")}


def test_every_module_sits_in_a_layer_folder():
    from pathlib import Path

    package = Path(kl_nontarget.__file__).parent
    assert sorted(p.name for p in package.glob("*.py")) == ["__init__.py"]
    modules = _package_modules()
    assert {folder for folder, _ in modules} == set(ORDER)
    unlisted = sorted(f"{f}/{m}" for f, m in modules if m not in ("__init__", "__main__") and m not in ORDER[f])
    assert not unlisted, f"add {unlisted} to ORDER and to docs/design.md"


def test_modules_import_only_downwards():
    assert not upward_imports(_package_modules())


def test_a_planted_upward_import_is_caught():
    modules = _package_modules()
    for module, line in [(("ops", "checks"), "from kl_nontarget.training.options import RegularizerOptions"),
                         (("models", "introspection"), "from kl_nontarget.models import lm_head"),
                         (("training", "options"), "import kl_nontarget.evaluation.metrics"),
                         (("evaluation", "loader"), "from kl_nontarget.cli import main")]:
        # A lazy import inside a function counts as much as one at the top.
        planted = {**modules, module: modules[module] + f"\n\ndef _planted():\n    {line}\n"}
        assert len(upward_imports(planted)) == 1, line
