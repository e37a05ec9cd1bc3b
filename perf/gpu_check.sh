#!/usr/bin/env bash
# The GPU checks of a kernel change, as parts that fit the 10-minute limit of a device call in pairs:
#   source .device/setup.sh && bash perf/gpu_check.sh smoke bf16   # smoke + FlashMLA matrix in bf16
#   source .device/setup.sh && bash perf/gpu_check.sh fp16 rest    # fp16 matrix, every other gpu test
#   source .device/setup.sh && bash perf/gpu_check.sh ab           # A/B timing of the schedules
#   source .device/setup.sh && bash perf/gpu_check.sh sparse sanitize parity   # FP8, sanitizer, sweep
#   source .device/setup.sh && bash perf/gpu_check.sh memcheck fp8sweep       # memcheck of every case, FP8 rows
# On a 2-GPU machine, run two lists side by side with CUDA_VISIBLE_DEVICES=0 / 1 and separate OUT folders.
# Every step has its own timeout and streams to a file under $OUT, so a hang costs one step and the
# log still shows where it stopped. Building kernels on the CPU first saves ~15 s each on the GPU:
#   CUTEMLA_CACHE_DIR=$PWD/.cute_cache python -m cutemla.kernels.warmup --schedules pipelined split_s
# then carry .cute_cache and export CUTEMLA_CACHE_DIR=$PWD/.cute_cache before this script.
set -u
OUT=${OUT:-/tmp/cutemla-gpu}
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...
    local name=$1 seconds=$2; shift 2
    timeout -s KILL "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name (exit $?)"; grep -E "passed|failed|FAILED|Error" "$OUT/$name.log" | tail -4
}
[ $# -eq 0 ] && set -- smoke bf16
for part in "$@"; do
case "$part" in
smoke)
    step smoke 120 python -m pytest tests/test_decode_gpu.py -k "smoke or zero or repeatable" -q -p no:warnings ;;
bf16|fp16)  # the FlashMLA matrix, 1932 cases: 180-250 s on an H100 (the fp32 reference on the CPU dominates;
            # slower when another CPU-heavy job such as ncu shares the host)
    step matrix_$part 330 python -m pytest tests/test_decode_gpu.py -k matrix_$part -q -x -p no:warnings ;;
rest)
    step other_gpu 330 python -m pytest tests -m gpu --ignore=tests/test_decode_gpu.py \
        --ignore=tests/test_sparse_decode_gpu.py --ignore=tests/test_dense_fp8_decode_gpu.py -q -p no:warnings ;;
ab)
    step ab 200 python -m perf.ab --variants seesaw:auto pipelined:auto split_s:auto --out "$OUT/ab.csv"
    tail -12 "$OUT/ab.log" ;;
sparse)  # the FP8 sparse and dense-FP8 decode kernels
    step sparse 150 python -m pytest tests/test_sparse_decode_gpu.py tests/test_dense_fp8_decode_gpu.py -q -p no:warnings ;;
sanitize)  # compute-sanitizer, three tools over four cases (bash perf/sanitize.sh runs all ten)
    TOOLS="memcheck racecheck synccheck" CASES="zero_lengths partial_last_page split_one_long h_kv8_h_q128" \
        STEP_TIMEOUT=45 timeout -s KILL 280 bash perf/sanitize.sh > "$OUT/sanitize.log" 2>&1
    echo "== sanitize (exit $?)"; tail -14 "$OUT/sanitize.log" ;;
memcheck)  # memcheck over every sanitizer case (dense schedules and FP8), ~10 s each
    TOOLS=memcheck STEP_TIMEOUT=60 timeout -s KILL 420 bash perf/sanitize.sh > "$OUT/memcheck.log" 2>&1
    echo "== memcheck (exit $?)"; tail -22 "$OUT/memcheck.log" ;;
fp8sweep)  # FP8 sparse and dense rows of the sweep, against FlashMLA's reported H800 number
    step fp8sweep 280 python -m perf.sweep --preset fp8 --providers cutemla,reference,flashmla-baseline \
        --trials 5 --replays 30 --no-progress --no-plots --out "$OUT/fp8.csv"
    tail -5 "$OUT/fp8sweep.log" ;;
parity)  # the FlashMLA preset plus the performance issue's small-batch cases, with plots
    step parity 260 python -m perf.sweep --preset flashmla --case 1x1x64k:h128 --case 4x1x32k:h128 \
        --case 32x1x2k:h16 --providers cutemla,flashmla-baseline,sdpa,sdpa-latent,flashinfer,reference \
        --trials 5 --replays 30 --no-progress --out "$OUT/parity.csv" --plots "$OUT/plots"
    tail -5 "$OUT/parity.log" ;;
*) echo "usage: bash perf/gpu_check.sh [smoke|bf16|fp16|rest|ab|sparse|sanitize|memcheck|fp8sweep|parity]..." >&2
   exit 2 ;;
esac
done
