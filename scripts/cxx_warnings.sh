#!/usr/bin/env bash
# Our C++ sources (csrc/ops.cpp, csrc/cpu/*.cpp, and the host side of csrc/cuda/*.cpp where
# a CUDA toolkit is present; then csrc/cuda/*.cu with nvcc) compiled with -Wall -Wextra
# -Werror (the .cpp syntax only): torch's and
# Python's headers are system headers here (-isystem), so what fails is our code, not
# theirs (the extension's own build passes torch's headers with -I, where they warn).
#   PYTHON=.venv/bin/python bash scripts/cxx_warnings.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CXX=${CXX:-g++}
std=$($PY -c "import torch; print('c++20' if tuple(int(v) for v in torch.__version__.split('.')[:2]) >= (2, 10) else 'c++17')")
torch_inc=$($PY -c "import torch.utils.cpp_extension as c; print(' '.join('-isystem ' + p for p in c.include_paths()))" 2>/dev/null)
py_inc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cuda_home=${CUDA_HOME:-/usr/local/cuda}
flags=(-std=$std -fsyntax-only -Wall -Wextra -Werror -fopenmp -isystem "$py_inc" -Icsrc/include)
files=(csrc/ops.cpp csrc/cpu/*.cpp)
if [ -f "$cuda_home/include/cuda_runtime.h" ] && $PY -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  files+=(csrc/cuda/*.cpp)
  flags+=(-isystem "$cuda_home/include" -Icsrc/cuda)
fi
fail=0
for f in "${files[@]}"; do
  if ! out=$($CXX "${flags[@]}" $torch_inc "$f" 2>&1); then
    echo "FAIL $f"; echo "$out" | grep -E "error|warning" | head -20; fail=1
  fi
done
[ $fail = 0 ] && echo "cxx_warnings: ${#files[@]} sources clean under -Wall -Wextra (-std=$std)"
# The .cu files: nvcc for one architecture (its front end and the host compiler see the same
# code for every one), nvcc's own warnings and the host compiler's -Wall -Wextra as errors.
nvcc=$cuda_home/bin/nvcc
[ -x "$nvcc" ] || nvcc=$(command -v nvcc || true)
if [ -n "$nvcc" ] && [ -f "$cuda_home/include/cuda_runtime.h" ] \
    && $PY -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  cu_files=(csrc/cuda/*.cu)
  out_dir=$(mktemp -d)
  for f in "${cu_files[@]}"; do
    if ! out=$("$nvcc" -std=$std -c "$f" -o "$out_dir/$(basename "$f").o" \
        -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -O3 \
        -Xcompiler=-fPIC,-Wall,-Wextra -Werror=all-warnings $torch_inc -isystem "$py_inc" \
        -Icsrc/include -Icsrc/cuda 2>&1); then
      echo "FAIL $f"; echo "$out" | grep -E "error|warning" | head -20; fail=1
    fi
  done
  rm -rf "$out_dir"
  [ $fail = 0 ] && echo "cxx_warnings: ${#cu_files[@]} .cu sources clean under nvcc -Werror=all-warnings, -Wall -Wextra"
fi
exit $fail
