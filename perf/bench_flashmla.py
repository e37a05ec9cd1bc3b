"""Benchmark cutemla on FlashMLA's baseline configs, in the baseline CSV format (a thin alias of the sweep).

    python -m perf.bench_flashmla --out results.csv [--cases small|all] [--check]

Same as ``python -m perf.sweep --preset flashmla --providers cutemla`` (see perf/sweep.py for the method:
CUDA graph, metadata reused, L2-cold inputs), written with the columns of perf/baselines/flashmla_h100.csv:
``us`` is the min over 5 samples of the mean of 50 replays, as the baseline measured it.
"""
from __future__ import annotations

import argparse
import sys

from .cases import FLASHMLA_CONFIGS, expand_presets
from .schema import BASELINE_FIELDS, to_baseline_format
from .sweep import SweepOptions, run_sweep

__all__ = ["FLASHMLA_CONFIGS", "BASELINE_FIELDS", "main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="CSV path (default: stdout)")
    parser.add_argument("--cases", choices=("small", "all"), default="all")
    parser.add_argument("--check", action="store_true", help="max |out - reference| on small cases")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (schema check only)")
    args = parser.parse_args(argv)
    cases = expand_presets(["flashmla"])
    if args.cases == "small":
        cases = [c for c in cases if c.b * c.s_k <= 2**19]
    options = SweepOptions(providers=("cutemla",), trials=5, replays=50, check=args.check, compile_timing=False,
                           kernel_breakdown=False, dry_run=args.dry_run, progress=sys.stderr.isatty())
    if args.dry_run:
        options.trials, options.replays = 2, 1
    frame = run_sweep([("flashmla", c) for c in cases], options)
    failed = frame[frame.status != "ok"]
    for _, row in failed.iterrows():
        print(f"{row['case']}: {row['status']}", file=sys.stderr)
    table = to_baseline_format(frame[frame.status == "ok"])
    if args.out:
        table.to_csv(args.out, index=False)
    else:
        table.to_csv(sys.stdout, index=False)
    return 0 if failed.empty else 1


if __name__ == "__main__":
    sys.exit(main())
