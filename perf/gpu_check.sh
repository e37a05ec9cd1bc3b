#!/usr/bin/env bash
# The GPU checks of a kernel change, in two device calls of under 10 minutes each on an H100:
#   source .device/setup.sh && bash perf/gpu_check.sh kernel   # smoke + FlashMLA matrix, bf16 and fp16
#   source .device/setup.sh && bash perf/gpu_check.sh rest     # every other gpu test, then an A/B timing
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
case "${1:-kernel}" in
kernel)
    step smoke 120 python -m pytest tests/test_decode_gpu.py -k "smoke or zero or repeatable" -q -p no:warnings
    step matrix_bf16 200 python -m pytest tests/test_decode_gpu.py -k matrix_bf16 -q -x -p no:warnings
    step matrix_fp16 200 python -m pytest tests/test_decode_gpu.py -k matrix_fp16 -q -x -p no:warnings
    ;;
rest)
    step other_gpu 330 python -m pytest tests -m gpu --ignore=tests/test_decode_gpu.py -q -p no:warnings
    step ab 200 python -m perf.ab --variants pipelined:2 split_s:2 pipelined:0 --out "$OUT/ab.csv"
    tail -12 "$OUT/ab.log"
    ;;
*) echo "usage: bash perf/gpu_check.sh kernel|rest" >&2; exit 2 ;;
esac
