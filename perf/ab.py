"""A/B timing of decode-kernel variants on the same inputs (GPU only).

    python -m perf.ab --variants pipelined:2 split_s:2 split_s:0 --out ab.csv

A variant is schedule:l2_prefetch_blocks, or schedule:auto for the launcher's own choice. Inputs are drawn on the GPU once per case (fast even for
long contexts) and every variant is timed on them, interleaved, as one whole call (decode + combine,
metadata reused, like the FlashMLA baseline) replayed in a CUDA graph; `us` is the best mean of
`trials` rounds of `replays` replays (cutemla.profile.time_cuda_graph).
"""
from __future__ import annotations

import argparse
import os
import sys

import pandas as pd
import torch

from cutemla.profile import time_cuda_graph
from cutemla.testing import DecodeCase, decode_bytes, decode_flops, make_decode_inputs

# (b, s_q, s_k, h_q, varlen): the cases of the performance issue plus a few neighbours.
FOCUS_CASES = [
    (128, 1, 16384, 16, True), (128, 1, 16384, 64, True), (128, 1, 16384, 128, True),
    (128, 2, 8192, 128, True), (1, 1, 65536, 128, False), (1, 1, 65536, 16, False),
    (4, 1, 32768, 128, False), (32, 1, 2048, 16, False), (32, 1, 2048, 128, False),
]


def run(variants, cases=FOCUS_CASES, replays=30, trials=5):
    from cutemla.kernels import run_dense_decode
    from cutemla.schedule import get_decoding_sched_meta

    rows = []
    for b, s_q, s_k, h_q, varlen in cases:
        case = DecodeCase(b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=1, varlen=varlen)
        data = make_decode_inputs(case, device="cuda", generate_on_device=True)
        meta, num_splits = get_decoding_sched_meta(data.cache_seqlens, s_q, h_q, 1)
        mean_sk = data.mean_seqlen
        flops = decode_flops(b, s_q, h_q, 1, mean_sk)
        nbytes = decode_bytes(b, s_q, h_q, 1, mean_sk)
        for variant in variants:
            schedule, prefetch = variant.split(":")
            if prefetch == "auto":
                os.environ.pop("CUTEMLA_L2_PREFETCH", None)
            else:
                os.environ["CUTEMLA_L2_PREFETCH"] = prefetch  # read by run_dense_decode per call

            def call():
                return run_dense_decode(data.q, data.kcache, data.block_table, data.cache_seqlens,
                                        meta, num_splits, 576 ** -0.5, False, schedule)

            us = time_cuda_graph([call], trials=trials, replays=replays).min_us
            rows.append(dict(case=f"{b}x{s_q}x{s_k}:h{h_q}" + (",varlen" if varlen else ""),
                             variant=variant, us=round(us, 2), tflops=round(flops / us / 1e6, 1),
                             gbps=round(nbytes / us / 1e3)))
            print(rows[-1], file=sys.stderr, flush=True)
        data = meta = num_splits = None  # free the inputs before the next case
        torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["pipelined:auto", "split_s:auto"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)
    frame = run(args.variants, replays=args.replays, trials=args.trials)
    if args.out:
        frame.to_csv(args.out, index=False)
    print(frame.pivot(index="case", columns="variant", values="us").to_string())


if __name__ == "__main__":
    main()
