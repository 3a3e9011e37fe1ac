#!/usr/bin/env bash
# Sets up a venv (created if missing) with torch and the build tools, then
# builds and installs confusion-kernels in editable mode with the extras given
# as arguments (e.g. `bash scripts/install.sh test`).
#
#   bash scripts/install.sh [--latest | --oldest] [EXTRA ...]
#
#   (default)  the tested set: every package at the version pinned in
#              constraints/tested.txt (reproducible)                -> .venv
#   --latest   the newest versions the registry offers, everything
#              upgraded (catches a new torch/Triton that breaks us) -> .venv-latest
#   --oldest   the oldest torch/Triton the package supports, pinned in
#              constraints/oldest.txt                               -> .venv-oldest
#
#   PYTHON=python3.11   interpreter for the venv (default: python3)
#   VENV=DIR            where the venv lives (default: as above)
# Build switches (CONFUSION_KERNELS_NO_CUDA, FORCE_CUDA, TORCH_CUDA_ARCH_LIST,
# MAX_JOBS, CUDA_HOME) are passed through to setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

mode=tested
case "${1:-}" in
  --latest) mode=latest; shift ;;
  --oldest) mode=oldest; shift ;;
  --*) echo "install.sh: unknown option $1 (expected --latest or --oldest)" >&2; exit 2 ;;
esac
case $mode in
  tested) VENV=${VENV:-.venv}; pins=(-c constraints/tested.txt) ;;
  latest) VENV=${VENV:-.venv-latest}; pins=(--upgrade --upgrade-strategy eager) ;;
  oldest) VENV=${VENV:-.venv-oldest}; pins=(-c constraints/oldest.txt) ;;
esac
extras=$(IFS=,; echo "$*")

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet "${pins[@]}")
# torch first: the extension builds against the installed torch (no build isolation).
"${pip[@]}" torch numpy ninja "setuptools>=77" wheel
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"${pip[@]}" --no-build-isolation -e ".${extras:+[$extras]}"
"$VENV/bin/python" - <<'EOF'
import torch, confusion_kernels as ck
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"confusion_kernels {ck.__version__} (torch {torch.__version__}, triton {triton_version}); "
      f"backends: {ck.available_backends()}")
EOF
