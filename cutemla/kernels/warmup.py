"""Compile (or load from the disk cache) kernel variants ahead of time.

Call `warmup()` before capturing CUDA graphs, so capture never compiles. It needs no GPU: on a
CPU-only machine it fills the disk cache (CUTEMLA_CACHE_DIR) that a GPU host with the same DSL
version then loads from.

    python -m cutemla.kernels.warmup [--schedules pipelined split_s] [--head-dims 576 512] [--no-fp8]

FP8 (is_fp8_kvcache=True) serving builds the sparse top-k and dense-FP8 decode kernels and the sparse
split combine too (on by default; ``fp8=False`` skips them).
"""
from __future__ import annotations

import argparse
import time

import torch

from . import DEFAULT_SCHEDULE

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def warmup(dtypes=("bf16", "fp16"), head_dims=(576, 512), schedules=(DEFAULT_SCHEDULE,),
           l2_prefetch=None, verbose=False, fp8=True) -> dict:
    """Build every listed decode variant plus the combine and scheduler kernels; return timings.

    l2_prefetch=None builds the variants the launcher picks (decode_variant) for one and for
    several M tiles per KV head; a list builds exactly those prefetch depths.
    """
    from . import _dsl_dtype, decode_variant
    from .combine import CTA_PER_ROW, CTA_PER_ROW_DEEP, USE_PDL_DEFAULT, WARP_PER_ROW, compile_combine
    from .decode import get_decode_fn
    from ..schedule.device import get_sched_meta_fn

    timings = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
        if verbose:
            print(f"{name}: {timings[name]:.2f} s", flush=True)

    def variants(d):
        found = set()
        for schedule in schedules:
            for rows in (64, 128):
                chosen, prefetch = decode_variant(d, rows, schedule)
                for p in (l2_prefetch if l2_prefetch is not None else (prefetch,)):
                    found.add((chosen, p))
        return sorted(found)

    for name in dtypes:
        dt = DTYPES[name]
        for d in head_dims:
            for schedule, prefetch in variants(d):
                timed(f"decode-{name}-d{d}-{schedule}-pf{prefetch}",
                      lambda: get_decode_fn(_dsl_dtype(dt), d, schedule, prefetch))
        for shape in (WARP_PER_ROW, CTA_PER_ROW, CTA_PER_ROW_DEEP):
            timed(f"combine-{name}-{'x'.join(map(str, shape[:2]))}{'-deep' if len(shape) > 2 else ''}",
                  lambda: compile_combine(dt, USE_PDL_DEFAULT, *shape))
    timed("sched_meta", lambda: get_sched_meta_fn())
    if fp8:  # the kernels flash_mla_with_kvcache(..., is_fp8_kvcache=True) launches by default
        from .dense_fp8_decode import get_dense_fp8_decode_fn
        from .sparse_combine import get_sparse_combine_fn
        from .sparse_decode import get_sparse_decode_fn

        timed("sparse_fp8", lambda: get_sparse_decode_fn())
        timed("sparse_combine", lambda: get_sparse_combine_fn())
        timed("dense_fp8", lambda: get_dense_fp8_decode_fn())
    return timings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[576, 512])
    parser.add_argument("--schedules", nargs="+", default=[DEFAULT_SCHEDULE])
    parser.add_argument("--l2-prefetch", nargs="+", type=int, default=None,
                        help="default: the depths the launcher picks (see decode_variant)")
    parser.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip the FP8 kernels")
    args = parser.parse_args(argv)
    warmup(args.dtypes, args.head_dims, args.schedules, args.l2_prefetch, verbose=True, fp8=args.fp8)


if __name__ == "__main__":
    main()
