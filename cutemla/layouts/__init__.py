"""Cache, tile and shared-memory layouts shared by the kernels and the host wrappers."""
from .tiles import BLOCK_M, BLOCK_N, D_ROPE, D_V, PAGE_SIZE, SUBTILE_K, SUPPORTED_HEAD_DIMS  # noqa: F401

__all__ = ["BLOCK_M", "BLOCK_N", "D_ROPE", "D_V", "PAGE_SIZE", "SUBTILE_K", "SUPPORTED_HEAD_DIMS"]
