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
