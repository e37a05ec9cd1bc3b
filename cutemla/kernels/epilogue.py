"""Output rows through shared memory: stage a consumer warpgroup's O fragment row-major in smem, then write
each row to global memory with one bulk copy (cp.async.bulk, the TMA unit's non-tensor form).

Why: the m64nN accumulator gives each thread 2-column pieces of two rows, so storing O straight from
registers takes one 4-byte (16-bit) or 8-byte (fp32) store per pair, each warp instruction touching 8 rows. On
the H100 at a locked clock those stores cost the seesaw ~10k cycles per request it finishes (264x1k h128:
267k cycles with them, 222k with the same kernel writing nothing), about 2.5 tile pairs. Staged, a warpgroup
writes its rows with conflict-free shared stores and the copy engine streams whole rows.

The staging tile is row-major with a padded pitch of STAGING_PITCH = 264 elements, so that the rows a warp
writes in one instruction fall in distinct banks: 16-bit pairs (4 bytes, 4 lanes a row, 8 rows a warp) need
rows 4 banks apart (528-byte pitch: 132 words), fp32 pairs (8 bytes, served a half-warp of 4 rows at a time)
need them 8 banks apart (1056-byte pitch: 264 words). Both pitches are multiples of 16 bytes, as cp.async.bulk
requires of every address and size. The global rows must be 16-byte aligned too: `out` and the fp32
partials are cutemla's own contiguous buffers (kernels.prepare_dense_decode, MLADecoder), whose row strides
are multiples of 512 elements.
"""
import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op

from .softmax import acc_row_col

STAGING_PITCH = 264  # elements a staged row takes: 256 columns + 8 of padding (see the module docstring)


@dsl_user_op
def bulk_store_row(gmem_ptr, smem_ptr, nbytes: int, *, loc=None, ip=None) -> None:
    """cp.async.bulk of `nbytes` (a multiple of 16) from shared-memory pointer `smem_ptr` to global pointer
    `gmem_ptr` (both 16-byte aligned), in this thread's bulk async-group. Commit and wait with
    cute.arch.cp_async_bulk_commit_group / cp_async_bulk_wait_group."""
    assert nbytes % 16 == 0, nbytes
    gmem_addr = gmem_ptr.toint(loc=loc, ip=ip)  # 64-bit global address
    smem_addr = smem_ptr.toint(loc=loc, ip=ip)  # 32-bit shared-window address
    llvm.inline_asm(
        None,
        [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Int32(smem_addr).ir_value(loc=loc, ip=ip)],
        f"cp.async.bulk.global.shared::cta.bulk_group [$0], [$1], {nbytes};",
        "l,r", has_side_effects=True, loc=loc, ip=ip)


@cute.jit
def stage_rows(acc_O: cute.Tensor, tidx_in_wg, sO: cute.Tensor, row_shift: cutlass.Constexpr[int]):
    """Write this thread's accumulator values (its two rows of the warpgroup's 64 x N tile) into
    sO[row - row_shift, col], converted to sO's dtype, as column pairs."""
    for i in cutlass.range_constexpr(0, cute.size(acc_O), 2):
        row, col = acc_row_col(tidx_in_wg, i)
        pair = cute.make_rmem_tensor(2, sO.element_type)
        pair[0] = acc_O[i].to(sO.element_type)
        pair[1] = acc_O[i + 1].to(sO.element_type)
        cute.autovec_copy(pair, cute.local_tile(sO[row - row_shift, None], (2,), (col // 2,)))
