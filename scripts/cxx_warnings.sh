#!/usr/bin/env bash
# Our C++ sources (csrc/ops.cpp, csrc/cpu/*.cpp, and the host side of csrc/cuda/*.cpp where
# a CUDA toolkit is present; then csrc/cuda/*.cu with nvcc) compiled with -Wall -Wextra
# -Werror (the .cpp syntax only): torch's and
# Python's headers are system headers here (-isystem), so what fails is our code, not
# theirs (the extension's own build passes torch's headers with -I, where they warn).
# The sources compile JOBS at a time (default: the number of cores).
#   PYTHON=.venv/bin/python [JOBS=2] bash scripts/cxx_warnings.sh
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
# Each source is its own compiler process, JOBS (default: the cores) at a time; a failing
# source prints its errors and warnings under a FAIL line and leaves a mark in $marks.
JOBS=${JOBS:-$(nproc)}
marks=$(mktemp -d)
trap 'rm -rf "$marks"' EXIT
check() {  # check NAME COMMAND...: runs the command, reports and marks NAME if it fails
  local name=$1 out
  shift
  if ! out=$("$@" 2>&1); then
    printf 'FAIL %s\n%s\n' "$name" "$(echo "$out" | grep -E "error|warning" | head -20)"
    touch "$marks/${name//\//_}.failed"
  fi
}
run_parallel() {  # run_parallel CHECKER FILE...: CHECKER FILE for each, JOBS at a time
  local checker=$1 f
  shift
  for f in "$@"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    "$checker" "$f" &
  done
  wait
}
failed() { compgen -G "$marks/*.failed" > /dev/null; }
check_cpp() { check "$1" $CXX "${flags[@]}" $torch_inc "$1"; }
run_parallel check_cpp "${files[@]}"
fail=0
failed && fail=1
[ $fail = 0 ] && echo "cxx_warnings: ${#files[@]} sources clean under -Wall -Wextra (-std=$std)"
# The .cu files: nvcc for one architecture (its front end and the host compiler see the same
# code for every one), nvcc's own warnings and the host compiler's -Wall -Wextra as errors.
nvcc=$cuda_home/bin/nvcc
[ -x "$nvcc" ] || nvcc=$(command -v nvcc || true)
if [ -n "$nvcc" ] && [ -f "$cuda_home/include/cuda_runtime.h" ] \
    && $PY -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  cu_files=(csrc/cuda/*.cu)
  out_dir=$(mktemp -d)
  check_cu() {
    check "$1" "$nvcc" -std=$std -c "$1" -o "$out_dir/$(basename "$1").o" \
      -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -O3 \
      -Xcompiler=-fPIC,-Wall,-Wextra -Werror=all-warnings $torch_inc -isystem "$py_inc" \
      -Icsrc/include -Icsrc/cuda
  }
  run_parallel check_cu "${cu_files[@]}"
  rm -rf "$out_dir"
  failed && fail=1
  [ $fail = 0 ] && echo "cxx_warnings: ${#cu_files[@]} .cu sources clean under nvcc -Werror=all-warnings, -Wall -Wextra"
fi
exit $fail
