#!/usr/bin/env bash
# Installs confusion-kernels as a user would, with pip's defaults, and checks what they get
# (CI runs this after the pinned stage; issue: "install like any Python package"):
#   1. an sdist, and a wheel built from it with pip's defaults (build isolation: only
#      setuptools and wheel are fetched for the build, never torch): the wheel is pure Python
#      plus the C++ / CUDA sources, with LICENSE and py.typed;
#   2. a fresh venv that already has torch (the pinned venv's packages, seen through a .pth
#      file), into which the sdist installs with --no-index (only setuptools and wheel are
#      offered, which a new venv's own old setuptools needs next to torch): torch's version
#      and location are the same afterwards, so no second torch came in;
#   3. from outside the checkout: the first import compiles the kernels against that torch
#      (one line on stderr, into a fresh cache), every available backend runs a small batch
#      and matches the reference; a second process loads the cached build without compiling;
#   4. the wheel in a second fresh venv: its first import finds the same cached build.
#   PYTHON=.venv/bin/python bash scripts/check_install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
ROOT=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the smoke builds the CPU kernels only (the CUDA sources compile in CI's pinned build)
unset FORCE_CUDA
export CONFUSION_KERNELS_NO_CUDA=1 CONFUSION_KERNELS_CACHE="$work/cache" PIP_NO_CACHE_DIR=1
step() { echo "--- check_install: $1"; }

step "sdist, then a wheel from it with pip's defaults (offline but for setuptools and wheel)"
$PY -m pip download --quiet -d "$work/build-reqs" "setuptools>=77" wheel
$PY setup.py -q sdist -d "$work/dist" > "$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/*.tar.gz)
$PY -m pip wheel --quiet --no-deps --no-index --find-links "$work/build-reqs" -w "$work/dist" "$sdist"
wheel=$(ls "$work"/dist/*.whl)
$PY - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["confusion_kernels/_csrc/ops.cpp", "confusion_kernels/_csrc/include/confusion_kernels/spec.h",
        "confusion_kernels/_build.py", "confusion_kernels/py.typed"]
missing = [n for n in need if n not in names]
assert not missing, missing
assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names), "no LICENSE"
assert not any(n.endswith(".so") for n in names), [n for n in names if n.endswith(".so")]
print(f"wheel: {len(names)} files, the sources included, no compiled code")
EOF

site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
torch_before=$($PY -c "import torch; print(torch.__version__, torch.__file__)")
fresh_venv() {  # a new venv whose interpreter also sees the pinned venv's packages (torch)
  python3 -m venv "$1"
  "$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
    | xargs -I{} sh -c "echo '$site' > {}/pinned-packages.pth"
}

step "the sdist into a fresh venv that has torch, with pip's defaults and no index"
fresh_venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --no-index --find-links "$work/build-reqs" "$sdist"
torch_after=$("$work/venv/bin/python" -c "import torch; print(torch.__version__, torch.__file__)")
[ "$torch_before" = "$torch_after" ] || { echo "torch changed: $torch_before -> $torch_after"; exit 1; }
echo "torch untouched: $torch_after"

smoke='
import sys, torch, confusion_kernels as ck
from confusion_kernels import _extension
assert "site-packages" in ck.__file__, ck.__file__  # the installed copy, not the checkout
assert "cpu" in ck.available_backends(), _extension.IMPORT_ERROR
g = torch.Generator().manual_seed(0)
x = torch.randn(37, 12, generator=g, dtype=torch.float64)
y = torch.randint(0, 4, (37,), generator=g)
want = ck.as_loss(x, y, backend="reference")
for backend in ck.available_backends():
    got = ck.as_loss(x, y, backend=backend)
    assert abs(got - want) <= 1e-9 * abs(want), (backend, got, want)
print("backends", ck.available_backends(), "ok;", _extension.HOW_BUILT)
'
step "first import outside the checkout: builds against the installed torch"
(cd "$work" && "$work/venv/bin/python" -c "$smoke" 2> "$work/first.err") || { cat "$work/first.err"; exit 1; }
echo "its stderr:"; cat "$work/first.err"
grep -q "confusion_kernels: building the C++ kernels for torch" "$work/first.err" \
  || { echo "no build message"; exit 1; }
step "second import: the cached build, nothing compiled"
out=$(cd "$work" && "$work/venv/bin/python" -c "$smoke" 2> "$work/second.err")
echo "$out"
if grep -q "building" "$work/second.err" || [[ "$out" == *"just now"* ]]; then
  echo "the second import built again"; cat "$work/second.err"; exit 1
fi
(cd "$work" && "$work/venv/bin/python" -m confusion_kernels info | head -4)

step "the wheel into another fresh venv: the same cached build"
fresh_venv "$work/venv2"
"$work/venv2/bin/python" -m pip install --quiet --no-index --find-links "$work/build-reqs" "$wheel"
torch_after=$("$work/venv2/bin/python" -c "import torch; print(torch.__version__, torch.__file__)")
[ "$torch_before" = "$torch_after" ] || { echo "torch changed: $torch_before -> $torch_after"; exit 1; }
out=$(cd "$work" && "$work/venv2/bin/python" -c "$smoke" 2> "$work/third.err")
echo "$out"
if grep -q "building" "$work/third.err"; then echo "the wheel built again"; exit 1; fi
cd "$ROOT"
echo "check_install: ok"
