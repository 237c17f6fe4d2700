#!/usr/bin/env bash
# Creates .venv and installs bertprep into it, with optional extras: scripts/install.sh [test|bench|test,bench]
# torch comes first: the CUDA build from PyPI where an NVIDIA driver is present, the CPU build elsewhere
# (a plain `pip install torch` on a CPU-only machine downloads several GB of CUDA libraries it never uses).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip_install "torch>=2.4"
  else
    # A local wheelhouse or mirror may carry the CPU build; otherwise PyTorch's own CPU index does.
    pip_install "torch==2.13.0+cpu" 2>/dev/null ||
      pip_install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip_install -e ".${extras:+[$extras]}"
