#!/usr/bin/env bash
# One device call that checks and times everything GPU-side, in priority order, each step
# under its own time limit, then packs experiments/results into $OUT/results.tgz.
#   usage (device machine, repo root): bash experiments/gpu_suite.sh [STEP ...]
# Wheels for packages the device image lacks are carried in .whl (see README, device notes).
set -u
OUT=${OUT:-/tmp/arjax-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())' \
  | tee -a "$OUT/env.txt"

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
  echo "=== $name exit $?" | tee -a "$OUT/log.txt"
  tail -n 25 "$OUT/log.txt"
}
STEPS="${*:-}"
step gpu_tests 120 python3 -m pytest -q -m gpu tests/test_flash_attention.py tests/test_linear_attention_scan.py tests/test_gated_delta_kernel.py -p no:cacheprovider
step train 190 python3 experiments/bench_train.py
step block 330 python3 experiments/bench_block_decode.py --impls auto
step hat 55 python3 experiments/bench_hat_decode.py --device gpu
step axial 40 python3 experiments/bench_axial_sampling.py
step linear_decode 130 python3 experiments/bench_linear_decode.py
step linear_train 60 python3 experiments/bench_linear_train.py
step scan 150 python3 experiments/bench_scan.py
step gated_delta 420 python3 experiments/bench_gated_delta.py
step scaling 420 python3 experiments/bench_scaling.py  # needs >= 2 GPUs
tar czf "$OUT/results.tgz" experiments/results
