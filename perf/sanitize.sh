#!/usr/bin/env bash
# compute-sanitizer over the kernel cases of tests/sanitize_kernels.py, on an sm90 GPU host:
#   bash perf/sanitize.sh                      # memcheck, racecheck, synccheck over every case
#   TOOLS="memcheck" CASES="zero_lengths split_one_long" bash perf/sanitize.sh
# Each (tool, case) is one process with its own timeout and log, $LOGDIR/sanitize-<tool>-<case>.log, so a hang
# or crash costs one entry. The kernels are compiled once first, without the sanitizer (into the disk cache;
# set CUTEMLA_CACHE_DIR to reuse a prebuilt one). Ends with a table of each log's "ERROR SUMMARY" count and
# exits non-zero if any run reported errors, failed its numeric check, or timed out.
set -u
OUT=${OUT:-/tmp/cutemla-sanitize}
# The logs stay outside $OUT (a device call returns at most 8 files); $OUT gets the summary and one archive.
LOGDIR=${LOGDIR:-$(mktemp -d /tmp/cutemla-sanitize-logs.XXXXXX)}
mkdir -p "$OUT" "$LOGDIR"
cd "$(dirname "$0")/.."
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
TOOLS=${TOOLS:-"memcheck racecheck synccheck"}
CASES=${CASES:-$(python tests/sanitize_kernels.py --list)}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
DRIVER="python tests/sanitize_kernels.py"

if [ ! -x "$SANITIZER" ]; then
    echo "compute-sanitizer not found (set SANITIZER=/path/to/compute-sanitizer)"; exit 2
fi
"$SANITIZER" --version | tail -1

echo "== warmup (compile, no sanitizer)"
timeout -s KILL 600 $DRIVER --warmup $CASES > "$LOGDIR/sanitize-warmup.log" 2>&1
echo "warmup exit $?"; tail -3 "$LOGDIR/sanitize-warmup.log"

# Every tensor its own cudaMalloc, so out-of-bounds reads land outside an allocation and memcheck sees them.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
summary="$LOGDIR/sanitize-summary.txt"
printf "%-10s %-20s %-6s %s\n" tool case exit errors > "$summary"
for tool in $TOOLS; do
    extra=""
    case $tool in
        memcheck) extra="--leak-check no" ;;
        racecheck) extra="--racecheck-report hazard" ;;
    esac
    for name in $CASES; do
        log="$LOGDIR/sanitize-$tool-$name.log"
        timeout -s KILL "$STEP_TIMEOUT" "$SANITIZER" --tool "$tool" $extra --print-limit ${PRINT_LIMIT:-400} \
            $DRIVER "$name" > "$log" 2>&1
        rc=$?
        # memcheck/synccheck print "ERROR SUMMARY: N errors"; racecheck prints
        # "RACECHECK SUMMARY: ... (N errors, M warnings)": count its errors and warnings both.
        errors=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$log" | tail -1 | grep -Eo "[0-9]+")
        if [ -z "$errors" ]; then
            errors=$(grep -Eo "\([0-9]+ errors?, [0-9]+ warnings?\)" "$log" | tail -1 \
                     | awk -F'[( ,]+' '{print $2 + $4}')
            grep -q "RACECHECK SUMMARY: 0 hazards" "$log" && errors=0
        fi
        [ -z "$errors" ] && errors="?"
        [ "$rc" -eq 137 ] && errors="timeout"
        printf "%-10s %-20s %-6s %s\n" "$tool" "$name" "$rc" "$errors" >> "$summary"
        if [ "$rc" -ne 0 ] || [ "$errors" != "0" ]; then status=1; fi
    done
done
cat "$summary"
cp "$summary" "$OUT/"
tar -czf "$OUT/sanitize-logs.tar.gz" -C "$LOGDIR" $(cd "$LOGDIR" && ls sanitize-*.log sanitize-summary.txt) 2>/dev/null
exit $status
