"""Merge the sparse FP8 decode's top-k splits, with FlashMLA's attention sink, in one pass (CuTe DSL, sm_90a).

The sparse kernel (``sparse_decode.py``) splits a row's top-k tiles over ``n`` CTAs when its grid is small;
split ``j`` of request ``i`` writes partial row ``i * n + j``: O / L (fp32) and its base-2 lse (``-inf`` when
it saw no valid slot). Per output row (request, query position, head)::

    g2  = log2(sum_j exp2(lse_j - mx)) + mx        mx = max_j lse_j (0 if all are -inf); -inf if the sum is 0
    out = f * sum_j exp2(lse_j - g2) * O_j          f = 1 / (1 + exp2(sink * log2(e) - g2)) with a sink, else 1
    lse = g2 * ln 2                                 (+inf for a row with no valid slot, whose out is 0)

The sink factor is applied in fp32 before the single rounding to bf16, exactly as the unsplit kernel and
FlashMLA's combine do (the generic ``combine.py`` has no sink; scaling its bf16 output afterwards would round
twice). One warp per row, 8 rows per 256-thread CTA; each lane owns four float4 column slots 128 apart, so
every partial row is read with fully coalesced 16-byte loads.
"""
import math
from functools import partial

import torch

from . import jit  # noqa: F401  (pins CUTE_DSL_ARCH before cutlass is imported)

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

D_V = 512
VEC = 4
SLOTS = D_V // (32 * VEC)  # float4 slots per lane
ROWS_PER_CTA = 8
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


class MlaSparseCombine:
    @cute.jit
    def __call__(self, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor,
                 mLse: cute.Tensor, has_sink: Int32, stream):
        """mOAccum [b * n, 1, s_q * h_q, 512] fp32, mLseAccum [b * n, 1, s_q * h_q] fp32, mSink [>= h_q] fp32
        (read only if has_sink), mOut [b, s_q, h_q, 512] bf16, mLse [b, s_q, h_q] fp32."""
        b, s_q, h_q, _ = mOut.shape
        total_rows = b * s_q * h_q
        self.kernel(mOAccum, mLseAccum, mSink, mOut, mLse, has_sink).launch(
            grid=[(total_rows + ROWS_PER_CTA - 1) // ROWS_PER_CTA, 1, 1], block=[32 * ROWS_PER_CTA, 1, 1],
            stream=stream)

    @cute.kernel
    def kernel(self, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor,
               mLse: cute.Tensor, has_sink: Int32):
        cta, _, _ = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        b, s_q, h_q, _ = mOut.shape
        rows = s_q * h_q
        n = mOAccum.shape[0] // b  # splits per request
        grow = cta * ROWS_PER_CTA + warp
        if grow < b * rows:
            batch = grow // rows
            row = grow - batch * rows
            s_idx = row // h_q
            head = row - s_idx * h_q
            first = batch * n
            mx = Float32(-math.inf)
            for j in cutlass.range(lane, n, 32, unroll=1):
                mx = cute.arch.fmax(mx, mLseAccum[first + j, 0, row])
            mx = cute.arch.warp_reduction_max(mx)
            shift = cutlass.select_(mx == -Float32.inf, Float32(0.0), mx)
            total = Float32(0.0)
            for j in cutlass.range(lane, n, 32, unroll=1):
                total += cute.math.exp2(mLseAccum[first + j, 0, row] - shift, fastmath=True)
            total = cute.arch.warp_reduction_sum(total)
            g2 = Float32(-math.inf)
            factor = Float32(0.0)
            if total > 0.0:
                g2 = cute.math.log2(total, fastmath=False) + shift
                factor = Float32(1.0)
                if has_sink != 0:
                    factor = 1.0 / (1.0 + cute.math.exp2(mSink[head] * Float32(LOG2E) - g2, fastmath=False))
            acc = cute.make_rmem_tensor((VEC, SLOTS), Float32)
            acc.fill(0.0)
            part = cute.make_rmem_tensor((VEC, SLOTS), Float32)
            for j in cutlass.range(0, n, unroll=1):
                w = cute.math.exp2(mLseAccum[first + j, 0, row] - g2, fastmath=True)
                if w > 0.0:  # an empty split (lse -inf) never contributes, whatever its O holds
                    cute.autovec_copy(self.lane_columns(mOAccum[first + j, 0, row, None], lane), part)
                    for i in cutlass.range_constexpr(VEC * SLOTS):
                        acc[i] = acc[i] + w * part[i]
            out_frag = cute.make_rmem_tensor((VEC, SLOTS), cutlass.BFloat16)
            for i in cutlass.range_constexpr(VEC * SLOTS):
                out_frag[i] = (acc[i] * factor).to(cutlass.BFloat16)
            cute.autovec_copy(out_frag, self.lane_columns(mOut[batch, s_idx, head, None], lane))
            if lane == 0:
                lse_nat = Float32(Float32.inf)
                if g2 != -Float32.inf:
                    lse_nat = g2 * Float32(LN2)
                mLse[batch, s_idx, head] = lse_nat

    @cute.jit
    def lane_columns(self, row: cute.Tensor, lane) -> cute.Tensor:
        """Columns slot * 128 + lane * 4 + v of a 512-column row, as (VEC, SLOTS)."""
        return cute.logical_divide(row, cute.make_layout((VEC, 32), stride=(1, VEC)))[(None, lane), None]


def _fake_args():
    from cutlass.cute.runtime import make_fake_tensor

    splits, rows = cute.sym_int32(symbol="splits"), cute.sym_int32(symbol="rows")
    o_accum = make_fake_tensor(Float32, (splits, 1, rows, D_V),
                               (cute.sym_int64(divisibility=VEC), cute.sym_int64(divisibility=VEC), D_V, 1),
                               assumed_align=16)
    lse_accum = make_fake_tensor(Float32, (splits, 1, rows), (cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
    sink = make_fake_tensor(Float32, (cute.sym_int32(),), (1,), assumed_align=4)
    b, s_q, h_q = cute.sym_int32(symbol="b"), cute.sym_int32(symbol="s_q"), cute.sym_int32(symbol="h_q")
    out = make_fake_tensor(cutlass.BFloat16, (b, s_q, h_q, D_V),
                           (cute.sym_int64(divisibility=VEC), cute.sym_int64(divisibility=VEC),
                            cute.sym_int64(divisibility=VEC), 1), assumed_align=8)
    lse = make_fake_tensor(Float32, (b, s_q, h_q), (cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
    return o_accum, lse_accum, sink, out, lse, Int32(0)


def compile_sparse_combine(options=None):
    from .jit import COMPILE_OPTIONS, fake_stream

    return cute.compile(MlaSparseCombine(), *_fake_args(), fake_stream(), options=options or COMPILE_OPTIONS)


def get_sparse_combine_fn():
    from .jit import compile_cache

    return compile_cache.get("mla_sparse_combine", (), compile_sparse_combine)


def compile_configs():
    return {"sparse_combine": partial(lambda options: compile_sparse_combine(options))}


def launch_sparse_combine(o_accum: torch.Tensor, lse_accum: torch.Tensor, sink: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, has_sink: int) -> None:
    """Merge the partials into out [b, s_q, h_q, 512] and lse [b, s_q, h_q] (the sparse launcher's own,
    contiguous buffers) on the current stream; sink [>= h_q] fp32 is read only if has_sink."""
    get_sparse_combine_fn()(o_accum, lse_accum, sink, out, lse, int(has_sink))
