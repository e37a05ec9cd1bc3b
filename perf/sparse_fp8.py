"""Benchmark rows for sparse (top-k) decode over the FP8 cache, FlashMLA's method (needs an sm90 GPU).

    python -m perf.sparse_fp8 [--preset flashmla|tp|all] [--splits auto 1 4 ...] [--configs sparse_fp8 ...]
                              [--out results.csv]

Self-contained (not yet a provider of ``perf.sweep``). Each row is one ``flash_mla_with_kvcache(...,
is_fp8_kvcache=True, indices=...)`` call timed in a CUDA graph (``cutemla.profile.time_cuda_graph``: best and
median of 10 x 50 replays), metrics as in FlashMLA's ``tests/test_flash_mla_sparse_decoding.py`` (lib.py):

* FLOP  = 2 * b * s_q * h_q * topk * (576 + 512)  (every slot counted, valid or not)
* bytes = 2 * b * s_q * h_q * (576 + 512) + unique_tokens * 656  (q in, out; each distinct cache token read once)

FlashMLA reports about 410 TFLOP/s on an H800 for b=128, h_q=128, s_q=2, topk=2048 (design/flashmla.md §5);
``flashmla_h800_tflops`` carries that number on the matching rows. Inputs: s_kv = 32k cache tokens, indices
drawn uniformly from them (per (b, s) row, with repeats) and ~1% set to -1, as FlashMLA's perf cases.
"""
from __future__ import annotations

import argparse
import csv
import sys

import torch

PRESETS = {
    # FlashMLA's V3.2 perf cases: h_q=128, s_q=2, s_kv=32k, topk=2048, b {2, 64, 74, 128}; plus h_q=64.
    "flashmla": [(b, 2, h, 2048, 32768) for h in (128, 64) for b in (2, 64, 74, 128)],
    # Tensor-parallel ranks (h_q 16/32, which FlashMLA lacks) and a longer top-k.
    "tp": [(b, 1, h, topk, 65536) for h in (16, 32) for b in (8, 128) for topk in (2048, 8192)],
}
PRESETS["all"] = PRESETS["flashmla"] + PRESETS["tp"]
FLASHMLA_H800_TFLOPS = {(128, 2, 128, 2048): 410.0}
D_QK, D_V, BYTES_PER_TOKEN = 576, 512, 656


def make_inputs(b, s_q, h_q, topk, s_kv, seed=0, device="cuda"):
    from cutemla.layouts.fp8_cache import quantize_fp8_cache

    gen = torch.Generator(device=device).manual_seed(seed)
    page = 64
    num_blocks = -(-s_kv // page)
    cache = (torch.randn(num_blocks, page, 1, D_QK, generator=gen, device=device) / 10).to(torch.bfloat16)
    packed = quantize_fp8_cache(cache)
    q = (torch.randn(b, s_q, h_q, D_QK, generator=gen, device=device) / 10).to(torch.bfloat16)
    indices = torch.randint(0, num_blocks * page, (b, s_q, topk), generator=gen, device=device, dtype=torch.int32)
    indices[torch.rand(b, s_q, topk, generator=gen, device=device) < 0.01] = -1
    sink = torch.randn(h_q, generator=gen, device=device)
    return q, packed, indices, sink


def metrics(b, s_q, h_q, topk, indices) -> tuple[float, float]:
    flop = 2.0 * b * s_q * h_q * topk * (D_QK + D_V)
    unique = int(torch.unique(indices[indices >= 0]).numel())
    return flop, 2.0 * b * s_q * h_q * (D_QK + D_V) + unique * BYTES_PER_TOKEN


def run(rows, split_options, out_path=None, configs=("sparse_fp8",)):
    from cutemla.kernels.sparse_decode import choose_num_splits, run_sparse_fp8_decode
    from cutemla.profile import time_cuda_graph

    device = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    results = []
    for b, s_q, h_q, topk, s_kv in rows:
        q, packed, indices, sink = make_inputs(b, s_q, h_q, topk, s_kv)
        flop, nbytes = metrics(b, s_q, h_q, topk, indices)
        for config, option in [(c, o) for c in configs for o in split_options]:
            splits = choose_num_splits(b, s_q, h_q, topk, num_sms) if option == "auto" else int(option)

            def call(splits=splits, config=config, inputs=(q, packed, indices, sink)):
                return run_sparse_fp8_decode(*inputs[:3], D_QK ** -0.5, attn_sink=inputs[3], num_splits=splits,
                                             config=config)

            timing = time_cuda_graph([call])
            us = timing.min_us
            row = dict(case=f"{b}x{s_q}x{s_kv} topk{topk} h{h_q}", b=b, s_q=s_q, h_q=h_q, topk=topk, s_kv=s_kv,
                       config=config, splits=splits, split_option=option, us=round(us, 2), us_median=round(timing.median_us, 2),
                       tflops=round(flop / us / 1e6, 1), gbps=round(nbytes / us / 1e3, 1),
                       flashmla_h800_tflops=FLASHMLA_H800_TFLOPS.get((b, s_q, h_q, topk), ""),
                       device=torch.cuda.get_device_name(device))
            results.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        del q, packed, indices, sink
        torch.cuda.empty_cache()
    if out_path:
        with open(out_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="flashmla", choices=sorted(PRESETS))
    parser.add_argument("--splits", nargs="+", default=["auto"], help="'auto' and/or split counts to time")
    parser.add_argument("--configs", nargs="+", default=["sparse_fp8"],
                        help="kernel variants (cutemla.kernels.sparse_decode.CONFIGS), e.g. sparse_fp8_pipelined")
    parser.add_argument("--out", default=None, help="CSV path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("perf.sparse_fp8 needs a CUDA (sm90) GPU", file=sys.stderr)
        return 2
    run(PRESETS[args.preset], args.splits, args.out, args.configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
