#!/usr/bin/env bash
# Every GPU check in one call, for a GPU that is available only briefly (at most 10 minutes, one device call, usually about 7):
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
# part that hangs leaves the others' results. The limits add up to 570 s (environment 20, tests 120,
# gpu_latency.py 270, the one-launch head's tests 60 and timings 100); a part that ignores the first
# signal is killed 5 s later, so even then the whole stays within the device call's 600 s. DRY_RUN=1 runs the same steps on the CPU with tiny
# shapes, to check the script itself in a few minutes: the Triton kernels through Triton's interpreter (so
# every part that needs them runs too), and of the tests only the benchmark script's own.
#
# Usage: OUT=DIR bash benchmarks/gpu_check.sh
#        OUT=DIR LATENCY_ARGS="--no-fused-decode" bash benchmarks/gpu_check.sh
set -u
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
  # images, the grid barrier and the one-launch image run too; the benchmark script's own tests only.
  export TRITON_INTERPRET=1
  tests=(tests/test_fast_gpu_latency_script.py)
else
  # Compiled kernels on the GPU: the tests would otherwise turn Triton's interpreter on.
  export TRITON_INTERPRET=0
fi

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
echo "environment exit $?" >>"$OUT/environment.txt"
cat "$OUT/environment.txt"

timeout -k 5 "${TEST_SECONDS:-120}" "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" \
  2>&1 | tee "$OUT/gpu_tests.log"
echo "tests exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"

# LATENCY_ARGS adds options, for example "--no-fused-decode" when the tests found the fused stack wrong.
# shellcheck disable=SC2086
timeout -k 5 "${LATENCY_SECONDS:-270}" "$PYTHON" benchmarks/gpu_latency.py --out "$OUT" \
  --budget-seconds "${IMAGE_BUDGET_SECONDS:-170}" "${dry[@]}" ${LATENCY_ARGS:-} 2>&1 | tee "$OUT/gpu_latency.log"
echo "gpu_latency exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_latency.log"

# Last, each under a short limit: the one-launch head, whose programs wait for each other (and would
# wait forever on a GPU that cannot run them all at once).
{
  timeout -k 5 "${PERSISTENT_TEST_SECONDS:-60}" "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_kernels_persistent_head.py 2>&1
  echo "persistent head tests exit $?"
  timeout -k 5 "${PERSISTENT_SECONDS:-100}" "$PYTHON" benchmarks/gpu_latency.py --out "$OUT" --persistent-head \
    --steps "$persistent_steps" --budget-seconds "${PERSISTENT_IMAGE_BUDGET_SECONDS:-85}" "${dry[@]}" 2>&1
  echo "persistent head latency exit $?"
} | tee "$OUT/gpu_persistent.log"
