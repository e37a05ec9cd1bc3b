"""Compile (or load from the disk cache) kernel variants ahead of time.

Call `warmup()` before capturing CUDA graphs, so capture never compiles. It needs no GPU: on a
CPU-only machine it fills the disk cache (CUTEMLA_CACHE_DIR) that a GPU host with the same DSL
version then loads from.

    python -m cutemla.kernels.warmup [--schedules pipelined split_s] [--head-dims 576 512]
"""
from __future__ import annotations

import argparse
import time

import torch

from . import DEFAULT_L2_PREFETCH, DEFAULT_SCHEDULE

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def warmup(dtypes=("bf16", "fp16"), head_dims=(576, 512), schedules=(DEFAULT_SCHEDULE,),
           l2_prefetch=(0, DEFAULT_L2_PREFETCH), verbose=False) -> dict:
    """Build every listed decode variant plus the combine and scheduler kernels; return timings."""
    from . import _dsl_dtype
    from .combine import compile_combine
    from .decode import get_decode_fn
    from ..schedule.device import get_sched_meta_fn

    timings = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
        if verbose:
            print(f"{name}: {timings[name]:.2f} s", flush=True)

    for name in dtypes:
        dt = DTYPES[name]
        for d in head_dims:
            for schedule in schedules:
                for prefetch in l2_prefetch:
                    timed(f"decode-{name}-d{d}-{schedule}-pf{prefetch}",
                          lambda: get_decode_fn(_dsl_dtype(dt), d, schedule, prefetch))
        for threads, warps_per_row in ((256, 1), (128, 4)):
            timed(f"combine-{name}-{threads}x{warps_per_row}",
                  lambda: compile_combine(dt, threads=threads, warps_per_row=warps_per_row))
    timed("sched_meta", lambda: get_sched_meta_fn())
    return timings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[576, 512])
    parser.add_argument("--schedules", nargs="+", default=[DEFAULT_SCHEDULE])
    parser.add_argument("--l2-prefetch", nargs="+", type=int, default=[0, DEFAULT_L2_PREFETCH],
                        help="both by default: the launcher picks by the number of M tiles")
    args = parser.parse_args(argv)
    warmup(args.dtypes, args.head_dims, args.schedules, args.l2_prefetch, verbose=True)


if __name__ == "__main__":
    main()
