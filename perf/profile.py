"""Where the time of one decode call goes: ``python -m perf.profile 128x1x16k:h16 [--device cpu]``.

Prints the table of ``cutemla.profile.profile_decode`` (scheduler / decode / combine, achieved TFLOP/s and
GB/s, the roofline bound). On CPU the call runs the reference; give it a small case.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .cases import parse_case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.profile", description=__doc__.split("\n")[0])
    parser.add_argument("case", help="case string, e.g. 128x1x16k:h16 (see python -m perf.sweep --list)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--csv", help="also write the stage table to this CSV")
    args = parser.parse_args(argv)
    from cutemla.profile import profile_decode

    report = profile_decode(parse_case(args.case).decode_case(), device=args.device, iters=args.iters,
                            trials=args.trials)
    print(report)
    if args.csv:
        report.table.to_csv(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
