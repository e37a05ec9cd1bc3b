"""Sparse (top-k) MLA decode over FlashMLA's 656-byte FP8 latent cache, for sm_90a (CuTe DSL).

FlashMLA semantics (design/flashmla.md §1 "Sparse path", §6): ``indices [b, s_q, topk]`` int32 hold global
token ids ``page * page_size + offset``; ``-1`` is skipped. ``topk_length [b]`` masks slots ``k >=
topk_length[i]``; ``attn_sink [h_q]`` scales each head's output by ``exp(lse) / (exp(lse) + exp(sink))``
(the returned lse is unchanged). On the device, *any* id outside ``[0, num_blocks * page_size)`` is treated
like ``-1``: masked, never read (FlashMLA faults on them instead).

One CTA per (64-row head tile, query position, request, split): grid ``(ceil(h_q / 64), s_q, b * num_splits)``.
With ``num_splits == 1`` (the launcher's choice whenever that grid fills half the SMs) a CTA walks all of its
row's top-k slots in tiles of 64 and writes ``out`` / ``lse`` (sink applied) directly; otherwise each split
takes an equal share of the tiles and writes fp32 partials that ``kernels/sparse_combine.py`` merges (sink
applied there, before the one rounding to bf16). h_q may be anything (16, 32, 64,
128 are tested); rows past h_q in the last head tile are zero (TMA fill) and not stored.

Warp roles (384 threads):
  warpgroup 0  producer. Warp 0 first loads the 64x576 Q tile by TMA. Then each of the 4 warps gathers 16
               of the tile's 64 tokens: lanes 0-15 read the 16 slot indices (one coalesced load), a ballot
               makes the validity mask, and for each token the warp reads its 656 bytes with three
               coalesced loads (lane l: NoPE bytes [16l, 16l+16) as one 16-byte vector, the fp32 scale of
               tile l // 8, RoPE bf16 pair l). The e4m3 values are dequantised in registers exactly like FlashMLA
               (fp8 -> fp32, times bf16(scale), rounded to bf16: ``layouts/fp8_cache.dequantize_fp8_cache``)
               and stored into a bf16 K tile in shared memory in the dense kernel's 128B-swizzled layout.
               Invalid tokens are written as zeros (their logits are masked anyway; zero V keeps NaN out).
               Configs *_packed (the default, sparse_fp8_u8_packed: 8 tokens in flight) cut the producer's
               instructions by ~40%: bit placement and two bf16x2 multiplies instead of the fp32 path
               (`packed_dequant`, the same bits for every non-NaN code, checked bit for bit on the GPU) and
               one row address per lane and tile, shuffled, instead of a division per token (`lane_rows`).
               That made the sparse kernel 1.7x faster (185 -> 322 TFLOP/s at b128 s_q2 h128 top-k 2048).
               Each thread fences its generic stores for the async proxy (fence.proxy.async) and arrives
               on the stage's "full" mbarrier (PipelineAsync, 2 stages). The slot validity bits go to
               shared memory with the tile. While a tile is dequantised, the next tile's token rows are
               prefetched into L2.
  warpgroups 1, 2  consumers, as in the dense kernel (its one-tile-at-a-time schedule, or with
               ``pipelined`` its QK^T(n+1)-before-PV(n) schedule): each computes
               S = Q K^T for its own 32 keys (SS WGMMA m64n32k16 over the 9 64-column sub-tiles), masks
               invalid slots to -inf (select), exchanges row maxima through shared memory, runs the base-2
               online softmax (kernels/softmax.py), publishes its bf16 P half to shared memory and
               accumulates its 256-column half of O with SS WGMMA m64n256k16 over V^T, a transposed view
               of the K stage. The epilogue divides by the row sum, applies the sink factor and writes bf16
               out and the natural-log lse.
"""
import math
from functools import partial

import torch

from . import jit  # noqa: F401  (pins CUTE_DSL_ARCH before cutlass is imported)

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Uint8, const_expr, pipeline
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.memory import SmemAllocator

from ..layouts.fp8_cache import FP8_BYTES_PER_TOKEN, FP8_HEAD_DIM, FP8_NOPE_DIM
from ..layouts.smem import row_major_tile, v_transposed_view
from . import softmax as sm

BLOCK_M = 64  # query heads per CTA (one WGMMA M)
BLOCK_N = 64  # top-k slots per tile
SUBTILE_K = 64
D_QK = FP8_HEAD_DIM  # 576
D_V = FP8_NOPE_DIM  # 512
NUM_THREADS = 384
TOKENS_PER_WARP = BLOCK_N // 4  # each producer warp gathers 16 tokens of a tile
# setmaxnreg budgets. The launch gives every thread 65536 // 384 rounded down to 8 = 168 registers; the
# consumers' increase can only take what the producer's decrease gave back (else setmaxnreg.inc hangs).
LAUNCH_REGS = (65536 // NUM_THREADS) // 8 * 8


def consumer_regs(producer_regs: int) -> int:
    """The most a consumer thread may take after the producer warpgroup dropped to producer_regs."""
    regs = min(240, (LAUNCH_REGS * NUM_THREADS - 128 * producer_regs) // 256 // 8 * 8)
    assert 128 * producer_regs + 256 * regs <= LAUNCH_REGS * NUM_THREADS
    return regs


SMEM_LIMIT = 232448
LOG2E = math.log2(math.e)
# Named barriers between the two consumer warpgroups (256 threads; id 0 is __syncthreads).
BARRIER_ROW_MAX = 1
BARRIER_P_FREE = 2
BARRIER_P_READY = 3
BARRIER_ROW_SUM = 4


# ----------------------------------------------------------------------------------------------------------
# Packed dequant (packed_dequant=True)
#
# An e4m3 byte s.eeee.mmm placed in a bf16 as sign -> bit 15, eeee.mmm -> bits 10..4 is the same value times
# 2^-120 (bf16's exponent bias 127 vs e4m3's 7; e4m3 subnormals land on bf16 subnormals, zeros on zeros).
# One prmt makes each 16-bit half sign-replicated-byte : byte (prmt's sign mode), a shift by 4 moves the byte
# to bits 11..4 and the sign into bits 15..12, one and keeps bit 15 and bits 10..4. mul.rn.bf16x2 by 2^120
# gives the e4m3 value back exactly (it is a bf16), and mul.rn.bf16x2 by bf16(scale) rounds the exact
# product once to bf16: the reference's fp32 product (exact: 4-bit x 8-bit significands) rounded to bf16.
# NaN codes (0x7F, 0xFF) give +-480 * scale instead of NaN. Per pair of values: prmt, shl, and,
# 2 x HMUL2.BF16 = 2.5 instructions a value (fp32 path: F2FP unpack, 2 x HADD2.F32, 2 x FMUL, F2FP pack = 3).
BF16X2_2POW120 = 0x7B807B80  # bf16 2^120 = exponent 247: 0x7B80
PRMT_LO = 0x9180  # result bytes (low first): b0, sign(b0), b1, sign(b1)
PRMT_HI = 0xB3A2  # b2, sign(b2), b3, sign(b3)


@dsl_user_op
def e4m3x2_to_scaled_bf16x2(word, scale2, selector: int, *, loc=None, ip=None):
    """Two e4m3 bytes of `word` -> bf16x2 of value * bf16(scale), `scale2` a bf16x2 pair of the scale. The prmt
    `selector` makes each half (sign of byte replicated) : byte, the lower value in the low half: PRMT_LO
    for bytes 0, 1, PRMT_HI for bytes 2, 3."""
    return Int32(llvm.inline_asm(
        T.i32(),
        [Int32(word).ir_value(loc=loc, ip=ip), Int32(scale2).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 t, c;\n\t"
        f"prmt.b32 t, $1, 0, {selector:#x};\n\t"
        "shl.b32 t, t, 4;\n\t"
        "and.b32 t, t, 0x87F087F0;\n\t"
        f"mov.b32 c, {BF16X2_2POW120:#x};\n\t"
        "mul.rn.bf16x2 t, t, c;\n\t"
        "mul.rn.bf16x2 $0, t, $2;\n\t}",
        "=r,r,r", loc=loc, ip=ip))


@dsl_user_op
def bf16x2_splat(x, *, loc=None, ip=None):
    """(bf16(x), bf16(x)) as one 32-bit word (cvt.rn: the rounding of Float32.to(BFloat16))."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(x).ir_value(loc=loc, ip=ip)], "cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,f",
        loc=loc, ip=ip))


class MlaSparseDecodeFp8:
    """Sparse FP8 decode. Config (compile-time): tokens a producer warp keeps in flight, L2 prefetch of the
    next tile, producer registers (the consumers get the rest), consumer schedule."""

    def __init__(self, tokens_in_flight: int = 4, l2_prefetch: bool = True, producer_regs: int = 88,
                 pipelined: bool = False, kv_stages: int = 2, packed_dequant: bool = False,
                 lane_rows: bool = False):
        assert TOKENS_PER_WARP % tokens_in_flight == 0
        # packed_dequant: e4m3 pairs -> bf16 pairs by bit placement and two bf16x2 multiplies
        # (`e4m3x2_to_scaled_bf16x2`) instead of fp8 -> f16 -> fp32, fp32 multiply, pack: 2.5 instead of 3
        # instructions per value, the same bits for every non-NaN code (NaN codes come out finite).
        self.packed_dequant = packed_dequant
        # lane_rows: each lane computes its own slot's row address once per tile (one division by the page
        # size) and the token loop shuffles it, instead of every lane dividing every token id by the page size
        # and computing the 64-bit row address.
        self.lane_rows = lane_rows
        # pipelined: QK^T of tile n+1 is issued before PV of tile n, so the softmax of n+1 runs while the
        # tensor cores do PV(n) (the dense kernel's "pipelined" schedule). Otherwise one tile at a time.
        self.pipelined = pipelined
        self.producer_regs = producer_regs
        self.consumer_regs = consumer_regs(producer_regs)
        self.dtype = cutlass.BFloat16
        self.tokens_in_flight = tokens_in_flight
        self.l2_prefetch = l2_prefetch
        self.kv_stages = kv_stages
        self.num_subtiles = D_QK // SUBTILE_K
        self.qk_cols = BLOCK_N // 2

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mKV: cute.Tensor, mIndices: cute.Tensor, mTopkLength: cute.Tensor,
                 mSink: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor,
                 mLseAccum: cute.Tensor, scale_log2: Float32, has_topk_length: Int32, has_sink: Int32,
                 num_splits: Int32, stream):
        """Tensors in torch order: mQ [b, s_q, h_q, 576] bf16, mKV [num_blocks, page, 1, 656] uint8,
        mIndices [b, s_q, topk] int32, mTopkLength [>= b] int32 (read only if has_topk_length),
        mSink [>= h_q] fp32 (read only if has_sink), mOut [b, s_q, h_q, 512] bf16, mLse [b, s_q, h_q] fp32.
        num_splits > 1 splits every row's tiles over that many CTAs, which write fp32 partials
        mOAccum [b * num_splits, 1, s_q * h_q, 512] (O / L) and mLseAccum [b * num_splits, 1, s_q * h_q]
        (base-2 lse) for sparse_combine.py instead of out / lse (which applies the sink).
        """
        # Q as (h_q, d, s_q, b) for TMA; the cache as (656 bytes, page, num_blocks).
        mQ_t = cute.make_tensor(mQ.iterator, cute.select(mQ.layout, mode=[2, 3, 1, 0]))
        mKV_t = cute.make_tensor(mKV.iterator, cute.select(mKV.layout, mode=[3, 1, 0]))
        sQ_layout, sK_layout, sP_layout, tiled_mma_qk, tiled_mma_pv = self.build_smem_and_mmas()
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mQ_t, sQ_layout, (BLOCK_M, D_QK))

        b, s_q, h_q, _ = mQ.shape
        num_m_blocks = (h_q + BLOCK_M - 1) // BLOCK_M
        self.kernel(
            tma_atom_Q, tma_Q, mKV_t, mIndices, mTopkLength, mSink, mOut, mLse, mOAccum, mLseAccum,
            scale_log2, has_topk_length, has_sink, num_splits, tiled_mma_qk, tiled_mma_pv, sQ_layout,
            sK_layout, sP_layout,
        ).launch(grid=(num_m_blocks, s_q, b * num_splits), block=(NUM_THREADS, 1, 1),
                 smem=self.shared_storage.size_in_bytes(), stream=stream)

    def build_smem_and_mmas(self):
        """Shared-memory layouts (the dense kernel's swizzled tiles), the SharedStorage struct (set on
        self) and the two tiled MMAs. Called while tracing __call__."""
        dt = self.dtype
        sQ_layout = row_major_tile(dt, BLOCK_M, D_QK)
        sK_layout = row_major_tile(dt, BLOCK_N, D_QK, self.kv_stages)
        sP_layout = row_major_tile(dt, BLOCK_M, BLOCK_N)
        K_MAJOR, MN_MAJOR = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN
        tiled_mma_qk = sm90_utils.make_trivial_tiled_mma(
            dt, dt, K_MAJOR, K_MAJOR, Float32, (1, 1, 1), tiler_mn=(BLOCK_M, self.qk_cols))
        tiled_mma_pv = sm90_utils.make_trivial_tiled_mma(
            dt, dt, K_MAJOR, MN_MAJOR, Float32, (1, 1, 1), tiler_mn=(BLOCK_M, D_V // 2))

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2]
            mbar_kv: cute.struct.MemRange[cutlass.Int64, 2 * self.kv_stages]
            sQ: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sK_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sP_layout)], 1024]
            sRowMax: cute.struct.MemRange[Float32, BLOCK_M * 2]
            sRowSum: cute.struct.MemRange[Float32, BLOCK_M * 4]  # x 2 buffers (request parity, dense FP8)
            # Validity bits of each stage's 64 slots: one 16-bit word per producer warp.
            sValid: cute.struct.MemRange[Int32, 4 * self.kv_stages]

        self.shared_storage = SharedStorage
        assert SharedStorage.size_in_bytes() <= SMEM_LIMIT, "shared memory over the sm90 limit"
        return sQ_layout, sK_layout, sP_layout, tiled_mma_qk, tiled_mma_pv

    @cute.jit
    def setup_shared(self, sQ_layout, sK_layout, sP_layout):
        """Allocate shared memory and create the Q (TMA) and KV (producer-thread) pipelines."""
        storage = SmemAllocator().allocate(self.shared_storage)
        threads = partial(pipeline.CooperativeGroup, pipeline.Agent.Thread)
        pipe_q = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_q.data_ptr(), num_stages=1,
            producer_group=threads(1), consumer_group=threads(8),
            tx_count=cute.size_in_bytes(self.dtype, sQ_layout), defer_sync=True)
        # Every producer thread arrives on "full" after its own stores; every consumer thread on "empty".
        pipe_kv = pipeline.PipelineAsync.create(
            barrier_storage=storage.mbar_kv.data_ptr(), num_stages=self.kv_stages,
            producer_group=threads(128), consumer_group=threads(256), defer_sync=True)
        pipeline.pipeline_init_arrive(cluster_shape_mn=(1, 1), is_relaxed=True)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        sRowMax = storage.sRowMax.get_tensor(cute.make_layout((BLOCK_M, 2)))
        sRowSum = storage.sRowSum.get_tensor(cute.make_layout((BLOCK_M, 2, 2)))
        sValid = storage.sValid.get_tensor(cute.make_layout((4, self.kv_stages)))
        pipeline.pipeline_init_wait(cluster_shape_mn=(1, 1))
        return pipe_q, pipe_kv, sQ, sK, sP, sRowMax, sRowSum, sValid

    @cute.kernel
    def kernel(self, tma_atom_Q: cute.CopyAtom, mQ: cute.Tensor, mKV: cute.Tensor, mIndices: cute.Tensor,
               mTopkLength: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor,
               mOAccum: cute.Tensor, mLseAccum: cute.Tensor, scale_log2: Float32, has_topk_length: Int32,
               has_sink: Int32, num_splits: Int32,
               tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
               sP_layout: cute.ComposedLayout):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        m_block, s_idx, split_idx = cute.arch.block_idx()  # split_idx = batch * num_splits + split
        batch = split_idx // num_splits
        split = split_idx - batch * num_splits
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_Q)
        pipe_q, pipe_kv, sQ, sK, sP, sRowMax, sRowSum, sValid = self.setup_shared(sQ_layout, sK_layout, sP_layout)

        # Slots [0, topk_eff) of this row are candidates; tiles past them are never touched. A split
        # takes an equal share of the ceil(topk / 64) tiles (it may be empty after topk_length).
        topk = mIndices.shape[2]
        topk_eff = topk
        if has_topk_length != 0:
            topk_eff = cutlass.max(cutlass.min(mTopkLength[batch], topk), 0)
        tiles_per_split = ((topk + BLOCK_N - 1) // BLOCK_N + num_splits - 1) // num_splits
        tile_begin = split * tiles_per_split
        tile_end = cutlass.min(tile_begin + tiles_per_split, (topk_eff + BLOCK_N - 1) // BLOCK_N)

        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            if warp_idx == 0:
                q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
                gQ = cute.local_tile(mQ[None, None, s_idx, batch], (BLOCK_M, D_QK), (m_block, 0))
                tQsQ, tQgQ = cpasync.tma_partition(
                    tma_atom_Q, 0, cute.make_layout(1), cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2))
                pipe_q.producer_acquire(q_state)
                cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=pipe_q.producer_get_barrier(q_state))
            self.producer(mKV, mIndices, sK, sValid, pipe_kv, batch, s_idx, tile_begin, tile_end, topk_eff,
                          warp_idx)
        else:
            cute.arch.setmaxregister_increase(self.consumer_regs)
            self.consumer(tidx - 128, sQ, sK, sP, sRowMax, sRowSum, sValid, pipe_q, pipe_kv,
                          tiled_mma_qk, tiled_mma_pv, tile_begin, tile_end, mSink, mOut, mLse, mOAccum,
                          mLseAccum, scale_log2, has_sink, num_splits, m_block, s_idx, batch, split_idx)

    # ------------------------------------------------------------------------------------------------------
    # Producer: gather, dequantise, store

    @cute.jit
    def slot_index(self, mIndices, batch, s_idx, n, warp, lane, topk_eff, num_tokens):
        """Lane j < 16 of `warp`: the token id of slot n*64 + 16*warp + j and whether it may be read."""
        k = n * BLOCK_N + warp * TOKENS_PER_WARP + lane % TOKENS_PER_WARP
        idx = Int32(-1)
        if lane < TOKENS_PER_WARP and k < topk_eff:
            idx = mIndices[batch, s_idx, k]
        ok = idx >= 0 and idx < num_tokens
        return idx, ok

    @cute.jit
    def producer(self, mKV, mIndices, sK, sValid, pipe_kv, batch, s_idx, tile_begin, tile_end, topk_eff,
                 warp):
        lane = cute.arch.lane_idx()
        page_size = mKV.shape[1]
        num_tokens = page_size * mKV.shape[2]
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.kv_stages)
        # Slots past this split's tiles are another CTA's: never read (nor prefetched) here.
        limit = cutlass.min(topk_eff, tile_end * BLOCK_N)
        idx, ok = self.slot_index(mIndices, batch, s_idx, tile_begin, warp, lane, limit, num_tokens)
        for n in cutlass.range(tile_begin, tile_end, unroll=1):
            bits = cute.arch.vote_ballot_sync(ok) & Int32(0xFFFF)
            if const_expr(self.l2_prefetch):
                # The next tile's indices now, its token rows into L2 while this tile is dequantised.
                idx_next, ok_next = self.slot_index(mIndices, batch, s_idx, n + 1, warp, lane, limit,
                                                    num_tokens)
                self.prefetch_tokens(mKV, idx_next, ok_next, page_size, lane)
            stage = kv_state.index
            pipe_kv.producer_acquire(kv_state)
            if lane == 0:
                sValid[warp, stage] = bits
            rows = self.lane_row(mKV, idx, page_size)
            for j0 in cutlass.range_constexpr(0, TOKENS_PER_WARP, self.tokens_in_flight):
                self.gather_dequant(mKV, sK, rows, bits, page_size, stage, warp, lane, j0)
            cute.arch.fence_view_async_shared()  # generic stores -> visible to WGMMA (async proxy)
            pipe_kv.producer_commit(kv_state)
            kv_state.advance()
            if const_expr(self.l2_prefetch):
                idx = idx_next
                ok = ok_next
            else:
                idx, ok = self.slot_index(mIndices, batch, s_idx, n + 1, warp, lane, limit, num_tokens)

    @cute.jit
    def lane_row(self, mKV, idx, page_size):
        """This lane's token id, or with lane_rows the address of its token's row (Int64): one division and
        one row-address computation per lane and tile instead of per token in every lane."""
        rows = idx
        if const_expr(self.lane_rows):
            page = idx // page_size
            rows = mKV[None, idx - page * page_size, page].iterator.toint()
        return rows

    @cute.jit
    def token_row(self, mKV, tok, page_size):
        """The 656-byte row of lane j's `lane_row` value, shuffled to every lane outside any branch."""
        if const_expr(self.lane_rows):
            # Row addresses are 16-byte aligned: the token stride is 656 = 41 * 16, blocks 16-byte multiples.
            row = cute.make_tensor(cute.make_ptr(Uint8, tok, mKV.iterator.memspace, assumed_align=16),
                                   cute.make_layout(FP8_BYTES_PER_TOKEN))
        else:
            page = tok // page_size
            row = mKV[None, tok - page * page_size, page]
        return row

    @cute.jit
    def prefetch_tokens(self, mKV, idx, ok, page_size, lane):
        """prefetch.global.L2 of the 16 tokens' rows (6 lines of 128 B cover 656 bytes; 3 per lane)."""
        rows = self.lane_row(mKV, idx, page_size)
        for rep in cutlass.range_constexpr(3):
            slot = rep * 32 + lane  # 96 (token, line) pairs
            j = slot // 6
            line = slot - j * 6
            tok = cute.arch.shuffle_sync(rows, j)
            valid = cute.arch.shuffle_sync(Int32(ok), j)
            if valid != 0:
                row = self.token_row(mKV, tok, page_size)
                offset = cutlass.min(line * 128, FP8_BYTES_PER_TOKEN - 16)
                cute.arch.prefetch((row.iterator + offset).llvm_ptr, cache_level="L2")

    @cute.jit
    def gather_dequant(self, mKV, sK, rows, bits, page_size, stage, warp, lane,
                       j0: cutlass.Constexpr[int]):
        """Tokens j0 .. j0 + tokens_in_flight - 1 of this warp: load all, then dequantise and store."""
        U = self.tokens_in_flight
        nope = cute.make_rmem_tensor((16, U), Uint8)
        scale = cute.make_rmem_tensor((4, U), Uint8)
        rope = cute.make_rmem_tensor((4, U), Uint8)
        nope.fill(0)
        scale.fill(0)
        rope.fill(0)
        for u in cutlass.range_constexpr(U):
            j = j0 + u
            tok = cute.arch.shuffle_sync(rows, j)
            if (bits >> j) & 1 != 0:
                row = self.token_row(mKV, tok, page_size)
                cute.autovec_copy(cute.local_tile(row, (16,), (lane,)), nope[None, u])
                cute.autovec_copy(cute.local_tile(row, (4,), (FP8_NOPE_DIM // 4 + lane // 8,)), scale[None, u])
                # RoPE: 64 bf16 = 128 bytes, one bf16 pair per lane (one register per token, not four).
                cute.autovec_copy(cute.local_tile(row, (4,), ((FP8_NOPE_DIM + 16) // 4 + lane,)), rope[None, u])
        for u in cutlass.range_constexpr(U):
            r = warp * TOKENS_PER_WARP + j0 + u
            s = cute.recast_tensor(scale[None, u], Float32)[0]
            if const_expr(self.packed_dequant):
                # Same bits as below for every non-NaN code: bf16x2 products, each rounded once.
                s2 = bf16x2_splat(s)
                words = cute.recast_tensor(nope[None, u], Int32)
                k_words = cute.make_rmem_tensor(8, Int32)
                for w in cutlass.range_constexpr(4):
                    k_words[2 * w] = e4m3x2_to_scaled_bf16x2(words[w], s2, PRMT_LO)  # bytes 0, 1
                    k_words[2 * w + 1] = e4m3x2_to_scaled_bf16x2(words[w], s2, PRMT_HI)  # bytes 2, 3
                k_row = sK[r, None, stage]
                cute.autovec_copy(cute.recast_tensor(k_words, self.dtype), cute.local_tile(k_row, (16,), (lane,)))
            else:
                # FlashMLA's dequant: fp8 -> fp32, times bf16(scale), one rounding to bf16 (the product of
                # a 4-bit and an 8-bit significand is exact in fp32).
                s_bf16 = s.to(cutlass.BFloat16).to(Float32)
                x = cute.recast_tensor(nope[None, u], cutlass.Float8E4M3FN).load().to(Float32)
                k_frag = cute.make_rmem_tensor(16, self.dtype)
                k_frag.store((x * s_bf16).to(self.dtype))
                k_row = sK[r, None, stage]
                cute.autovec_copy(k_frag, cute.local_tile(k_row, (16,), (lane,)))
            cute.autovec_copy(cute.recast_tensor(rope[None, u], self.dtype),
                              cute.local_tile(k_row, (2,), (FP8_NOPE_DIM // 2 + lane,)))

    # ------------------------------------------------------------------------------------------------------
    # Consumers

    @cute.jit
    def consumer(self, tidx_wg2, sQ, sK, sP, sRowMax, sRowSum, sValid, pipe_q, pipe_kv, tiled_mma_qk,
                 tiled_mma_pv, tile_begin, tile_end, mSink, mOut, mLse, mOAccum, mLseAccum,
                 scale_log2: Float32, has_sink: Int32, num_splits: Int32, m_block, s_idx, batch, split_idx):
        wg = cute.arch.make_warp_uniform(tidx_wg2 // 128)
        tidx = tidx_wg2 % 128
        thr_qk, thr_pv, tSrQ, tSrK, tOrVt, tOrP, tPsP = self.consumer_fragments(
            tidx, wg, sQ, sK, sP, tiled_mma_qk, tiled_mma_pv)
        tile_row = (tidx // 32) * 16 + (tidx % 32) // 4
        quad_leader = tidx % 4 == 0

        acc_O = cute.make_rmem_tensor(thr_pv.partition_shape_C((BLOCK_M, D_V // 2)), Float32)
        acc_O.fill(0.0)
        row_max = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
        row_sum = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
        row_max.fill(-Float32.inf)
        row_sum.fill(0.0)
        acc_S = cute.make_rmem_tensor(thr_qk.partition_shape_C((BLOCK_M, self.qk_cols)), Float32)
        rP = cute.make_rmem_tensor_like(acc_S, self.dtype)

        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.kv_stages)
        pipe_q.consumer_wait(q_state)
        rescale = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
        if const_expr(self.pipelined):
            if tile_begin < tile_end:  # prologue: the first tile up to its P in shared memory
                pipe_kv.consumer_wait(kv_state)
                self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, kv_state.index)
                warpgroup.wait_group(0)
                self.mask_invalid(acc_S, tidx, self.valid_bits(sValid, wg, kv_state.index))
                self.softmax_to_p(acc_S, rP, rescale, row_max, row_sum, sRowMax, tile_row, wg, quad_leader,
                                  scale_log2)
                self.stage_p(acc_O, rP, rescale, tPsP)
            for n in cutlass.range(tile_begin, tile_end, unroll=1):
                stage = kv_state.index
                has_next = n + 1 < tile_end
                next_state = kv_state.clone()
                next_state.advance()
                next_stage = stage
                if has_next:
                    pipe_kv.consumer_wait(next_state)
                    next_stage = next_state.index
                # QK^T(n+1) before PV(n). On the last tile it re-runs QK^T on tile n's resident stage and
                # the result is dropped: WGMMA issue stays out of data-dependent branches.
                self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, next_stage)
                sm.issue_pv(acc_O, tOrP, tOrVt, tiled_mma_pv, stage)
                warpgroup.wait_group(1)  # QK^T(n+1) done; PV(n) may still run
                if has_next:
                    self.mask_invalid(acc_S, tidx, self.valid_bits(sValid, wg, next_stage))
                    self.softmax_to_p(acc_S, rP, rescale, row_max, row_sum, sRowMax, tile_row, wg, quad_leader,
                                      scale_log2)
                warpgroup.wait_group(0)  # PV(n) done: stage n may go, O may be rescaled
                pipe_kv.consumer_release(kv_state)
                kv_state.advance()
                if has_next:
                    self.stage_p(acc_O, rP, rescale, tPsP)
        else:
            for n in cutlass.range(tile_begin, tile_end, unroll=1):
                stage = kv_state.index
                pipe_kv.consumer_wait(kv_state)
                self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, stage)
                warpgroup.wait_group(0)
                self.mask_invalid(acc_S, tidx, self.valid_bits(sValid, wg, stage))
                self.softmax_pv(acc_S, acc_O, rP, row_max, row_sum, tPsP, tOrP, tOrVt, tiled_mma_pv, sRowMax,
                                tile_row, wg, quad_leader, stage, scale_log2)
                pipe_kv.consumer_release(kv_state)
                kv_state.advance()

        row_total = sm.exchange_row_sums(row_sum, sRowSum, tile_row, wg, quad_leader, 0, BARRIER_ROW_SUM)
        self.epilogue(acc_O, row_max, row_total, tidx, wg, tile_row, m_block, s_idx, batch, split_idx, mSink,
                      has_sink, num_splits, mOut, mLse, mOAccum, mLseAccum)

    @cute.jit
    def consumer_fragments(self, tidx, wg, sQ, sK, sP, tiled_mma_qk, tiled_mma_pv):
        """WGMMA views: S = Q K^T over this warpgroup's 32 keys of a stage; O half += P V over all 64."""
        thr_qk = tiled_mma_qk.get_slice(tidx)
        tSrQ = tiled_mma_qk.make_fragment_A(thr_qk.partition_A(sQ))
        sK_qk = cute.flat_divide(sK, (self.qk_cols, D_QK))[None, None, wg, 0, None]
        tSrK = tiled_mma_qk.make_fragment_B(thr_qk.partition_B(sK_qk))
        sVt = v_transposed_view(sK, BLOCK_N, D_QK, self.kv_stages)
        sVt_half = cute.flat_divide(sVt, (D_V // 2, BLOCK_N))[None, None, wg, 0, None]
        thr_pv = tiled_mma_pv.get_slice(tidx)
        tOrVt = tiled_mma_pv.make_fragment_B(thr_pv.partition_B(sVt_half))
        tOrP = tiled_mma_pv.make_fragment_A(thr_pv.partition_A(sP))
        tPsP = thr_qk.partition_C(cute.flat_divide(sP, (BLOCK_M, self.qk_cols))[None, None, 0, wg])
        return thr_qk, thr_pv, tSrQ, tSrK, tOrVt, tOrP, tPsP

    @cute.jit
    def valid_bits(self, sValid, wg, stage):
        """This warpgroup's 32 slots of a stage: the bits of producer warps 2*wg and 2*wg + 1."""
        return sValid[2 * wg, stage] | (sValid[2 * wg + 1, stage] << 16)

    @cute.jit
    def softmax_to_p(self, acc_S, rP, rescale, row_max, row_sum, sRowMax, tile_row, wg, quad_leader,
                     scale_log2: Float32):
        """Masked scores of one tile -> row maxima over both warpgroups, online softmax step, bf16 P in
        registers and the factor O must be rescaled by."""
        block_max = sm.exchange_row_max(sm.block_row_max(acc_S), sRowMax, tile_row, wg, quad_leader,
                                        BARRIER_ROW_MAX)
        factors = sm.online_softmax_step(acc_S, block_max, row_max, row_sum, scale_log2)
        rescale[0] = factors[0]
        rescale[1] = factors[1]
        rP.store(acc_S.load().to(self.dtype))

    @cute.jit
    def stage_p(self, acc_O, rP, rescale, tPsP):
        """Rescale O, then publish this warpgroup's P half for both PV WGMMAs (after both finished the
        previous PV, which read sP)."""
        sm.rescale_rows(acc_O, rescale)
        cute.arch.barrier(barrier_id=BARRIER_P_FREE, number_of_threads=256)
        cute.autovec_copy(rP, tPsP)
        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=BARRIER_P_READY, number_of_threads=256)

    @cute.jit
    def softmax_pv(self, acc_S, acc_O, rP, row_max, row_sum, tPsP, tOrP, tOrVt, tiled_mma_pv, sRowMax,
                   tile_row, wg, quad_leader, stage, scale_log2: Float32):
        """One tile, one at a time: softmax, P to shared memory, O += P V (waited: the stage may go)."""
        rescale = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
        self.softmax_to_p(acc_S, rP, rescale, row_max, row_sum, sRowMax, tile_row, wg, quad_leader, scale_log2)
        self.stage_p(acc_O, rP, rescale, tPsP)
        sm.issue_pv(acc_O, tOrP, tOrVt, tiled_mma_pv, stage)
        warpgroup.wait_group(0)

    @cute.jit
    def mask_invalid(self, acc_S, tidx, valid):
        """Scores of invalid slots -> -inf (select: their K rows are zero, but never trust a masked score)."""
        for i in cutlass.range_constexpr(cute.size(acc_S)):
            _, col = sm.acc_row_col(tidx, i)
            if (valid >> col) & 1 == 0:
                acc_S[i] = -Float32.inf

    @cute.jit
    def issue_qk(self, acc_S, tSrQ, tSrK, tiled_mma_qk, stage):
        mma_qk = cute.make_mma_atom(tiled_mma_qk.op)
        mma_qk.set(warpgroup.Field.ACCUMULATE, False)
        warpgroup.fence()
        for kk in cutlass.range_constexpr(D_QK // 16):
            cute.gemm(mma_qk, acc_S, tSrQ[None, None, kk], tSrK[None, None, kk, stage], acc_S)
            mma_qk.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()

    @cute.jit
    def epilogue(self, acc_O, row_max, row_total, tidx, wg, tile_row, m_block, s_idx, batch, split_idx, mSink,
                 has_sink: Int32, num_splits: Int32, mOut, mLse, mOAccum, mLseAccum):
        """O / L -> bf16 out (times the sink factor) and lse = (m + log2 L) * ln 2, +inf for an empty row;
        or, when split, fp32 O / L and the base-2 lse (-inf for an empty split) for the combine."""
        h_q = mOut.shape[2]
        is_split = num_splits > 1
        inv = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
        lse2 = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
        for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
            head = m_block * BLOCK_M + tile_row + r * 8
            total = row_total[r]
            if total > 0.0:
                lse2[r] = row_max[r] + cute.math.log2(total, fastmath=False)
                factor = 1.0 / total
                if has_sink != 0 and head < h_q and not is_split:
                    # exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + 2^(sink*log2e - lse2)); +-inf sinks work.
                    sink2 = mSink[head] * Float32(LOG2E)
                    factor = factor / (1.0 + cute.math.exp2(sink2 - lse2[r], fastmath=False))
                inv[r] = factor
            else:  # no valid slot (or NaN): out 0, lse +inf (a split: lse -inf, weight 0 in the combine)
                inv[r] = Float32(0.0)
                lse2[r] = -Float32.inf
        sm.rescale_rows(acc_O, inv)

        col_base = wg * (D_V // 2)
        lane = tidx % 32
        for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
            head = m_block * BLOCK_M + tile_row + r * 8
            if head < h_q:
                if is_split:
                    row = s_idx * h_q + head  # the combine's row: query position * h_q + head
                    sm.store_row(acc_O, r, tidx, col_base, mOAccum[split_idx, 0, row, None], Float32)
                    if wg == 0 and lane % 4 == 0:
                        mLseAccum[split_idx, 0, row] = lse2[r]
                else:
                    sm.store_row(acc_O, r, tidx, col_base, mOut[batch, s_idx, head, None], self.dtype)
                    if wg == 0 and lane % 4 == 0:
                        mLse[batch, s_idx, head] = sm.natural_lse(lse2[r])


# ----------------------------------------------------------------------------------------------------------
# Compile


def _fake_args():
    """Fake tensors with symbolic sizes: batch, s_q, h_q, topk and the cache size never recompile."""
    from cutlass.cute.runtime import make_fake_tensor

    def stride(div=1):
        return cute.sym_int64(divisibility=div)

    b, s_q, h_q = cute.sym_int32(symbol="b"), cute.sym_int32(symbol="s_q"), cute.sym_int32(symbol="h_q")
    q = make_fake_tensor(cutlass.BFloat16, (b, s_q, h_q, D_QK), (stride(8), stride(8), stride(8), 1),
                         assumed_align=16)
    # FlashMLA requires stride(1) == 656 (bytes per token); blocks may be strided (16-byte multiples).
    kv = make_fake_tensor(Uint8, (cute.sym_int32(symbol="num_blocks"), cute.sym_int32(symbol="page"), 1,
                                  FP8_BYTES_PER_TOKEN),
                          (stride(16), FP8_BYTES_PER_TOKEN, stride(16), 1), assumed_align=16)
    indices = make_fake_tensor(Int32, (b, s_q, cute.sym_int32(symbol="topk")), (stride(), stride(), 1),
                               assumed_align=4)
    topk_length = make_fake_tensor(Int32, (cute.sym_int32(),), (1,), assumed_align=4)
    sink = make_fake_tensor(Float32, (cute.sym_int32(),), (1,), assumed_align=4)
    out = make_fake_tensor(cutlass.BFloat16, (b, s_q, h_q, D_V), (stride(2), stride(2), stride(2), 1),
                           assumed_align=4)
    lse = make_fake_tensor(Float32, (b, s_q, h_q), (stride(), stride(), 1), assumed_align=4)
    splits, rows = cute.sym_int32(symbol="splits"), cute.sym_int32(symbol="rows")
    o_accum = make_fake_tensor(Float32, (splits, 1, rows, D_V), (stride(4), stride(4), D_V, 1), assumed_align=16)
    lse_accum = make_fake_tensor(Float32, (splits, 1, rows), (stride(), stride(), 1), assumed_align=4)
    return (q, kv, indices, topk_length, sink, out, lse, o_accum, lse_accum, Float32(1.0), Int32(0), Int32(0),
            Int32(1))


def compile_sparse_decode(tokens_in_flight: int = 4, l2_prefetch: bool = True, producer_regs: int = 88,
                          pipelined: bool = False, packed: bool = False, options: str | None = None):
    """Compile (uncached) one sparse FP8 decode variant. Use `get_sparse_decode_fn` to call it.
    packed: the producer's packed dequant and per-lane row addresses (packed_dequant, lane_rows)."""
    from .jit import COMPILE_OPTIONS, fake_stream

    kernel = MlaSparseDecodeFp8(tokens_in_flight, l2_prefetch, producer_regs, pipelined,
                                packed_dequant=packed, lane_rows=packed)
    return cute.compile(kernel, *_fake_args(), fake_stream(), options=options or COMPILE_OPTIONS)


# (tokens in flight per producer warp, L2 prefetch of the next tile, producer registers[, pipelined[, packed]]). The
# consumers get the rest of the register file (200-208; they need about that). All compile with 0 spills
# (tests/test_sparse_kernel_compile.py); ptxas is not monotonic in the budget (4 tokens spill 4 bytes at 88).
# packed: the producer's packed dequant and per-lane row addresses (packed_dequant, lane_rows): bit-identical
# outputs (tests/test_fp8_packed_dequant_gpu.py) from ~40% fewer producer instructions per tile.
# perf/sparse_fp8.py --configs on an H200 (perf/results/2026-11-25-h200-fp8-producer-ab.csv), b128 s_q2 h128
# top-k 2048: sparse_fp8 185, sparse_fp8_u8 191, sparse_fp8_packed 308, sparse_fp8_pipelined_packed 270,
# sparse_fp8_u8_packed 322 TFLOP/s; u8_packed is the fastest in all eight FlashMLA cases, hence the default.
CONFIGS = {
    "sparse_fp8": (4, True, 80),
    "sparse_fp8_pipelined": (4, True, 80, True),
    "sparse_fp8_noprefetch": (4, False, 80),
    "sparse_fp8_u2": (2, True, 72),
    "sparse_fp8_u8": (8, True, 88),
    "sparse_fp8_packed": (4, True, 80, False, True),
    "sparse_fp8_pipelined_packed": (4, True, 80, True, True),
    # 8 tokens in flight: the packed producer needs 96 registers for them without spills (consumers: 200).
    "sparse_fp8_u8_packed": (8, True, 96, False, True),
}
DEFAULT_CONFIG = "sparse_fp8_u8_packed"


def get_sparse_decode_fn(config: str = DEFAULT_CONFIG):
    from .jit import compile_cache

    args = CONFIGS[config]
    return compile_cache.get("mla_sparse_fp8", args, lambda: compile_sparse_decode(*args))


def compile_configs():
    """Every compiled variant, by name, for the CI compile checks (cutemla.kernels.ptx_report)."""
    return {name: partial(lambda args, options: compile_sparse_decode(*args, options=options), args)
            for name, args in CONFIGS.items()}


# ----------------------------------------------------------------------------------------------------------
# Host side


_dummies: dict = {}


def _dummy(device, dtype, shape=(1,)):
    """A small tensor for an absent input (never read: its flag is 0, or num_splits == 1). Allocated once."""
    key = (str(device), dtype, shape)
    t = _dummies.get(key)
    if t is None:
        t = _dummies[key] = torch.zeros(shape, dtype=dtype, device=device)
    return t


MIN_TILES_PER_SPLIT = 4  # a split of fewer 64-slot tiles spends more on pipeline fill and partials
MAX_GRID_Z = 65535


def choose_num_splits(b: int, s_q: int, h_q: int, topk: int, num_sms: int) -> int:
    """Splits per row: 1 when the (head tile, s_q, b) grid fills half the SMs, else enough splits of at least
    MIN_TILES_PER_SPLIT tiles to fill them. Depends only on shapes (CUDA-graph safe)."""
    ctas = b * s_q * -(-h_q // BLOCK_M)
    if 2 * ctas >= num_sms:
        return 1
    splits = min(num_sms // ctas, -(-topk // BLOCK_N) // MIN_TILES_PER_SPLIT, MAX_GRID_Z // b)
    return max(1, splits)


_num_sms: dict = {}


def _device_num_sms(device) -> int:
    key = str(device)
    if key not in _num_sms:
        _num_sms[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _num_sms[key]


def sparse_launch_args(q, k_cache, indices, softmax_scale, attn_sink, topk_length, num_splits: int):
    """The compiled kernel's arguments, in order: inputs in the layouts its fake tensors declare (q made
    TMA-ready, the cache as uint8, indices with a unit last stride, dummies for absent inputs) and fresh
    outputs (out, lse [b, s_q, h_q], split partials or dummies). Any device (the CPU tests check it)."""
    from . import _tma_ready

    b, s_q, h_q, _ = q.shape
    device = q.device
    if not (1 <= num_splits and b * num_splits <= MAX_GRID_Z):
        raise ValueError(f"num_splits must be >= 1 with b * num_splits <= {MAX_GRID_Z}, got {num_splits}")
    out = torch.empty(b, s_q, h_q, D_V, dtype=torch.bfloat16, device=device)
    lse = torch.empty(b, s_q, h_q, dtype=torch.float32, device=device)
    if num_splits > 1:
        o_accum = torch.empty(b * num_splits, 1, s_q * h_q, D_V, dtype=torch.float32, device=device)
        lse_accum = torch.empty(b * num_splits, 1, s_q * h_q, dtype=torch.float32, device=device)
    else:
        o_accum = _dummy(device, torch.float32, (1, 1, 1, D_V))
        lse_accum = _dummy(device, torch.float32, (1, 1, 1))
    if k_cache.dtype != torch.uint8:
        k_cache = k_cache.view(torch.uint8)
    # A unit last stride, as compiled (clone: .contiguous() keeps any stride of a size-1 dim).
    if indices.stride(-1) != 1:
        indices = indices.clone(memory_format=torch.contiguous_format)
    if topk_length is not None and topk_length.stride(0) != 1:
        topk_length = topk_length.clone(memory_format=torch.contiguous_format)
    if attn_sink is not None and attn_sink.stride(0) != 1:
        attn_sink = attn_sink.clone(memory_format=torch.contiguous_format)
    return (_tma_ready(q, "q", copy_ok=True), k_cache, indices,
            topk_length if topk_length is not None else _dummy(device, torch.int32),
            attn_sink if attn_sink is not None else _dummy(device, torch.float32),
            out, lse, o_accum, lse_accum, float(softmax_scale) * LOG2E, int(topk_length is not None),
            int(attn_sink is not None), int(num_splits))


def run_sparse_fp8_decode(q, k_cache, indices, softmax_scale, attn_sink=None, topk_length=None,
                          num_splits: int | None = None, config: str = DEFAULT_CONFIG):
    """Sparse top-k decode over the FP8 cache on the current stream. Inputs must already be validated.

    q [b, s_q, h_q, 576] bf16; k_cache [num_blocks, page, 1, 656] uint8/int8/float8_e4m3fn bytes with
    stride(1) == 656; indices [b, s_q, topk] int32; attn_sink [h_q] fp32 or None; topk_length [b] int32 or
    None. num_splits: CTAs per row (None: `choose_num_splits`); above 1 the rows' tiles are split and merged
    by `sparse_combine.py` (which applies the sink).
    Returns (out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32: a transposed view of a [b, s_q, h_q]
    buffer, as FlashMLA returns it). No host sync, no data-dependent allocation (CUDA-graph capturable).
    """
    from .sparse_combine import launch_sparse_combine

    b, s_q, h_q, _ = q.shape
    device = q.device
    if num_splits is None:
        num_splits = choose_num_splits(b, s_q, h_q, indices.shape[2], _device_num_sms(device))
    args = sparse_launch_args(q, k_cache, indices, softmax_scale, attn_sink, topk_length, num_splits)
    sink, out, lse, o_accum, lse_accum, has_sink = args[4], args[5], args[6], args[7], args[8], args[11]
    fn = get_sparse_decode_fn(config)
    with torch.cuda.device(device):
        fn(*args)
        if num_splits > 1:  # merge the splits, sink applied in fp32 before the one rounding to bf16
            launch_sparse_combine(o_accum, lse_accum, sink, out, lse, has_sink)
    return out, lse.transpose(1, 2)
