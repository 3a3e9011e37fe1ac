#!/usr/bin/env bash
# The GPU routine: one run of at most 8 minutes on the lent GPU machine (an H200:
# 16 cores, no network, its own python / torch / Triton), in four steps, each with a
# time budget that its commands cannot outrun:
#
#   build     the extension for sm_90 only, against the machine's torch (no build isolation)
#   tests     every CUDA and Triton test (-k "cuda or triton"), one process per test file,
#             several files at a time, each file under a time limit: a hung or crashed
#             file (a sticky CUDA error) cannot take the later ones with it
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck and initcheck on a small
#             subset (one CUDA kernel family each), one process per tool
#   bench     the headline benchmarks: ASLoss euclidean fwd+bwd, N = 65536, D = 128, fp32
#             (tf32) and bf16, ours (triton, cuda) beside eager, torch.compile and KeOps;
#             then N = 1,048,576 (ours only, one timed step each)
#
# and one step outside the plan, for a second call of its own:
#   suite     benchmarks/run.py --suite gpu: every op side by side (CSV, Markdown, PNG)
#
#   bash benchmarks/gpu_routine.sh                 # all four steps
#   bash benchmarks/gpu_routine.sh tests bench     # some of them
#   bash benchmarks/gpu_routine.sh --dry-run       # any machine, no GPU: checks that every
#        step's scripts and test files exist, that every test selection collects tests,
#        and that the budgets add up to the plan; CI runs this
#
# Results land in $OUT (default benchmarks/out/gpu) as each step ends: summary.txt,
# results.tar.gz (logs, tables) and the build (_C*.so.gz; gunzip it into
# confusion_kernels/ and carry that path to skip the build in a second call). At most
# 8 files, so a run stopped at its limit still returns what it did.
# The device machine gets no .git: pass CK_COMMIT=<sha> so that the results name it.
# Wheels it lacks (pykeops, keopscore: benchmarks/fetch_wheels.sh) are installed from
# benchmarks/wheels/ when that folder travels (carry: ["benchmarks/wheels"]).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLAN=${PLAN_SECONDS:-540}
# step budgets (seconds); the tests' per-file limit and parallelism
BUILD_S=100 TESTS_S=170 SANITIZE_S=80 BENCH_S=190
FILE_S=${FILE_SECONDS:-150} TEST_JOBS=${TEST_JOBS:-8} TEST_TIMEOUT=${TEST_TIMEOUT:-60}
SELECTION="cuda or triton"
# the heaviest files first, so that they are not the ones left when the step's time runs out
HEAVY="tests/test_cuda.py tests/test_intra_inter_sums.py tests/test_weighted_pair_sums.py
       tests/test_affinity.py tests/test_n_centroids_kernels.py tests/test_memory.py"
TEST_FILES=${TEST_FILES:-$(echo $HEAVY; ls tests/test_*.py | grep -v -E "test_(docs|demo|distributed)\.py" | grep -v -F "$(echo $HEAVY | tr ' ' '\n')")}
# compute-sanitizer: tool -> seconds, test file and selection (small shapes of one kernel
# family; racecheck is the slowest: 8 one-pass tests took its first 20 s on an H200)
SANITIZE=(
  "memcheck|20|tests/test_cuda.py|gram_kernels and 65-24 and (fp32 or bf16)"
  "racecheck|20|tests/test_weighted_pair_sums.py|cuda and duplicates"
  "racecheck|10|tests/test_retrieval.py|cuda and ties"
  "synccheck|15|tests/test_weighted_pair_sums.py|cuda and bitwise"
  "initcheck|15|tests/test_intra_inter_sums.py|cuda and (singleton or identical)"
)
SUITE_S=${SUITE_SECONDS:-420}
SUITE=(benchmarks/run.py --suite gpu)
# ours first (both dtypes, both data), then the peers; reports are rewritten after every case
BENCH=(benchmarks/run_as_loss.py --device cuda --backends triton cuda --tf32 --sizes 65536
       --dims 128 --metrics euclidean --dtypes fp32 bf16 --data random clustered --peer-data random
       --providers fused gram gram-compile keops eager --skip-eager-above 65536 --reps 5
       --max-seconds 1 --case-timeout 40)
# N = 1,048,576: one timed step, no warm-up (the kernels are compiled and cached by then);
# at the 355 ms of N = 65536 (H200, 2026-12-04) one step is about 90 s
BENCH_BIG=(benchmarks/run_as_loss.py --device cuda --backends triton --tf32 --sizes 1048576
       --dims 128 --metrics euclidean --data random --providers fused --reps 1 --min-reps 1
       --warmup 0 --max-seconds 0 --case-timeout 110)

dry=0 steps=()
for a in "$@"; do
  case $a in
    --dry-run) dry=1 ;;
    build|tests|sanitize|bench|suite) steps+=("$a") ;;
    *) echo "gpu_routine: unknown step $a (build tests sanitize bench suite, or --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#steps[@]} -eq 0 ] && steps=(build tests sanitize bench)
has() { [[ " ${steps[*]} " == *" $1 "* ]]; }

if [ $dry = 1 ]; then
  fail=0
  total=$((BUILD_S + TESTS_S + SANITIZE_S + BENCH_S))
  tools=0
  for entry in "${SANITIZE[@]}"; do IFS='|' read -r _ s _ _ <<< "$entry"; tools=$((tools + s)); done
  [ $tools -le $SANITIZE_S ] || { echo "FAIL: the sanitizer tools' ${tools} s exceed the step's ${SANITIZE_S} s"; fail=1; }
  echo "plan: build ${BUILD_S} s + tests ${TESTS_S} s + sanitize ${SANITIZE_S} s + bench ${BENCH_S} s = ${total} s (limit ${PLAN} s)"
  [ $total -le $PLAN ] || { echo "FAIL: the budgets add up to ${total} s > ${PLAN} s"; fail=1; }
  # every file of a budget must fit inside it: files run TEST_JOBS at a time
  [ $FILE_S -le $TESTS_S ] || { echo "FAIL: a test file's limit ${FILE_S} s exceeds the step's ${TESTS_S} s"; fail=1; }
  [ $SUITE_S -le 570 ] || { echo "FAIL: the suite step's ${SUITE_S} s leave no room in a 10-minute call"; fail=1; }
  $PY "${SUITE[0]}" --help | grep -q -- "--suite" || { echo "FAIL: ${SUITE[0]} has no --suite"; fail=1; }
  for f in setup.py scripts/cuda_resources.py ${BENCH[0]} ${SUITE[0]} $TEST_FILES; do
    [ -f "$f" ] || { echo "FAIL: $f is missing"; fail=1; }
  done
  for entry in "${SANITIZE[@]}"; do
    IFS='|' read -r tool _ file sel <<< "$entry"
    n=$($PY -m pytest "$file" -q --collect-only -p no:cacheprovider -k "$sel" 2>/dev/null | grep -c "::")
    echo "sanitize $tool: $file -k '$sel': $n tests"
    [ "$n" -gt 0 ] || { echo "FAIL: the $tool selection collects no test"; fail=1; }
  done
  n=$($PY -m pytest $TEST_FILES -q --collect-only -p no:cacheprovider -k "$SELECTION" 2>/dev/null | grep -c "::")
  echo "tests: $(echo $TEST_FILES | wc -w) files, $n tests selected by -k '$SELECTION'"
  [ "$n" -gt 100 ] || { echo "FAIL: the GPU test selection collects only $n tests"; fail=1; }
  $PY "${BENCH[0]}" --help > /dev/null || { echo "FAIL: ${BENCH[0]} --help"; fail=1; }
  for flag in "${BENCH[@]:1}" "${BENCH_BIG[@]:1}"; do
    if [[ $flag == --* ]] && ! $PY "${BENCH[0]}" --help | grep -q -- "$flag"; then
      echo "FAIL: ${BENCH[0]} has no option $flag"; fail=1
    fi
  done
  [ $fail = 0 ] && echo "gpu_routine dry run: ok" || echo "gpu_routine dry run: FAILED"
  exit $fail
fi

OUT=${OUT:-benchmarks/out/gpu}
# logs and tables are made in a work folder and packed into $OUT/results.tar.gz after every
# step: $OUT itself holds 3 files (at most 8 come back from the device machine)
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/logs" "$WORK/tables"
summary="$OUT/summary.txt"
note() { echo "== $*" | tee -a "$summary"; }
pack() {  # after every step: what is done so far comes back even if a later step is cut off
  cp "$summary" "$WORK/"
  tar czf "$OUT/results.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}
export PYTHONUNBUFFERED=1 CK_COMMIT=${CK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
note "start $(date -u +%FT%TZ) commit $CK_COMMIT steps: ${steps[*]}"
nvidia-smi > "$WORK/logs/nvidia-smi.txt" 2>&1
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())" 2>&1 | tee -a "$summary"

if ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ck-site \
    benchmarks/wheels/*.whl > "$WORK/logs/wheels.log" 2>&1 \
    && export PYTHONPATH=/tmp/ck-site${PYTHONPATH:+:$PYTHONPATH} \
    && note "wheels: $(cd benchmarks/wheels && ls *.whl | tr '\n' ' ')" \
    || note "wheels FAILED: $(tail -1 "$WORK/logs/wheels.log")"
fi

so_name=$($PY -c "import sysconfig; print('_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
if has build; then
  start=$SECONDS
  if [ -f "confusion_kernels/$so_name" ] && PYTHONPATH=$PWD $PY -c "import confusion_kernels as ck, sys; sys.exit('cuda' not in ck.available_backends('cuda'))" 2>/dev/null; then
    note "build: the carried confusion_kernels/$so_name"
  elif TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1 timeout $BUILD_S \
       $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$WORK/logs/build.log" 2>&1; then
    note "build ok in $((SECONDS - start)) s"
    gzip -c "confusion_kernels/$so_name" > "$OUT/$so_name.gz"
  else
    note "build FAILED after $((SECONDS - start)) s"; tail -30 "$WORK/logs/build.log"; pack; exit 1
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import confusion_kernels as ck; print('backends on cuda:', ck.available_backends('cuda'))" 2>&1 | tee -a "$summary"
  $PY scripts/cuda_resources.py --out "$WORK/tables" > "$WORK/logs/cuda_resources.log" 2>&1
  note "cuda_resources: $(tail -1 "$WORK/logs/cuda_resources.log")"
  pack
fi

if has tests; then
  start=$SECONDS
  run_file() {  # one test file in its own process, under its own limit
    local f=$1 log="$WORK/logs/pytest-$(basename "$1" .py).log" extra=()
    $PY -c "import pytest_timeout" 2> /dev/null && extra=(--timeout "$TEST_TIMEOUT")
    # -v: a file stopped at its limit still shows which tests ran; 2 threads a process
    # (TEST_JOBS processes share 16 cores)
    CK_FAILURE_LOG="$WORK/logs/failures-$(basename "$1" .py).log" OMP_NUM_THREADS=2 \
      timeout "$FILE_S" $PY -m pytest "$f" -v -p no:cacheprovider -rfEs --durations=15 \
      -k "$SELECTION" "${extra[@]}" > "$log" 2>&1
    echo "$? $f $(tail -1 "$log")" >> "$WORK/logs/test-files.txt"
  }
  export -f run_file; export WORK PY FILE_S TEST_TIMEOUT SELECTION
  : > "$WORK/logs/test-files.txt"
  timeout $TESTS_S bash -c "echo '$TEST_FILES' | tr ' ' '\n' | xargs -P $TEST_JOBS -I{} bash -c 'run_file {}'"
  # exit 5 = no test selected in that file; 124 = the file's limit
  bad=$(awk '$1 != 0 && $1 != 5' "$WORK/logs/test-files.txt" | wc -l)
  note "tests in $((SECONDS - start)) s: $(wc -l < "$WORK/logs/test-files.txt") files run, $bad failed or timed out"
  awk '$1 != 0 && $1 != 5' "$WORK/logs/test-files.txt" | tee -a "$summary"
  grep -h -E "^(FAILED|ERROR)" "$WORK"/logs/pytest-*.log | head -30 | tee -a "$summary"
  pack
fi

if has sanitize; then
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # the caching allocator hides out-of-bounds accesses
  for entry in "${SANITIZE[@]}"; do
    IFS='|' read -r tool per_tool file sel <<< "$entry"
    start=$SECONDS
    timeout $per_tool compute-sanitizer --tool "$tool" --error-exitcode 99 $PY -m pytest "$file" \
      -q -p no:cacheprovider -k "$sel" > "$WORK/logs/sanitizer-$tool.log" 2>&1
    note "compute-sanitizer $tool rc=$? in $((SECONDS - start)) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|not supported' "$WORK/logs/sanitizer-$tool.log" | tail -1) / $(grep -E 'passed|failed' "$WORK/logs/sanitizer-$tool.log" | tail -1)"
  done
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
  pack
fi

if has bench; then
  start=$SECONDS
  timeout $((BENCH_S - 115)) $PY "${BENCH[@]}" --out "$WORK/tables" > "$WORK/logs/bench.log" 2>&1
  note "benchmark rc=$? in $((SECONDS - start)) s"
  grep -v "^{" "$WORK/logs/bench.log" | tail -12 | tee -a "$summary"
  [ -f "$WORK/tables/as_loss_cuda.md" ] && tail -n +6 "$WORK/tables/as_loss_cuda.md" | tee -a "$summary"
  pack
  start=$SECONDS
  mkdir -p "$WORK/tables/big"
  timeout 115 $PY "${BENCH_BIG[@]}" --out "$WORK/tables/big" > "$WORK/logs/bench-big.log" 2>&1
  note "benchmark N = 1048576 rc=$? in $((SECONDS - start)) s"
  grep "^{" "$WORK/logs/bench-big.log" | cut -c1-300 | tee -a "$summary"
  pack
fi
if has suite; then
  start=$SECONDS
  timeout $SUITE_S $PY "${SUITE[@]}" --out "$WORK/tables/suite" > "$WORK/logs/suite.log" 2>&1
  note "benchmark suite rc=$? in $((SECONDS - start)) s"
  grep -v "^wrote" "$WORK/logs/suite.log" | tail -30 | tee -a "$summary"
  pack
fi
note "end $(date -u +%FT%TZ)"
pack
ls -la "$OUT"
