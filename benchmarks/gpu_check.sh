#!/usr/bin/env bash
# Every GPU check in one call, for a GPU that is available only briefly (one device call of at most 10 minutes;
# this check ends within 7.5):
#   1. the machine: GPU, PyTorch, Triton and transformers versions (environment.txt, under 20 s);
#   2. the GPU tests, first (a kernel that is wrong on the GPU is known before the benchmark times
#      it): every Triton kernel checked against its reference on Hypothesis-drawn shapes, the fused decode
#      stack and the captured token loop against the eager paths, the backbone's parity and cache
#      tests (gpu_tests.log); a kernel that fails to build or launch fails the test that called it
#      (tests/conftest.py), rather than running its reference unnoticed;
#   3. benchmarks/gpu_latency.py: NextStep-1-Large shapes against the bandwidth floors
#      (gpu_latency.json, gpu_latency.md, gpu_latency.log);
#   4. apart, under short limits: the one-launch head's tests and timings at 20 head steps (each way of
#      waiting at its grid-wide barrier, without prefetching), the barrier alone, and one 512x512 image at
#      batch 1 with the one-launch head and int8 decode weights (gpu_persistent.log,
#      gpu_latency_persistent.json).
# Results go to $OUT (default benchmarks/results/gpu). Each part has its own time limit, so a
# part that hangs leaves the others' results. The limits add up to 430 s (environment 20, tests 110,
# gpu_latency.py 190 with an image budget of 125, the one-launch head's tests 40 and timings 70 with an image
# budget of 55); a part that ignores the first signal is killed 5 s later, so the whole check ends within
# 455 s, well inside 8 minutes and the device call's 600 s. DRY_RUN=1 runs the same steps on the CPU with tiny
# shapes, to check the script itself in a few minutes: the Triton kernels through Triton's interpreter (so
# every part that needs them runs too), and of the tests only the benchmark script's own (under a limit of
# 150 s unless TEST_SECONDS says otherwise: the interpreter is slow).
#
# Each part's exit status is kept: a timed-out part exits 124 (137 when killed). When the tests fail, the
# benchmark decodes with the backbone's own stack (--no-fused-decode, as LATENCY_ARGS would ask), so that
# timings of kernels the tests found faulty are not taken as results, and the one-launch head is timed only
# when its own tests pass. The last lines say PASS or FAIL for every part (also in summary.txt); the script
# exits 1 when any part failed, 0 when all passed.
#
# Usage: OUT=DIR bash benchmarks/gpu_check.sh
#        OUT=DIR LATENCY_ARGS="--no-fused-decode" bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
dry=()
persistent_steps=20
tests=(tests/test_fast_fused_decode.py tests/test_fast_weight_quantization.py tests/test_kernels_*.py
       tests/test_fast_kernels.py tests/test_fast_token_sampler.py tests/test_backbone_kv_cache.py
       tests/test_qwen2_parity.py
       --deselect tests/test_kernels_persistent_head.py --deselect tests/test_kernels_target_compile.py
       -n "${TEST_WORKERS:-8}")
if [ "${DRY_RUN:-0}" = 1 ]; then
  # Images of 4 tokens: the interpreted int8 and one-launch images then fit the image budgets.
  dry=(--dry-run --tokens 4)
  persistent_steps=2
  # Triton's interpreter on the CPU, so the product and tile search, the few-rows and int8 stacks and
  # images, the grid barrier and the one-launch image run too; the benchmark script's own tests only,
  # which the interpreter makes slower than the GPU tests.
  export TRITON_INTERPRET=1
  tests=(tests/test_fast_gpu_latency_script.py)
  TEST_SECONDS=${TEST_SECONDS:-150}
else
  # Compiled kernels on the GPU: the tests would otherwise turn Triton's interpreter on.
  export TRITON_INTERPRET=0
fi

# Every part's name, exit status and what else the summary says of it, in order.
parts=()
codes=()
notes=()
record() {
  parts+=("$1")
  codes+=("$2")
  notes+=("${3:-}")
}
# What an exit status means, for the summary.
meaning() {
  case "$1" in
    0) echo "exit 0" ;;
    124) echo "exit 124: over its time limit" ;;
    137) echo "exit 137: killed after its time limit" ;;
    "not run") echo "not run" ;;
    *) echo "exit $1" ;;
  esac
}

environment() {
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  "$PYTHON" -c 'import sys, torch, triton, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "transformers", transformers.__version__)'
}
export -f environment
export PYTHON
timeout -k 5 "${ENVIRONMENT_SECONDS:-20}" bash -c environment >"$OUT/environment.txt" 2>&1
code=$?
echo "environment exit $code" >>"$OUT/environment.txt"
cat "$OUT/environment.txt"
record environment "$code"

timeout -k 5 "${TEST_SECONDS:-110}" "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" \
  2>&1 | tee "$OUT/gpu_tests.log"
code=${PIPESTATUS[0]}
echo "tests exit $code" | tee -a "$OUT/gpu_tests.log"
record tests "$code"

# LATENCY_ARGS adds options, for example "--no-fused-decode" when the tests found the fused stack wrong; the
# script adds that option itself when the tests failed.
safe=()
safe_note=""
if [ "$code" != 0 ]; then
  safe=(--no-fused-decode)
  safe_note="; run with --no-fused-decode since the tests failed"
fi
{
  if [ "${#safe[@]}" != 0 ]; then
    echo "gpu_check: the tests failed ($(meaning "$code")): gpu_latency.py runs with --no-fused-decode (the" \
      "backbone's own decode stack), so that kernels the tests found faulty are not timed as results"
  fi
  # shellcheck disable=SC2086
  timeout -k 5 "${LATENCY_SECONDS:-190}" "$PYTHON" benchmarks/gpu_latency.py --out "$OUT" \
    --budget-seconds "${IMAGE_BUDGET_SECONDS:-125}" "${dry[@]}" ${LATENCY_ARGS:-} "${safe[@]}" 2>&1
} | tee "$OUT/gpu_latency.log"
code=${PIPESTATUS[0]}
echo "gpu_latency exit $code" | tee -a "$OUT/gpu_latency.log"
record gpu_latency "$code" "$safe_note"

# Last, each under a short limit: the one-launch head, whose programs wait for each other (and would
# wait forever on a GPU that cannot run them all at once); its timings only after its tests passed.
: >"$OUT/gpu_persistent.log"
timeout -k 5 "${PERSISTENT_TEST_SECONDS:-40}" "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/test_kernels_persistent_head.py 2>&1 | tee -a "$OUT/gpu_persistent.log"
code=${PIPESTATUS[0]}
echo "persistent head tests exit $code" | tee -a "$OUT/gpu_persistent.log"
record "persistent head tests" "$code"
if [ "$code" = 0 ]; then
  {
    if [ "${#safe[@]}" != 0 ]; then
      echo "gpu_check: the tests failed: the one-launch head's image decodes with --no-fused-decode"
    fi
    timeout -k 5 "${PERSISTENT_SECONDS:-70}" "$PYTHON" benchmarks/gpu_latency.py --out "$OUT" --persistent-head \
      --steps "$persistent_steps" --budget-seconds "${PERSISTENT_IMAGE_BUDGET_SECONDS:-55}" "${dry[@]}" \
      "${safe[@]}" 2>&1
  } | tee -a "$OUT/gpu_persistent.log"
  code=${PIPESTATUS[0]}
  echo "persistent head latency exit $code" | tee -a "$OUT/gpu_persistent.log"
  record "persistent head latency" "$code" "$safe_note"
else
  echo "gpu_check: the one-launch head's tests failed: its timings are not taken" | tee -a "$OUT/gpu_persistent.log"
  record "persistent head latency" "not run" ": the one-launch head's tests failed"
fi

# One line per part (PASS: it exited 0), and the exit status: 1 when any part failed or did not run.
failed=0
lines=("gpu_check summary ($OUT):")
for index in "${!parts[@]}"; do
  verdict=PASS
  if [ "${codes[$index]}" != 0 ]; then
    verdict=FAIL
    failed=1
  fi
  lines+=("$verdict ${parts[$index]} ($(meaning "${codes[$index]}")${notes[$index]})")
done
printf '%s\n' "${lines[@]}" | tee "$OUT/summary.txt"
echo "gpu_check exit $failed"
exit "$failed"
