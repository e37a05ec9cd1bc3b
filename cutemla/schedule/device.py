"""FlashMLA's decoding scheduler as a one-CTA CuTe DSL kernel (no host sync, CUDA-graph safe).

The kernel writes the same ``tile_scheduler_metadata`` and ``num_splits`` as
``cutemla.schedule.reference_impl.flashmla_plan`` (words 0-6 bit-exact, word 7 = 0) from a device
``cache_seqlens``. One warp: all 32 lanes sum the per-request work, then lane 0 runs the greedy fill,
which is inherently serial (each partition starts where the previous one stopped).

FlashMLA keeps per-request block counts in dynamic shared memory (``20 b + 4`` bytes, which caps b).
Here lane 0 recomputes them from ``cache_seqlens`` in global memory instead (two integer ops per value), so any
batch size works; the walk keeps the lengths of requests req-1, req, req+1 in registers and loads the next one
a step ahead. Measured on an H100 (profiler kernel time, h_q=128, 66 partitions): b=1 6 us, b=128 16 us,
b=1024 68 us, b=20000 1.17 ms, i.e. about 60 ns per request plus 50 ns per partition. A warp-parallel walk
(32 requests per step with shuffle prefix sums and a ballot) would cut the per-request cost for large batches.

Compiled once per (block_size_n, fixed_overhead_num_blocks): b and num_sm_parts are symbolic (num_sm_parts is
the meta tensor's row count). Call the compiled TVM-FFI function with torch tensors,
``fn(cache_seqlens, meta, num_splits)``; it launches on torch's current CUDA stream.
"""
from __future__ import annotations

from cutemla.kernels import jit  # pins CUTE_DSL_ARCH before cutlass is imported

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Int32
from cutlass.cute.runtime import make_fake_compact_tensor

META_WORDS = 8
WARP_THREADS = 32


class DecodingSchedMetaKernel:
    """One CTA of 32 threads that fills ``meta [num_sm_parts, 8]`` and ``num_splits [b + 1]`` (int32)."""

    def __init__(self, block_size_n: int = 64, fixed_overhead_num_blocks: int = 5):
        self.block_size_n = block_size_n
        self.overhead = fixed_overhead_num_blocks

    @cute.jit
    def __call__(self, mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor, stream: cuda.CUstream):
        self.kernel(mSeqlens, mMeta, mNumSplits).launch(grid=[1, 1, 1], block=[WARP_THREADS, 1, 1], stream=stream)

    @cute.jit
    def last_block(self, seqlen: Int32) -> Int32:
        # An empty request has last block 0, i.e. counts as one block of work (FlashMLA's convention).
        return cutlass.max(seqlen - 1, Int32(0)) // self.block_size_n

    @cute.kernel
    def kernel(self, mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor):
        lane, _, _ = cute.arch.thread_idx()
        batch = mSeqlens.shape[0]
        num_parts = mMeta.shape[0]
        overhead = self.overhead

        # Total work, spread over the warp: sum of (nblk + overhead) per request.
        total = Int32(0)
        for i in cutlass.range(lane, batch, WARP_THREADS, unroll=4):  # several loads in flight
            total += self.last_block(mSeqlens[i]) + 1 + overhead
        total = cute.arch.warp_reduction_sum(total)

        if lane == 0:
            payload = (total + num_parts - 1) // num_parts + overhead
            # Trailing partitions (begin_req == b) read FlashMLA's first_block_idx_shared[b], which aliases
            # last_block_idx_shared[0]: reproduce that begin_block so the rows compare bit-exactly.
            aliased_first_block = self.last_block(mSeqlens[0])
            last_req = batch - 1

            req = Int32(0)  # current request
            block = Int32(0)  # first block of `req` not yet assigned
            split = Int32(0)  # pieces of `req` already given to earlier partitions
            cum_splits = Int32(0)
            # The serial walk is bound by load latency, so the lengths around `req` live in registers and the
            # next one is loaded a full step before it is needed.
            prev_seqlen = Int32(0)  # seqlens[req - 1]
            cur_seqlen = mSeqlens[0]  # seqlens[req] (while req < b)
            next_seqlen = mSeqlens[cutlass.min(Int32(1), last_req)]  # seqlens[req + 1], clamped
            mNumSplits[0] = Int32(0)
            for p in cutlass.range(num_parts, unroll=1):
                begin_req = req
                mMeta[p, 0] = begin_req
                begin_block = block
                if req >= batch:
                    begin_block = aliased_first_block
                mMeta[p, 2] = begin_block
                mMeta[p, 4] = split
                first_split = Int32(0)
                if block != 0:
                    first_split = Int32(1)

                budget = payload
                # FlashMLA's inner `while (req < b) { ...; break; }`, with the break turned into a flag
                # (the DSL has no early exit from a dynamic loop).
                filling = req < batch
                while filling:
                    remaining = self.last_block(cur_seqlen) + 1 - block
                    if budget >= remaining + overhead:  # the rest of the request fits: finish it
                        cum_splits += split + 1
                        mNumSplits[req + 1] = cum_splits
                        budget -= remaining + overhead
                        req += 1
                        block = Int32(0)
                        split = Int32(0)
                        prev_seqlen = cur_seqlen
                        cur_seqlen = next_seqlen
                        next_seqlen = mSeqlens[cutlass.min(req + 1, last_req)]
                        filling = req < batch
                    else:  # cut it, if the piece would be non-empty after paying the overhead
                        if budget - overhead > 0:
                            block += budget - overhead
                            split += 1
                            budget = Int32(0)
                        filling = False

                # Where this partition stopped: inside `req`, or right after finishing req - 1.
                end_req = req - 1
                end_seqlen = prev_seqlen
                if block > 0:
                    end_req = req
                    end_seqlen = cur_seqlen
                end_last_block = self.last_block(end_seqlen)
                end_block = block
                if block == 0:
                    end_block = end_last_block + 1
                    if end_seqlen == 0:
                        end_block = Int32(0)
                last_split = Int32(0)
                if end_block != end_last_block + 1 and end_seqlen != 0:
                    last_split = Int32(1)
                if begin_req == end_req:
                    first_split = first_split | last_split
                    last_split = first_split
                mMeta[p, 1] = end_req
                mMeta[p, 3] = end_block
                mMeta[p, 5] = first_split
                mMeta[p, 6] = last_split
                mMeta[p, 7] = Int32(0)


def _fake_args():
    batch = cute.sym_int32()
    num_parts = cute.sym_int32()
    seqlens = make_fake_compact_tensor(Int32, (batch,), assumed_align=4)
    meta = make_fake_compact_tensor(Int32, (num_parts, META_WORDS), stride_order=(1, 0), assumed_align=4)
    num_splits = make_fake_compact_tensor(Int32, (cute.sym_int32(),), assumed_align=4)
    return seqlens, meta, num_splits


def compile_sched_meta(block_size_n: int = 64, fixed_overhead_num_blocks: int = 5, options: str = jit.COMPILE_OPTIONS):
    """``cute.compile`` the kernel for one pair of constants; returns the TVM-FFI function."""
    kernel = DecodingSchedMetaKernel(block_size_n, fixed_overhead_num_blocks)
    return cute.compile(kernel, *_fake_args(), jit.fake_stream(), options=options)


def get_sched_meta_fn(block_size_n: int = 64, fixed_overhead_num_blocks: int = 5):
    """The cached compiled function: call it as ``fn(cache_seqlens, meta, num_splits)`` (int32 CUDA tensors)."""
    key = (int(block_size_n), int(fixed_overhead_num_blocks))
    return jit.compile_cache.get("sched_meta", key, lambda: compile_sched_meta(*key))


def compile_configs():
    """Configs for ``cutemla.kernels.ptx_report.run_report("cutemla.schedule.device", name)``."""
    return {"default": lambda options: compile_sched_meta(64, 5, options)}
