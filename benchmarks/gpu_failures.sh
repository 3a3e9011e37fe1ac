#!/usr/bin/env bash
# Re-run groups of GPU test failures, each group in its own process (a sticky CUDA error
# or a timeout in one must not fail the others), with tracebacks, into $OUT/failures.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}; mkdir -p "$OUT/parts"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
run() { local name=$1; shift
  timeout "${GROUP_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider --tb=short -rs "$@" > "$OUT/parts/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/parts/$name.log"; }
run A tests/test_affinity.py -k "margin_edges and triton" &
run B tests/test_cuda.py -k "bitwise_deterministic" &
run C tests/test_guarantees.py -k "compile_fullgraph_with_default or double_backward_raises or bitwise_reproducible or mixed_embedding" &
run D tests/test_intra_inter_sums.py -k "(identical_rows or near_duplicates or dim_mean or arbitrary_label or only_one or cosine_in_one or cosine_eps or singleton) and (triton or cuda)" &
run E tests/test_cuda.py -k "gradcheck_on_device or gram_kernels_match_reference" &
run F tests/test_opcheck.py &
run G tests/test_similar_labels.py -k "statistics_match_numpy_over_arbitrary_splits and triton" &
run H tests/test_cuda.py -k "memory_linear_in_n and 1048576" --durations=10 &
wait
for f in "$OUT"/parts/*.log; do echo "######## $f"; cat "$f"; done > "$OUT/failures.log"
rm -rf "$OUT/parts"
grep -E "^(FAILED|ERROR|rc=)|passed|failed" "$OUT/failures.log" | tail -80
