"""Tile sizes of the MLA decode kernels. Plain Python: importing this never imports cutlass."""

# Query rows per CTA: one WGMMA M of 64. Query rows are s_q * h_q / h_kv per KV head, folded.
BLOCK_M = 64
# KV tokens per tile. Equal to the page size, so one page is one TMA tile addressed by its page id.
BLOCK_N = 64
PAGE_SIZE = 64
# The 576 (or 512) head columns travel as 64-column sub-tiles: one 128-byte-swizzled TMA box each,
# with its own mbarrier, so QK^T on sub-tile t starts as soon as t lands.
SUBTILE_K = 64
D_V = 512
D_ROPE = 64
SUPPORTED_HEAD_DIMS = (512, 576)
