"""Tensor-parallel MLA decode: one DeepSeek-V3 attention layer sharded by query heads over N ranks.

Every rank builds the same random-weight layer (same seed), keeps its ``heads / N`` query heads
(:func:`cutemla.models.tensor_parallel.shard_mla_attention`) and a full replica of the paged latent cache,
decodes with cutemla on its heads only, and sums the row-parallel ``o_proj`` partial outputs with
``torch.distributed.all_reduce`` (NCCL on CUDA, gloo on CPU). Rank 0 then reruns the same steps with the
unsharded layer and checks the all-reduced outputs against it. Throughput (tokens/s of the sharded layer,
all-reduce included) is printed per N.

    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel_decode.py --device cpu --steps 2
    torchrun --standalone --nproc-per-node 8 examples/tensor_parallel_decode.py      # 8 GPUs, 16 heads each

NCCL_NVLS_ENABLE=0 is set (if unset) before the process group is created: NVLink SHARP multicast is not
wanted for these small all-reduces and is unavailable on some hosts. Without torchrun (no ``RANK`` in the
environment) the script runs as a single rank (N = 1).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before torch.distributed creates a NCCL communicator

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from cutemla.models.deepseek_mla import DeepseekMLAAttention, MLAConfig, PagedLatentCache, step_metadata  # noqa: E402
from cutemla.models.tensor_parallel import shard_mla_attention, tp_forward  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _tolerance(dtype: torch.dtype, scale: float) -> float:
    # Partial outputs are rounded to the dtype before the sum (and summed in it), the unsharded o_proj rounds
    # once: a few ulps of the output's magnitude apart in bf16/fp16; fp32 differs by summation order only.
    rel = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    return rel * scale + 1e-6


def _build_cache(args, dtype, device, layer: DeepseekMLAAttention) -> PagedLatentCache:
    """A cache pre-filled with ``args.context`` tokens per request (their latents only; no attention needed)."""
    pages_per_seq = -(-(args.context + args.steps) // args.page_size)
    cache = PagedLatentCache(1, num_blocks=args.batch * pages_per_seq, batch=args.batch,
                             max_blocks_per_seq=pages_per_seq, page_size=args.page_size, dtype=dtype,
                             device=device, seed=args.seed)
    if args.context:
        step = cache.reserve(args.context)
        gen = torch.Generator(device).manual_seed(args.seed + 1)
        for start in range(0, args.context, 512):  # chunks: batch x context x hidden at once can be GiBs
            stop = min(start + 512, args.context)
            prefix = torch.randn(args.batch, stop - start, args.hidden, dtype=dtype, device=device, generator=gen)
            cache.write(0, layer.latent(prefix, step.positions[:, start:stop]), step.slots[:, start:stop])
    return cache


def _decode(layer, args, dtype, device, hidden_steps, tp: bool):
    """Run ``len(hidden_steps)`` one-token steps with cache growth; returns (outputs, seconds, cache)."""
    cache = _build_cache(args, dtype, device, layer)
    outputs, start = [], None
    for t, hidden in enumerate(hidden_steps):
        if t == 1 or len(hidden_steps) == 1 and t == 0:  # time after the first step (compiles, warmup)
            _sync(device)
            if tp and dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
        step = cache.reserve(1)  # host page bookkeeping: a new page when a request crosses a boundary
        meta, splits = step_metadata(cache, 1, layer.config.num_heads)  # h_q of *this rank*
        if tp:
            out = tp_forward(layer, hidden, step, cache, 0, meta, splits)
        else:
            out = layer(hidden, step, cache, 0, meta, splits)
        outputs.append(out)
    _sync(device)
    elapsed = time.perf_counter() - start
    return outputs, elapsed, cache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=32, help="decode steps, one new token per request each")
    parser.add_argument("--batch", type=int, default=None, help="requests (default 64 on CUDA, 2 on CPU)")
    parser.add_argument("--context", type=int, default=None,
                        help="tokens already cached per request (default 4000 on CUDA, 63 on CPU)")
    parser.add_argument("--heads", type=int, default=128, help="query heads of the full layer (DeepSeek-V3: 128)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 7168 on CUDA, 64 on CPU)")
    parser.add_argument("--q-lora-rank", type=int, default=None, help="default 1536 on CUDA, 32 on CPU")
    parser.add_argument("--nope-dim", type=int, default=None, help="qk_nope_head_dim (default 128 CUDA, 16 CPU)")
    parser.add_argument("--v-dim", type=int, default=None, help="v_head_dim (default 128 CUDA, 16 CPU)")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    on_cuda = args.device == "cuda"
    for name, cuda_default, cpu_default in (("batch", 64, 2), ("context", 4000, 63), ("hidden", 7168, 64),
                                            ("q_lora_rank", 1536, 32), ("nope_dim", 128, 16), ("v_dim", 128, 16)):
        if getattr(args, name) is None:
            setattr(args, name, cuda_default if on_cuda else cpu_default)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if on_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        os.environ.setdefault("CUTEMLA_BACKEND", "reference")  # the CPU path; no fallback warning
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=datetime.timedelta(minutes=5),
                                **({"device_id": device} if on_cuda else {}))
    dtype = DTYPES[args.dtype]

    config = MLAConfig(hidden_size=args.hidden, num_heads=args.heads, q_lora_rank=args.q_lora_rank,
                       qk_nope_head_dim=args.nope_dim, v_head_dim=args.v_dim)
    torch.manual_seed(args.seed)  # the same full layer on every rank
    full = DeepseekMLAAttention(config).to(device=device, dtype=dtype).eval()
    sharded = shard_mla_attention(full, rank, world_size)
    if rank != 0:
        del full  # only rank 0 keeps the unsharded layer, for the check
    gen = torch.Generator(device).manual_seed(args.seed + 2)  # the same new-token hidden states on every rank
    hidden_steps = [torch.randn(args.batch, 1, args.hidden, dtype=dtype, device=device, generator=gen)
                    for _ in range(args.steps)]

    with torch.no_grad():
        got, elapsed, cache = _decode(sharded, args, dtype, device, hidden_steps, tp=True)
        timed = args.steps - 1 if args.steps > 1 else 1
        tp_tokens_s = timed * args.batch / elapsed
        if rank == 0:
            want, base_elapsed, _ = _decode(full, args, dtype, device, hidden_steps, tp=False)
            max_err = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
            scale = max(w.float().abs().max().item() for w in want)
            tol = _tolerance(dtype, scale)
            print(f"TP={world_size} device={device.type} dtype={args.dtype} heads/rank={sharded.config.num_heads} "
                  f"of {args.heads} batch={args.batch} context={args.context} steps={args.steps} "
                  f"final_len={cache.lengths[0]} pages/seq={len(cache._pages[0])}")
            print(f"max abs error vs single-device layer: {max_err:.3e} (tolerance {tol:.3e}, max |out| {scale:.3e})")
            print(f"TP={world_size}: {tp_tokens_s:.1f} tokens/s sharded+all-reduce "
                  f"({elapsed / timed * 1e3:.3f} ms/step); single device: {timed * args.batch / base_elapsed:.1f} "
                  "tokens/s")
            assert all(torch.isfinite(g).all() for g in got), "non-finite TP output"
            assert max_err <= tol, f"TP output differs from the single-device layer: {max_err} > {tol}"
            print("check passed")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
