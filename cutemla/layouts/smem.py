"""Shared-memory layouts of the decode kernel (CuTe DSL; import only from kernel code).

Q and each K stage are row-major tiles of 64 rows x d columns in 128-byte-swizzled 64-column atoms:
every 64x64 sub-tile is one contiguous, 1 KiB-aligned 8 KiB chunk, which is exactly one TMA box.
V is never loaded: V^T is a transposed view of the first 512 columns of the K stage.
"""
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import warpgroup
from cutlass.tensor_utils import LayoutEnum

from .tiles import D_V


def row_major_tile(dtype, rows: int, cols: int, stages: int | None = None):
    """(rows, cols[, stages]) K-major layout built from the widest swizzle atom that divides cols."""
    atom = warpgroup.make_smem_layout_atom(
        sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, cols), dtype)
    if stages is None:
        return cute.tile_to_shape(atom, (rows, cols), order=(0, 1))
    return cute.tile_to_shape(atom, (rows, cols, stages), order=(0, 1, 2))


def v_transposed_view(sK: cute.Tensor, block_n: int, d_qk: int, stages: int) -> cute.Tensor:
    """V^T as (D_V, block_n, stages) over the K stages: sVt[c, n, s] == sK[n, c, s] for c < D_V."""
    return cute.composition(
        sK, cute.make_layout((D_V, block_n, stages), stride=(block_n, 1, block_n * d_qk)))
