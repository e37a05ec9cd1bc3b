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
from cutlass.cute.nvgpu import cpasync

from .softmax import acc_row_col

STAGING_PITCH = 264  # elements a staged row takes: 256 columns + 8 of padding (see the module docstring)


@cute.jit
def bulk_store_row(dst_row: cute.Tensor, src_row: cute.Tensor):
    """cp.async.bulk (CopyBulkS2GOp) of the staged shared-memory row `src_row` to the global row `dst_row`:
    the first size(dst_row) elements, both 16-byte aligned and 16-byte multiples, in this thread's bulk
    async-group. Commit and wait with cute.arch.cp_async_bulk_commit_group / cp_async_bulk_wait_group."""
    n = cute.size(dst_row)
    atom = cute.make_copy_atom(cpasync.CopyBulkS2GOp(), src_row.element_type,
                               num_bits_per_copy=n * src_row.element_type.width)
    cute.copy(atom, cute.local_tile(src_row, (n,), (0,)), dst_row)


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
