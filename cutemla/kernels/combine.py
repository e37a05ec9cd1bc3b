"""Split-KV combine for MLA decode: merge per-split partial outputs into the final `out` and `lse`.

The decode kernel splits a long request's keys over several CTAs ("splits"). Each split writes its
softmax-normalised partial output and its base-2 log-sum-exp; this kernel merges them:

    mx  = max_j lse_j                       (shift 0 when every split is empty, so nothing is inf - inf)
    g2  = log2(sum_j exp2(lse_j - mx)) + mx (+inf when that sum is 0: the row attended nothing)
    out = sum_j exp2(lse_j - g2) * O_j      (fp32, then cast to bf16/fp16; a weight-0 split never contributes)
    lse = g2 * ln(2)                        (natural log, as FlashMLA returns it)

Contract with the decode kernel (tensor shapes, all fp32 unless stated):

* ``o_accum``   ``[total_splits, h_kv, q_seq_per_hk, 512]`` contiguous, each split's O already divided by its L.
* ``lse_accum`` ``[total_splits, h_kv, q_seq_per_hk]`` contiguous, base-2 LSE of the scaled logits, -inf when
  the split saw no key for that row.
* ``num_splits`` int32 ``[b + 1]``: request ``i`` owns accumulator rows ``num_splits[i] .. num_splits[i+1]-1``.
  A request with one split was finished by the decode kernel, which wrote its out/lse directly: the combine
  leaves it alone.
* Row ``r`` of kv head ``hk`` is query ``(s = r // g, head = hk * g + r % g)`` with ``g = h_q // h_kv``.
* ``out`` ``[b, s_q, h_q, 512]`` bf16/fp16 (any strides, last dim contiguous); ``lse`` ``[b, h_q, s_q]`` fp32.

Kernel shape: grid ``(ceil(q_seq_per_hk / rows_per_cta), h_kv, b)``, each output row handled by one warp
(256-thread CTAs, 8 rows each) or, for small problems, by the 4 warps of a 128-thread CTA that split its
columns; for the smallest, that CTA keeps more splits in flight ("deep"; see `launch_shape`). The long
dimension is grid x (2^31 - 1 blocks) because FlashMLA once failed for s_q >= 4096 by putting it in a
65535-limited dimension. Lanes stride over the splits for the max and the
sum (warp shuffles), so any number of splits works without a MAX_SPLITS template cap. Each lane owns float4
column slots 128 columns apart, so one warp instruction reads 512 contiguous bytes of a partial row.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from . import jit  # pins CUTE_DSL_ARCH before cutlass is imported (keep this import first)
from ..ops import default_num_sms  # the SM count the scheduler plans for (cached per device)
from ..schedule import DEFAULT_NUM_SMS

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

HEAD_DIM_V = 512
VEC = 4  # fp32 elements per 16-byte load
LOADED_FLOATS_PER_LANE = 64  # partial-row registers a lane keeps in flight (sets splits in flight)
# The "deep" variant of the CTA-per-row shape, for the fewest rows (b = 1-2 at h_q 128, say):
# * each lane keeps 128 floats = 32 splits in flight (b = 1 at h_q 128 has 66 splits: 3 rounds of loads, not 5);
# * the first 32 * LSE_REGS splits' LSEs stay in each lane's registers, loaded once, together, and used by the
#   max, the sum and the weights (otherwise three chains of dependent global loads).
# It needs 168 registers (3 CTAs per SM instead of 4), which costs a second wave beyond ~3 rows per SM:
# on an H200, 1x64k h128 -1.6%, 1x64k h16 -4.7%, but 4x32k h128 (512 rows) +3.5% and 32x2k h16 (512 rows) +8%
# (perf/results/2026-11-25-h200-ab-combine-deep.csv), hence DEEP_ROWS_PER_SM.
LOADED_FLOATS_PER_LANE_DEEP = 128
LSE_REGS = 4
# Launch shapes, (threads per CTA, warps per output row[, deep]), picked per call from the number of rows.
# Measured on an H100 (bf16, CUDA graphs):
#   b=1,  h_q=128, 66 splits:  warp per row 12.6 us (1.4 TB/s), CTA per row 6.3 us (2.8 TB/s)
#   b=128, h_q=128, 2 splits:  warp per row 33.2 us (2.5 TB/s), CTA per row 75 us (1.1 TB/s)
# Few rows: split each row's columns over 4 warps so the grid has enough warps to keep HBM busy.
# Many rows: one warp per row, so the LSE reduction (redone by every warp of a row) is not repeated.
WARP_PER_ROW = (256, 1)
CTA_PER_ROW = (128, 4)
CTA_PER_ROW_DEEP = (128, 4, True)
FEW_ROWS = 1024  # below this many (request, kv head, row) triples, use CTA_PER_ROW
# At most this many rows per SM: CTA_PER_ROW_DEEP (one CTA per row, 3 per SM, so two rows per SM keep it in one
# wave with room to spare). On the 132-SM H100/H200 that is 264: the measured 256 rows gained, 512 lost.
DEEP_ROWS_PER_SM = 2
THREADS_PER_CTA, WARPS_PER_ROW = WARP_PER_ROW  # MlaCombine's defaults
MAX_GRID_YZ = 65535  # CUDA's limit on grid y and z
# The decode kernel launches with PDL and the combine waits on griddepcontrol before reading anything.
USE_PDL_DEFAULT = True

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_CUTLASS_DTYPES = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16}
LN_2 = math.log(2.0)  # natural-log lse = base-2 lse * ln 2


class MlaCombine:
    """Merge split-KV partials.

    Config (compile-time): output dtype, programmatic dependent launch, CTA size and how many warps share
    one output row (each owns 512 / warps_per_row columns; all of them redo the cheap LSE reduction).
    Splitting a row over warps multiplies the warps in the grid: at b = 1 the grid is otherwise too small
    to keep enough 2 KB partial rows in flight to approach HBM bandwidth.
    """

    def __init__(self, dtype, use_pdl: bool = USE_PDL_DEFAULT, threads: int = THREADS_PER_CTA,
                 warps_per_row: int = WARPS_PER_ROW, deep: bool = False):
        if threads % (32 * warps_per_row) != 0 or HEAD_DIM_V % (32 * VEC * warps_per_row) != 0:
            raise ValueError(f"unsupported combine config: threads={threads}, warps_per_row={warps_per_row}")
        self.dtype = dtype
        self.use_pdl = use_pdl
        self.threads = threads
        self.warps_per_row = warps_per_row
        self.rows_per_cta = threads // 32 // warps_per_row
        self.cols_per_warp = HEAD_DIM_V // warps_per_row
        self.slots = self.cols_per_warp // (32 * VEC)  # float4 slots per lane, 128 columns apart
        self.deep = deep  # see LOADED_FLOATS_PER_LANE_DEEP
        # Partial rows a warp loads before accumulating any: a power of two dividing 32 (see kernel).
        floats = LOADED_FLOATS_PER_LANE_DEEP if deep else LOADED_FLOATS_PER_LANE
        self.splits_in_flight = min(32, floats // (VEC * self.slots))

    @cute.jit
    def __call__(
        self,
        mOAccum: cute.Tensor,  # (total_splits, h_kv, q_seq_per_hk, 512) fp32
        mLseAccum: cute.Tensor,  # (total_splits, h_kv, q_seq_per_hk) fp32
        mNumSplits: cute.Tensor,  # (b + 1,) int32
        mOut: cute.Tensor,  # (b, s_q, h_q, 512) bf16/fp16
        mLse: cute.Tensor,  # (b, h_q, s_q) fp32
        stream: cuda.CUstream,
    ):
        if const_expr(mOut.element_type != self.dtype):
            raise TypeError(f"out must be {self.dtype}, got {mOut.element_type}")
        if const_expr(mOAccum.element_type != Float32 or mLseAccum.element_type != Float32):
            raise TypeError("o_accum and lse_accum must be float32")
        q_seq_per_hk = mOAccum.shape[2]
        grid_x = (q_seq_per_hk + (self.rows_per_cta - 1)) // self.rows_per_cta
        self.kernel(mOAccum, mLseAccum, mNumSplits, mOut, mLse).launch(
            grid=[grid_x, mOAccum.shape[1], mOut.shape[0]],
            block=[self.threads, 1, 1],
            stream=stream,
            use_pdl=self.use_pdl,
        )

    @cute.kernel
    def kernel(
        self,
        mOAccum: cute.Tensor,
        mLseAccum: cute.Tensor,
        mNumSplits: cute.Tensor,
        mOut: cute.Tensor,
        mLse: cute.Tensor,
    ):
        row_block, head_kv, batch = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        if const_expr(self.use_pdl):
            # Everything below reads what the decode kernel wrote: wait for its grid to flush.
            cute.arch.griddepcontrol_wait()

        q_seq_per_hk = mOAccum.shape[2]
        heads_per_kv = mOut.shape[2] // mOAccum.shape[1]
        row = row_block * self.rows_per_cta + warp // self.warps_per_row
        col_part = warp % self.warps_per_row
        split_begin = mNumSplits[batch]
        n_splits = mNumSplits[batch + 1] - split_begin
        # n_splits <= 1: the decode kernel already wrote this request's out and lse.
        if row < q_seq_per_hk and n_splits > 1:
            # Splits j = lane, lane + 32, ...; with deep, the first LSE_REGS of them from registers (-inf
            # past the end), all loaded at once.
            first_loaded = lane
            if const_expr(self.deep):
                lse_regs = cute.make_rmem_tensor(LSE_REGS, Float32)
                for i in cutlass.range_constexpr(LSE_REGS):
                    lse_regs[i] = Float32(-math.inf)
                    if lane + 32 * i < n_splits:
                        lse_regs[i] = mLseAccum[split_begin + lane + 32 * i, head_kv, row]
                first_loaded = lane + 32 * LSE_REGS
            lse_max = Float32(-math.inf)
            if const_expr(self.deep):
                for i in cutlass.range_constexpr(LSE_REGS):
                    lse_max = cute.arch.fmax(lse_max, lse_regs[i])
            for j in cutlass.range(first_loaded, n_splits, 32, unroll=1):
                lse_max = cute.arch.fmax(lse_max, mLseAccum[split_begin + j, head_kv, row])
            lse_max = cute.arch.warp_reduction_max(lse_max)
            # All splits empty: shift by 0 so exp2(-inf - shift) stays 0 instead of NaN.
            shift = cutlass.select_(lse_max == Float32(-math.inf), Float32(0.0), lse_max)
            total = Float32(0.0)
            if const_expr(self.deep):
                for i in cutlass.range_constexpr(LSE_REGS):
                    total += cute.math.exp2(lse_regs[i] - shift, fastmath=True)
            for j in cutlass.range(first_loaded, n_splits, 32, unroll=1):
                total += cute.math.exp2(mLseAccum[split_begin + j, head_kv, row] - shift, fastmath=True)
            total = cute.arch.warp_reduction_sum(total)
            lse2 = cute.math.log2(total, fastmath=True) + shift
            lse2 = cutlass.select_(total == Float32(0.0), Float32(math.inf), lse2)

            acc = cute.make_rmem_tensor((VEC, self.slots), Float32)
            acc.fill(0.0)
            # splits_in_flight partial rows are loaded before any is used: with few CTAs (small b) the
            # latency of one split at a time would dominate.
            parts = cute.make_rmem_tensor((VEC, self.slots, self.splits_in_flight), Float32)
            # Splits in chunks of 32: lane k computes the weight of split chunk+k with one coalesced
            # load, then every lane fetches it by shuffle while the warp sweeps the chunk's rows.
            for chunk in cutlass.range(0, n_splits, 32, unroll=1):
                weight = Float32(0.0)
                if chunk + lane < n_splits:
                    if const_expr(self.deep):
                        lse_j = lse_regs[0]
                        for i in cutlass.range_constexpr(1, LSE_REGS):
                            lse_j = cutlass.select_(chunk == 32 * i, lse_regs[i], lse_j)
                        if chunk >= 32 * LSE_REGS:
                            lse_j = mLseAccum[split_begin + chunk + lane, head_kv, row]
                        weight = cute.math.exp2(lse_j - lse2, fastmath=True)
                    else:
                        weight = cute.math.exp2(mLseAccum[split_begin + chunk + lane, head_kv, row] - lse2,
                                                fastmath=True)
                chunk_len = cutlass.min(n_splits - chunk, 32)
                for first in cutlass.range(0, chunk_len, self.splits_in_flight, unroll=1):
                    for u in cutlass.range_constexpr(self.splits_in_flight):
                        if first + u < chunk_len:
                            split = split_begin + chunk + first + u
                            src = self.lane_columns(mOAccum[split, head_kv, row, None], col_part, lane)
                            cute.autovec_copy(src, parts[None, None, u])
                    for u in cutlass.range_constexpr(self.splits_in_flight):
                        # first is a multiple of splits_in_flight below 32, so first + u is a valid lane.
                        w = cute.arch.shuffle_sync(weight, first + u)
                        # A weight-0 split (lse -inf, underflow, or past the chunk) must not contribute,
                        # even if its partial row holds inf/NaN or was not loaded: select, not multiply.
                        keep = w > Float32(0.0) and first + u < chunk_len
                        part = parts[None, None, u]
                        for i in cutlass.range_constexpr(VEC * self.slots):
                            acc[i] = acc[i] + cutlass.select_(keep, part[i] * w, Float32(0.0))

            s_idx = row // heads_per_kv
            head = head_kv * heads_per_kv + (row - s_idx * heads_per_kv)
            out_frag = cute.make_rmem_tensor((VEC, self.slots), self.dtype)
            out_frag.store(acc.load().to(self.dtype))
            cute.autovec_copy(out_frag, self.lane_columns(mOut[batch, s_idx, head, None], col_part, lane))
            if lane == 0 and col_part == 0:
                mLse[batch, head, s_idx] = lse2 * Float32(LN_2)

    @cute.jit
    def lane_columns(self, row: cute.Tensor, col_part: Int32, lane: Int32) -> cute.Tensor:
        """The (VEC, slots) view of a 512-column row that (`col_part`, `lane`) owns: columns
        col_part * cols_per_warp + slot * 128 + lane * VEC + v. Consecutive lanes touch consecutive
        16-byte (fp32) / 8-byte (16-bit) pieces, so every warp access is fully coalesced."""
        warp_columns = cute.local_tile(row, (self.cols_per_warp,), (col_part,))
        lanes_then_slots = cute.logical_divide(warp_columns, cute.make_layout((VEC, 32), stride=(1, VEC)))
        return lanes_then_slots[(None, lane), None]


# ----------------------------------------------------------------------------------------------------------
# Compile: fake tensors with symbolic dims (one SymInt per logical dim, so TVM-FFI checks that the tensors
# agree at call time), TVM-FFI calling convention, env stream (torch's current stream).
# ----------------------------------------------------------------------------------------------------------

def _fake_arguments(dtype_name: str):
    from cutlass.cute.runtime import make_fake_tensor

    total_splits = cute.sym_int32(symbol="total_splits")
    h_kv = cute.sym_int32(symbol="h_kv")
    q_seq_per_hk = cute.sym_int32(symbol="q_seq_per_hk")
    batch = cute.sym_int32(symbol="b")
    batch_plus_1 = cute.sym_int32(symbol="b_plus_1")
    s_q = cute.sym_int32(symbol="s_q")
    h_q = cute.sym_int32(symbol="h_q")

    def any_stride():
        return cute.sym_int64()

    # Strides stay runtime int64 values (offsets past 2^31 elements are possible with long s_q); their
    # divisibility by 4 and the static 512 row stride let the compiler prove 16-byte aligned rows, so
    # partial rows load as ld.global.v4.
    o_accum = make_fake_tensor(
        Float32, (total_splits, h_kv, q_seq_per_hk, HEAD_DIM_V),
        stride=(cute.sym_int64(divisibility=VEC), cute.sym_int64(divisibility=VEC), HEAD_DIM_V, 1),
        assumed_align=16,
    )
    lse_accum = make_fake_tensor(
        Float32, (total_splits, h_kv, q_seq_per_hk), stride=(any_stride(), any_stride(), 1), assumed_align=4,
    )
    num_splits = make_fake_tensor(Int32, (batch_plus_1,), stride=(1,), assumed_align=4)
    # 8-byte stores of 4 x 16-bit: every row start must be 4-element aligned.
    out_stride = cute.sym_int64(divisibility=VEC)
    out = make_fake_tensor(
        _CUTLASS_DTYPES[dtype_name], (batch, s_q, h_q, HEAD_DIM_V),
        stride=(cute.sym_int64(divisibility=VEC), cute.sym_int64(divisibility=VEC), out_stride, 1),
        assumed_align=2 * VEC,
    )
    lse = make_fake_tensor(Float32, (batch, h_q, s_q), stride=(any_stride(), any_stride(), any_stride()), assumed_align=4)
    return o_accum, lse_accum, num_splits, out, lse


def _compile(dtype_name: str, use_pdl: bool, options: str, threads: int = THREADS_PER_CTA,
             warps_per_row: int = WARPS_PER_ROW, deep: bool = False):
    kernel = MlaCombine(_CUTLASS_DTYPES[dtype_name], use_pdl=use_pdl, threads=threads, warps_per_row=warps_per_row,
                        deep=deep)
    return cute.compile(kernel, *_fake_arguments(dtype_name), jit.fake_stream(), options=options)


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str) and dtype in _CUTLASS_DTYPES:
        return dtype
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise TypeError(f"combine output dtype must be torch.bfloat16 ('bf16') or torch.float16 ('fp16'), got {dtype!r}")


def compile_combine(dtype, use_pdl: bool = USE_PDL_DEFAULT, threads: int = THREADS_PER_CTA,
                    warps_per_row: int = WARPS_PER_ROW, deep: bool = False) -> Callable:
    """The compiled combine for output `dtype` (torch.bfloat16/float16 or 'bf16'/'fp16'), cached.

    Call it as ``fn(o_accum, lse_accum, num_splits, out, lse)`` with CUDA torch tensors; it launches on
    torch's current stream (TVM-FFI env stream) and returns nothing.
    """
    name = _dtype_name(dtype)
    key = (name, bool(use_pdl), int(threads), int(warps_per_row), bool(deep))
    return jit.compile_cache.get(
        "combine", key, lambda: _compile(name, bool(use_pdl), jit.COMPILE_OPTIONS, int(threads), int(warps_per_row),
                                         bool(deep))
    )


def compile_configs() -> dict[str, Callable[[str], object]]:
    """CI configs for `cutemla.kernels.ptx_report`: name -> compile(options)."""
    configs = {}
    for name in _CUTLASS_DTYPES:
        for suffix, shape in (("", WARP_PER_ROW), ("_cta_per_row", CTA_PER_ROW),
                              ("_cta_per_row_deep", CTA_PER_ROW_DEEP)):
            configs[name + suffix] = (lambda options, name=name, shape=shape:
                                      _compile(name, USE_PDL_DEFAULT, options, *shape))
    return configs


def launch_shape(b: int, h_kv: int, q_seq_per_hk: int, num_sms: int = DEFAULT_NUM_SMS) -> tuple:
    """(threads per CTA, warps per row[, deep]) for a problem of b * h_kv * q_seq_per_hk output rows on a GPU
    of `num_sms` SMs."""
    rows = b * h_kv * q_seq_per_hk
    if rows <= DEEP_ROWS_PER_SM * num_sms:
        return CTA_PER_ROW_DEEP
    return CTA_PER_ROW if rows < FEW_ROWS else WARP_PER_ROW


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------

def _check_arguments(o_accum, lse_accum, num_splits, out, lse) -> None:
    for name, t in (("o_accum", o_accum), ("lse_accum", lse_accum), ("num_splits", num_splits),
                    ("out", out), ("lse", lse)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if o_accum.dim() != 4 or o_accum.shape[-1] != HEAD_DIM_V:
        raise ValueError(f"o_accum must be [total_splits, h_kv, q_seq_per_hk, {HEAD_DIM_V}], got {tuple(o_accum.shape)}")
    total_splits, h_kv, q_seq_per_hk, _ = o_accum.shape
    if lse_accum.shape != (total_splits, h_kv, q_seq_per_hk):
        raise ValueError(f"lse_accum must be {(total_splits, h_kv, q_seq_per_hk)} to match o_accum, "
                         f"got {tuple(lse_accum.shape)}")
    if o_accum.dtype != torch.float32 or lse_accum.dtype != torch.float32:
        raise TypeError(f"o_accum and lse_accum must be float32, got {o_accum.dtype} and {lse_accum.dtype}")
    if not o_accum.is_contiguous() or not lse_accum.is_contiguous():
        raise ValueError("o_accum and lse_accum must be contiguous")
    if num_splits.dtype != torch.int32 or num_splits.dim() != 1 or not num_splits.is_contiguous():
        raise TypeError(f"num_splits must be a contiguous 1-D int32 tensor [b + 1], got {num_splits.dtype} "
                        f"{tuple(num_splits.shape)}")
    if out.dim() != 4 or out.shape[-1] != HEAD_DIM_V:
        raise ValueError(f"out must be [b, s_q, h_q, {HEAD_DIM_V}], got {tuple(out.shape)}")
    b, s_q, h_q, _ = out.shape
    if out.dtype not in _DTYPE_NAMES:
        raise TypeError(f"out must be bfloat16 or float16, got {out.dtype}")
    if num_splits.shape[0] != b + 1:
        raise ValueError(f"num_splits must have b + 1 = {b + 1} entries, got {num_splits.shape[0]}")
    if h_kv == 0 or h_q % h_kv != 0 or q_seq_per_hk != s_q * (h_q // h_kv):
        raise ValueError(f"out [b, s_q, h_q, {HEAD_DIM_V}] = {tuple(out.shape)} does not match o_accum: its "
                         f"q_seq_per_hk ({q_seq_per_hk}) must be s_q * h_q / h_kv with h_q divisible by h_kv ({h_kv})")
    if lse.shape != (b, h_q, s_q) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [b, h_q, s_q] = {(b, h_q, s_q)}, got {lse.dtype} {tuple(lse.shape)}")
    if out.stride(-1) != 1:
        raise ValueError("out's last dimension must be contiguous")
    devices = {t.device for t in (o_accum, lse_accum, num_splits, out, lse)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _aligned_out_view(out: torch.Tensor) -> torch.Tensor:
    """`out` with strides the kernel accepts (multiples of 4 elements, 8-byte aligned start).

    A size-1 dim's stride never moves the address, so it is normalised instead of rejected."""
    strides = list(out.stride())
    fixed = False
    for dim in range(3):
        if strides[dim] % VEC != 0:
            if out.shape[dim] != 1:
                raise ValueError(f"out.stride({dim}) = {strides[dim]} must be a multiple of {VEC} elements "
                                 "for the combine's vector stores")
            strides[dim], fixed = 0, True
    if out.data_ptr() % (2 * VEC) != 0:
        raise ValueError(f"out must start at an {2 * VEC}-byte aligned address")
    return out.as_strided(out.shape, strides) if fixed else out


def _canonical_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A contiguous `t` with the row-major strides the kernel's fake tensor declares.

    torch calls a tensor contiguous whatever the strides of its size-1 dims; TVM-FFI checks them."""
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= max(size, 1)
    strides.reverse()
    return t if list(t.stride()) == strides else t.as_strided(t.shape, strides)


def combine_splits(o_accum: torch.Tensor, lse_accum: torch.Tensor, num_splits: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge split-KV partials into `out` [b, s_q, h_q, 512] and `lse` [b, h_q, s_q], in place.

    Requests with at most one split are left untouched (the decode kernel wrote them). CUDA tensors run
    the CuTe DSL kernel on torch's current stream (no host sync, CUDA-graph capturable); CPU tensors use
    `combine_splits_torch`.
    """
    _check_arguments(o_accum, lse_accum, num_splits, out, lse)
    if out.device.type != "cuda":
        combine_splits_torch(o_accum, lse_accum, num_splits, out, lse)
        return
    launch_combine(o_accum, lse_accum, num_splits, out, lse)


def combine_kernel_for(dtype, b: int, h_kv: int, rows: int, device="cuda") -> Callable | None:
    """The compiled combine for `b` requests of `h_kv` KV heads x `rows` folded rows, with the launch shape
    picked for that size on `device`'s GPU (default: the current CUDA device); None when there is nothing to
    merge."""
    if b * rows == 0:
        return None
    if b > MAX_GRID_YZ or h_kv > MAX_GRID_YZ:
        raise ValueError(f"the combine grid puts b ({b}) in z and h_kv ({h_kv}) in y: each must be at most "
                         f"{MAX_GRID_YZ}")
    return compile_combine(dtype, USE_PDL_DEFAULT, *launch_shape(b, h_kv, rows, default_num_sms(device)))


def launch_combine(o_accum: torch.Tensor, lse_accum: torch.Tensor, num_splits: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor) -> None:
    """`combine_splits` for CUDA tensors already known to fit its contract (the decode launchers' own
    buffers): the same launch without re-validating every argument on the hot path."""
    fn = combine_kernel_for(out.dtype, out.shape[0], o_accum.shape[1], o_accum.shape[2], out.device)
    if fn is not None:
        fn(_canonical_contiguous(o_accum), _canonical_contiguous(lse_accum), num_splits, _aligned_out_view(out),
           lse)


def combine_splits_torch(o_accum: torch.Tensor, lse_accum: torch.Tensor, num_splits: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor) -> None:
    """Pure torch version of `combine_splits` (same contract, fp32 math): the test reference and CPU path.

    Reads `num_splits` on the host, so on CUDA it synchronises; it is not meant for the hot path.
    """
    _check_arguments(o_accum, lse_accum, num_splits, out, lse)
    b, s_q, h_q, _ = out.shape
    h_kv = o_accum.shape[1]
    heads_per_kv = h_q // h_kv
    bounds = num_splits.tolist()
    for i in range(b):
        begin, end = bounds[i], bounds[i + 1]
        if end - begin <= 1:
            continue
        part_lse = lse_accum[begin:end].float()  # [n, h_kv, q_seq_per_hk]
        lse_max = part_lse.amax(dim=0)
        shift = torch.where(lse_max == -math.inf, torch.zeros_like(lse_max), lse_max)
        total = torch.exp2(part_lse - shift).sum(dim=0)
        lse2 = torch.where(total == 0, torch.full_like(total, math.inf), torch.log2(total) + shift)
        weight = torch.exp2(part_lse - lse2).unsqueeze(-1)  # [n, h_kv, rows, 1]
        # where, not multiply: a weight-0 split contributes nothing even if its partial row is inf/NaN.
        merged = torch.where(weight > 0, weight * o_accum[begin:end].float(), 0.0).sum(dim=0)
        # Row r of kv head hk is (s = r // g, head = hk * g + r % g).
        out[i] = (merged.view(h_kv, s_q, heads_per_kv, HEAD_DIM_V).permute(1, 0, 2, 3)
                  .reshape(s_q, h_q, HEAD_DIM_V).to(out.dtype))
        lse[i] = (lse2 * LN_2).view(h_kv, s_q, heads_per_kv).permute(0, 2, 1).reshape(h_q, s_q)
