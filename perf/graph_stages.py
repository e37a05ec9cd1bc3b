"""What the decode and the combine each cost inside a CUDA graph (GPU only).

    python -m perf.graph_stages --cases 128x2x4096:h128,varlen 1x1x65536:h128 --out stages.csv

For each case three graphs are captured from the same launches (`cutemla.kernels.prepare_dense_decode`,
metadata planned once): the whole call (decode, then combine), the decode alone, and the combine alone (its
inputs are the partials the decode left in the workspace). They take turns as in ``perf.ab`` (a warm-up, then
trials in rotating order; best mean of ``replays`` replays). ``combine_share`` is 1 - decode / call: what the
call would save without the combine, launch gap included.

torch.profiler's kernel times (``perf.profile``, the sweep's ``k_combine_us``) come from eager launches, and
the combine is launched with programmatic dependent launch: at 128 x h128 they put the combine at 15-21 us of
a 300-500 us call, yet a combine launching 16 times fewer CTAs there changed the graph-timed call by less than
1% (perf/README.md, fifth session). This measures the share the graph actually pays.
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd
import torch

from cutemla.profile import capture_cuda_graph
from cutemla.testing import DecodeCase, make_decode_inputs

from .ab import FOCUS_CASES, case_label, parse_case, time_interleaved

STAGES = ("call", "decode", "combine")


def stage_graphs(data, s_q: int, h_q: int, schedule=None) -> dict:
    """{stage: CUDA graph} of one case's inputs (`make_decode_inputs`); no "combine" when nothing is split."""
    from cutemla.kernels import prepare_dense_decode
    from cutemla.schedule import get_decoding_sched_meta

    meta, num_splits = get_decoding_sched_meta(data.cache_seqlens, s_q, h_q, 1)
    decode, decode_args, combine, combine_args, out, lse = prepare_dense_decode(
        data.q, data.kcache, data.block_table, data.cache_seqlens, meta, num_splits, 576 ** -0.5, False, schedule)

    def whole_call():
        decode(*decode_args)
        if combine is not None:
            combine(*combine_args)

    calls = {"call": whole_call, "decode": lambda: decode(*decode_args)}
    if combine is not None:
        calls["combine"] = lambda: combine(*combine_args)
    return {stage: capture_cuda_graph([fn]) for stage, fn in calls.items()}


def run(cases=FOCUS_CASES, replays: int = 30, trials: int = 5, warmup_s: float = 2.0, schedule=None):
    rows = []
    for b, s_q, s_k, h_q, varlen in cases:
        case = DecodeCase(b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=1, varlen=varlen)
        data = make_decode_inputs(case, device="cuda", generate_on_device=True)
        graphs = stage_graphs(data, s_q, h_q, schedule)
        timed = time_interleaved(graphs, trials, replays, warmup_s)
        row = dict(case=case_label(b, s_q, s_k, h_q, varlen))
        row.update({f"{stage}_us": round(timed[stage], 2) if stage in timed else float("nan")
                    for stage in STAGES})
        row["combine_share"] = round(1.0 - timed["decode"] / timed["call"], 4)
        row["device"] = torch.cuda.get_device_name()
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        data = graphs = None
        torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=None, metavar="BxSQxSK:hH[,varlen]",
                        help="as perf.ab's --cases (default: its FOCUS_CASES)")
    parser.add_argument("--schedule", default=None, help="the decode schedule (default: the launcher's)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    cases = [parse_case(spec) for spec in args.cases] if args.cases else FOCUS_CASES
    frame = run(cases, args.replays, args.trials, args.warmup_s, args.schedule)
    if args.out:
        frame.to_csv(args.out, index=False)
    print(frame.drop(columns="device").to_string(index=False))


if __name__ == "__main__":
    main()
