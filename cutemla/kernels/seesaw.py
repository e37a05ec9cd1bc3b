"""Seesaw MLA decode for sm_90a (CuTe DSL): each consumer warpgroup scores a whole 64-key tile.

The schedules of decode.py split every tile's 64 keys between the two consumer warpgroups, so each
runs QK^T as m64n32 WGMMAs and both read all of Q from shared memory for every tile. Here the two
warpgroups take turns instead (FlashMLA's "seesaw"): of each pair of tiles (n0, n1), consumer 0
scores n0 and consumer 1 scores n1, each as m64n64 WGMMAs, so Q is read once per tile and the
tensor cores see twice the N. O stays split by columns (consumer 0 owns O[:, :256], consumer 1
O[:, 256:]), so each P tile is used by both:

  consumer 0                                       consumer 1
  S0 -> softmax with the running max -> m0, P0;    (waits SCALE0) O_R *= exp2(m_old - m0);
    P0 -> smem; arrive SCALE0 (m0, factor, P0)       O_R += P0 V0_R (smem), and while it runs:
  O_L *= exp2(m_old - m0)                          S1 -> softmax from m0 -> m1, P1; arrive SCALE1;
  O_L += P0 V0_L   (P0 from registers)               P1 -> smem, arrive P1_READY
  (waits SCALE1) O_L *= exp2(m0 - m1)              O_R *= exp2(m0 - m1) (after P0 V0_R, and only
  (waits P1_READY) O_L += P1 V1_L (smem)             where a factor is not 1); O_R += P1 V1_R
  QK^T of the next n0                                (registers), queued behind P0 V0_R
                                                   QK^T of the next n1

P0 goes over at consumer 0's own max m0 and consumer 1 multiplies it in before its own softmax: P0 V0_R
enters O_R at m0 and is rescaled with the rest of O_R by exp2(m0 - m1), as O_L is, so the result is
exact. Handing P0 over only after rescaling it to m1 (FlashMLA's order) made stage 0's R half the last
thing a pair freed, and its refill what consumer 0's next QK^T waited on; now it is freed once consumer
1's softmax is done (2-5% faster at 128 x h128 s_q = 2, perf/results/2026-11-26-h100-ab-early-p0.csv).

Rescaling is lazy (FlashAttention-4's trick, LAZY_RESCALE_THRESHOLD): the reference max m of a row moves
only when a tile's max exceeds it by more than 2^8, so almost every factor above is exactly 1, and a warp
whose factors all are skips the multiplies (a warp vote): after the first tiles of a request the O
rescales are gone. P then reaches up to 256, which bf16/fp16 and the fp32 sums hold without loss. Schedule
"seesaw_exact" keeps the exact online softmax.

Shared memory is Q plus two K stages (221 KiB); P tiles live in the RoPE sub-tile (columns
512-575) of their own tile's stage, which no one reads after that tile's QK^T. Stage 0 always holds
n0 and stage 1 n1. Each stage is refilled in two halves, each released by its last reader, so a
load starts as soon as half a stage is free:
  stage 0: L = sub-tiles 0-3 (V0_L; consumer 0 after O_L += P0 V0_L),
           R = 4-8 (V0_R + P0; consumer 1 after O_R += P0 V0_R)
  stage 1: R = 4-7 (V1_R; consumer 1 after O_R += P1 V1_R),
           L = 0-3 + 8 (V1_L + P1; consumer 0 after O_L += P1 V1_L)
Producer warp 0 fills stage 0 (and loads Q), warp 1 fills stage 1, each in its release order; every
K sub-tile has its own full mbarrier. Needs the 576-column head (the P tiles use the RoPE sub-tile).

The epilogue writes O through shared memory (staged_epilogue, kernels/epilogue.py): after the ROW_SUM
meeting no WGMMA reads sQ or a K stage, so each consumer stages its normalised 64 x 256 block in its half
of K stage 1 and copies whole rows out with cp.async.bulk (fp32 partials in two rounds of 32 rows); from
the fragments, the stores cost ~10k cycles a request (256x1k h128: 6% at the steady clock,
perf/results/2026-11-26-h100-ab-epilogue-steady.csv). Stage 1, not sQ: Q's empty barrier is arrived at
the meeting, so the next Q and first n0 tile load during the epilogue, and only producer 1 waits for it
(STAGING_DONE); consumer 1 needs its n1 after consumer 0's first QK^T and softmax. Staged in sQ (Q and
n0 after the epilogue): 2.3% slower at 256x1k h128, 1.6% at 128x2x4k
(perf/results/2026-11-26-h100-ab-stage-kv.csv).

Consumer-to-consumer hand-offs go through shared-memory mbarriers with one arrive per thread
(schedule "seesaw"). The named-barrier form FlashMLA uses (bar.arrive / bar.sync) is kept as schedule
"seesaw_named" (MlaDecodeSeesaw(..., handoff="named")): it runs at the same speed, but compute-sanitizer
racecheck reports RAW hazards on its SCALE1 hand-off (store -> BAR.ARV; other side BAR.SYNC -> load, in
that order in the SASS), and with one arrive per warp (lane 0 after a __syncwarp) the mbarrier form still
had reports; with per-thread arrives racecheck is clean (perf/results/2026-11-25-h100-sanitize.md). Every
mbarrier.arrive is a release and every try_wait an acquire, at CTA scope, so each thread's own earlier
shared-memory accesses are ordered before the waiter's later ones. The protocol, barrier by barrier
(words of SharedStorage.mbar_handoff; counts 128 for one warpgroup, 256 for both):

  word  barrier    arrives                   waits               parity (phase completed)
  0     SCALE0     consumer 0, step 1        consumer 1, step 1  fills0 % 2   (pairs so far)
        (m0, its factor and P0 are published)
  1     SCALE1     consumer 1, step 2        consumer 0, step 3  fills0 % 2
  2     P1_READY   consumer 1, step 2        consumer 0, step 4  fills1 % 2   (pairs with an n1)
        (both only when the pair has an n1)
  3     ROW_SUM    both, end of request      both                (q_fills - 1) % 2 (requests so far)

and two more words of SharedStorage.mbar_q next to Q's full barrier (word 0), counts 8 (every consumer warp):
  1     Q_EMPTY       each consumer warp, after ROW_SUM       producer 0, before loading a request's Q
  2     STAGING_DONE  each consumer warp, after its epilogue's  producer 1, before loading a request's
                      bulk copies read stage 1                 first tile
  both waited with parity (requests the producer warp has started % 2) ^ 1: a fresh barrier counts as
  having completed the phase before its first one.

fills0, fills1 and q_fills are the counters both consumers already keep for the TMA barriers (fills0
counts pairs, fills1 pairs with an n1, q_fills requests), fills0 / fills1 read before the pair
increments them and q_fills after the request did (hence the - 1), so the parities carry across tile
pairs and requests with no new loop state. A fresh mbarrier is in phase 0, and a
wait for parity p returns once the phase of parity p has completed.

No arrive can run two phases ahead of its waiter (the parity wait could not tell them apart), and no
thread can arrive twice in one phase: every barrier's next arrive sits behind a wait that needs the
waiter's progress past its previous wait. SCALE0(k+1) is arrived after consumer 0 waited SCALE1(k),
which consumer 1 arrives after waiting SCALE0(k); symmetrically SCALE1(k+1) after SCALE0(k+1);
P1_READY at a later pair after SCALE0 of that pair (consumer 0 waited P1_READY in an earlier pair);
ROW_SUM(r+1) after the arriving thread's own wait of ROW_SUM(r), which needs all 256 arrives of r.

Write-after-read (no separate "consumed" barrier is needed; each is implied by the opposite hand-off,
because a thread arrives after its own reads):
  sRowMax = m0, sScale[:, 0]: consumer 0 writes them in pair k+1 after waiting SCALE1(k); consumer 1
    arrived SCALE1(k) after reading m0 and scale0 of pair k (step 1).
  sRowMax = m1, sScale[:, 1]: consumer 1 writes them in pair k after waiting SCALE0(k); consumer 0
    arrived SCALE0(k) after reading m1 and scale1 of pair k-1 (step 3). Within a warp, the existing
    sync_warp before each leader write orders the other lanes' reads of the same rows (rows are
    warp-private: warp w holds rows 16w..16w+15).
  sRowSum: double-buffered by request parity; buffer b is rewritten at request r+2 only after the
    writer waited ROW_SUM(r+1), which the reader arrives after reading b at request r.
  P tiles (RoPE sub-tile of each stage): rewritten only after the stage is refilled, i.e. after the
    reader's empty-barrier release following its PV WGMMA (the TMA pipeline orders it).
  sQ: the next Q's TMA waits for Q_EMPTY, which each warp arrives after its ROW_SUM wait; both consumers
    arrive ROW_SUM after their last QK^T WGMMA completed.
  K stage 1 as the epilogue's staging tile: written after ROW_SUM, which each consumer arrives after its
    last WGMMA completed (so every read of the request's last stage-1 tile, QK^T, P1 and V1, is done);
    no TMA load is in flight into it then (every tile producer 1 loaded was consumed, and it loads the
    next request's tiles only after STAGING_DONE), which each warp arrives after its threads'
    cp.async.bulk.wait_group.read (a __syncwarp, then lane 0). A consumer's second fp32 round rewrites
    its tile after the first round's copies were read and a warpgroup barrier. Stage 0 is not touched:
    producer 0 may already be loading the next request's n0 into it.
P0/P1: the writer's stores, fence.proxy.async (each thread), then the arrive; the waiter's WGMMA
reads the tile after its acquire.
"""
from functools import partial

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.memory import SmemAllocator

from ..layouts.smem import v_transposed_view
from ..layouts.tiles import BLOCK_M, BLOCK_N, D_V, SUBTILE_K
from . import barriers
from . import epilogue as epi
from . import softmax as sm
from .decode import NUM_THREADS, SMEM_LIMIT, MlaDecode, _fake_args, request_block_range, split_slot

D_QK = 576
NUM_SUBTILES = D_QK // SUBTILE_K
ROPE_SUBTILE = NUM_SUBTILES - 1
# The sub-tiles of each stage's halves, in the order the producer refills them and the QK^T of the
# stage's next tile consumes them (consumer 0 frees stage 0's L half first; consumer 1 frees stage
# 1's R half first). Index 2 * stage + half of the empty barriers: half 0 = L, 1 = R.
STAGE_HALVES = (
    ((0, (0, 1, 2, 3)), (1, (4, 5, 6, 7, 8))),   # stage 0: L then R
    ((1, (4, 5, 6, 7)), (0, (0, 1, 2, 3, 8))),   # stage 1: R then L
)
# Named barriers (id 0 is __syncthreads): between the consumers (256 threads; handoff="named"
# only), and per consumer.
# Hand-off i (HANDOFF_*) is named barrier NAMED_HANDOFF_BASE + i with handoff="named".
NAMED_HANDOFF_BASE = 1
BARRIER_WG = 6        # 6 + wg: one consumer's zeroed V tail is visible to its WGMMAs
# The consumer-to-consumer hand-offs (see the protocol at the top), also the words of
# SharedStorage.mbar_handoff: m0, its factor and P0 published (SCALE0), m1 and exp2(m0 - m1) (SCALE1),
# P1 in smem (P1_READY), row sums at the end of a request (ROW_SUM).
HANDOFF_SCALE0, HANDOFF_SCALE1, HANDOFF_P1_READY, HANDOFF_ROW_SUM = range(4)
NUM_HANDOFF = 4
# The words of SharedStorage.mbar_q: Q loaded (TMA), sQ free (Q_EMPTY), the epilogue's copies have read stage 1
# (STAGING_DONE); see the protocol at the top.
Q_FULL, Q_EMPTY, STAGING_DONE = range(3)
# Lazy rescaling (FlashAttention-4's threshold, log2 units): the reference max moves only when a tile's max
# exceeds it by more than 2^8, so probabilities stay below 256.
LAZY_RESCALE_THRESHOLD = 8.0
# setmaxnreg split (producer, consumer): the producer warps at setmaxnreg's minimum and 240 registers per consumer
# thread (FA3's split for two consumer warpgroups); 128 * 24 + 256 * 240 = 168 * 384, the launch's budget. ptxas
# uses them (highest register R237, was R221). Against (56, 224) ("seesaw_r224") on an H100: 1-2% faster at small
# batches, 5-6% at 128 x h128 in the best of 2 captures (perf/results/2026-11-26-h100-ab-regs.csv), geomean 1% over
# the flashmla preset (2026-11-26-h100-parity.csv against -parity-r224.csv).
SEESAW_REGS = (24, 240)
L2_EVICT_FIRST = 0x12F0000000000000  # the TMA L2 cache-hint word of the EVICT_FIRST policy (CUTLASS CacheHintSm90)


class MlaDecodeSeesaw(MlaDecode):
    """Split-KV MLA decode, seesaw schedule. Same call signature and outputs as MlaDecode."""

    def __init__(self, dtype, d_qk: int = D_QK, l2_prefetch_blocks: int = 0,
                 regs: tuple = SEESAW_REGS, handoff: str = "mbarrier", evict_first_kv: bool = True,
                 rescale_threshold: float | None = LAZY_RESCALE_THRESHOLD):
        assert d_qk == D_QK, "the seesaw schedule keeps P tiles in the RoPE sub-tile: d must be 576"
        self.dtype = dtype
        self.d_qk = d_qk
        self.kv_stages = 2
        self.num_subtiles = NUM_SUBTILES
        self.l2_prefetch_blocks = l2_prefetch_blocks
        # K/V TMA loads with the L2 EVICT_FIRST policy, as FlashMLA does: 5-10% faster at small batches
        # and 1% at 128x16k h16, no change at large h128 (perf/results/2026-11-25-h100-ab-evict-first.csv);
        # schedule "seesaw_no_evict_first" turns it off.
        self.evict_first_kv = evict_first_kv
        # rescale_threshold (log2 units; None = exact): lazy rescaling, see softmax.online_softmax_step;
        # the O rescales are skipped by warps whose factors are all 1. 1-2% faster at small batches and
        # h16/h64, 4-9% at 128 x h128, in the best, median and worst of 3 captures (with consumer 1 handing
        # P1 over before its O_R rescale; perf/results/2026-11-25-h200-ab-lazy-captures.csv); "seesaw_exact"
        # turns it off.
        self.rescale_threshold = rescale_threshold
        # Consumer-to-consumer hand-offs: smem mbarriers ("mbarrier", the default) or named
        # barriers ("named", schedule "seesaw_named"); see the module docstring.
        assert handoff in ("mbarrier", "named"), handoff
        self.mbarrier_handoff = handoff == "mbarrier"
        self.subtile_bytes = BLOCK_N * SUBTILE_K * dtype.width // 8
        self.q_bytes = BLOCK_M * d_qk * dtype.width // 8
        # setmaxnreg split (producer, consumer): 128 * p + 256 * c must stay within 168 * 384.
        self.producer_regs, self.consumer_regs = regs
        assert 128 * regs[0] + 256 * regs[1] <= 168 * NUM_THREADS

    def make_shared_storage(self, sQ_layout, sK_layout):
        """The kernel's shared-memory struct (plain Python: it depends on the dtype and layouts)."""
        @cute.struct
        class SharedStorage:
            mbar_full: cute.struct.MemRange[cutlass.Int64, 2 * NUM_SUBTILES]
            mbar_empty: cute.struct.MemRange[cutlass.Int64, 4]
            mbar_q: cute.struct.MemRange[cutlass.Int64, 3]  # Q full, Q_EMPTY, STAGING_DONE
            # SCALE0, SCALE1, P1_READY, ROW_SUM (unused with handoff="named"; the 32 bytes sit
            # inside the 1 KiB the barriers already take before sQ's alignment)
            mbar_handoff: cute.struct.MemRange[cutlass.Int64, NUM_HANDOFF]
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            sRowMax: cute.struct.MemRange[Float32, BLOCK_M]
            sScale: cute.struct.MemRange[Float32, BLOCK_M * 2]
            sRowSum: cute.struct.MemRange[Float32, BLOCK_M * 4]

        return SharedStorage

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mBlockTable: cute.Tensor,
                 mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor,
                 mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor,
                 scale_log2: Float32, is_causal: Int32, stream):
        """Tensors as MlaDecode.__call__ documents them."""
        dt = self.dtype
        mQ_t, mK_t, mOut_r, mLse_r = self.tma_and_output_views(mQ, mK, mOut, mLse)
        h_kv = mOut.shape[2]
        sQ_layout, sK_layout, tma_atom_Q, tma_Q, tma_atom_K, tma_K = self.make_tma_atoms(mQ_t, mK_t)

        K_MAJOR, MN_MAJOR = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN
        tiled_mma_qk = sm90_utils.make_trivial_tiled_mma(
            dt, dt, K_MAJOR, K_MAJOR, Float32, (1, 1, 1), tiler_mn=(BLOCK_M, BLOCK_N))
        # PV with this warpgroup's own P from registers, and with the other's P from smem.
        tiled_mma_pv_rs = sm90_utils.make_trivial_tiled_mma(
            dt, dt, K_MAJOR, MN_MAJOR, Float32, (1, 1, 1), tiler_mn=(BLOCK_M, D_V // 2),
            a_source=warpgroup.OperandSource.RMEM)
        tiled_mma_pv_ss = sm90_utils.make_trivial_tiled_mma(
            dt, dt, K_MAJOR, MN_MAJOR, Float32, (1, 1, 1), tiler_mn=(BLOCK_M, D_V // 2))

        SharedStorage = self.make_shared_storage(sQ_layout, sK_layout)
        self.shared_storage = SharedStorage
        assert SharedStorage.size_in_bytes() <= SMEM_LIMIT, "shared memory over the sm90 limit"

        rows = mQ.shape[1]
        num_m_blocks = (rows + BLOCK_M - 1) // BLOCK_M
        self.kernel(
            tma_atom_Q, tma_Q, tma_atom_K, tma_K, mBlockTable, mSeqlens, mMeta, mNumSplits,
            mOut_r, mLse_r, mOAccum, mLseAccum, scale_log2, is_causal,
            tiled_mma_qk, tiled_mma_pv_rs, tiled_mma_pv_ss, sQ_layout, sK_layout,
        ).launch(grid=(num_m_blocks, h_kv, mMeta.shape[0]), block=(NUM_THREADS, 1, 1),
                 smem=SharedStorage.size_in_bytes(), stream=stream)

    @cute.kernel
    def kernel(self, tma_atom_Q: cute.CopyAtom, mQ: cute.Tensor, tma_atom_K: cute.CopyAtom,
               mK: cute.Tensor, mBlockTable: cute.Tensor, mSeqlens: cute.Tensor, mMeta: cute.Tensor,
               mNumSplits: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor,
               mLseAccum: cute.Tensor, scale_log2: Float32, is_causal: Int32,
               tiled_mma_qk: cute.TiledMma, tiled_mma_pv_rs: cute.TiledMma,
               tiled_mma_pv_ss: cute.TiledMma, sQ_layout: cute.ComposedLayout,
               sK_layout: cute.ComposedLayout):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        m_block, kv_head, part = cute.arch.block_idx()
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_Q)
            cpasync.prefetch_descriptor(tma_atom_K)

        storage = SmemAllocator().allocate(self.shared_storage)
        full = storage.mbar_full.data_ptr()
        empty = storage.mbar_empty.data_ptr()
        q_bar = storage.mbar_q.data_ptr()
        handoff = storage.mbar_handoff.data_ptr()
        if tidx == 0:
            for i in cutlass.range_constexpr(2 * NUM_SUBTILES):
                cute.arch.mbarrier_init(full + i, 1)  # the producer's arrive + TMA bytes
            for i in cutlass.range_constexpr(4):
                cute.arch.mbarrier_init(empty + i, 4)  # one arrive per warp of the releasing WG
            cute.arch.mbarrier_init(q_bar + Q_FULL, 1)
            cute.arch.mbarrier_init(q_bar + Q_EMPTY, 8)  # every consumer warp is done with sQ
            cute.arch.mbarrier_init(q_bar + STAGING_DONE, 8)  # every consumer warp's copies read stage 1
            if const_expr(self.mbarrier_handoff):
                for i in cutlass.range_constexpr(NUM_HANDOFF):
                    # One consumer arrives at each, except ROW_SUM where both do.
                    cute.arch.mbarrier_init(handoff + i, self.handoff_count(i))
            cute.arch.mbarrier_init_fence()
        cute.arch.barrier()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        # The last element: K stage 1's storage, unswizzled, where the epilogue stages O.
        exchange = (storage.sRowMax.get_tensor(cute.make_layout(BLOCK_M)),
                    storage.sScale.get_tensor(cute.make_layout((BLOCK_M, 2))),
                    storage.sRowSum.get_tensor(cute.make_layout((BLOCK_M, 2, 2))),
                    storage.sK.data_ptr() + BLOCK_N * self.d_qk)
        barriers = (full, empty, q_bar, handoff)

        batch = mSeqlens.shape[0]
        if mMeta[part, 0] < batch:
            if warp_idx < 4:
                cute.arch.setmaxregister_decrease(self.producer_regs)
                g, s_q = mOut.shape[0][0], mOut.shape[0][1]
                if warp_idx == 0:
                    self.producer(0, tma_atom_Q, mQ, tma_atom_K, mK, sQ, sK, barriers, mBlockTable,
                                  mSeqlens, mMeta, m_block, kv_head, part, is_causal, g, s_q)
                elif warp_idx == 1:
                    self.producer(1, tma_atom_Q, mQ, tma_atom_K, mK, sQ, sK, barriers, mBlockTable,
                                  mSeqlens, mMeta, m_block, kv_head, part, is_causal, g, s_q)
            else:
                cute.arch.setmaxregister_increase(self.consumer_regs)
                # One code path per consumer: nothing is live across a branch on the warpgroup
                # (a shared path with the branch inside spilled ~400 bytes in ptxas).
                args = (sQ, sK, exchange, barriers, mSeqlens, mMeta, mNumSplits, mOut, mLse,
                        mOAccum, mLseAccum, tiled_mma_qk, tiled_mma_pv_rs, tiled_mma_pv_ss, m_block,
                        kv_head, part, scale_log2, is_causal, mQ.shape[0])
                if warp_idx < 8:
                    self.consumer(0, tidx - 128, *args)
                else:
                    self.consumer(1, tidx - 256, *args)

    @cute.jit
    def producer(self, stage: cutlass.Constexpr[int], tma_atom_Q, mQ, tma_atom_K, mK, sQ, sK,
                 barriers, mBlockTable, mSeqlens, mMeta, m_block, kv_head, part, is_causal, g, s_q):
        """Warp `stage` fills K stage `stage` with tiles start+stage, start+stage+2, ... of every
        request, half by half as the consumers free them; warp 0 also loads each request's Q."""
        full, empty, q_bar, _ = barriers
        tKsK, tKgK = self.k_tma_partition(tma_atom_K, mK, sK, kv_head)
        # FlashMLA's L2 policy for the streamed K/V pages (evict_first_kv).
        kv_hint = {"cache_policy": cutlass.Int64(L2_EVICT_FIRST)} if const_expr(self.evict_first_kv) else {}
        rows = mQ.shape[0]
        fills = Int32(0)  # tiles this stage has received so far
        started = Int32(0)  # requests this warp has started: the parity of Q_EMPTY / STAGING_DONE
        for req in cutlass.range(mMeta[part, 0], mMeta[part, 1] + 1, unroll=1):
            start, end, seqlen = request_block_range(mSeqlens, mMeta, part, req, m_block, is_causal,
                                                  g, s_q, rows)
            if const_expr(stage == 1):
                # The previous request's epilogue staged O in stage 1: wait until its copies read it.
                cute.arch.mbarrier_wait(q_bar + STAGING_DONE, (started % 2) ^ 1)
                started += 1
            if const_expr(stage == 0):
                tQsQ, tQgQ = self.q_tma_partition(tma_atom_Q, mQ, sQ, kv_head, req, m_block)
                # A fresh mbarrier counts as having completed the phase before its first one.
                cute.arch.mbarrier_wait(q_bar + Q_EMPTY, (started % 2) ^ 1)
                with cute.arch.elect_one():
                    cute.arch.mbarrier_arrive_and_expect_tx(q_bar + Q_FULL, self.q_bytes)
                cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=q_bar + Q_FULL)
                started += 1
            for n in cutlass.range(start + stage, end, 2, unroll=1):
                page = mBlockTable[req, n]
                for h in cutlass.range_constexpr(2):
                    half, subtiles = STAGE_HALVES[stage][h]
                    cute.arch.mbarrier_wait(empty + 2 * stage + half, (fills % 2) ^ 1)
                    for t in cutlass.range_constexpr(len(subtiles)):
                        bar = full + stage * NUM_SUBTILES + subtiles[t]
                        with cute.arch.elect_one():
                            cute.arch.mbarrier_arrive_and_expect_tx(bar, self.subtile_bytes)
                        cute.copy(tma_atom_K, tKgK[None, subtiles[t], page],
                                  tKsK[None, subtiles[t], stage], tma_bar_ptr=bar, **kv_hint)
                fills += 1
                if const_expr(self.l2_prefetch_blocks > 0):
                    # This warp's next tile is 2 ahead; warm L2 for the one after it.
                    ahead = n + 2 * self.l2_prefetch_blocks
                    if ahead < end:
                        ahead_page = mBlockTable[req, ahead]
                        for t in cutlass.range_constexpr(NUM_SUBTILES):
                            cute.prefetch(tma_atom_K, tKgK[None, t, ahead_page])

    @cute.jit
    def consumer(self, wg: cutlass.Constexpr[int], tidx, sQ, sK, exchange, barriers, mSeqlens,
                 mMeta, mNumSplits, mOut, mLse, mOAccum, mLseAccum, tiled_mma_qk, tiled_mma_pv_rs,
                 tiled_mma_pv_ss, m_block, kv_head, part, scale_log2: Float32, is_causal: Int32,
                 rows):
        """Consumer `wg` (0: O[:, :256] and tiles n0; 1: O[:, 256:] and tiles n1), tidx in 0..127."""
        full, empty, q_bar, handoff = barriers
        sRowMax, sScale, sRowSum, staging_storage = exchange
        g = mOut.shape[0][0]
        s_q = mOut.shape[0][1]

        thr_qk = tiled_mma_qk.get_slice(tidx)
        tSrQ = tiled_mma_qk.make_fragment_A(thr_qk.partition_A(sQ))
        tSrK = tiled_mma_qk.make_fragment_B(thr_qk.partition_B(sK))
        sVt = v_transposed_view(sK, BLOCK_N, self.d_qk, self.kv_stages)
        sVt_half = cute.flat_divide(sVt, (D_V // 2, BLOCK_N))[None, None, wg, 0, None]
        thr_pv_rs = tiled_mma_pv_rs.get_slice(tidx)
        thr_pv_ss = tiled_mma_pv_ss.get_slice(tidx)
        tOrVt_rs = tiled_mma_pv_rs.make_fragment_B(thr_pv_rs.partition_B(sVt_half))
        tOrVt_ss = tiled_mma_pv_ss.make_fragment_B(thr_pv_ss.partition_B(sVt_half))
        # P tiles: the RoPE sub-tile of each stage, (64 rows, 64 keys, stage).
        sP = cute.flat_divide(sK, (BLOCK_N, SUBTILE_K))[None, None, 0, ROPE_SUBTILE, None]
        tOsP = tiled_mma_pv_ss.make_fragment_A(thr_pv_ss.partition_A(sP))
        tPsP = thr_qk.partition_C(sP)

        tile_row = (tidx // 32) * 16 + (tidx % 32) // 4
        quad_leader = tidx % 4 == 0
        lane = tidx % 32
        fills0 = Int32(0)  # tiles consumed from each stage (mirrors the producer warps' counts)
        fills1 = Int32(0)
        q_fills = Int32(0)
        for req in cutlass.range(mMeta[part, 0], mMeta[part, 1] + 1, unroll=1):
            start, end, seqlen = request_block_range(mSeqlens, mMeta, part, req, m_block, is_causal,
                                                  g, s_q, rows)
            row0, border0, border1, tile_border = self.row_borders(seqlen, m_block, tile_row, g, s_q,
                                                                   is_causal)
            borders = (border0, border1, tile_border, seqlen)

            acc_O = cute.make_rmem_tensor(thr_pv_ss.partition_shape_C((BLOCK_M, D_V // 2)), Float32)
            acc_O.fill(0.0)
            row_max = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
            row_sum = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
            row_max.fill(-Float32.inf)
            row_sum.fill(0.0)
            acc_S = cute.make_rmem_tensor(thr_qk.partition_shape_C((BLOCK_M, BLOCK_N)), Float32)

            cute.arch.mbarrier_wait(q_bar + Q_FULL, q_fills % 2)
            q_fills += 1
            frags = (tSrQ, tSrK, tOrVt_rs, tOrVt_ss, tOsP, tPsP)
            if const_expr(wg == 0):
                fills0, fills1 = self.consumer0_request(
                    start, end, fills0, fills1, acc_S, acc_O, row_max, row_sum, frags, sK,
                    sRowMax, sScale, (full, empty, handoff), tiled_mma_qk, tiled_mma_pv_rs, tiled_mma_pv_ss,
                    borders, tidx, tile_row, quad_leader, lane, scale_log2)
            else:
                fills0, fills1 = self.consumer1_request(
                    start, end, fills0, fills1, acc_S, acc_O, row_max, row_sum, frags, sK,
                    sRowMax, sScale, (full, empty, handoff), tiled_mma_qk, tiled_mma_pv_rs, tiled_mma_pv_ss,
                    borders, tidx, tile_row, quad_leader, lane, scale_log2)
            # Each warpgroup summed the P of the tiles it scored, both at the final row max. Past this
            # meeting neither consumer reads sQ or a K stage again for this request (their WGMMAs have
            # completed): sQ is released for the next request's Q now, and the epilogue stages O in
            # stage 1, which it releases (STAGING_DONE) when done.
            row_total = sm.publish_row_sums(row_sum, sRowSum, tile_row, wg, quad_leader, req % 2)
            self.handoff_meet(handoff, HANDOFF_ROW_SUM, (q_fills - 1) % 2)
            row_total = sm.add_peer_row_sums(row_total, sRowSum, tile_row, wg, req % 2)
            cute.arch.sync_warp()
            self.release(q_bar, Q_EMPTY, lane)
            self.staged_epilogue(acc_O, row_max, row_total, tidx, wg, req, kv_head, m_block, row0,
                                 rows, mNumSplits, mMeta, part, mOut, mLse, mOAccum, mLseAccum,
                                 staging_storage, q_bar, quad_leader, lane)

    @cute.jit
    def consumer0_request(self, start, end, fills0, fills1, acc_S, acc_O, row_max, row_sum, frags,
                          sK, sRowMax, sScale, bars, tiled_mma_qk, tiled_mma_pv_rs,
                          tiled_mma_pv_ss, borders, tidx, tile_row, quad_leader, lane,
                          scale_log2: Float32):
        """Consumer 0 over one request: scores tiles n0 = start, start + 2, ...; owns O[:, :256]."""
        tSrQ, tSrK, tOrVt_rs, tOrVt_ss, tOsP, tPsP = frags
        border0, border1, tile_border, seqlen = borders
        full, empty, handoff = bars
        rP = cute.make_rmem_tensor_like(acc_S, self.dtype)
        tOrP = self.registers_as_pv_operand(rP, tiled_mma_pv_rs, tidx)
        rescale = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
        if start < end:
            self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, full, 0, fills0 % 2)
            warpgroup.wait_group(0)
        for n0 in cutlass.range(start, end, 2, unroll=1):
            n1 = n0 + 1
            has1 = n1 < end
            has_next = n0 + 2 < end
            # 1. softmax of S0 from the running max -> m0; P0 (at m0) to smem; publish m0, the factor
            # for the old O and P0.
            if n0 * BLOCK_N + BLOCK_N > tile_border:
                sm.mask_scores(acc_S, tidx, n0 * BLOCK_N, border0, border1)
            block_max = sm.block_row_max(acc_S)
            factors = sm.online_softmax_step(acc_S, block_max, row_max, row_sum, scale_log2,
                                             self.rescale_threshold)
            rP.store(acc_S.load().to(self.dtype))
            cute.autovec_copy(rP, tPsP[None, None, None, 0])
            cute.arch.fence_view_async_shared()
            # The quad's other lanes read these words in step 3 of the previous pair: converge the
            # warp before its leader overwrites them (a warp-level WAR under racecheck).
            cute.arch.sync_warp()
            if quad_leader:
                for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
                    sRowMax[tile_row + 8 * r] = row_max[r]
                    sScale[tile_row + 8 * r, 0] = factors[r]
            self.handoff_signal(handoff, HANDOFF_SCALE0)
            rescale[0] = factors[0]
            rescale[1] = factors[1]
            self.rescale_o(acc_O, rescale)
            # 2. O_L += P0 V0_L with P0 from registers; then stage 0's L half is free.
            if n0 * BLOCK_N + BLOCK_N > seqlen:
                self.zero_v_tail_synced(sK, seqlen - n0 * BLOCK_N, 0, tidx, 0)
            sm.issue_pv(acc_O, tOrP, tOrVt_rs, tiled_mma_pv_rs, 0)
            warpgroup.wait_group(0)
            self.release(empty, 0, lane)
            # 3. consumer 1's max m1: O_L and the row sums go from m0 to m1.
            self.handoff_wait(handoff, HANDOFF_SCALE1, fills0 % 2)
            for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
                rescale[r] = sScale[tile_row + 8 * r, 1]
                row_max[r] = sRowMax[tile_row + 8 * r]
                row_sum[r] = row_sum[r] * rescale[r]
            self.rescale_o(acc_O, rescale)
            # 4. O_L += P1 V1_L (P1 from smem), overlapped with the next S0 = Q K^T.
            if has1:
                self.handoff_wait(handoff, HANDOFF_P1_READY, fills1 % 2)
                self.wait_stage(full, 1, fills1 % 2, (0, 1, 2, 3))
                if n1 * BLOCK_N + BLOCK_N > seqlen:
                    self.zero_v_tail_synced(sK, seqlen - n1 * BLOCK_N, 0, tidx, 1)
                sm.issue_pv(acc_O, tOsP, tOrVt_ss, tiled_mma_pv_ss, 1, p_stage=1)
            fills0 += 1
            if has_next:
                self.issue_qk_part(acc_S, tSrQ, tSrK, tiled_mma_qk, full, 0, fills0 % 2,
                                   (0, 1, 2, 3), True)
                warpgroup.wait_group(1)  # O_L += P1 V1_L done
                if has1:
                    self.release(empty, 2, lane)
                self.issue_qk_part(acc_S, tSrQ, tSrK, tiled_mma_qk, full, 0, fills0 % 2,
                                   (4, 5, 6, 7, 8), False)
                warpgroup.wait_group(0)
            else:
                warpgroup.wait_group(0)
                if has1:
                    self.release(empty, 2, lane)
            if has1:
                fills1 += 1
        return fills0, fills1

    @cute.jit
    def consumer1_request(self, start, end, fills0, fills1, acc_S, acc_O, row_max, row_sum, frags,
                          sK, sRowMax, sScale, bars, tiled_mma_qk, tiled_mma_pv_rs,
                          tiled_mma_pv_ss, borders, tidx, tile_row, quad_leader, lane,
                          scale_log2: Float32):
        """Consumer 1 over one request: scores tiles n1 = start + 1, start + 3, ...; owns O[:, 256:]."""
        tSrQ, tSrK, tOrVt_rs, tOrVt_ss, tOsP, tPsP = frags
        border0, border1, tile_border, seqlen = borders
        full, empty, handoff = bars
        rP = cute.make_rmem_tensor_like(acc_S, self.dtype)
        tOrP = self.registers_as_pv_operand(rP, tiled_mma_pv_rs, tidx)
        rescale = cute.make_rmem_tensor(sm.ROWS_PER_THREAD, Float32)
        if start + 1 < end:
            self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, full, 1, fills1 % 2)
            warpgroup.wait_group(0)
        for n0 in cutlass.range(start, end, 2, unroll=1):
            n1 = n0 + 1
            has1 = n1 < end
            has_next = n1 + 2 < end
            # 1. m0, its factor and P0 from consumer 0: O_R goes to m0, then O_R += P0 V0_R (smem).
            self.handoff_wait(handoff, HANDOFF_SCALE0, fills0 % 2)
            for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
                row_max[r] = sRowMax[tile_row + 8 * r]
                rescale[r] = sScale[tile_row + 8 * r, 0]
                row_sum[r] = row_sum[r] * rescale[r]
            self.rescale_o(acc_O, rescale)
            self.wait_stage(full, 0, fills0 % 2, (4, 5, 6, 7))
            if n0 * BLOCK_N + BLOCK_N > seqlen:
                self.zero_v_tail_synced(sK, seqlen - n0 * BLOCK_N, 1, tidx, 0)
            sm.issue_pv(acc_O, tOsP, tOrVt_ss, tiled_mma_pv_ss, 0, p_stage=0)
            # 2. while that runs: softmax of S1 from m0 -> m1; publish m1 and exp2(m0 - m1), then P1.
            for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
                rescale[r] = Float32(1.0)
            if has1:
                if n1 * BLOCK_N + BLOCK_N > tile_border:
                    sm.mask_scores(acc_S, tidx, n1 * BLOCK_N, border0, border1)
                block_max = sm.block_row_max(acc_S)
                factors = sm.online_softmax_step(acc_S, block_max, row_max, row_sum, scale_log2,
                                                 self.rescale_threshold)
                rescale[0] = factors[0]
                rescale[1] = factors[1]
            cute.arch.sync_warp()  # every lane has read m0 before the leader writes m1 over it
            if quad_leader:
                for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
                    sRowMax[tile_row + 8 * r] = row_max[r]
                    sScale[tile_row + 8 * r, 1] = rescale[r]
            self.handoff_signal(handoff, HANDOFF_SCALE1)
            if has1:
                rP.store(acc_S.load().to(self.dtype))
                cute.autovec_copy(rP, tPsP[None, None, None, 1])
                cute.arch.fence_view_async_shared()
                self.handoff_signal(handoff, HANDOFF_P1_READY)
            # 3. O_R to m1 and O_R += P1 V1_R, queued right behind P0 V0_R: only a warp that has to
            # rescale O_R (a factor is not 1) waits for P0 V0_R first. Waiting for P0 V0_R before every
            # P1 V1_R was 0.8-2.5% slower at 128 x h128 in the median capture of three A/B calls without
            # perf.ab's warm-up, the same elsewhere (perf/results/2026-11-26-h100-ab-chain.csv).
            if has1:
                if n1 * BLOCK_N + BLOCK_N > seqlen:
                    self.zero_v_tail_synced(sK, seqlen - n1 * BLOCK_N, 1, tidx, 1)
                if self.needs_rescale(rescale):
                    warpgroup.wait_group(0)
                    sm.rescale_rows(acc_O, rescale)
                sm.issue_pv(acc_O, tOrP, tOrVt_rs, tiled_mma_pv_rs, 1)
                warpgroup.wait_group(1)  # P0 V0_R done: stage 0's R half is free
                self.release(empty, 1, lane)
                warpgroup.wait_group(0)  # P1 V1_R done: stage 1's R half is free
                self.release(empty, 3, lane)
                fills1 += 1
            else:  # no n1: m1 = m0, so the factors are all 1 and O_R stays as it is
                warpgroup.wait_group(0)
                self.release(empty, 1, lane)
            fills0 += 1
            # 4. the next S1 = Q K^T.
            if has_next:
                self.issue_qk(acc_S, tSrQ, tSrK, tiled_mma_qk, full, 1, fills1 % 2)
                warpgroup.wait_group(0)
        return fills0, fills1

    @cute.jit
    def staged_epilogue(self, acc_O, row_max, row_total, tidx, wg, req, kv_head, m_block, row0, rows,
                        mNumSplits, mMeta, part, mOut, mLse, mOAccum, mLseAccum, staging_storage, q_bar,
                        quad_leader, lane):
        """Normalise this consumer's O[:, 256 wg : 256 (wg + 1)] by L and write it (out in q's dtype, or
        the fp32 split partial) through its half of K stage 1's storage, one bulk copy per row
        (kernels/epilogue.py); write the LSE. Then arrive on STAGING_DONE: producer 1 may refill stage 1."""
        lse2 = sm.normalize_rows(acc_O, row_max, row_total)
        is_split, split = split_slot(mNumSplits, mMeta, part, req)
        if wg == 0 and quad_leader:
            for r in cutlass.range_constexpr(sm.ROWS_PER_THREAD):
                row = row0 + r * 8
                if row < rows:
                    if is_split:
                        mLseAccum[split, kv_head, row] = lse2[r]
                    else:
                        mLse[row, kv_head, req] = sm.natural_lse(lse2[r])
        if is_split:
            # 64 x 256 fp32 is 64 KiB, more than this consumer's 36 KiB of stage 1: rows 0-31 (warps 0 and 1
            # hold them) go first, then rows 32-63 (warps 2 and 3) if the M tile has any; thread t < 32
            # copies one row of 1 KiB. A tile of at most 32 rows (h_q * s_q / h_kv <= 32) takes one round.
            sO = self.staging_tile(staging_storage, wg, Float32, BLOCK_M // 2)
            for h in cutlass.range_constexpr(2):
                first = m_block * BLOCK_M + h * (BLOCK_M // 2)
                if first < rows:
                    if const_expr(h == 1):
                        cute.arch.cp_async_bulk_wait_group(0, read=True)  # rows 0-31 were read
                        cute.arch.barrier(barrier_id=BARRIER_WG + wg, number_of_threads=128)
                    if tidx // 64 == h:
                        epi.stage_rows(acc_O, tidx, sO, h * (BLOCK_M // 2))
                    self.publish_staged(wg)
                    if tidx < BLOCK_M // 2 and first + tidx < rows:
                        epi.bulk_store_row(cute.local_tile(mOAccum[split, kv_head, first + tidx, None],
                                                           (D_V // 2,), (wg,)), sO[tidx, None])
                        cute.arch.cp_async_bulk_commit_group()
        else:
            # 64 x 256 in q's 16-bit dtype: 32 KiB in one round; thread t < 64 copies row t (512 bytes).
            sO = self.staging_tile(staging_storage, wg, self.dtype, BLOCK_M)
            epi.stage_rows(acc_O, tidx, sO, 0)
            self.publish_staged(wg)
            copy_row = m_block * BLOCK_M + tidx
            if tidx < BLOCK_M and copy_row < rows:
                epi.bulk_store_row(cute.local_tile(mOut[copy_row, None, kv_head, req], (D_V // 2,), (wg,)),
                                   sO[tidx, None])
                cute.arch.cp_async_bulk_commit_group()
        # The copies have read stage 1: producer 1 may load the next request's tiles over it.
        cute.arch.cp_async_bulk_wait_group(0, read=True)
        cute.arch.sync_warp()
        self.release(q_bar, STAGING_DONE, lane)

    @cute.jit
    def staging_tile(self, staging_storage, wg: cutlass.Constexpr[int], dtype: cutlass.Constexpr,
                     num_rows: cutlass.Constexpr[int]):
        """Consumer wg's staging tile (num_rows x 256 columns at epilogue.STAGING_PITCH) in its half of
        K stage 1's storage (BLOCK_N x d_qk elements, as many bytes as sQ)."""
        stage_bytes = BLOCK_N * self.d_qk * self.dtype.width // 8
        assert num_rows * epi.STAGING_PITCH * dtype.width // 8 <= stage_bytes // 2
        half_elems = (stage_bytes // 2) // (dtype.width // 8)
        base = cute.recast_ptr(staging_storage, dtype=dtype) + wg * half_elems
        return cute.make_tensor(base, cute.make_layout((num_rows, epi.STAGING_PITCH),
                                                       stride=(epi.STAGING_PITCH, 1)))

    @cute.jit
    def publish_staged(self, wg: cutlass.Constexpr[int]):
        """Make this consumer's staged rows visible to the bulk copies (async proxy) of its threads."""
        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=BARRIER_WG + wg, number_of_threads=128)

    @cute.jit
    def needs_rescale(self, rescale):
        """Whether this warp applies the factors: always with exact rescaling; with lazy rescaling only
        when one of its rows' factors is not 1 (softmax.warp_needs_rescale)."""
        if const_expr(self.rescale_threshold is None):
            return True
        return sm.warp_needs_rescale(rescale)

    @cute.jit
    def rescale_o(self, acc_O, rescale):
        """O *= the per-row factors (see needs_rescale)."""
        if self.needs_rescale(rescale):
            sm.rescale_rows(acc_O, rescale)

    def handoff_count(self, index: int) -> int:
        """Arrival count of hand-off mbarrier `index`: one consumer warpgroup's threads, both
        warpgroups' for ROW_SUM."""
        return 2 * 128 if index == HANDOFF_ROW_SUM else 128

    @cute.jit
    def handoff_signal(self, handoff, index: cutlass.Constexpr[int]):
        """This thread's side of hand-off `index` is done. mbarrier: one arrive per thread, which
        releases the thread's own earlier shared-memory accesses (one arrive per warp after a
        __syncwarp relies on the warp barrier's cumulativity, which racecheck does not follow);
        named: bar.arrive, the waiter syncs."""
        if const_expr(self.mbarrier_handoff):
            cute.arch.mbarrier_arrive(handoff + index)
        else:
            barriers.arrive(NAMED_HANDOFF_BASE + index, 256)

    @cute.jit
    def handoff_wait(self, handoff, index: cutlass.Constexpr[int], parity):
        """Wait for the other consumer's side of hand-off `index` (the phase of `parity`)."""
        if const_expr(self.mbarrier_handoff):
            cute.arch.mbarrier_wait(handoff + index, parity)
        else:
            barriers.sync(NAMED_HANDOFF_BASE + index, 256)

    @cute.jit
    def handoff_meet(self, handoff, index: cutlass.Constexpr[int], parity):
        """Both consumers signal and wait (ROW_SUM)."""
        if const_expr(self.mbarrier_handoff):
            cute.arch.mbarrier_arrive(handoff + index)
            cute.arch.mbarrier_wait(handoff + index, parity)
        else:
            barriers.sync(NAMED_HANDOFF_BASE + index, 256)

    @cute.jit
    def release(self, bars, index: cutlass.Constexpr[int], lane):
        """One arrive per warp (its lane 0) on barrier word `index` of `bars`: an empty barrier (2 * stage +
        half) after the warp's WGMMAs finished, or Q_EMPTY / STAGING_DONE of mbar_q."""
        if lane == 0:
            cute.arch.mbarrier_arrive(bars + index)

    def registers_as_pv_operand(self, rP, tiled_mma_pv_rs, tidx):
        """View the bf16/fp16 P fragment (m64n64 accumulator order) as the A operand of the
        register-sourced m64n256k16 PV: k-block k holds accumulator columns 16k..16k+15, which
        is the same element order, so this is a re-layout of the same registers."""
        thr = tiled_mma_pv_rs.get_slice(tidx)
        frag_A = tiled_mma_pv_rs.make_fragment_A(thr.partition_shape_A((BLOCK_M, BLOCK_N)))
        return cute.make_tensor(rP.iterator, frag_A.layout)

    @cute.jit
    def wait_stage(self, full, stage: cutlass.Constexpr[int], parity, subtiles: cutlass.Constexpr):
        """Wait on sub-tiles of a stage the other consumer already waited on (instant): the TMA
        writes become visible to this warpgroup's own WGMMA reads."""
        for t in cutlass.range_constexpr(len(subtiles)):
            cute.arch.mbarrier_wait(full + stage * NUM_SUBTILES + subtiles[t], parity)

    @cute.jit
    def issue_qk(self, acc_S, tSrQ, tSrK, tiled_mma_qk, full, stage: cutlass.Constexpr[int],
                 parity):
        """S = Q K^T over a whole stage, in its refill order, as one WGMMA group."""
        order = STAGE_HALVES[stage][0][1] + STAGE_HALVES[stage][1][1]
        self.issue_qk_part(acc_S, tSrQ, tSrK, tiled_mma_qk, full, stage, parity, order, True)

    @cute.jit
    def issue_qk_part(self, acc_S, tSrQ, tSrK, tiled_mma_qk, full, stage: cutlass.Constexpr[int],
                      parity, subtiles: cutlass.Constexpr, first: cutlass.Constexpr[bool]):
        """Issue S (+)= Q K^T over `subtiles` of a stage as each lands; commit one WGMMA group."""
        k_per_subtile = SUBTILE_K // 16
        mma_qk = cute.make_mma_atom(tiled_mma_qk.op)
        mma_qk.set(warpgroup.Field.ACCUMULATE, not first)
        warpgroup.fence()
        for i in cutlass.range_constexpr(len(subtiles)):
            t = subtiles[i]
            cute.arch.mbarrier_wait(full + stage * NUM_SUBTILES + t, parity)
            for k in cutlass.range_constexpr(k_per_subtile):
                kk = t * k_per_subtile + k
                cute.gemm(mma_qk, acc_S, tSrQ[None, None, kk], tSrK[None, None, kk, stage], acc_S)
                mma_qk.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()

    @cute.jit
    def zero_v_tail_synced(self, sK, valid, wg: cutlass.Constexpr[int], tidx,
                           stage: cutlass.Constexpr[int]):
        """Zero this consumer's V columns of a tail tile's rows past seqlen (they may be NaN and
        0 * NaN is NaN in the MMA), visible to its own WGMMAs."""
        self.zero_v_tail(sK, valid, wg, tidx, stage)
        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=BARRIER_WG + wg, number_of_threads=128)


def compile_decode_seesaw(dtype, d_qk: int = D_QK, options: str | None = None,
                          l2_prefetch_blocks: int = 0, regs: tuple = SEESAW_REGS, handoff: str = "mbarrier",
                          evict_first_kv: bool = True,
                          rescale_threshold: float | None = LAZY_RESCALE_THRESHOLD):
    """Compile (uncached) the seesaw decode. Use `get_decode_fn(..., schedule="seesaw")`."""
    from .jit import COMPILE_OPTIONS, fake_stream

    kernel = MlaDecodeSeesaw(dtype, d_qk, l2_prefetch_blocks=l2_prefetch_blocks, regs=regs,
                             handoff=handoff, evict_first_kv=evict_first_kv,
                             rescale_threshold=rescale_threshold)
    return cute.compile(kernel, *_fake_args(dtype, d_qk), fake_stream(),
                        options=options or COMPILE_OPTIONS)


# Schedule names of the seesaw (get_decode_fn) -> MlaDecodeSeesaw options.
SCHEDULE_OPTIONS = {
    "seesaw": {},
    "seesaw_named": {"handoff": "named"},
    "seesaw_no_evict_first": {"evict_first_kv": False},
    # Exact online softmax (every new max rescales O).
    "seesaw_exact": {"rescale_threshold": None},
    # The register split before SEESAW_REGS.
    "seesaw_r224": {"regs": (56, 224)},
}


def compile_configs():
    """Every compiled seesaw variant, by name, for the CI compile checks."""
    configs = {
        f"{name}_d576_seesaw{'_pf' if pf else ''}": partial(compile_decode_seesaw, dt, D_QK,
                                                           l2_prefetch_blocks=pf)
        for name, dt in (("bf16", cutlass.BFloat16), ("fp16", cutlass.Float16))
        for pf in (0, 1)
    }
    configs.update({
        f"{name}_d576_{schedule}": partial(compile_decode_seesaw, dt, D_QK, **SCHEDULE_OPTIONS[schedule])
        for name, dt in (("bf16", cutlass.BFloat16), ("fp16", cutlass.Float16))
        for schedule in ("seesaw_named", "seesaw_no_evict_first", "seesaw_exact", "seesaw_r224")
    })
    return configs
