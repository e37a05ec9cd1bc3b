"""Dense paged MLA decode over the FP8 656-byte cache (a cutemla extension; FlashMLA's dense path is bf16/fp16).

Semantics: those of the dense decode (``cutemla.reference.mla_decode_reference``) on the dequantised cache, i.e.
``cutemla.reference_sparse.dense_fp8_mla_decode_reference``: bf16 q ``[b, s_q, h_q, 576]``, the FP8 cache
``[num_blocks, 64, 1, 656]`` (h_kv = 1, page 64), ``block_table``, ``cache_seqlens``, bottom-right causal mask.

Structure: the dense kernel's split-KV plan (FlashMLA's scheduler metadata: each CTA = one 64-row tile of the
folded rows ``s * h_q + head`` and one scheduler partition of (request, 64-token block) ranges; split requests
write fp32 partials that the existing combine kernel merges) with the sparse kernel's producer and consumers
(``sparse_decode.MlaSparseDecodeFp8``): the producer warpgroup gathers each page's 64 tokens with 16-byte loads
(token id ``page * 64 + offset``; tokens at or past the length, and pages outside the cache, are zero-filled
and never read), dequantises them into the swizzled bf16 K tile, and the consumers run the same WGMMA / online
softmax step, masking keys past each row's (causal) border.
"""
from functools import partial

import torch

from . import jit  # noqa: F401  (pins CUTE_DSL_ARCH before cutlass is imported)

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint8, const_expr, pipeline
from cutlass.cute.nvgpu import cpasync, warpgroup

from ..layouts.fp8_cache import FP8_BYTES_PER_TOKEN
from . import softmax as sm
from .decode import request_block_range, split_slot
from .sparse_decode import (BARRIER_ROW_SUM, BLOCK_M, BLOCK_N, D_QK, D_V, LOG2E, NUM_THREADS, TOKENS_PER_WARP,
                            MlaSparseDecodeFp8)

PAGE_SIZE = 64  # one page = one 64-token tile


class MlaDenseDecodeFp8(MlaSparseDecodeFp8):
    """Dense FP8 decode (split-KV). Config as the sparse kernel's (tokens in flight, L2 prefetch, registers)."""

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mKV: cute.Tensor, mBlockTable: cute.Tensor, mSeqlens: cute.Tensor,
                 mMeta: cute.Tensor, mNumSplits: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor,
                 mOAccum: cute.Tensor, mLseAccum: cute.Tensor, scale_log2: Float32, is_causal: Int32, stream):
        """mQ [b, rows, 1, 576] (folded: row = s * h_q + head), mKV [num_blocks, 64, 1, 656] uint8,
        mBlockTable [b, max_blocks], mSeqlens [b], mMeta [parts, 8], mNumSplits [b + 1] (from the scheduler),
        mOut [b, s_q, h_q, 512] bf16, mLse [b, h_q, s_q] fp32, mOAccum [splits, 1, rows, 512] fp32,
        mLseAccum [splits, 1, rows] fp32 (base-2 lse of the split partials)."""
        mQ_t = cute.make_tensor(mQ.iterator, cute.select(mQ.layout, mode=[1, 3, 2, 0]))  # (rows, d, 1, b)
        mKV_t = cute.make_tensor(mKV.iterator, cute.select(mKV.layout, mode=[3, 1, 0]))  # (656, 64, blocks)
        sQ_layout, sK_layout, sP_layout, tiled_mma_qk, tiled_mma_pv = self.build_smem_and_mmas()
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mQ_t, sQ_layout, (BLOCK_M, D_QK))
        rows = mQ.shape[1]
        self.kernel(
            tma_atom_Q, tma_Q, mKV_t, mBlockTable, mSeqlens, mMeta, mNumSplits, mOut, mLse, mOAccum, mLseAccum,
            scale_log2, is_causal, tiled_mma_qk, tiled_mma_pv, sQ_layout, sK_layout, sP_layout,
        ).launch(grid=((rows + BLOCK_M - 1) // BLOCK_M, 1, mMeta.shape[0]), block=(NUM_THREADS, 1, 1),
                 smem=self.shared_storage.size_in_bytes(), stream=stream)

    @cute.kernel
    def kernel(self, tma_atom_Q: cute.CopyAtom, mQ: cute.Tensor, mKV: cute.Tensor, mBlockTable: cute.Tensor,
               mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor, mOut: cute.Tensor,
               mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, scale_log2: Float32,
               is_causal: Int32, tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        m_block, _, part = cute.arch.block_idx()
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_Q)
        pipe_q, pipe_kv, sQ, sK, sP, sRowMax, sRowSum, sValid = self.setup_shared(sQ_layout, sK_layout, sP_layout)
        if mMeta[part, 0] < mSeqlens.shape[0]:  # trailing partitions hold no work
            if warp_idx < 4:
                cute.arch.setmaxregister_decrease(self.producer_regs)
                self.dense_producer(tma_atom_Q, mQ, mKV, sQ, sK, sValid, mBlockTable, mSeqlens, mMeta, pipe_q,
                                    pipe_kv, m_block, part, is_causal, mOut.shape[2], mOut.shape[1], warp_idx)
            else:
                cute.arch.setmaxregister_increase(self.consumer_regs)
                self.dense_consumer(tidx - 128, sQ, sK, sP, sRowMax, sRowSum, pipe_q, pipe_kv, tiled_mma_qk,
                                    tiled_mma_pv, mSeqlens, mMeta, mNumSplits, mOut, mLse, mOAccum, mLseAccum,
                                    m_block, part, scale_log2, is_causal, mQ.shape[0])

    @cute.jit
    def block_tokens(self, mBlockTable, req, n, seqlen, num_blocks, warp, lane):
        """Lane j < 16: the token id of this warp's j-th token of block n and whether it may be read."""
        j = warp * TOKENS_PER_WARP + lane % TOKENS_PER_WARP
        page = mBlockTable[req, n]
        idx = page * PAGE_SIZE + j
        ok = lane < TOKENS_PER_WARP and n * BLOCK_N + j < seqlen and page >= 0 and page < num_blocks
        return idx, ok

    @cute.jit
    def dense_producer(self, tma_atom_Q, mQ, mKV, sQ, sK, sValid, mBlockTable, mSeqlens, mMeta, pipe_q,
                       pipe_kv, m_block, part, is_causal, g, s_q, warp):
        lane = cute.arch.lane_idx()
        num_blocks = mKV.shape[2]
        rows = mQ.shape[0]
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.kv_stages)
        for req in cutlass.range(mMeta[part, 0], mMeta[part, 1] + 1, unroll=1):
            start, end, seqlen = request_block_range(mSeqlens, mMeta, part, req, m_block, is_causal, g, s_q, rows)
            if warp == 0:  # Q of every request, even one with no block here (the consumers wait on it)
                gQ = cute.local_tile(mQ[None, None, 0, req], (BLOCK_M, D_QK), (m_block, 0))
                tQsQ, tQgQ = cpasync.tma_partition(
                    tma_atom_Q, 0, cute.make_layout(1), cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2))
                pipe_q.producer_acquire(q_state)
                cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=pipe_q.producer_get_barrier(q_state))
                q_state.advance()
            for n in cutlass.range(start, end, unroll=1):
                idx, ok = self.block_tokens(mBlockTable, req, n, seqlen, num_blocks, warp, lane)
                bits = cute.arch.vote_ballot_sync(ok) & Int32(0xFFFF)
                if const_expr(self.l2_prefetch):
                    if n + 1 < end:
                        idx_next, ok_next = self.block_tokens(mBlockTable, req, n + 1, seqlen, num_blocks, warp,
                                                              lane)
                        self.prefetch_tokens(mKV, idx_next, ok_next, PAGE_SIZE, lane)
                stage = kv_state.index
                pipe_kv.producer_acquire(kv_state)
                if lane == 0:
                    sValid[warp, stage] = bits
                token_rows = self.lane_row(mKV, idx, PAGE_SIZE)  # with lane_rows, each lane's row address
                for j0 in cutlass.range_constexpr(0, TOKENS_PER_WARP, self.tokens_in_flight):
                    self.gather_dequant(mKV, sK, token_rows, bits, PAGE_SIZE, stage, warp, lane, j0)
                cute.arch.fence_view_async_shared()  # generic stores -> visible to WGMMA (async proxy)
                pipe_kv.producer_commit(kv_state)
                kv_state.advance()

    @cute.jit
    def dense_consumer(self, tidx_wg2, sQ, sK, sP, sRowMax, sRowSum, pipe_q, pipe_kv, tiled_mma_qk, tiled_mma_pv,
                       mSeqlens, mMeta, mNumSplits, mOut, mLse, mOAccum, mLseAccum, m_block, part,
                       scale_log2: Float32, is_causal: Int32, rows):
        wg = cute.arch.make_warp_uniform(tidx_wg2 // 128)
        tidx = tidx_wg2 % 128
        g = mOut.shape[2]  # h_q: rows are s * h_q + head
        s_q = mOut.shape[1]
        thr_qk, thr_pv, tSrQ, tSrK, tOrVt, tOrP, tPsP = self.consumer_fragments(
            tidx, wg, sQ, sK, sP, tiled_mma_qk, tiled_mma_pv)
        tile_row = (tidx // 32) * 16 + (tidx % 32) // 4
        quad_leader = tidx % 4 == 0
        acc_S = cute.make_rmem_tensor(thr_qk.partition_shape_C((BLOCK_M, self.qk_cols)), Float32)
        rP = cute.make_rmem_tensor_like(acc_S, self.dtype)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.kv_stages)
        for req in cutlass.range(mMeta[part, 0], mMeta[part, 1] + 1, unroll=1):
            start, end, seqlen = request_block_range(mSeqlens, mMeta, part, req, m_block, is_causal, g, s_q, rows)
            row0 = m_block * BLOCK_M + tile_row
            border0 = seqlen
            border1 = seqlen
            if is_causal != 0:  # bottom-right aligned; never past seqlen (padding rows included)
                border0 = cutlass.min(seqlen, seqlen - (s_q - 1 - row0 // g))
                border1 = cutlass.min(seqlen, seqlen - (s_q - 1 - (row0 + 8) // g))
            acc_O = cute.make_rmem_tensor(thr_pv.partition_shape_C((BLOCK_M, D_V // 2)), Float32)
            acc_O.fill(0.0)
            row_max = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
            row_sum = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
            row_max.fill(-Float32.inf)
            row_sum.fill(0.0)
            pipe_q.consumer_wait(q_state)
            for n in cutlass.range(start, end, unroll=1):
                stage = kv_state.index
                pipe_kv.consumer_wait(kv_state)
                self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, stage)
                warpgroup.wait_group(0)
                # Keys past each row's border (and so past seqlen: those K/V rows are zero) -> -inf.
                sm.mask_scores(acc_S, tidx, n * BLOCK_N + wg * self.qk_cols, border0, border1)
                self.softmax_pv(acc_S, acc_O, rP, row_max, row_sum, tPsP, tOrP, tOrVt, tiled_mma_pv, sRowMax,
                                tile_row, wg, quad_leader, stage, scale_log2)
                pipe_kv.consumer_release(kv_state)
                kv_state.advance()
            pipe_q.consumer_release(q_state)  # sQ may take the next request's Q
            q_state.advance()
            # Double-buffered by request parity: the other warpgroup may still read the previous sums.
            row_total = sm.exchange_row_sums(row_sum, sRowSum, tile_row, wg, quad_leader, req % 2,
                                             BARRIER_ROW_SUM)
            self.dense_epilogue(acc_O, row_max, row_total, tidx, wg, row0, rows, g, req, part, mMeta, mNumSplits,
                                mOut, mLse, mOAccum, mLseAccum)

    @cute.jit
    def dense_epilogue(self, acc_O, row_max, row_total, tidx, wg, row0, rows, g, req, part, mMeta, mNumSplits,
                       mOut, mLse, mOAccum, mLseAccum):
        """O / L -> bf16 out and natural lse (+inf when empty); or the split's fp32 O / L and base-2 lse."""
        lse2 = sm.normalize_rows(acc_O, row_max, row_total)
        is_split, split = split_slot(mNumSplits, mMeta, part, req)
        col_base = wg * (D_V // 2)
        lane = tidx % 32
        for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
            row = row0 + r * 8
            if row < rows:
                if is_split:
                    sm.store_row(acc_O, r, tidx, col_base, mOAccum[split, 0, row, None], Float32)
                    if wg == 0 and lane % 4 == 0:
                        mLseAccum[split, 0, row] = lse2[r]
                else:
                    s_idx = row // g
                    head = row - s_idx * g
                    sm.store_row(acc_O, r, tidx, col_base, mOut[req, s_idx, head, None], self.dtype)
                    if wg == 0 and lane % 4 == 0:
                        mLse[req, head, s_idx] = sm.natural_lse(lse2[r])


# ----------------------------------------------------------------------------------------------------------
# Compile


def _fake_args():
    from cutlass.cute.runtime import make_fake_tensor

    def stride(div=1):
        return cute.sym_int64(divisibility=div)

    b, rows = cute.sym_int32(symbol="b"), cute.sym_int32(symbol="rows")
    q = make_fake_tensor(cutlass.BFloat16, (b, rows, 1, D_QK), (stride(8), stride(8), stride(8), 1), assumed_align=16)
    kv = make_fake_tensor(Uint8, (cute.sym_int32(symbol="num_blocks"), PAGE_SIZE, 1, FP8_BYTES_PER_TOKEN),
                          (stride(16), FP8_BYTES_PER_TOKEN, stride(16), 1), assumed_align=16)
    block_table = make_fake_tensor(Int32, (b, cute.sym_int32()), (stride(), 1), assumed_align=4)
    seqlens = make_fake_tensor(Int32, (b,), (1,), assumed_align=4)
    meta = make_fake_tensor(Int32, (cute.sym_int32(), 8), (8, 1), assumed_align=4)
    num_splits = make_fake_tensor(Int32, (cute.sym_int32(),), (1,), assumed_align=4)
    s_q, h_q = cute.sym_int32(symbol="s_q"), cute.sym_int32(symbol="h_q")
    out = make_fake_tensor(cutlass.BFloat16, (b, s_q, h_q, D_V), (stride(2), stride(2), stride(2), 1), assumed_align=4)
    lse = make_fake_tensor(Float32, (b, h_q, s_q), (stride(), stride(), stride()), assumed_align=4)
    splits = cute.sym_int32(symbol="splits")
    o_accum = make_fake_tensor(Float32, (splits, 1, rows, D_V), (stride(4), stride(4), D_V, 1), assumed_align=16)
    lse_accum = make_fake_tensor(Float32, (splits, 1, rows), (stride(), stride(), 1), assumed_align=4)
    return (q, kv, block_table, seqlens, meta, num_splits, out, lse, o_accum, lse_accum, Float32(1.0), Int32(0))


# (tokens in flight per producer warp, L2 prefetch of the next page, producer registers[, packed])
# packed: the producer's packed dequant and per-lane row addresses (MlaSparseDecodeFp8 packed_dequant,
# lane_rows), bit-identical outputs. On an H200 at 128x16k varlen (perf/results/2026-11-25-h200-fp8-producer-ab.csv):
# h16 1164 -> 852 us (dense_fp8 -> dense_fp8_packed; dense_fp8_u8_packed 894), h128 2415 -> 1669 us.
CONFIGS = {
    "dense_fp8": (4, True, 88),
    "dense_fp8_noprefetch": (4, False, 88),
    "dense_fp8_packed": (4, True, 88, True),
    "dense_fp8_u8_packed": (8, True, 88, True),
}
DEFAULT_CONFIG = "dense_fp8_packed"


def compile_dense_fp8_decode(tokens_in_flight=4, l2_prefetch=True, producer_regs=88, packed=False, options=None):
    from .jit import COMPILE_OPTIONS, fake_stream

    kernel = MlaDenseDecodeFp8(tokens_in_flight, l2_prefetch, producer_regs, packed_dequant=packed, lane_rows=packed)
    return cute.compile(kernel, *_fake_args(), fake_stream(), options=options or COMPILE_OPTIONS)


def get_dense_fp8_decode_fn(config: str = DEFAULT_CONFIG):
    from .jit import compile_cache

    args = CONFIGS[config]
    return compile_cache.get("mla_dense_fp8", args, lambda: compile_dense_fp8_decode(*args))


def compile_configs():
    """Every compiled variant, by name, for the CI compile checks (cutemla.kernels.ptx_report)."""
    return {name: partial(lambda args, options: compile_dense_fp8_decode(*args, options=options), args)
            for name, args in CONFIGS.items()}


# ----------------------------------------------------------------------------------------------------------
# Host side


def dense_launch_args(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, softmax_scale,
                      causal):
    """The compiled kernel's arguments, in order (q folded to rows and made TMA-ready, the cache as uint8,
    fresh out / lse / split partials sized b + num_sm_parts). Any device (the CPU tests check it)."""
    from . import _tma_ready
    from ..layouts.cache import fold_q

    b, s_q, h_q, _ = q.shape
    rows = s_q * h_q
    num_parts = tile_scheduler_metadata.shape[0]
    device = q.device
    out = torch.empty(b, s_q, h_q, D_V, dtype=torch.bfloat16, device=device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=device)
    o_accum = torch.empty(b + num_parts, 1, rows, D_V, dtype=torch.float32, device=device)
    lse_accum = torch.empty(b + num_parts, 1, rows, dtype=torch.float32, device=device)
    if k_cache.dtype != torch.uint8:
        k_cache = k_cache.view(torch.uint8)
    # Unit last strides, as compiled (clone: .contiguous() keeps any stride of a size-1 dim).
    if block_table.stride(-1) != 1:
        block_table = block_table.clone(memory_format=torch.contiguous_format)
    if cache_seqlens.stride(0) != 1:
        cache_seqlens = cache_seqlens.clone(memory_format=torch.contiguous_format)
    return (_tma_ready(fold_q(q, 1), "q", copy_ok=True), k_cache, block_table, cache_seqlens,
            tile_scheduler_metadata, num_splits, out, lse, o_accum, lse_accum, float(softmax_scale) * LOG2E,
            int(bool(causal) and s_q > 1))


def run_dense_fp8_decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                         softmax_scale, causal, config: str = DEFAULT_CONFIG):
    """Dense FP8 decode + combine on the current stream. Inputs must already be validated.

    q [b, s_q, h_q, 576] bf16; k_cache [num_blocks, 64, 1, 656] FP8 cache bytes (stride(1) == 656);
    block_table [b, max_blocks] int32; cache_seqlens [b] int32; metadata from cutemla.schedule for
    (s_q, h_q, h_kv = 1). Returns (out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32).
    """
    from .combine import launch_combine

    args = dense_launch_args(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                             softmax_scale, causal)
    out, lse, o_accum, lse_accum = args[6:10]
    fn = get_dense_fp8_decode_fn(config)
    with torch.cuda.device(q.device):
        fn(*args)
        launch_combine(o_accum, lse_accum, num_splits, out, lse)
    return out, lse


__all__ = ["MlaDenseDecodeFp8", "run_dense_fp8_decode", "dense_launch_args", "get_dense_fp8_decode_fn",
           "compile_configs"]
