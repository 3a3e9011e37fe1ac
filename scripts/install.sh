#!/usr/bin/env bash
# Sets up .venv (created if missing) with torch and the build tools, then
# builds and installs confusion-kernels in editable mode with the extras given
# as arguments (e.g. `bash scripts/install.sh test`).
#
#   PYTHON=python3.11   interpreter for the venv (default: python3)
#   VENV=.venv          where the venv lives
# Build switches (CONFUSION_KERNELS_NO_CUDA, FORCE_CUDA, TORCH_CUDA_ARCH_LIST,
# MAX_JOBS, CUDA_HOME) are passed through to setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
extras=$(IFS=,; echo "$*")
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch first: the extension builds against the installed torch (no build isolation).
"$VENV/bin/python" -m pip install --quiet "torch>=2.4" numpy ninja "setuptools>=64" wheel
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$VENV/bin/python" -m pip install --quiet --no-build-isolation -e ".${extras:+[$extras]}"
"$VENV/bin/python" -c "import confusion_kernels as ck; print('confusion_kernels', ck.__version__, 'backends:', ck.available_backends())"
