#!/usr/bin/env bash
# The GPU checks of a kernel change, as parts that fit the 10-minute limit of a device call in pairs:
#   source .device/setup.sh && bash perf/gpu_check.sh smoke bf16   # smoke + FlashMLA matrix in bf16
#   source .device/setup.sh && bash perf/gpu_check.sh fp16 rest    # fp16 matrix, every other gpu test
#   source .device/setup.sh && bash perf/gpu_check.sh ab           # A/B timing of the schedules
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
bf16|fp16)  # the FlashMLA matrix, 1932 cases: about 210 s on an H100 (the fp32 reference dominates)
    step matrix_$part 290 python -m pytest tests/test_decode_gpu.py -k matrix_$part -q -x -p no:warnings ;;
rest)
    step other_gpu 330 python -m pytest tests -m gpu --ignore=tests/test_decode_gpu.py -q -p no:warnings ;;
ab)
    step ab 200 python -m perf.ab --variants pipelined:auto pipelined:0 pipelined:2 --out "$OUT/ab.csv"
    tail -12 "$OUT/ab.log" ;;
*) echo "usage: bash perf/gpu_check.sh [smoke|bf16|fp16|rest|ab]..." >&2; exit 2 ;;
esac
done
