"""Small kernel configurations for compute-sanitizer (memcheck, racecheck, synccheck); driven by perf/sanitize.sh.

    python tests/sanitize_kernels.py --list            # case names, one per line
    python tests/sanitize_kernels.py --warmup          # compile every variant the cases need (no sanitizer)
    python tests/sanitize_kernels.py CASE [CASE ...]   # run the cases once each, check against the reference
    python tests/sanitize_kernels.py pipelined:zero_lengths   # a dense case under another decode schedule

A dense case runs the default decode schedule (the seesaw for 576-wide heads); ``SCHEDULE:CASE`` runs it under
``CUTEMLA_DECODE_SCHEDULE=SCHEDULE`` (seesaw, pipelined, split_s, or seesaw_named: the seesaw with named-barrier
hand-offs). The ``fp8_*`` cases run the FP8 kernels
(sparse top-k with its split combine and sink, and the dense FP8 decode) through the API, checked the same way
as their GPU tests (tests/test_sparse_decode_gpu.py, tests/test_dense_fp8_decode_gpu.py).

Each case runs the scheduler, the decode kernel and the combine kernel once (``cutemla.kernels.run_dense_decode``)
and compares with ``mla_decode_reference`` at FlashMLA's tolerances; the exit status is 0 only if all pass.
The cases are small on purpose (racecheck is ~100x slower) but each crosses one hazard: empty requests, a
partial last page, causal s_q = 2, h_kv > 1, requests cut into splits (combine path) and unsplit ones, d = 512,
fp16, garbage block-table entries and slices of bigger tensors. Block-table garbage is FlashMLA's 2147480000,
so a kernel that dereferences it reads far out of bounds; run with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so each
tensor is its own allocation and memcheck sees overruns that the caching allocator would otherwise hide.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_inputs import RandomSpec, build_inputs  # noqa: E402

__all__ = ["CASES", "run_case", "main"]


def _spec(**overrides) -> RandomSpec:
    base = dict(seed=1, seqlens=(100,), s_q=1, h_q=16, h_kv=1, d=576, page_size=64, causal=False,
                dtype=torch.bfloat16, spare_pages=1, extra_columns=2, garbage="unused_id", q_view="contiguous",
                cache_view="contiguous", table_view="contiguous", softmax_scale=None)
    base.update(overrides)
    return RandomSpec(**base)


CASES: Dict[str, RandomSpec] = {
    # Empty requests among live ones (out 0 / lse +inf rows, partitions touching only empty requests).
    "zero_lengths": _spec(seqlens=(0, 70, 0, 0, 1), extra_columns=3),
    "all_zero": _spec(seqlens=(0, 0, 0)),
    # The last page is partial (tail rows NaN) and the length is one past a page boundary.
    "partial_last_page": _spec(seqlens=(65, 127, 129, 1), garbage="random"),
    "causal_s_q2": _spec(seqlens=(1, 2, 64, 200), s_q=2, causal=True, h_q=16),
    "h_kv_gt1": _spec(seqlens=(150, 64, 3), s_q=2, causal=True, h_q=9, h_kv=3),
    "h_kv8_h_q128": _spec(seqlens=(300,), h_q=128, h_kv=8),
    # One long request alone: cut into many splits (combine path).
    "split_one_long": _spec(seqlens=(4096,), h_q=64),
    # Split and unsplit requests in one batch, with heads folded over several 64-row blocks.
    "split_and_unsplit": _spec(seqlens=(3000, 5, 64, 0, 700), s_q=4, causal=True, h_q=32, h_kv=1),
    # Many requests of at most one page: each partition holds several whole requests, none is split.
    "unsplit_many": _spec(seqlens=tuple(i * 7 % 64 + 1 for i in range(200)), h_q=16),
    # Many rows (160 x h_q 64): the combine's many-rows shape (a warp per row), split requests among unsplit ones.
    "many_rows_split": _spec(seqlens=tuple(i * 131 % 2000 + 1 for i in range(160)), h_q=64),
    "d512_fp16_views": _spec(seqlens=(513, 40), d=512, dtype=torch.float16, q_view="head_slice",
                             cache_view="pool_offset", table_view="row_slice", garbage="alias"),
}


SCHEDULES = ("seesaw", "pipelined", "split_s", "seesaw_named")


def _fp8_sparse(splits):
    """The sparse FP8 kernel: sink, topk_length with garbage ids, out-of-range ids, an empty row."""
    import test_sparse_decode_gpu as sparse

    os.environ["CUTEMLA_BACKEND"] = "kernel"
    case = sparse.SparseCase(b=3, s_q=2, h_q=64, topk=200, topk_length=True, out_of_range=True,
                             empty_row=True, seed=5)
    sparse.run_case(case, num_splits=splits)


def _fp8_dense():
    """The dense FP8 kernel: empty requests, causal s_q 2, a split request, NaN past every length."""
    import test_dense_fp8_decode_gpu as dense
    from cutemla.testing import DecodeCase

    os.environ["CUTEMLA_BACKEND"] = "kernel"
    dense.test_dense_fp8_matches_reference(None, DecodeCase(b=4, s_q=2, s_k=700, h_q=64, h_kv=1, varlen=True,
                                                            causal=True, zero_frac=0.3, seed=2))


FP8_CASES = {
    "fp8_sparse": lambda: _fp8_sparse(None),
    "fp8_sparse_split": lambda: _fp8_sparse(3),
    "fp8_dense": _fp8_dense,
}


# The other two dense schedules (used for 512-wide heads and by choice) over a partial last page and a mix
# of split and unsplit requests.
SCHEDULE_CASES = [f"{schedule}:{case}" for schedule in ("pipelined", "split_s")
                  for case in ("partial_last_page", "split_and_unsplit")]


def case_names():
    """Every case perf/sanitize.sh runs by default."""
    return list(CASES) + SCHEDULE_CASES + list(FP8_CASES)


def _check_name(name: str) -> bool:
    schedule, _, base = name.rpartition(":")
    if schedule:
        return schedule in SCHEDULES and base in CASES
    return name in CASES or name in FP8_CASES


def run_case(name: str, device: str = "cuda") -> None:
    """Run case ``name`` ([SCHEDULE:]CASE) through the kernel path once and assert it matches the reference."""
    schedule, _, name = name.rpartition(":")
    if name in FP8_CASES:
        FP8_CASES[name]()
        print(f"{name}: ok", flush=True)
        return
    if schedule:
        os.environ["CUTEMLA_DECODE_SCHEDULE"] = schedule
    from cutemla.kernels import run_dense_decode
    from cutemla.reference import mla_decode_reference
    from cutemla.schedule import get_decoding_sched_meta
    from cutemla.testing import LSE_TOL, OUT_TOL, assert_close_flashmla

    spec = CASES[name]
    inputs = build_inputs(spec, device)
    causal = spec.causal and spec.s_q > 1
    scale = spec.d ** -0.5
    meta, num_splits = get_decoding_sched_meta(inputs.cache_seqlens, spec.s_q, spec.h_q, spec.h_kv)
    out, lse = run_dense_decode(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, meta,
                                num_splits, scale, causal)
    torch.cuda.synchronize()
    ref_out, ref_lse = mla_decode_reference(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens,
                                            512, scale, causal)
    assert_close_flashmla("out", out.float(), ref_out.float(), **OUT_TOL)
    assert_close_flashmla("lse", lse, ref_lse, **LSE_TOL)
    print(f"{schedule + ':' if schedule else ''}{name}: ok (b={spec.b}, splits={int(num_splits[-1])})",
          flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--warmup", action="store_true", help="compile the kernels the cases need, then exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(case_names()))
        return 0
    unknown = [c for c in args.cases if not _check_name(c)]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {case_names()}, optionally as SCHEDULE:CASE for "
                     f"a dense case, SCHEDULE in {SCHEDULES}")
    names = args.cases or case_names()
    if args.warmup:  # one run of each case compiles (and caches on disk) every variant they use
        # plus any named ones outside the default list (e.g. seesaw_named:CASE), run last because a
        # SCHEDULE: prefix stays set for the cases after it
        names = case_names() + [c for c in args.cases if c not in case_names()]
    failed = 0
    for name in names:
        try:
            run_case(name)
        except Exception as exc:  # keep going: one log covers every case
            failed += 1
            print(f"{name}: FAILED: {exc!r}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
