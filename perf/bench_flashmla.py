"""Benchmark cutemla on FlashMLA's baseline configs, in the baseline CSV format.

    python -m perf.bench_flashmla --out results.csv [--cases small|all] [--check]

Method (same as ../shared/baselines/README.md): inputs like FlashMLA's tests (bf16, d=576, dv=512,
h_kv=1, page 64, random block-table permutation, q and k ~ N(0, 0.1^2) clamped to [-1, 1]; varlen draws
each length from N(s_k, s_k/2), at least s_q). One whole call (split-KV decode and combine, reusing
the scheduler metadata) is captured in a CUDA graph and replayed 50 times; `us` is the best of 5 such means.
tflops = b*h_q*s_q*mean_sk*2*(576+512)/t; gbps = b*(s_q*h_q*576*2 + mean_sk*576*2 + s_q*h_q*512*2)/t.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys

import torch

# (b, s_q, s_k, h_q, causal, varlen): the rows of flashmla_h100.csv.
FLASHMLA_CONFIGS = [
    *[(128, 1, s_k, 128, 0, 1) for s_k in (4096, 8192, 16384, 32768)],
    *[(128, 2, s_k, 128, 0, 1) for s_k in (4096, 8192, 16384, 32768)],
    *[(128, 2, s_k, 128, 1, 1) for s_k in (4096, 8192, 16384, 32768)],
    *[(128, 1, s_k, h_q, 0, 1) for h_q in (16, 32, 64) for s_k in (4096, 16384)],
    *[(b, 1, s_k, h_q, 0, 0) for b, s_k in ((1, 65536), (4, 32768), (16, 8192), (32, 2048), (256, 1024))
      for h_q in (16, 128)],
]
FIELDS = ["impl", "b", "s_q", "s_k", "h_q", "causal", "varlen", "mean_sk", "us", "tflops", "gbps",
          "max_abs_err"]
D, DV, PAGE = 576, 512, 64


def make_inputs(b, s_q, s_k, h_q, varlen, seed=0, device="cuda"):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if varlen:
        lens = torch.randn(b, generator=gen, device=device, dtype=torch.float64) * (s_k / 2) + s_k
        seqlens = lens.round().clamp(min=s_q).to(torch.int32)
    else:
        seqlens = torch.full((b,), s_k, dtype=torch.int32, device=device)
    max_len = int(seqlens.max())
    max_blocks = math.ceil(max_len / 256) * 256 // PAGE
    num_blocks = b * max_blocks
    block_table = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32).view(b, max_blocks)
    q = (torch.randn(b, s_q, h_q, D, generator=gen, device=device) / 10).clamp_(-1, 1).bfloat16()
    kcache = torch.empty(num_blocks, PAGE, 1, D, dtype=torch.bfloat16, device=device)
    for start in range(0, num_blocks, 4096):  # bounded temporaries
        chunk = kcache[start:start + 4096]
        chunk.copy_((torch.randn(chunk.shape, generator=gen, device=device) / 10).clamp_(-1, 1))
    return q, kcache, block_table, seqlens


def time_graph(fn, replays=50, trials=5):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up: compiles/loads kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    best = float("inf")
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / replays)
    return best


def bench_case(b, s_q, s_k, h_q, causal, varlen, check=False):
    from cutemla.kernels import run_dense_decode
    from cutemla.schedule import get_decoding_sched_meta

    q, kcache, block_table, seqlens = make_inputs(b, s_q, s_k, h_q, varlen)
    scale = D ** -0.5

    # Like the baseline: the metadata is computed once and reused by every call (as every layer of
    # a serving step does); the timed call is the split-KV decode plus the combine.
    meta, num_splits = get_decoding_sched_meta(seqlens, s_q, h_q, 1)

    def call():
        return run_dense_decode(q, kcache, block_table, seqlens, meta, num_splits, scale, bool(causal))

    us = time_graph(call)
    mean_sk = float(seqlens.double().mean())
    flops = b * h_q * s_q * mean_sk * 2 * (D + DV)
    nbytes = b * (s_q * h_q * D * 2 + mean_sk * D * 2 + s_q * h_q * DV * 2)
    err = float("nan")
    if check and b * s_k <= 300_000:
        from cutemla.reference import mla_decode_reference

        out, _ = call()
        ref, _ = mla_decode_reference(q, kcache, block_table, seqlens, causal=bool(causal))
        err = float((out.float() - ref.float()).abs().max())
    return dict(impl="cutemla", b=b, s_q=s_q, s_k=s_k, h_q=h_q, causal=causal, varlen=varlen,
                mean_sk=round(mean_sk), us=round(us, 2), tflops=round(flops / us / 1e6, 1),
                gbps=round(nbytes / us / 1e3), max_abs_err=err)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="CSV path (default: stdout)")
    parser.add_argument("--cases", choices=("small", "all"), default="all")
    parser.add_argument("--check", action="store_true", help="max |out - reference| on small cases")
    args = parser.parse_args(argv)
    configs = FLASHMLA_CONFIGS if args.cases == "all" else [c for c in FLASHMLA_CONFIGS if c[0] * c[2] <= 2**19]
    sink = open(args.out, "w", newline="") if args.out else sys.stdout
    writer = csv.DictWriter(sink, fieldnames=FIELDS)
    writer.writeheader()
    for config in configs:
        row = bench_case(*config, check=args.check)
        writer.writerow(row)
        sink.flush()
        print(row, file=sys.stderr)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
