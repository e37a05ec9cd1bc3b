"""Online softmax in base 2 on WGMMA accumulators (register fragments of an m64nN tile), the
row-statistics exchange between two consumer warpgroups, the PV WGMMA they share, and the
epilogue's row stores.

Fragment facts this relies on (the sm90 m64nNk16 C layout): thread t of a warpgroup (warp w, lane l)
holds rows 16w + l//4 and 16w + l//4 + 8; its value i sits in column 8*(i//4) + 2*(l%4) + i%2 of row
(i//2)%2. The four threads of a quad share a row, so row reductions need two butterfly shuffles.

Running maxima are kept in the scaled log2 domain (logit * softmax_scale * log2(e)), so every
exponential is one FFMA and one ex2.approx.
"""
import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from cutlass.cute.nvgpu import warpgroup

from ..layouts.tiles import BLOCK_N
from . import barriers

ROWS_PER_THREAD = 2
LN2 = math.log(2.0)


@cute.jit
def acc_row_col(tidx_in_wg, i: cutlass.Constexpr[int]):
    """(row, column) inside the 64xN tile of accumulator value i held by warpgroup thread tidx_in_wg."""
    warp = tidx_in_wg // 32
    lane = tidx_in_wg % 32
    row = warp * 16 + lane // 4 + ((i // 2) % 2) * 8
    col = (i // 4) * 8 + (lane % 4) * 2 + i % 2
    return row, col


@cute.jit
def quad_allreduce_max(x: Float32) -> Float32:
    x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=1))
    return cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=2))


@cute.jit
def quad_allreduce_sum(x: Float32) -> Float32:
    x = x + cute.arch.shuffle_sync_bfly(x, offset=1)
    return x + cute.arch.shuffle_sync_bfly(x, offset=2)


@cute.jit
def mask_scores(acc_S: cute.Tensor, tidx_in_wg, key_base, border0, border1):
    """Set scores of keys at or past each row's border to -inf (select, not add: K rows may be NaN).

    key_base is the key index of the tile's column 0.
    """
    for i in cutlass.range_constexpr(cute.size(acc_S)):
        row, col = acc_row_col(tidx_in_wg, i)
        border = border0 if (i // 2) % 2 == 0 else border1
        if key_base + col >= border:
            acc_S[i] = -Float32.inf


@cute.jit
def block_row_max(acc_S: cute.Tensor) -> cute.Tensor:
    """Max of each of the thread's two rows over the tile's columns (raw scores, quad-reduced)."""
    block_max = cute.make_rmem_tensor(ROWS_PER_THREAD, Float32)
    for r in cutlass.range_constexpr(ROWS_PER_THREAD):
        m = -Float32.inf
        for i in cutlass.range_constexpr(cute.size(acc_S)):
            if cutlass.const_expr((i // 2) % 2 == r):
                m = cute.arch.fmax(m, acc_S[i])
        block_max[r] = quad_allreduce_max(m)
    return block_max


@cute.jit
def online_softmax_step(acc_S: cute.Tensor, block_max: cute.Tensor, row_max: cute.Tensor,
                        row_sum: cute.Tensor, scale_log2: Float32,
                        threshold: cutlass.Constexpr = None) -> cute.Tensor:
    """Turn scores into unnormalised probabilities in place; update row_max and row_sum.

    block_max: this tile's row maxima of raw scores (all columns the softmax covers this step).
    row_sum stays a per-thread partial sum (quad-reduce it at the end). Returns the per-row factor
    the O accumulator must be multiplied by. A row with no finite score yet keeps row_max = -inf and
    uses 0 as its shift, so -inf - (-inf) never happens.

    threshold (log2 units, compile-time; None = exact): keep the old reference max while the tile's
    max exceeds it by at most `threshold`, so the factor is exactly 1 and the caller may skip the O
    rescale. Probabilities then reach up to 2^threshold instead of 1, which bf16/fp16 P and the fp32
    sums hold without loss (relative precision does not depend on magnitude); the LSE and the final
    O / L use the same reference max, so the result is the same softmax.
    """
    rescale = cute.make_rmem_tensor(ROWS_PER_THREAD, Float32)
    for r in cutlass.range_constexpr(ROWS_PER_THREAD):
        prev_max = row_max[r]
        new_max = cute.arch.fmax(prev_max, block_max[r] * scale_log2)
        if cutlass.const_expr(threshold is not None):
            # False when prev_max is -inf (the difference is +inf or NaN): the first finite max is taken.
            if new_max - prev_max <= threshold:
                new_max = prev_max
        shift = new_max
        if new_max == -Float32.inf:
            shift = Float32(0.0)
        factor = cute.math.exp2(prev_max - shift, fastmath=True)
        if cutlass.const_expr(threshold is not None):
            if new_max == prev_max:
                factor = Float32(1.0)  # exactly, so callers can test for it (a -inf row's O is 0 anyway)
        rescale[r] = factor
        row_max[r] = new_max
        partial_sum = row_sum[r] * rescale[r]
        for i in cutlass.range_constexpr(cute.size(acc_S)):
            if cutlass.const_expr((i // 2) % 2 == r):
                p = cute.math.exp2(acc_S[i] * scale_log2 - shift, fastmath=True)
                acc_S[i] = p
                partial_sum = partial_sum + p
        row_sum[r] = partial_sum
    return rescale


@cute.jit
def rescale_rows(acc_O: cute.Tensor, rescale: cute.Tensor):
    for i in cutlass.range_constexpr(cute.size(acc_O)):
        acc_O[i] = acc_O[i] * rescale[(i // 2) % 2]


@cute.jit
def warp_needs_rescale(rescale: cute.Tensor):
    """Whether any factor of the warp's rows differs from 1 (a warp vote, so a skip is warp-uniform: lazy
    rescaling, online_softmax_step's threshold, makes "no" the common case)."""
    return cute.arch.vote_any_sync(rescale[0] != 1.0 or rescale[1] != 1.0)


@cute.jit
def exchange_row_max(block_max: cute.Tensor, sRowMax: cute.Tensor, tile_row, wg, quad_leader,
                     barrier_id: cutlass.Constexpr[int]) -> cute.Tensor:
    """Row maxima of a tile whose keys two consumer warpgroups split: publish this warpgroup's in
    sRowMax[:, wg] (64 x 2), then fold in the other's after a 256-thread named barrier (both warpgroups
    reach it from one instruction in the kernels that call this)."""
    if quad_leader:
        sRowMax[tile_row, wg] = block_max[0]
        sRowMax[tile_row + 8, wg] = block_max[1]
    cute.arch.barrier(barrier_id=barrier_id, number_of_threads=256)
    block_max[0] = cute.arch.fmax(block_max[0], sRowMax[tile_row, 1 - wg])
    block_max[1] = cute.arch.fmax(block_max[1], sRowMax[tile_row + 8, 1 - wg])
    return block_max


@cute.jit
def exchange_row_sums(row_sum: cute.Tensor, sRowSum: cute.Tensor, tile_row, wg, quad_leader, buf,
                      barrier_id: cutlass.Constexpr[int]) -> cute.Tensor:
    """Whole-row sums when two consumer warpgroups each summed part of a row's keys: quad-reduce this
    warpgroup's partials, publish them in sRowSum[:, wg, buf] (64 x 2 x 2) and add the other's after a
    256-thread named barrier. buf double-buffers by request parity: the other warpgroup may still be
    reading the previous request's sums."""
    row_total = publish_row_sums(row_sum, sRowSum, tile_row, wg, quad_leader, buf)
    barriers.sync(barrier_id, 256)  # unaligned: the seesaw's warpgroups reach it from their own code
    return add_peer_row_sums(row_total, sRowSum, tile_row, wg, buf)


@cute.jit
def publish_row_sums(row_sum: cute.Tensor, sRowSum: cute.Tensor, tile_row, wg, quad_leader, buf) -> cute.Tensor:
    """The first half of exchange_row_sums (up to its barrier): this warpgroup's quad-reduced row sums,
    also written to sRowSum[:, wg, buf]."""
    row_total = cute.make_rmem_tensor(ROWS_PER_THREAD, Float32)
    for r in cutlass.range_constexpr(ROWS_PER_THREAD):
        row_total[r] = quad_allreduce_sum(row_sum[r])
    if quad_leader:
        sRowSum[tile_row, wg, buf] = row_total[0]
        sRowSum[tile_row + 8, wg, buf] = row_total[1]
    return row_total


@cute.jit
def add_peer_row_sums(row_total: cute.Tensor, sRowSum: cute.Tensor, tile_row, wg, buf) -> cute.Tensor:
    """The second half of exchange_row_sums (after its barrier): add the other warpgroup's sums."""
    row_total[0] = row_total[0] + sRowSum[tile_row, 1 - wg, buf]
    row_total[1] = row_total[1] + sRowSum[tile_row + 8, 1 - wg, buf]
    return row_total


@cute.jit
def normalize_rows(acc_O: cute.Tensor, row_max: cute.Tensor, row_total: cute.Tensor) -> cute.Tensor:
    """O /= L per row; return the base-2 LSE m + log2(L). A row that attended nothing (L = 0, or NaN)
    gets O = 0 and LSE -inf (a partial's "empty"; the final lse writes it as +inf)."""
    inv = cute.make_rmem_tensor(ROWS_PER_THREAD, Float32)
    lse2 = cute.make_rmem_tensor(ROWS_PER_THREAD, Float32)
    for r in cutlass.range_constexpr(ROWS_PER_THREAD):
        total = row_total[r]
        if total > 0.0:
            inv[r] = 1.0 / total
            lse2[r] = row_max[r] + cute.math.log2(total, fastmath=False)
        else:
            inv[r] = Float32(0.0)
            lse2[r] = -Float32.inf
    rescale_rows(acc_O, inv)
    return lse2


@cute.jit
def natural_lse(lse2: Float32) -> Float32:
    """A row's final lse from normalize_rows' base-2 LSE: natural log, +inf for a row that attended nothing
    (base-2 -inf), as the `lse` output reports it."""
    lse = Float32(Float32.inf)
    if lse2 != -Float32.inf:
        lse = lse2 * LN2
    return lse


@cute.jit
def store_row(acc_O: cute.Tensor, r: cutlass.Constexpr[int], tidx_in_wg, col_base, row_tensor: cute.Tensor,
              dtype: cutlass.Constexpr):
    """Write this thread's values of its accumulator row r (0 or 1) into row_tensor[col_base + col] as
    column pairs, one 4-byte (16-bit dtype) or 8-byte (fp32) store each. row_tensor is one output row
    with a static unit stride; its base must be aligned to a pair (the caller's layout proves it)."""
    for i in cutlass.range_constexpr(cute.size(acc_O)):
        if cutlass.const_expr((i // 2) % 2 == r and i % 2 == 0):
            _, col = acc_row_col(tidx_in_wg, i)
            pair = cute.make_rmem_tensor(2, dtype)
            pair[0] = acc_O[i].to(dtype)
            pair[1] = acc_O[i + 1].to(dtype)
            cute.autovec_copy(pair, cute.local_tile(row_tensor, (2,), ((col_base + col) // 2,)))


@cute.jit
def issue_pv(acc_O: cute.Tensor, tOrP: cute.Tensor, tOrVt: cute.Tensor, tiled_mma_pv: cute.TiledMma,
             stage, p_stage: cutlass.Constexpr = None):
    """O += P V^T for one 64-key tile as one committed WGMMA group. tOrVt[..., k, stage]; tOrP is
    a register fragment (p_stage None) or an smem one indexed [..., k, p_stage]."""
    mma_pv = cute.make_mma_atom(tiled_mma_pv.op)
    mma_pv.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.fence()
    for k in cutlass.range_constexpr(BLOCK_N // 16):
        if cutlass.const_expr(p_stage is None):
            cute.gemm(mma_pv, acc_O, tOrP[None, None, k], tOrVt[None, None, k, stage], acc_O)
        else:
            cute.gemm(mma_pv, acc_O, tOrP[None, None, k, p_stage], tOrVt[None, None, k, stage], acc_O)
    warpgroup.commit_group()
