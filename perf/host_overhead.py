"""Host (Python) overhead of one decode call: the same table on the CPU (compiled kernels stubbed) and on the GPU.

    python -m perf.host_overhead [--iters 20000]   # CPU: everything but the compiled kernels runs
    python -m perf.host_overhead --cuda            # on an sm90 GPU host: the real calls, kernels launched
    python -m perf.host_overhead --cuda --profile  # cProfile of one call and its pieces timed alone

On the CPU the compiled decode / combine functions are replaced by no-ops (``stub_compiled_kernels``), so the
launchers, checks, allocations, views and caches run as on the GPU host; only the TVM-FFI launches (~12 us
there) and the device scheduler are missing (the get_mla_metadata row runs the host scheduler on the CPU).

With --cuda the case is tiny (one request of 64 tokens), so the GPU finishes each call's kernels before the
host has issued the next call and the loop is bound by host time: wall time per call (no sync inside the
loop) is then the host overhead, launches included. The GPU time of the same call (CUDA events over a
graph replay) is printed beside it to show that the loop was indeed host-bound.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock

import torch

import cutemla
from cutemla import interface, kernels, ops
from cutemla.decoder import MLADecoder
from cutemla.profile import capture_cuda_graph

OLD_STYLE = "flash_mla_with_kvcache (old-style meta, num_splits)"


def _noop_launch(*args) -> None:
    pass


@contextlib.contextmanager
def stub_compiled_kernels():
    """Pretend the kernel backend is available on CPU, with no-op compiled decode and combine functions."""
    stubs = (lambda *args, **kwargs: _noop_launch, lambda *args, **kwargs: _noop_launch)
    with mock.patch.object(kernels, "kernels_available", lambda device: True), \
            mock.patch.object(kernels, "_launch", stubs), \
            mock.patch.object(kernels, "_dsl_dtype", lambda dtype: dtype), \
            mock.patch.dict(kernels._compiled_launches, clear=True):
        interface._reset_backend_state()
        try:
            yield
        finally:
            interface._reset_backend_state()


def _time_per_call(fn, iters: int, loops: int = 5) -> float:
    """Best of `loops` timed loops, in microseconds per call (the best is the least disturbed by other load)."""
    for _ in range(min(iters, 200)):
        fn()
    best = float("inf")
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - start) / iters)
    return best * 1e6


def make_inputs(device, b: int = 1, s_q: int = 1, h_q: int = 16, h_kv: int = 1, seqlen: int = 64):
    """(q, kcache, block_table, seqlens, meta, splits) of `b` requests of `seqlen` tokens."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, s_q, h_q, 576, generator=gen).to(device, torch.bfloat16)
    kcache = torch.randn(b * 4, 64, h_kv, 576, generator=gen).to(device, torch.bfloat16)
    block_table = torch.arange(b * 4, dtype=torch.int32, device=device).view(b, 4)
    seqlens = torch.full((b,), seqlen, dtype=torch.int32, device=device)
    meta, splits = cutemla.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv, h_q)
    return q, kcache, block_table, seqlens, meta, splits


def make_calls(device, b: int = 1, s_q: int = 1, h_q: int = 16, h_kv: int = 1, seqlen: int = 64) -> dict:
    """The timed calls, by name, on one request of `seqlen` tokens (the same table on the CPU and the GPU)."""
    q, kcache, block_table, seqlens, meta, splits = make_inputs(device, b, s_q, h_q, h_kv, seqlen)
    sched = cutemla.get_mla_metadata()[0]
    decoder = MLADecoder(b, s_q, h_q, h_kv, dtype=torch.bfloat16, device=device, max_blocks_per_seq=4)
    decoder.plan(seqlens)
    decoder.block_table[:b].copy_(block_table)
    scale = 576 ** -0.5
    return {
        "MLADecoder.run (static buffers, prepared launches; plan() once)":
            lambda: decoder.run(decoder.q_buf[:b], kcache, decoder.block_table[:b]),
        "MLADecoder.run(None, kv_cache, None) (inputs already in q_buf / block_table: no slices, no checks)":
            lambda: decoder.run(None, kcache, None),
        "flash_mla_with_kvcache (FlashMLASchedMeta reused)":
            lambda: cutemla.flash_mla_with_kvcache(q, kcache, block_table, seqlens, 512, sched, causal=True),
        OLD_STYLE:
            lambda: cutemla.flash_mla_with_kvcache(q, kcache, block_table, seqlens, 512, meta, splits,
                                                   causal=True),
        "get_mla_metadata (device scheduler; host scheduler on CPU) + flash_mla_with_kvcache":
            lambda: cutemla.flash_mla_with_kvcache(
                q, kcache, block_table, seqlens, 512,
                *cutemla.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv, h_q), causal=True),
        "cutemla.ops.mla_decode (eager, no dispatcher)":
            lambda: ops.mla_decode(q, kcache, block_table, seqlens, meta, splits, causal=True),
        "kernels.run_dense_decode (launches only)":
            lambda: kernels.run_dense_decode(q, kcache, block_table, seqlens, meta, splits, scale, True),
    }


def measure(iters: int = 20000, loops: int = 5) -> dict:
    """Microseconds per call (best of `loops` loops) of each entry point on the CPU, compiled kernels stubbed."""
    with stub_compiled_kernels():
        calls = make_calls(torch.device("cpu"))
        results = {}
        for name, fn in calls.items():
            fn()
            results[name] = _time_per_call(fn, iters, loops)
    return results


def measure_cuda(iters: int = 5000) -> dict:
    """Microseconds of host time per real call on the current GPU (best of 5 loops, no sync in a loop)."""
    calls = make_calls(torch.device("cuda"))
    results = {}
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        results[name] = _time_per_call(fn, iters)
        torch.cuda.synchronize()
    # GPU time of one call, to show the loop above was host-bound
    graph = capture_cuda_graph([calls[OLD_STYLE]])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(200):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    results["GPU time of one call (graph replay, for comparison)"] = start.elapsed_time(end) / 200 * 1e3
    return results


def profile_cuda(iters: int = 2000, top: int = 30) -> None:
    """cProfile of the real old-style call on the GPU (host side), plus the pieces timed alone."""
    import cProfile
    import pstats
    import sys

    import tvm_ffi

    print(f"torch {torch.__version__}, tvm_ffi {tvm_ffi.__version__}, python {sys.version.split()[0]}, "
          f"torch.Tensor.__dlpack_c_exchange_api__: {hasattr(torch.Tensor, '__dlpack_c_exchange_api__')}")
    device = torch.device("cuda")
    q, kcache, block_table, seqlens, meta, splits = make_inputs(device)
    call = make_calls(device)[OLD_STYLE]

    call()
    torch.cuda.synchronize()
    def device_guard():
        with torch.cuda.device(device):
            pass

    decode, decode_args, combine, combine_args, _, _ = kernels.prepare_dense_decode(
        q, kcache, block_table, seqlens, meta, splits, 576 ** -0.5, True)
    pieces = {
        "kernels.prepare_dense_decode (allocations, views, compiled-fn lookup)":
            lambda: kernels.prepare_dense_decode(q, kcache, block_table, seqlens, meta, splits, 576 ** -0.5, True),
        "decode launch alone (TVM-FFI call: TMA descriptors + launch)": lambda: decode(*decode_args),
        "combine launch alone (TVM-FFI call)": lambda: combine(*combine_args),
        "torch.empty (one CUDA tensor)": lambda: torch.empty(1, 16, 512, device=device),
        "torch.cuda.device(device) enter+exit": device_guard,
        "tvm_ffi.from_dlpack(q)": lambda: tvm_ffi.from_dlpack(q),
        "full call": call,
    }
    for name, fn in pieces.items():
        print(f"{_time_per_call(fn, iters):8.2f} us  {name}")
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20000)
    parser.add_argument("--loops", type=int, default=5, help="timed loops per call on the CPU (best is kept)")
    parser.add_argument("--cuda", action="store_true", help="time the real calls on the GPU (sm90 host)")
    parser.add_argument("--profile", action="store_true", help="with --cuda: cProfile of the real call")
    args = parser.parse_args(argv)
    if args.cuda and args.profile:
        profile_cuda(min(args.iters, 2000))
        return
    results = measure_cuda(min(args.iters, 5000)) if args.cuda else measure(args.iters, args.loops)
    for name, us in results.items():
        print(f"{us:8.2f} us  {name}")


if __name__ == "__main__":
    main()
