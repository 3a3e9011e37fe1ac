#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no network): pykeops for the KeOps
# column of the GPU benchmark, with keopscore and pybind11. Run here, then
# pass `carry: ["benchmarks/wheels"]` to the device call; gpu_routine.sh
# installs whatever lies in benchmarks/wheels/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p benchmarks/wheels
$PY -m pip wheel --no-deps -w benchmarks/wheels pykeops keopscore pybind11
ls -la benchmarks/wheels
