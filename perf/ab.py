"""A/B timing of decode-kernel variants on the same inputs (GPU only).

    python -m perf.ab --variants pipelined:2 split_s:2 split_s:0 --out ab.csv

A variant is schedule:l2_prefetch_blocks, or schedule:auto for the launcher's own choice, optionally
followed by scheduler settings: ``:sms=N`` (plan for N SMs instead of the device's count, so
N // 2 parts at h_q 128) and ``:o=N`` (SchedulePolicy.fixed_overhead_num_blocks), e.g.
``seesaw:auto:sms=66`` to see how a case scales with the number of CTAs.

Inputs are drawn on the GPU once per case (fast even for long contexts) and every variant is captured as
one whole call (decode + combine, metadata reused, like the FlashMLA baseline) in a CUDA graph. The graphs
then take turns, trial by trial in a rotating order, so clock and temperature drift reach every variant
alike (run one after the other, two identical variants differed by up to 10% at h_q 128); `us` is the
best mean of `trials` rounds of `replays` replays. At 128 x h_q 128 the H100 reaches its 700 W power cap:
the first graph timed after an idle moment runs at the boost clock, up to 10% faster than the rest, so
without a warm-up the variant listed first won the best-capture column (perf/README.md, 2026-11-26). The
graphs therefore first take turns for ``--warmup-s`` seconds (default 2) before any trial is timed, so every
timed trial sees the steady clock. ``--captures N`` captures every variant N times, round robin, and reports
its best capture (`us`) with the median and worst (`us_median_capture`, `us_max_capture`).

To compare two source trees (builds), use ``python -m perf.ab_trees``: it runs this module from each tree's own
directory, since the working directory comes first on ``sys.path``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import pandas as pd
import torch

import cutemla
from cutemla.profile import capture_cuda_graph
from cutemla.testing import DecodeCase, decode_bytes, decode_flops, make_decode_inputs

from . import cases as sweep_cases

# (b, s_q, s_k, h_q, varlen): the cases of the performance issue plus a few neighbours.
FOCUS_CASES = [
    (128, 1, 16384, 16, True), (128, 1, 16384, 64, True), (128, 1, 16384, 128, True),
    (128, 2, 8192, 128, True), (1, 1, 65536, 128, False), (1, 1, 65536, 16, False),
    (4, 1, 32768, 128, False), (32, 1, 2048, 16, False), (32, 1, 2048, 128, False),
]


def warm_up(graphs: dict, seconds: float, replays: int, synchronize=None) -> int:
    """Replay the graphs in turn, `replays` each, until `seconds` have passed (whole rounds; none when
    seconds <= 0): the power controller settles before anything is timed. Returns the rounds run."""
    synchronize = synchronize or torch.cuda.synchronize
    rounds = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for graph in graphs.values():
            for _ in range(replays):
                graph.replay()
        synchronize()
        rounds += 1
    return rounds


def time_interleaved(graphs: dict, trials: int, replays: int, warmup_s: float = 0.0) -> dict:
    """Best mean us per replay of each graph, the graphs taking turns trial by trial (in a rotating
    order) so that clock and temperature drift over the run reaches every variant alike, after
    warm_up(graphs, warmup_s, replays)."""
    warm_up(graphs, warmup_s, replays)
    names = list(graphs)
    best = {name: float("inf") for name in names}
    for trial in range(trials):
        for k in range(len(names)):
            name = names[(trial + k) % len(names)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graphs[name].replay()
            end.record()
            end.synchronize()
            best[name] = min(best[name], start.elapsed_time(end) * 1e3 / replays)
    return best


def run(variants, cases=FOCUS_CASES, replays=30, trials=5, captures=1, warmup_s=2.0):
    from cutemla.kernels import run_dense_decode
    from cutemla.schedule import SchedulePolicy, get_decoding_sched_meta

    rows = []
    for b, s_q, s_k, h_q, varlen in cases:
        case = DecodeCase(b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=1, varlen=varlen)
        data = make_decode_inputs(case, device="cuda", generate_on_device=True)
        plans = {}  # scheduler settings -> (meta, num_splits), planned once per case
        mean_sk = data.mean_seqlen
        flops = decode_flops(b, s_q, h_q, 1, mean_sk)
        nbytes = decode_bytes(b, s_q, h_q, 1, mean_sk)
        graphs = {}
        for capture, variant in [(c, v) for c in range(captures) for v in variants]:
            schedule, prefetch, *settings = variant.split(":")
            sched = parse_scheduler_settings(settings)
            if sched not in plans:
                num_sms, overhead = sched
                policy = None if overhead is None else SchedulePolicy(fixed_overhead_num_blocks=overhead)
                plans[sched] = get_decoding_sched_meta(data.cache_seqlens, s_q, h_q, 1,
                                                       num_sms=num_sms, policy=policy)
            meta, num_splits = plans[sched]
            if prefetch == "auto":
                os.environ.pop("CUTEMLA_L2_PREFETCH", None)
            else:
                os.environ["CUTEMLA_L2_PREFETCH"] = prefetch  # read when the call is captured

            def call(meta=meta, num_splits=num_splits, schedule=schedule):
                return run_dense_decode(data.q, data.kcache, data.block_table, data.cache_seqlens,
                                        meta, num_splits, 576 ** -0.5, False, schedule)

            graphs[(variant, capture)] = capture_cuda_graph([call])
        os.environ.pop("CUTEMLA_L2_PREFETCH", None)
        timed = time_interleaved(graphs, trials, replays, warmup_s)
        for variant in variants:
            per_capture = [timed[(variant, c)] for c in range(captures)]
            us = min(per_capture)
            rows.append(dict(case=case_label(b, s_q, s_k, h_q, varlen),
                             variant=variant, us=round(us, 2), tflops=round(flops / us / 1e6, 1),
                             gbps=round(nbytes / us / 1e3),
                             us_median_capture=round(float(pd.Series(per_capture).median()), 2),
                             us_max_capture=round(max(per_capture), 2), captures=captures,
                             device=torch.cuda.get_device_name()))  # timings compare only on one device
            print(rows[-1], file=sys.stderr, flush=True)
        data = meta = num_splits = plans = graphs = None  # free the inputs before the next case
        torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def case_label(b: int, s_q: int, s_k: int, h_q: int, varlen: bool) -> str:
    """The `case` column of a FOCUS_CASES-style tuple, e.g. ``128x2x4096:h128,varlen`` (parse_case reads it back)."""
    return f"{b}x{s_q}x{s_k}:h{h_q}" + (",varlen" if varlen else "")


def parse_case(spec: str):
    """``"32x1x2048:h16"`` -> (b, s_q, s_k, h_q, varlen): a FOCUS_CASES entry by name (varlen as listed there),
    or any case in perf.cases' grammar (``16x1x8k:h16,varlen``) that uses only its h<N> and fixed/varlen
    options: perf.ab times bf16, non-causal cases with one KV head."""
    for case in FOCUS_CASES:
        if spec == f"{case[0]}x{case[1]}x{case[2]}:h{case[3]}":
            return case
    try:
        case = sweep_cases.parse_case(spec)
    except ValueError as err:
        raise SystemExit(f"--cases: {err}") from None
    if case != sweep_cases.SweepCase(case.b, case.s_q, case.s_k, case.h_q, varlen=case.varlen):
        raise SystemExit(f"--cases: {spec!r}: perf.ab takes only the h<N> and fixed/varlen options "
                         "(bf16, non-causal, one KV head)")
    return (case.b, case.s_q, case.s_k, case.h_q, case.varlen)


def parse_scheduler_settings(settings):
    """``["sms=66", "o=3"]`` -> (num_sms or None, fixed_overhead_num_blocks or None)."""
    values = {"sms": None, "o": None}
    for item in settings:
        key, _, value = item.partition("=")
        if key not in values or not value.isdigit():
            raise ValueError(f"scheduler setting {item!r}: expected sms=N or o=N")
        values[key] = int(value)
    return values["sms"], values["o"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["pipelined:auto", "split_s:auto"])
    parser.add_argument("--cases", nargs="+", default=None, metavar="BxSQxSK:hH[,varlen]",
                        help="these cases instead of FOCUS_CASES, e.g. 1x1x65536:h128 or 16x1x8k:h16,varlen "
                             "(a FOCUS_CASES name keeps its varlen flag)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--captures", type=int, default=1,
                        help="capture each variant this many times (round robin) and report the best capture "
                             "(us) and the median and worst (identical graphs differ by up to 10%% at 128 x h128)")
    parser.add_argument("--warmup-s", type=float, default=2.0,
                        help="seconds of untimed replays (all graphs in turn) before each case's trials, so the "
                             "first variant does not get the boost clock the power cap then takes away; 0 = none")
    args = parser.parse_args(argv)
    cases = [parse_case(spec) for spec in args.cases] if args.cases else FOCUS_CASES
    # Which source tree runs: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH, so an
    # A/B of two trees must run each from its own directory (an "old" tree on PYTHONPATH alone is silently ignored).
    print(f"cutemla from {os.path.dirname(os.path.abspath(cutemla.__file__))}", file=sys.stderr, flush=True)
    frame = run(args.variants, cases, replays=args.replays, trials=args.trials, captures=args.captures,
                warmup_s=args.warmup_s)
    if args.out:
        frame.to_csv(args.out, index=False)
    print(frame.pivot(index="case", columns="variant", values="us").to_string())


if __name__ == "__main__":
    main()
