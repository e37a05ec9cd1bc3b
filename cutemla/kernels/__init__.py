"""CuTe DSL kernels for sm_90a. (Stub: filled in by the decode-kernel work.)"""


def kernels_available(device) -> bool:
    """True when the CuTe DSL decode kernels can run on `device` (an sm90 CUDA device)."""
    return False


def run_dense_decode(q, kcache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                     softmax_scale, causal):
    raise NotImplementedError("the CuTe DSL decode kernel is not built yet")
