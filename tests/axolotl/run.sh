#!/usr/bin/env bash
# The axolotl plugin's tests (tests/axolotl/) in axolotl's own environment, .venv-axolotl: axolotl 0.19.0 pins
# transformers 5.16.1, trl 1.9 and peft 0.20, which conflict with this package's tested stack in .venv, so it gets a
# virtual environment of its own, with this package installed into it without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-axolotl
.venv-axolotl/bin/pip install -q torch==2.13.0
.venv-axolotl/bin/pip install -q axolotl==0.19.0 pytest
.venv-axolotl/bin/pip install -q --no-deps -e .
# .venv-axolotl/bin/pytest, not python -m pytest: the root folder on sys.path would make kernels/ (shipped as
# kl_nontarget.kernels) shadow the PyPI package `kernels`, which transformers imports when it is installed.
HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 .venv-axolotl/bin/pytest -q tests/axolotl
