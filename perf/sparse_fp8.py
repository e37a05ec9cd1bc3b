"""FP8 decode benchmark inputs and metrics (FlashMLA's method), and a split-count / kernel-config script.

    python -m perf.sweep --preset fp8 --providers cutemla,reference,flashmla-baseline   # CSV rows (the sweep)
    python -m perf.sparse_fp8 [--preset flashmla|tp|all] [--splits auto 1 4 ...] [--configs sparse_fp8_u8_packed ...]
                              [--out results.csv]

The sweep (``perf.sweep``, preset ``fp8`` or cases with ``fp8`` / ``topk<N>``) imports the input builders and
formulas below, so its FP8 rows and this script's agree. This script stays for what the sweep does not vary:
the sparse kernel's split count and config (``run_sparse_fp8_decode`` directly, needs an sm90 GPU). Each of its
rows is one call timed in a CUDA graph (``cutemla.profile.time_cuda_graph``: best and median of 10 x 50
replays). Metrics as in FlashMLA's ``tests/test_flash_mla_sparse_decoding.py`` (lib.py):

* FLOP  = 2 * b * s_q * h_q * topk * (576 + 512)  (every slot counted, valid or not)
* bytes = 2 * b * s_q * h_q * (576 + 512) + unique_tokens * 656  (q in, out; each distinct cache token read once)

Dense decode over the FP8 cache (``is_fp8_kvcache=True`` without indices, a cutemla extension) counts the same
way with every token of every request read once: FLOP = 2 * s_q * h_q * sum(len) * (576 + 512),
bytes = 2 * b * s_q * h_q * (576 + 512) + sum(len) * 656.

FlashMLA reports about 410 TFLOP/s on an H800 for b=128, h_q=128, s_q=2, topk=2048 (design/flashmla.md §5);
``flashmla_h800_tflops`` carries that number on the matching rows (the sweep: a ``flashmla-baseline`` row).
Sparse inputs: s_kv = 32k cache tokens, indices drawn uniformly from them (per (b, s) row, with repeats) and
~1% set to -1, as FlashMLA's perf cases.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from typing import Optional

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
INVALID_FRAC = 0.01  # share of -1 slots in the drawn indices


def make_inputs(b, s_q, h_q, topk, s_kv, seed=0, device="cuda"):
    """FlashMLA's sparse perf inputs: ``(q, packed cache of ceil(s_kv / 64) pages, indices, attn_sink)``."""
    from cutemla.layouts.fp8_cache import quantize_fp8_cache

    gen = torch.Generator(device=device).manual_seed(seed)
    page = 64
    num_blocks = -(-s_kv // page)
    cache = (torch.randn(num_blocks, page, 1, D_QK, generator=gen, device=device) / 10).to(torch.bfloat16)
    packed = quantize_fp8_cache(cache)
    q = (torch.randn(b, s_q, h_q, D_QK, generator=gen, device=device) / 10).to(torch.bfloat16)
    indices = torch.randint(0, num_blocks * page, (b, s_q, topk), generator=gen, device=device, dtype=torch.int32)
    indices[torch.rand(b, s_q, topk, generator=gen, device=device) < INVALID_FRAC] = -1
    sink = torch.randn(h_q, generator=gen, device=device)
    return q, packed, indices, sink


def sparse_flops(b, s_q, h_q, topk) -> float:
    """FlashMLA's count: every top-k slot, valid or not, costs QK^T (576) and PV (512)."""
    return 2.0 * b * s_q * h_q * topk * (D_QK + D_V)


def fp8_bytes(b, s_q, h_q, tokens_read) -> float:
    """q in and out in bf16, plus 656 bytes per distinct cache token read (sparse and dense FP8 alike)."""
    return 2.0 * b * s_q * h_q * (D_QK + D_V) + float(tokens_read) * BYTES_PER_TOKEN


def unique_tokens(indices) -> int:
    """Distinct valid token ids: each is loaded once from HBM however many slots name it."""
    return int(torch.unique(indices[indices >= 0]).numel())


def expected_unique_tokens(slots, s_kv, invalid_frac=INVALID_FRAC) -> float:
    """E[distinct ids] for ``slots`` uniform draws from ``s_kv`` tokens (``invalid_frac`` of them -1): the
    bytes of a case whose indices were not drawn here (the FlashMLA H800 reference row)."""
    valid = slots * (1.0 - invalid_frac)
    return s_kv * -math.expm1(valid * math.log1p(-1.0 / s_kv))


def metrics(b, s_q, h_q, topk, indices) -> tuple[float, float]:
    return sparse_flops(b, s_q, h_q, topk), fp8_bytes(b, s_q, h_q, unique_tokens(indices))


def dense_fp8_metrics(b, s_q, h_q, cache_seqlens) -> tuple[float, float]:
    """Dense decode over the FP8 cache: every token of every request is read once (656 bytes) and costs
    576 + 512 MACs per query row."""
    tokens = float(cache_seqlens.double().sum())
    return 2.0 * s_q * h_q * tokens * (D_QK + D_V), fp8_bytes(b, s_q, h_q, tokens)


def flashmla_h800_tflops(b, s_q, h_q, topk) -> Optional[float]:
    """FlashMLA's reported H800 rate for this sparse config, or None."""
    return FLASHMLA_H800_TFLOPS.get((b, s_q, h_q, topk))


def make_dense_fp8_inputs(decode_case, device="cuda", generate_on_device=False):
    """``cutemla.testing.make_decode_inputs`` (bf16, h_kv = 1, d = 576) with the cache packed into 656-byte
    FP8 tokens by ``quantize_fp8_cache``; q stays bf16. NaN rows past each length become NaN tiles, never read."""
    from cutemla.layouts.fp8_cache import quantize_fp8_cache
    from cutemla.testing import make_decode_inputs

    data = make_decode_inputs(decode_case, device, generate_on_device=generate_on_device)
    return dataclasses.replace(data, kcache=quantize_fp8_cache(data.kcache))


@dataclasses.dataclass
class SparseInputs:
    """One sparse case's tensors (``make_inputs``), in the shape the sweep's providers take."""

    q: torch.Tensor  # [b, s_q, h_q, 576] bf16
    kcache: torch.Tensor  # [num_blocks, 64, 1, 656] uint8
    indices: torch.Tensor  # [b, s_q, topk] int32 global token ids, -1 = skip
    attn_sink: torch.Tensor  # [h_q] fp32
    case: object  # what built it (perf.cases.SweepCase in the sweep)

    @property
    def mean_seqlen(self) -> float:
        """Valid slots per query row: the keys each row attends (the sweep's ``mean_sk``)."""
        return float((self.indices >= 0).sum()) / (self.indices.shape[0] * self.indices.shape[1])


def make_sparse_inputs(b, s_q, h_q, topk, s_kv, seed=0, device="cuda", case=None) -> SparseInputs:
    """``make_inputs`` as one object, so the sweep's providers see the same draw as this script."""
    return SparseInputs(*make_inputs(b, s_q, h_q, topk, s_kv, seed=seed, device=device), case=case)


def run(rows, split_options, out_path=None, configs=None):
    from cutemla.kernels.sparse_decode import DEFAULT_CONFIG, choose_num_splits, run_sparse_fp8_decode
    from cutemla.profile import time_cuda_graph

    device = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    results = []
    for b, s_q, h_q, topk, s_kv in rows:
        q, packed, indices, sink = make_inputs(b, s_q, h_q, topk, s_kv)
        flop, nbytes = metrics(b, s_q, h_q, topk, indices)
        for config, option in [(c, o) for c in (configs or (DEFAULT_CONFIG,)) for o in split_options]:
            splits = choose_num_splits(b, s_q, h_q, topk, num_sms) if option == "auto" else int(option)

            def call(splits=splits, config=config, inputs=(q, packed, indices, sink)):
                return run_sparse_fp8_decode(*inputs[:3], D_QK ** -0.5, attn_sink=inputs[3], num_splits=splits,
                                             config=config)

            timing = time_cuda_graph([call])
            us = timing.min_us
            row = dict(case=f"{b}x{s_q}x{s_kv} topk{topk} h{h_q}", b=b, s_q=s_q, h_q=h_q, topk=topk, s_kv=s_kv,
                       config=config, splits=splits, split_option=option, us=round(us, 2), us_median=round(timing.median_us, 2),
                       tflops=round(flop / us / 1e6, 1), gbps=round(nbytes / us / 1e3, 1),
                       flashmla_h800_tflops=flashmla_h800_tflops(b, s_q, h_q, topk) or "",
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
    parser.add_argument("--configs", nargs="+", default=None,
                        help="kernel variants (cutemla.kernels.sparse_decode.CONFIGS), e.g. sparse_fp8 "
                             "sparse_fp8_packed (default: the launcher's DEFAULT_CONFIG)")
    parser.add_argument("--out", default=None, help="CSV path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("perf.sparse_fp8 needs a CUDA (sm90) GPU", file=sys.stderr)
        return 2
    run(PRESETS[args.preset], args.splits, args.out, args.configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
