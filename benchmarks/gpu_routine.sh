#!/usr/bin/env bash
# The whole GPU routine in one call: build the extension, run the test suite on
# the GPU, run compute-sanitizer (memcheck, racecheck) on the CUDA tests, run
# the GPU benchmark. Results land in $OUT (default benchmarks/out/gpu), packed
# into results.tar.gz plus the benchmark table and a summary.
#
#   bash benchmarks/gpu_routine.sh [build] [test] [test-fast] [sanitize] [bench] [bench-grid]
#                                  [bench-asloss] [bench-affinity] [bench-stats] [bench-large]
#                                  [bench-ncl] [bench-suite]
#   (no stage: build test-fast sanitize bench; run bench-asloss in a call of its own)
# test: the whole suite (longer than one 10-minute device call: split it);
# test-fast: the CUDA-specific files; bench: the headline cases (N up to
# 65536, D 2 and 128, euclidean, fwd/bwd/full, every implementation);
# bench-grid: the full GPU grid with cases predicted over 20 s skipped.
# bench-asloss: the one-pass ASLoss (Triton) at N = 16384, 65536, D = 128 (tf32).
# bench-ncl: the N-Centroids loss (cuda, triton, eager, compile, reference) at N = 65536,
# K = 1000 and 10000, D = 128, random and clustered.
# bench-suite: benchmarks/run.py --suite gpu (every op side by side; CSV, Markdown, PNG).
# KeOps: run benchmarks/fetch_wheels.sh where there is network and carry
# benchmarks/wheels; the build stage installs them.
# The device machine gets no .git: pass the commit as CK_COMMIT=<sha> so the
# results name it, e.g. `CK_COMMIT=abc1234 bash benchmarks/gpu_routine.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs"
stages=${*:-build test-fast sanitize bench}
summary="$OUT/summary.txt"
note() { echo "== $*" | tee -a "$summary"; }
has() { [[ " $stages " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1

export CK_COMMIT=${CK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
note "start $(date -u +%FT%TZ) commit $CK_COMMIT stages: $stages"
nvidia-smi > "$OUT/logs/nvidia-smi.txt" 2>&1
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())" | tee -a "$summary"
nvcc --version | tail -1 | tee -a "$summary"

so_name=$($PY -c "import sysconfig; print('_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
if has build && [ -f "confusion_kernels/$so_name" ] && \
   PYTHONPATH=$PWD $PY -c "import confusion_kernels as ck, sys; sys.exit('cuda' not in ck.available_backends('cuda'))"; then
  # a carried build from an earlier call of this session (see the end of the build stage)
  export PYTHONPATH=$PWD
  note "build: using the carried confusion_kernels/$so_name"
elif has build; then
  start=$SECONDS
  if MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/logs/build.log" 2>&1; then
    note "build ok in $((SECONDS - start)) s"
  else
    note "build FAILED"; tail -40 "$OUT/logs/build.log"; exit 1
  fi
  # the device machine keeps nothing between cold starts: send the build back so a later
  # call can carry it (gunzip into confusion_kernels/ here, carry that path)
  gzip -c "confusion_kernels/$so_name" > "$OUT/$so_name.gz"
fi
if has build; then  # built or carried: the extension's backends, then the KeOps wheels
  $PY -c "import confusion_kernels as ck, torch; print('backends on cuda:', ck.available_backends('cuda'))" | tee -a "$summary"
  if ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
    for w in pybind11 keopscore pykeops; do
      $PY -c "import $w" 2> /dev/null || $PY -m pip install --no-index --no-deps benchmarks/wheels/$w-*.whl >> "$OUT/logs/build.log" 2>&1
    done
    $PY -c "import pykeops; print('pykeops', pykeops.__version__)" 2>&1 | tail -1 | tee -a "$summary"
  else
    note "no benchmarks/wheels: the KeOps column will read 'not run'"
  fi
fi

if has test; then
  start=$SECONDS
  workers=()  # pytest-xdist where the machine has it: the suite is mostly CPU-bound
  $PY -c "import xdist" 2> /dev/null && workers=(-n "${TEST_WORKERS:-8}")
  export CK_FAILURE_LOG="$OUT/logs/failures.log"  # tracebacks as they happen (tests/conftest.py)
  timeout "${TEST_TIMEOUT:-3000}" $PY -m pytest ${TEST_FILES:-tests} "${workers[@]}" ${TEST_ARGS:--q} -p no:cacheprovider -rs --durations=20 \
    > "$OUT/logs/pytest.log" 2>&1
  rc=$?
  note "pytest rc=$rc in $((SECONDS - start)) s: $(tail -1 "$OUT/logs/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/logs/pytest.log" | head -20
fi

if has test-fast; then
  start=$SECONDS
  $PY -m pytest tests/test_cuda.py tests/test_cuda_emulation.py tests/test_validation.py \
    tests/test_affinity.py tests/test_similar_labels.py tests/test_weighted_pair_sums.py -q \
    -p no:cacheprovider > "$OUT/logs/pytest-fast.log" 2>&1
  rc=$?
  note "pytest (cuda files) rc=$rc in $((SECONDS - start)) s: $(tail -1 "$OUT/logs/pytest-fast.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/logs/pytest-fast.log" | head -20
fi

if has sanitize; then
  # the caching allocator hides out-of-bounds accesses inside its blocks
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  selection='cuda and (singleton or identical or arbitrary or only_one or dim_mean or cosine_in_one)'
  for tool in memcheck racecheck; do
    start=$SECONDS
    compute-sanitizer --tool $tool --error-exitcode 99 $PY -m pytest tests/test_intra_inter_sums.py \
      -q -p no:cacheprovider -k "$selection" > "$OUT/logs/sanitizer-$tool.log" 2>&1
    rc=$?
    note "compute-sanitizer $tool rc=$rc in $((SECONDS - start)) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/logs/sanitizer-$tool.log" | tail -1) / $(grep -E 'passed|failed' "$OUT/logs/sanitizer-$tool.log" | tail -1)"
  done
  # the Gram-form (tensor-core and fp32) kernels, small shapes
  for tool in memcheck racecheck; do
    start=$SECONDS
    compute-sanitizer --tool $tool --error-exitcode 99 $PY -m pytest tests/test_cuda.py \
      tests/test_affinity.py -q -p no:cacheprovider \
      -k "(gram_kernels and not 3000) or (cuda and (match_reference or tied or far_points))" \
      > "$OUT/logs/sanitizer-gram-$tool.log" 2>&1
    rc=$?
    note "compute-sanitizer $tool (Gram kernels) rc=$rc in $((SECONDS - start)) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/logs/sanitizer-gram-$tool.log" | tail -1) / $(grep -E 'passed|failed' "$OUT/logs/sanitizer-gram-$tool.log" | tail -1)"
  done
  for tool in memcheck racecheck synccheck initcheck; do  # the one-pass kernel (pair_pass_kernels.cuh)
    start=$SECONDS
    compute-sanitizer --tool $tool --error-exitcode 99 $PY -m pytest tests/test_weighted_pair_sums.py \
      -q -p no:cacheprovider -k "cuda and (variants or duplicates or bitwise)" \
      > "$OUT/logs/sanitizer-pair-pass-$tool.log" 2>&1
    rc=$?
    note "compute-sanitizer $tool (pair pass) rc=$rc in $((SECONDS - start)) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/logs/sanitizer-pair-pass-$tool.log" | tail -1) / $(grep -E 'passed|failed' "$OUT/logs/sanitizer-pair-pass-$tool.log" | tail -1)"
  done
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi

if has bench; then
  start=$SECONDS
  # KeOps in a run of its own: its code generation crashed the whole process on an
  # H100 (2026-11-24), which must not cost the other columns
  $PY benchmarks/run_intra_inter_sums.py --device cuda --sizes 4096 16384 65536 \
    --impls cuda cuda-pair-pass triton eager compile \
    --dims 2 128 --metrics euclidean --modes fwd bwd full --reps 20 --max-seconds 4 --min-runs 3 \
    --max-predicted-seconds 20 --out "$OUT" --stem intra_inter_sums-cuda > "$OUT/logs/bench.log" 2>&1
  note "benchmark rc=$? in $((SECONDS - start)) s"
  cat "$OUT/logs/bench.log" | grep -v "^wrote"
  $PY benchmarks/run_intra_inter_sums.py --device cuda --sizes 4096 16384 65536 --impls keops \
    --dims 2 128 --metrics euclidean --modes full --reps 20 --max-seconds 4 --min-runs 3 \
    --max-predicted-seconds 20 --out "$OUT" --stem intra_inter_sums-keops > "$OUT/logs/bench-keops.log" 2>&1
  note "KeOps benchmark rc=$?"
  grep -v "^wrote" "$OUT/logs/bench-keops.log" | tail -15
fi

if has bench-grid; then
  start=$SECONDS
  $PY benchmarks/run_intra_inter_sums.py --device cuda --reps 20 --max-seconds 2 --min-runs 1 \
    --max-predicted-seconds 20 --out "$OUT" --stem intra_inter_sums-cuda-grid > "$OUT/logs/bench-grid.log" 2>&1
  note "grid benchmark rc=$? in $((SECONDS - start)) s"
  grep -v "^wrote" "$OUT/logs/bench-grid.log" | tail -60
fi

if has bench-asloss; then
  # the one-pass ASLoss (Triton) against the two-pass kernels, eager and torch.compile
  start=$SECONDS
  $PY benchmarks/run_as_loss.py --device cuda --backends triton cuda --tf32 --sizes 16384 65536 \
    --dims 128 --metrics euclidean --skip-eager-above 16384 --reps 10 --max-seconds 10 \
    --out "$OUT/asloss" > "$OUT/logs/bench-asloss.log" 2>&1
  note "ASLoss benchmark rc=$? in $((SECONDS - start)) s"
  grep -v "^{" "$OUT/logs/bench-asloss.log" | tail -10
  cat "$OUT/asloss/as_loss_cuda.md" 2>/dev/null | tail -20
fi

if has bench-affinity; then
  start=$SECONDS
  $PY benchmarks/run_affinity.py --device cuda --reps 5 --max-seconds 20 --out "$OUT" \
    > "$OUT/logs/bench-affinity.log" 2>&1
  note "affinity benchmark rc=$? in $((SECONDS - start)) s"
  grep -v "^wrote" "$OUT/logs/bench-affinity.log" | tail -30
fi

if has bench-ncl; then
  start=$SECONDS
  $PY benchmarks/run_n_centroids.py --device cuda --reps 7 --max-seconds 20 --out "$OUT" \
    > "$OUT/logs/bench-ncl.log" 2>&1
  note "N-Centroids benchmark rc=$? in $((SECONDS - start)) s"
  grep -v "^wrote" "$OUT/logs/bench-ncl.log" | tail -30
fi

if has bench-suite; then
  start=$SECONDS
  $PY benchmarks/run.py --suite gpu --out "$OUT/suite-gpu" > "$OUT/logs/bench-suite.log" 2>&1
  note "benchmark suite rc=$? in $((SECONDS - start)) s"
  grep -v "^wrote" "$OUT/logs/bench-suite.log" | tail -40
fi

if has bench-stats; then
  $PY benchmarks/run_class_stats.py --device cuda --out "$OUT/class-stats-cuda.md" \
    > "$OUT/logs/bench-stats.log" 2>&1
  note "class-statistics benchmark rc=$?"
  cat "$OUT/logs/bench-stats.log"
fi

if has bench-large; then
  start=$SECONDS
  $PY benchmarks/run_intra_inter_sums.py --device cuda --impls cuda triton \
    --sizes 1048576 --dims 2 --metrics euclidean --modes fwd bwd full --reps 20 --max-seconds 6 \
    --out "$OUT" --stem intra_inter_sums-cuda-large > "$OUT/logs/bench-large.log" 2>&1
  note "large benchmark rc=$? in $((SECONDS - start)) s"
  cat "$OUT/logs/bench-large.log" | grep -v "^wrote"
fi

note "end $(date -u +%FT%TZ)"
# at most 8 files come back: pack logs and plots
tar czf "$OUT/results.tar.gz" -C "$OUT" --exclude results.tar.gz --exclude "*.so.gz" . && \
  find "$OUT" -mindepth 1 ! -name results.tar.gz ! -name summary.txt ! -name '*.md' ! -name '*.so.gz' -delete 2>/dev/null
ls -la "$OUT"
