"""Split-KV MLA decode kernel for sm_90a (CuTe DSL): TMA + mbarrier pipeline + WGMMA + online softmax.

One CTA handles one 64-row M tile of folded query rows (s_q * h_q / h_kv per KV head), one KV head and
one scheduler partition (a run of requests and 64-token block ranges from the tile metadata).

Warp roles (384 threads):
  warpgroup 0  producer. Warp 0 issues every TMA: Q once per request (9 boxes of 64x64, one mbarrier)
               and each KV page as d/64 sub-tile boxes, each on its own mbarrier, into a ring of two
               stages. The page id read from block_table is the TMA coordinate.
  warpgroups 1, 2  consumers. Each computes S = Q K^T for its own 32 of the tile's 64 keys (SS
               WGMMA m64n32, starting on sub-tile t as soon as it lands); the two exchange row maxima
               and their bf16/fp16 P halves through shared memory, run the online softmax in base 2,
               and each accumulates its own 256-column half of O with an SS WGMMA over the whole P
               and V^T, a transposed view of the K stage in shared memory (V is never loaded).

The `schedule` compile-time option picks the consumer loop:
  "pipelined" QK^T of tile n+1 is issued before PV of tile n, so the softmax of n+1 runs while the
              tensor cores do PV(n) (FA3-style intra-warpgroup overlap). The default.
  "split_s"   one tile at a time: QK^T, softmax, PV. Simpler; kept as the reference schedule.
(A third, "mirrored" -- both warpgroups computing the full S, P kept in registers -- was slower in
every measured case and is gone; see perf/README.md.) The default for 576-column heads is the
"seesaw" of kernels/seesaw.py, a subclass of this kernel in which the warpgroups take turns scoring
whole tiles; these two remain for 512-column heads and as references.

Outputs: a request that the scheduler did not split writes out/lse directly; a split request writes
fp32 O/L and the base-2 LSE per split for the combine kernel.
"""
from functools import partial

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr, pipeline
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.memory import SmemAllocator

from ..layouts.smem import row_major_tile, v_transposed_view
from ..layouts.tiles import BLOCK_M, BLOCK_N, D_V, SUBTILE_K
from . import softmax as sm

NUM_THREADS = 384
# Registers per thread after setmaxnreg. The launch gives every thread 65536 // 384 rounded down to
# 8 = 168; the consumers' increase can only take what the producer's decrease gave back, so
# 128 * producer + 256 * consumer must stay within 168 * 384, or setmaxnreg.inc waits forever
# (a silent hang, seen on the H100 with 32/240).
PRODUCER_REGS, CONSUMER_REGS = 40, 232
LAUNCH_REGS = (65536 // NUM_THREADS) // 8 * 8
assert 128 * PRODUCER_REGS + 256 * CONSUMER_REGS <= LAUNCH_REGS * NUM_THREADS
SMEM_LIMIT = 232448  # 227 KiB, the sm90 per-block opt-in maximum
# Named barriers between the two consumer warpgroups (256 threads; id 0 is __syncthreads).
BARRIER_ROW_MAX = 1  # row maxima of a tile published
BARRIER_P_FREE = 2   # both finished the previous PV: sP may be overwritten
BARRIER_P_READY = 3  # P halves (and zeroed V tails) visible to the async proxy
BARRIER_ROW_SUM = 4  # row sums published at the end of a request
SCHEDULES = ("pipelined", "split_s")


class MlaDecode:
    """Split-KV MLA decode. Config (compile-time): dtype, head dim (576 or 512), consumer schedule."""

    def __init__(self, dtype, d_qk: int = 576, schedule: str = "pipelined", kv_stages: int = 2,
                 l2_prefetch_blocks: int = 2):
        assert d_qk % SUBTILE_K == 0 and d_qk >= D_V
        assert schedule in SCHEDULES, schedule
        self.dtype = dtype
        self.d_qk = d_qk
        self.kv_stages = kv_stages
        self.num_subtiles = d_qk // SUBTILE_K
        self.pipelined = schedule == "pipelined"
        # How many blocks ahead of its TMA loads the producer prefetches pages into L2 (0: off).
        self.l2_prefetch_blocks = l2_prefetch_blocks
        # Keys of one tile whose scores a consumer warpgroup computes.
        self.qk_cols = BLOCK_N // 2

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mBlockTable: cute.Tensor,
                 mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor,
                 mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor,
                 scale_log2: Float32, is_causal: Int32, stream):
        """Tensors arrive in torch order:
        mQ [b, rows, h_kv, d] (folded), mK [num_blocks, 64, h_kv, d], mBlockTable [b, max_blocks],
        mSeqlens [b], mMeta [parts, 8], mNumSplits [b + 1], mOut [b, s_q, h_kv, g, 512],
        mLse [b, h_kv, g, s_q], mOAccum [splits, h_kv, rows, 512] fp32, mLseAccum [splits, h_kv, rows].
        """
        dt = self.dtype
        mQ_t, mK_t, mOut_r, mLse_r = self.tma_and_output_views(mQ, mK, mOut, mLse)
        h_kv = mOut.shape[2]
        sQ_layout, sK_layout, tma_atom_Q, tma_Q, tma_atom_K, tma_K = self.make_tma_atoms(mQ_t, mK_t)

        K_MAJOR, MN_MAJOR = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN
        tiled_mma_qk = sm90_utils.make_trivial_tiled_mma(
            dt, dt, K_MAJOR, K_MAJOR, Float32, (1, 1, 1), tiler_mn=(BLOCK_M, self.qk_cols))
        # P comes from shared memory: each warpgroup needs both halves.
        tiled_mma_pv = sm90_utils.make_trivial_tiled_mma(
            dt, dt, K_MAJOR, MN_MAJOR, Float32, (1, 1, 1), tiler_mn=(BLOCK_M, D_V // 2))
        sP_layout = row_major_tile(dt, BLOCK_M, BLOCK_N)

        num_stages_ring = self.num_subtiles * self.kv_stages

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2]
            mbar_kv: cute.struct.MemRange[cutlass.Int64, 2 * num_stages_ring]
            sQ: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sK_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sP_layout)], 1024]
            # Row maxima (64 rows x 2 warpgroups); row sums (x 2 buffers, by request parity).
            sRowMax: cute.struct.MemRange[Float32, BLOCK_M * 2]
            sRowSum: cute.struct.MemRange[Float32, BLOCK_M * 4]

        self.shared_storage = SharedStorage
        assert SharedStorage.size_in_bytes() <= SMEM_LIMIT, "shared memory over the sm90 limit"

        rows = mQ.shape[1]
        num_m_blocks = (rows + BLOCK_M - 1) // BLOCK_M
        self.kernel(
            tma_atom_Q, tma_Q, tma_atom_K, tma_K, mBlockTable, mSeqlens, mMeta, mNumSplits,
            mOut_r, mLse_r, mOAccum, mLseAccum, scale_log2, is_causal,
            tiled_mma_qk, tiled_mma_pv, sQ_layout, sK_layout, sP_layout,
        ).launch(grid=(num_m_blocks, h_kv, mMeta.shape[0]), block=(NUM_THREADS, 1, 1),
                 smem=SharedStorage.size_in_bytes(), stream=stream)

    def make_tma_atoms(self, mQ_t, mK_t):
        """Q and K-stage smem layouts and their TMA atoms: Q as one (64, d) copy, K as 64x64 boxes."""
        sQ_layout = row_major_tile(self.dtype, BLOCK_M, self.d_qk)
        sK_layout = row_major_tile(self.dtype, BLOCK_N, self.d_qk, self.kv_stages)
        sub_layout = row_major_tile(self.dtype, BLOCK_N, SUBTILE_K)
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mQ_t, sQ_layout, (BLOCK_M, self.d_qk))
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mK_t, sub_layout, (BLOCK_N, SUBTILE_K))
        return sQ_layout, sK_layout, tma_atom_Q, tma_Q, tma_atom_K, tma_K

    @staticmethod
    def tma_and_output_views(mQ, mK, mOut, mLse):
        """Tile-first views for TMA, (rows, d, h_kv, b) and (page, d, h_kv, num_blocks), and the
        outputs by folded row (g, s_q): row r is head-in-group r % g at query position r // g."""
        mQ_t = cute.make_tensor(mQ.iterator, cute.select(mQ.layout, mode=[1, 3, 2, 0]))
        mK_t = cute.make_tensor(mK.iterator, cute.select(mK.layout, mode=[1, 3, 2, 0]))
        b, s_q, h_kv, g, dv = mOut.shape
        ob, os_, oh, og, _ = mOut.stride
        mOut_r = cute.make_tensor(mOut.iterator, cute.make_layout(
            ((g, s_q), dv, h_kv, b), stride=((og, os_), 1, oh, ob)))
        lb, lh, lg, ls = mLse.stride
        mLse_r = cute.make_tensor(mLse.iterator, cute.make_layout(
            ((g, s_q), h_kv, b), stride=((lg, ls), lh, lb)))
        return mQ_t, mK_t, mOut_r, mLse_r

    @cute.kernel
    def kernel(self, tma_atom_Q: cute.CopyAtom, mQ: cute.Tensor, tma_atom_K: cute.CopyAtom,
               mK: cute.Tensor, mBlockTable: cute.Tensor, mSeqlens: cute.Tensor, mMeta: cute.Tensor,
               mNumSplits: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor,
               mLseAccum: cute.Tensor, scale_log2: Float32, is_causal: Int32,
               tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
               sP_layout: cute.ComposedLayout):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        m_block, kv_head, part = cute.arch.block_idx()
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_Q)
            cpasync.prefetch_descriptor(tma_atom_K)

        storage = SmemAllocator().allocate(self.shared_storage)
        consumer_warps = partial(pipeline.CooperativeGroup, pipeline.Agent.Thread)
        # Consumers release a buffer with one arrive per warp (lane 0): 8 consumer warps.
        pipe_q = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_q.data_ptr(), num_stages=1,
            producer_group=consumer_warps(1), consumer_group=consumer_warps(8),
            tx_count=cute.size_in_bytes(self.dtype, sQ_layout), defer_sync=True)
        pipe_kv = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_kv.data_ptr(), num_stages=self.num_subtiles * self.kv_stages,
            producer_group=consumer_warps(1), consumer_group=consumer_warps(8),
            tx_count=BLOCK_N * SUBTILE_K * self.dtype.width // 8, defer_sync=True)
        pipeline.pipeline_init_arrive(cluster_shape_mn=(1, 1), is_relaxed=True)

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        exchange = (storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner),
                    storage.sRowMax.get_tensor(cute.make_layout((BLOCK_M, 2))),
                    storage.sRowSum.get_tensor(cute.make_layout((BLOCK_M, 2, 2))))
        pipeline.pipeline_init_wait(cluster_shape_mn=(1, 1))

        batch = mSeqlens.shape[0]
        begin_req = mMeta[part, 0]
        if begin_req < batch:
            if warp_idx < 4:
                cute.arch.setmaxregister_decrease(PRODUCER_REGS)
                if warp_idx == 0:
                    self.producer(tma_atom_Q, mQ, tma_atom_K, mK, sQ, sK, mBlockTable, mSeqlens,
                                  mMeta, pipe_q, pipe_kv, m_block, kv_head, part, is_causal,
                                  mOut.shape[0][0], mOut.shape[0][1])
            else:
                cute.arch.setmaxregister_increase(CONSUMER_REGS)
                self.consumer(tidx - 128, sQ, sK, exchange, mSeqlens, mMeta, mNumSplits, mOut, mLse,
                              mOAccum, mLseAccum, pipe_q, pipe_kv, tiled_mma_qk, tiled_mma_pv,
                              m_block, kv_head, part, scale_log2, is_causal, mQ.shape[0])

    @cute.jit
    def row_borders(self, seqlen, m_block, tile_row, g, s_q, is_causal: Int32):
        """This thread's first row, the key borders of its two rows (keys at or past a border are
        masked) and the smallest border of the M tile (bottom-right causal alignment)."""
        row0 = m_block * BLOCK_M + tile_row
        border0 = seqlen
        border1 = seqlen
        tile_border = seqlen
        if is_causal != 0:
            border0 = seqlen - (s_q - 1 - row0 // g)
            border1 = seqlen - (s_q - 1 - (row0 + 8) // g)
            tile_border = seqlen - (s_q - 1 - (m_block * BLOCK_M) // g)
        return row0, border0, border1, tile_border

    def k_tma_partition(self, tma_atom_K, mK, sK, kv_head):
        """(smem, gmem) TMA views of the K sub-tiles: (64x64, subtile, stage) and (.., subtile, page)."""
        gK = cute.local_tile(mK[None, None, kv_head, None], (BLOCK_N, SUBTILE_K), (0, None, None))
        sK_tiles = cute.flat_divide(sK, (BLOCK_N, SUBTILE_K))[None, None, 0, None, None]
        return cpasync.tma_partition(tma_atom_K, 0, cute.make_layout(1),
                                     cute.group_modes(sK_tiles, 0, 2), cute.group_modes(gK, 0, 2))

    def q_tma_partition(self, tma_atom_Q, mQ, sQ, kv_head, req, m_block):
        """(smem, gmem) TMA views of request req's 64-row Q tile m_block."""
        gQ = cute.local_tile(mQ[None, None, kv_head, req], (BLOCK_M, self.d_qk), (m_block, 0))
        return cpasync.tma_partition(tma_atom_Q, 0, cute.make_layout(1),
                                     cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2))

    @cute.jit
    def producer(self, tma_atom_Q, mQ, tma_atom_K, mK, sQ, sK, mBlockTable, mSeqlens, mMeta,
                 pipe_q, pipe_kv, m_block, kv_head, part, is_causal, g, s_q):
        tKsK, tKgK = self.k_tma_partition(tma_atom_K, mK, sK, kv_head)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        kv_state = pipeline.make_pipeline_state(
            pipeline.PipelineUserType.Producer, self.num_subtiles * self.kv_stages)
        rows = mQ.shape[0]
        for req in cutlass.range(mMeta[part, 0], mMeta[part, 1] + 1, unroll=1):
            start, end, seqlen = request_block_range(mSeqlens, mMeta, part, req, m_block, is_causal,
                                                  g, s_q, rows)
            tQsQ, tQgQ = self.q_tma_partition(tma_atom_Q, mQ, sQ, kv_head, req, m_block)
            pipe_q.producer_acquire(q_state)
            cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=pipe_q.producer_get_barrier(q_state))
            q_state.advance()
            for n in cutlass.range(start, end, unroll=1):
                page = mBlockTable[req, n]
                stage = kv_state.index // self.num_subtiles
                for t in cutlass.range_constexpr(self.num_subtiles):
                    pipe_kv.producer_acquire(kv_state)
                    cute.copy(tma_atom_K, tKgK[None, t, page], tKsK[None, t, stage],
                              tma_bar_ptr=pipe_kv.producer_get_barrier(kv_state))
                    kv_state.advance()
                if const_expr(self.l2_prefetch_blocks > 0):
                    # Only two pages fit in shared memory: warm L2 with a later page so its TMA
                    # load, issued when a stage frees up, waits on L2 instead of HBM.
                    ahead = n + self.l2_prefetch_blocks
                    if ahead < end:
                        ahead_page = mBlockTable[req, ahead]
                        for t in cutlass.range_constexpr(self.num_subtiles):
                            cute.prefetch(tma_atom_K, tKgK[None, t, ahead_page])

    @cute.jit
    def consumer(self, tidx_wg2, sQ, sK, exchange, mSeqlens, mMeta, mNumSplits, mOut, mLse,
                 mOAccum, mLseAccum, pipe_q, pipe_kv, tiled_mma_qk, tiled_mma_pv, m_block, kv_head,
                 part, scale_log2: Float32, is_causal: Int32, rows):
        wg = cute.arch.make_warp_uniform(tidx_wg2 // 128)  # which half of O this warpgroup owns
        tidx = tidx_wg2 % 128
        g = mOut.shape[0][0]
        s_q = mOut.shape[0][1]

        thr_qk = tiled_mma_qk.get_slice(tidx)
        tSrQ = tiled_mma_qk.make_fragment_A(thr_qk.partition_A(sQ))
        # This warpgroup's 32 keys of each stage: (32, d, stages).
        sK_qk = cute.flat_divide(sK, (self.qk_cols, self.d_qk))[None, None, wg, 0, None]
        tSrK = tiled_mma_qk.make_fragment_B(thr_qk.partition_B(sK_qk))
        sVt = v_transposed_view(sK, BLOCK_N, self.d_qk, self.kv_stages)
        sVt_half = cute.flat_divide(sVt, (D_V // 2, BLOCK_N))[None, None, wg, 0, None]
        thr_pv = tiled_mma_pv.get_slice(tidx)
        tOrVt = tiled_mma_pv.make_fragment_B(thr_pv.partition_B(sVt_half))
        sP, sRowMax, sRowSum = exchange
        tOrP = tiled_mma_pv.make_fragment_A(thr_pv.partition_A(sP))
        # Where this warpgroup's P half goes: columns [32 * wg, 32 * wg + 32) of sP.
        tPsP = thr_qk.partition_C(cute.flat_divide(sP, (BLOCK_M, self.qk_cols))[None, None, 0, wg])

        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        # KV ring positions come from a running count of consumed blocks (see kv_slot), so the
        # pipelined loop can wait on or release any block without mutating pipeline state.
        kv_block = Int32(0)
        # Each thread owns rows tile_row and tile_row + 8 of this M tile; a quad shares a row.
        tile_row = (tidx // 32) * 16 + (tidx % 32) // 4
        quad_leader = tidx % 4 == 0
        key_offset = wg * self.qk_cols  # key index of this warpgroup's first score column

        for req in cutlass.range(mMeta[part, 0], mMeta[part, 1] + 1, unroll=1):
            start, end, seqlen = request_block_range(mSeqlens, mMeta, part, req, m_block, is_causal,
                                                  g, s_q, rows)
            row0, border0, border1, tile_border = self.row_borders(seqlen, m_block, tile_row, g, s_q,
                                                                   is_causal)

            acc_O = cute.make_rmem_tensor(thr_pv.partition_shape_C((BLOCK_M, D_V // 2)), Float32)
            acc_O.fill(0.0)
            row_max = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
            row_sum = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
            row_max.fill(-Float32.inf)
            row_sum.fill(0.0)

            pipe_q.consumer_wait(q_state)
            acc_S = cute.make_rmem_tensor(thr_qk.partition_shape_C((BLOCK_M, self.qk_cols)),
                                          Float32)
            rP = cute.make_rmem_tensor_like(acc_S, self.dtype)
            rescale = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
            if const_expr(self.pipelined):
                if start < end:  # prologue: tile `start` up to its P in shared memory
                    self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, pipe_kv, kv_block, True)
                    warpgroup.wait_group(0)
                    self.softmax_to_registers(acc_S, rP, rescale, start, tile_border, tidx,
                                              key_offset, border0, border1, sRowMax, tile_row, wg,
                                              quad_leader, row_max, row_sum, scale_log2)
                    self.stage_p(acc_O, rP, rescale, tPsP, sK, seqlen, start, wg, tidx,
                                 kv_block % self.kv_stages)
                for n in cutlass.range(start, end, unroll=1):
                    blk = kv_block + (n - start)
                    has_next = n + 1 < end
                    next_blk = blk
                    if has_next:
                        next_blk = blk + 1
                    # QK^T(n+1) before PV(n), so the softmax of n+1 overlaps PV(n). On the last
                    # tile it re-runs QK^T on tile n's resident stage and the result is dropped:
                    # the WGMMA issue stays out of data-dependent branches.
                    self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, pipe_kv, next_blk, has_next)
                    sm.issue_pv(acc_O, tOrP, tOrVt, tiled_mma_pv, blk % self.kv_stages)
                    warpgroup.wait_group(1)  # QK^T(n+1) done; PV(n) still running
                    if has_next:
                        self.softmax_to_registers(acc_S, rP, rescale, n + 1, tile_border, tidx,
                                                  key_offset, border0, border1, sRowMax,
                                                  tile_row, wg, quad_leader, row_max, row_sum,
                                                  scale_log2)
                    warpgroup.wait_group(0)  # PV(n) done: its K may go, O may be rescaled
                    self.release_kv(pipe_kv, blk)
                    if has_next:
                        self.stage_p(acc_O, rP, rescale, tPsP, sK, seqlen, n + 1, wg, tidx,
                                     next_blk % self.kv_stages)
            else:  # one tile at a time
                for n in cutlass.range(start, end, unroll=1):
                    blk = kv_block + (n - start)
                    self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, pipe_kv, blk, True)
                    warpgroup.wait_group(0)
                    self.softmax_to_registers(acc_S, rP, rescale, n, tile_border, tidx,
                                              key_offset, border0, border1, sRowMax, tile_row, wg,
                                              quad_leader, row_max, row_sum, scale_log2)
                    self.stage_p(acc_O, rP, rescale, tPsP, sK, seqlen, n, wg, tidx,
                                 blk % self.kv_stages)
                    sm.issue_pv(acc_O, tOrP, tOrVt, tiled_mma_pv, blk % self.kv_stages)
                    warpgroup.wait_group(0)
                    self.release_kv(pipe_kv, blk)
            kv_block = kv_block + max(end - start, 0)
            pipe_q.consumer_release(q_state)
            q_state.advance()

            # Each warpgroup summed its own keys.
            row_total = sm.exchange_row_sums(row_sum, sRowSum, tile_row, wg, quad_leader, req % 2,
                                             BARRIER_ROW_SUM)
            self.epilogue(acc_O, row_max, row_total, tidx, wg, req, kv_head, row0, rows,
                          mNumSplits, mMeta, part, mOut, mLse, mOAccum, mLseAccum)

    def kv_slot(self, block_count, subtile):
        """Ring position of `subtile` of the consumer's block_count-th block (0-based, all requests)."""
        return pipeline.PipelineState(
            self.num_subtiles * self.kv_stages, block_count,
            (block_count % self.kv_stages) * self.num_subtiles + subtile,
            (block_count // self.kv_stages) % 2)

    @cute.jit
    def issue_qk(self, acc_S, tSrQ, tSrK, tiled_mma_qk, pipe_kv, block_count, wait: bool):
        """Issue S = Q K^T for one block, sub-tile by sub-tile as each lands (wait=False: the block
        is already resident), and commit it as one WGMMA group."""
        stage = block_count % self.kv_stages
        k_per_subtile = SUBTILE_K // 16
        mma_qk = cute.make_mma_atom(tiled_mma_qk.op)
        mma_qk.set(warpgroup.Field.ACCUMULATE, False)
        warpgroup.fence()
        for t in cutlass.range_constexpr(self.num_subtiles):
            if wait:
                pipe_kv.consumer_wait(self.kv_slot(block_count, t))
            for k in cutlass.range_constexpr(k_per_subtile):
                kk = t * k_per_subtile + k
                cute.gemm(mma_qk, acc_S, tSrQ[None, None, kk], tSrK[None, None, kk, stage], acc_S)
                mma_qk.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()

    @cute.jit
    def release_kv(self, pipe_kv, block_count):
        for t in cutlass.range_constexpr(self.num_subtiles):
            pipe_kv.consumer_release(self.kv_slot(block_count, t))

    @cute.jit
    def tile_row_max(self, acc_S, n, tile_border, tidx, key_offset, border0, border1, sRowMax,
                     tile_row, wg, quad_leader):
        """Mask the tile if it reaches a row's border, then its row maxima over all 64 keys: this
        warpgroup's 32 combined with the other's through shared memory."""
        if n * BLOCK_N + BLOCK_N > tile_border:
            sm.mask_scores(acc_S, tidx, n * BLOCK_N + key_offset, border0, border1)
        return sm.exchange_row_max(sm.block_row_max(acc_S), sRowMax, tile_row, wg, quad_leader,
                                   BARRIER_ROW_MAX)

    @cute.jit
    def softmax_to_registers(self, acc_S, rP, rescale, n, tile_border, tidx, key_offset, border0,
                             border1, sRowMax, tile_row, wg, quad_leader, row_max, row_sum,
                             scale_log2):
        """Scores of tile n -> bf16/fp16 P in registers and the row factors for O."""
        block_max = self.tile_row_max(acc_S, n, tile_border, tidx, key_offset, border0, border1,
                                      sRowMax, tile_row, wg, quad_leader)
        factors = sm.online_softmax_step(acc_S, block_max, row_max, row_sum, scale_log2)
        rescale[0] = factors[0]
        rescale[1] = factors[1]
        rP.store(acc_S.load().to(self.dtype))

    @cute.jit
    def stage_p(self, acc_O, rP, rescale, tPsP, sK, seqlen, n, wg, tidx, stage):
        """Rescale O, then publish this warpgroup's P half of tile n for both PV WGMMAs.

        The tail page's rows past seqlen may hold anything (NaN): P is 0 there, but 0 * NaN is NaN
        in the MMA, so each warpgroup also zeroes its half of those V rows."""
        sm.rescale_rows(acc_O, rescale)
        # sP is free once both warpgroups finished the previous PV.
        cute.arch.barrier(barrier_id=BARRIER_P_FREE, number_of_threads=256)
        cute.autovec_copy(rP, tPsP)
        valid = seqlen - n * BLOCK_N
        if valid < BLOCK_N:
            self.zero_v_tail(sK, valid, wg, tidx, stage)
        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=BARRIER_P_READY, number_of_threads=256)

    @cute.jit
    def zero_v_tail(self, sK, valid, wg, tidx, stage):
        """Zero rows [valid, 64) of this warpgroup's V columns (the caller fences and syncs)."""
        half = D_V // 2
        first_row = max(valid, 0)
        for idx in cutlass.range(tidx, (BLOCK_N - first_row) * half, 128, unroll=1):
            sK[first_row + idx // half, wg * half + idx % half, stage] = self.dtype(0.0)

    @cute.jit
    def epilogue(self, acc_O, row_max, row_total, tidx, wg, req, kv_head, row0, rows, mNumSplits,
                 mMeta, part, mOut, mLse, mOAccum, mLseAccum):
        """Normalise O by L; write out/lse, or the fp32 split partials with a base-2 LSE."""
        lse2 = sm.normalize_rows(acc_O, row_max, row_total)
        is_split, split = split_slot(mNumSplits, mMeta, part, req)
        col_base = wg * (D_V // 2)
        lane = tidx % 32
        for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
            row = row0 + r * 8
            if row < rows:
                # Column pairs as one 8-byte (fp32) or 4-byte store each from a per-row base: the
                # outputs' strides are declared even (_fake_args), so pairs are aligned.
                if is_split:
                    sm.store_row(acc_O, r, tidx, col_base, mOAccum[split, kv_head, row, None], Float32)
                    if wg == 0 and lane % 4 == 0:
                        mLseAccum[split, kv_head, row] = lse2[r]
                else:
                    sm.store_row(acc_O, r, tidx, col_base, mOut[row, None, kv_head, req], self.dtype)
                    if wg == 0 and lane % 4 == 0:
                        mLse[row, kv_head, req] = sm.natural_lse(lse2[r])

@cute.jit
def request_block_range(mSeqlens: cute.Tensor, mMeta: cute.Tensor, part, req, m_block,
                        is_causal: Int32, g, s_q, rows):
    """[start, end) of the 64-token blocks a CTA handles for `req`, and the request's seqlen.

    Shared by producer and consumers so their barrier sequences match. Causal trimming drops the
    blocks no row of this M tile may see (bottom-right alignment).
    """
    seqlen = mSeqlens[req]
    start = Int32(0)
    end = (seqlen + BLOCK_N - 1) // BLOCK_N
    if req == mMeta[part, 0]:
        start = mMeta[part, 2]
    if req == mMeta[part, 1]:
        end = min(end, mMeta[part, 3])
    if is_causal != 0:
        last_row = min(rows, (m_block + 1) * BLOCK_M) - 1
        visible = seqlen - (s_q - 1 - last_row // g)
        end = min(end, (max(visible, 0) + BLOCK_N - 1) // BLOCK_N)
    return start, end, seqlen


@cute.jit
def split_slot(mNumSplits: cute.Tensor, mMeta: cute.Tensor, part, req):
    """(whether `req` is cut into several splits, the partials slot of this part's piece of it). A request's
    splits are numbered from mNumSplits[req]; the part that starts inside it holds split mMeta[part, 4]."""
    first_split = mNumSplits[req]
    is_split = mNumSplits[req + 1] - first_split > 1
    split = first_split
    if req == mMeta[part, 0]:
        split = first_split + mMeta[part, 4]
    return is_split, split


def _fake_args(dtype, d_qk: int):
    """Fake tensors with symbolic sizes: batch, lengths and block counts never trigger a recompile."""
    from cutlass.cute.runtime import make_fake_tensor

    def dyn_stride():
        return cute.sym_int64(divisibility=8)

    def even_stride():
        return cute.sym_int64(divisibility=2)

    b, rows, h_kv = cute.sym_int32(symbol="b"), cute.sym_int32(symbol="rows"), cute.sym_int32(symbol="h_kv")
    q = make_fake_tensor(dtype, (b, rows, h_kv, d_qk), (dyn_stride(), dyn_stride(), dyn_stride(), 1),
                         assumed_align=16)
    kcache = make_fake_tensor(dtype, (cute.sym_int32(), BLOCK_N, h_kv, d_qk),
                              (dyn_stride(), dyn_stride(), dyn_stride(), 1), assumed_align=16)
    block_table = make_fake_tensor(Int32, (b, cute.sym_int32()), (cute.sym_int64(), 1), assumed_align=4)
    seqlens = make_fake_tensor(Int32, (b,), (1,), assumed_align=4)
    meta = make_fake_tensor(Int32, (cute.sym_int32(), 8), (8, 1), assumed_align=4)
    num_splits = make_fake_tensor(Int32, (cute.sym_int32(),), (1,), assumed_align=4)
    s_q, g = cute.sym_int32(symbol="s_q"), cute.sym_int32(symbol="g")
    # The outputs are cutemla's own contiguous buffers (dense_decode_launches): strides are multiples of
    # 512. Declaring them even lets the epilogue store column pairs as one vector each.
    out = make_fake_tensor(dtype, (b, s_q, h_kv, g, D_V),
                           (even_stride(), even_stride(), even_stride(), even_stride(), 1), assumed_align=4)
    lse = make_fake_tensor(Float32, (b, h_kv, g, s_q),
                           (cute.sym_int64(), cute.sym_int64(), cute.sym_int64(), cute.sym_int64()),
                           assumed_align=4)
    splits = cute.sym_int32(symbol="splits")
    o_accum = make_fake_tensor(Float32, (splits, h_kv, rows, D_V),
                               (even_stride(), even_stride(), even_stride(), 1), assumed_align=16)
    lse_accum = make_fake_tensor(Float32, (splits, h_kv, rows),
                                 (cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
    return (q, kcache, block_table, seqlens, meta, num_splits, out, lse, o_accum, lse_accum,
            Float32(1.0), Int32(0))


def compile_decode(dtype, d_qk: int = 576, schedule: str = "pipelined", options: str | None = None,
                   l2_prefetch_blocks: int = 2):
    """Compile (uncached) one decode variant. Use `get_decode_fn` to call it."""
    from .jit import COMPILE_OPTIONS, fake_stream

    kernel = MlaDecode(dtype, d_qk, schedule, l2_prefetch_blocks=l2_prefetch_blocks)
    return cute.compile(kernel, *_fake_args(dtype, d_qk), fake_stream(),
                        options=options or COMPILE_OPTIONS)


def get_decode_fn(dtype, d_qk: int = 576, schedule: str = "pipelined", l2_prefetch_blocks: int = 2):
    """The compiled decode (cached in memory and on disk). schedule: "pipelined", "split_s", or
    "seesaw" (kernels/seesaw.py; 576-column heads only)."""
    from .jit import compile_cache

    if schedule.startswith("seesaw"):
        # "seesaw" or one of its experiments (seesaw.SCHEDULE_OPTIONS: seesaw_exact, seesaw_named, ...).
        from .seesaw import SCHEDULE_OPTIONS, compile_decode_seesaw

        if schedule not in SCHEDULE_OPTIONS:
            raise ValueError(f"unknown seesaw schedule {schedule!r}; one of {sorted(SCHEDULE_OPTIONS)}")
        build = partial(compile_decode_seesaw, dtype, d_qk, l2_prefetch_blocks=l2_prefetch_blocks,
                        **SCHEDULE_OPTIONS[schedule])
    else:
        build = partial(compile_decode, dtype, d_qk, schedule, l2_prefetch_blocks=l2_prefetch_blocks)
    return compile_cache.get("mla_decode", (str(dtype), d_qk, schedule, l2_prefetch_blocks), build)


def compile_configs():
    """Every compiled variant, by name, for the CI compile checks."""
    return {
        f"{name}_d{d}_{schedule}": partial(compile_decode, dt, d, schedule)
        for name, dt in (("bf16", cutlass.BFloat16), ("fp16", cutlass.Float16))
        for d in (576, 512)
        for schedule in SCHEDULES
    }
