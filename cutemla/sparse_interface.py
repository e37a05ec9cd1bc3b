"""``flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...)``: sparse (top-k) decode over the FP8 cache.

Called by :func:`cutemla.interface.flash_mla_with_kvcache` when both ``is_fp8_kvcache`` and ``indices`` are
given (FlashMLA's DeepSeek-V3.2 sparse decode; design/flashmla.md §1 "Sparse path", §6). Backend: the CuTe DSL
kernel (``cutemla.kernels.sparse_decode``) where the dense kernel would run, else the PyTorch reference
(``cutemla.reference_sparse.sparse_mla_decode_reference``).

Accepted (checked here, metadata only, no device sync):

* ``q`` ``[b, s_q, h_q, 576]`` bfloat16, last dim contiguous; any ``h_q >= 1`` (FlashMLA: 64 or 128).
* ``k_cache`` ``[num_blocks, page_block_size, 1, 656]`` uint8 / int8 / float8_e4m3fn bytes (any page size) with
  ``stride(1) == 656`` and a contiguous last dim; the kernel also needs 16-byte aligned base and block stride.
* ``indices`` ``[b, s_q, topk]`` int32 global token ids (``page * page_block_size + offset``), ``-1`` = skip;
  any ``topk >= 1`` (FlashMLA's sm90 kernel: a multiple of 64).
* ``attn_sink`` ``[h_q]`` float32 or None; ``topk_length`` ``[b]`` int32 or None.
* ``head_dim_v == 512``; ``causal`` must be False (FlashMLA asserts it); ``block_table`` / ``cache_seqlens`` are
  ignored and may be None; ``extra_k_cache`` / ``extra_indices_in_kvcache`` / ``extra_topk_length`` (MODEL1)
  raise ``NotImplementedError``.

Out-of-range ids: the reference raises ``ValueError``. The kernel masks any id outside
``[0, num_blocks * page_block_size)`` like ``-1`` and never reads it; ``CUTEMLA_DEBUG=1`` (a host sync) raises
instead, and so does a call whose ``indices`` are on the CPU.
"""
from __future__ import annotations

from typing import Tuple

import torch

from cutemla.layouts.fp8_cache import FP8_BYTES_PER_TOKEN, FP8_HEAD_DIM
from cutemla.reference_sparse import check_attn_sink
from cutemla.validation import check_softmax_scale, debug_enabled

__all__ = ["validate_sparse_inputs", "flash_mla_sparse_fp8"]

_PACKED_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def validate_sparse_inputs(q, k_cache, indices, head_dim_v, causal, attn_sink, topk_length,
                           extra_k_cache=None, extra_indices_in_kvcache=None, extra_topk_length=None):
    """Structural checks of a sparse FP8 call; returns ``(b, s_q, h_q, topk)``."""
    extra = {"extra_k_cache": extra_k_cache, "extra_indices_in_kvcache": extra_indices_in_kvcache,
             "extra_topk_length": extra_topk_length}
    given = [name for name, value in extra.items() if value is not None]
    if given:
        raise NotImplementedError(
            f"{', '.join(given)}: FlashMLA's MODEL1 extra cache is not supported; cutemla implements the "
            "DeepSeek-V3.2 sparse decode (one FP8 cache, indices, topk_length, attn_sink)")
    _tensor("q", q)
    _tensor("k_cache", k_cache)
    b, s_q, h_q, _ = _check_q_and_cache(q, k_cache)
    _tensor("indices", indices)
    if indices.dtype != torch.int32:
        raise TypeError(f"indices must be torch.int32, got {indices.dtype}")
    if indices.dim() != 3 or indices.shape[0] != b or indices.shape[1] != s_q or indices.shape[2] <= 0:
        raise ValueError(f"indices must be [b={b}, s_q={s_q}, topk >= 1], got shape {tuple(indices.shape)}")
    if head_dim_v != 512:
        raise ValueError(f"head_dim_v must be 512, got {head_dim_v}")
    if causal and s_q > 1:
        raise ValueError("causal must be False for sparse decode (indices select the keys; FlashMLA asserts this)")
    check_attn_sink(attn_sink, h_q)
    if topk_length is not None:
        _tensor("topk_length", topk_length)
        if topk_length.dtype != torch.int32:
            raise TypeError(f"topk_length must be torch.int32, got {topk_length.dtype}")
        if topk_length.shape != (b,):
            raise ValueError(f"topk_length must be [b={b}], got shape {tuple(topk_length.shape)}")
    devices = {t.device for t in (q, k_cache, indices, attn_sink, topk_length) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"q, k_cache, indices, attn_sink and topk_length must be on one device, got "
                         f"{sorted(map(str, devices))}")
    return b, s_q, h_q, indices.shape[2]


def check_indices_in_range(indices: torch.Tensor, k_cache: torch.Tensor, topk_length=None) -> None:
    """Raise ValueError for an id that is neither -1 nor in the cache, in a slot topk_length does not mask
    (a host sync: debug mode, or indices already on the CPU)."""
    num_tokens = k_cache.shape[0] * k_cache.shape[1]
    ids = indices.detach().cpu().long()
    live = ids != -1
    if topk_length is not None:
        lengths = topk_length.detach().cpu().long().view(-1, 1, 1)
        if bool(((lengths < 0) | (lengths > ids.shape[2])).any()):
            raise ValueError(f"topk_length values must lie in [0, topk = {ids.shape[2]}]")
        live &= torch.arange(ids.shape[2]).view(1, 1, -1) < lengths
    bad = live & ((ids < 0) | (ids >= num_tokens))
    if bool(bad.any()):
        i, j, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"indices[{i}, {j}, {k}] = {int(ids[i, j, k])} is neither -1 nor a token id in "
                         f"[0, num_blocks * page_block_size = {num_tokens})")


def _kernel_ready_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """The cache bytes as the kernel reads them: 16-byte aligned base and block stride (size-1 dims fixed)."""
    if k_cache.data_ptr() % 16 or (k_cache.shape[0] > 1 and k_cache.stride(0) % 16):
        raise ValueError("k_cache must have a 16-byte aligned base and a block stride (stride(0)) that is a "
                         f"multiple of 16 bytes for the kernel, got strides {tuple(k_cache.stride())}")
    strides = list(k_cache.stride())
    if k_cache.shape[0] == 1:
        strides[0] = k_cache.shape[1] * FP8_BYTES_PER_TOKEN
    if k_cache.shape[1] == 1:
        strides[1] = FP8_BYTES_PER_TOKEN
    strides[2] = FP8_BYTES_PER_TOKEN
    if strides != list(k_cache.stride()):
        k_cache = k_cache.as_strided(k_cache.shape, strides)
    return k_cache


def _fill_sched_meta(sched_meta, b, s_q, h_q, page_block_size, topk) -> None:
    """FlashMLA fills its FlashMLASchedMeta on the first sparse call and checks the config on reuse. The
    sparse kernel needs no split schedule, so only the config is recorded (tensors stay None)."""
    from cutemla.interface import FlashMLASchedMeta, _check_config

    current = (b, s_q, h_q, page_block_size, 1, False, True, topk, None, None)
    if sched_meta.have_initialized:
        _check_config(sched_meta, current)
        return
    sched_meta.config = FlashMLASchedMeta.Config(*current)
    sched_meta.have_initialized = True


def flash_mla_sparse_fp8(q, k_cache, indices, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale,
                         causal, attn_sink, topk_length, extra_k_cache=None, extra_indices_in_kvcache=None,
                         extra_topk_length=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sparse FP8 branch of ``flash_mla_with_kvcache``; returns ``(out [b, s_q, h_q, 512] bf16,
    lse [b, h_q, s_q] fp32)`` (lse a transposed view, as in FlashMLA)."""
    from cutemla.interface import KERNEL, FlashMLASchedMeta, _select_backend

    b, s_q, h_q, topk = validate_sparse_inputs(q, k_cache, indices, head_dim_v, causal, attn_sink, topk_length,
                                               extra_k_cache, extra_indices_in_kvcache, extra_topk_length)
    softmax_scale = check_softmax_scale(softmax_scale, FP8_HEAD_DIM)
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError("num_splits must be None when tile_scheduler_metadata is a FlashMLASchedMeta")
        _fill_sched_meta(tile_scheduler_metadata, b, s_q, h_q, k_cache.shape[1], topk)
    elif tile_scheduler_metadata is not None and not isinstance(tile_scheduler_metadata, torch.Tensor):
        raise TypeError("tile_scheduler_metadata must be a FlashMLASchedMeta (from get_mla_metadata()), an old-style "
                        f"metadata tensor (ignored by sparse decode) or None, got {type(tile_scheduler_metadata).__name__}")
    backend = _select_backend(q.device)
    if backend == KERNEL and q.device.type == "cuda":
        if debug_enabled():
            check_indices_in_range(indices, k_cache, topk_length)
        from cutemla.kernels.sparse_decode import run_sparse_fp8_decode

        return run_sparse_fp8_decode(q, _kernel_ready_cache(k_cache), indices, softmax_scale,
                                     attn_sink=attn_sink, topk_length=topk_length)
    from cutemla.reference_sparse import sparse_mla_decode_reference

    return sparse_mla_decode_reference(q, k_cache, indices, softmax_scale=softmax_scale, attn_sink=attn_sink,
                                       topk_length=topk_length)


# ----------------------------------------------------------------------------------------------------------
# Dense decode over the FP8 cache (is_fp8_kvcache=True without indices; a cutemla extension)


def validate_dense_fp8_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, attn_sink, topk_length,
                              extra_k_cache=None, extra_indices_in_kvcache=None, extra_topk_length=None):
    """Structural checks of a dense FP8 call; returns ``(b, s_q, h_q, page_block_size)``."""
    given = [name for name, value in (("attn_sink", attn_sink), ("topk_length", topk_length),
                                      ("extra_k_cache", extra_k_cache),
                                      ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                                      ("extra_topk_length", extra_topk_length)) if value is not None]
    if given:
        raise NotImplementedError(f"{', '.join(given)}: only with sparse decode (pass indices); dense decode over "
                                  "the FP8 cache takes q, k_cache, block_table and cache_seqlens")
    _tensor("k_cache", k_cache)
    if k_cache.dtype in (torch.bfloat16, torch.float16):
        raise NotImplementedError(
            f"is_fp8_kvcache=True expects k_cache in FlashMLA's 656-byte FP8 format (uint8 [num_blocks, page, 1, 656], "
            f"see cutemla.layouts.fp8_cache.quantize_fp8_cache); a {k_cache.dtype} cache is not quantised on the "
            "fly: pass is_fp8_kvcache=False for it")
    b, s_q, h_q, _ = _check_q_and_cache(q, k_cache)
    _tensor("block_table", block_table)
    _tensor("cache_seqlens", cache_seqlens)
    if block_table.dtype != torch.int32 or cache_seqlens.dtype != torch.int32:
        raise TypeError(f"block_table and cache_seqlens must be torch.int32, got {block_table.dtype} and "
                        f"{cache_seqlens.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != b or (block_table.shape[1] > 1 and block_table.stride(1) != 1):
        raise ValueError(f"block_table must be [b={b}, max_blocks] with a contiguous last dim, got shape "
                         f"{tuple(block_table.shape)}")
    if cache_seqlens.shape != (b,) or not cache_seqlens.is_contiguous():
        raise ValueError(f"cache_seqlens must be a contiguous [b={b}] tensor, got shape {tuple(cache_seqlens.shape)}")
    if head_dim_v != 512:
        raise ValueError(f"head_dim_v must be 512, got {head_dim_v}")
    devices = {t.device for t in (q, k_cache, block_table, cache_seqlens)}
    if len(devices) != 1:
        raise ValueError(f"q, k_cache, block_table and cache_seqlens must be on one device, got "
                         f"{sorted(map(str, devices))}")
    return b, s_q, h_q, k_cache.shape[1]


def _check_q_and_cache(q, k_cache):
    """The q / k_cache checks shared by both FP8 paths; returns q's shape."""
    _tensor("q", q)
    if q.dtype != torch.bfloat16:
        raise TypeError(f"q must be torch.bfloat16 with the FP8 cache, got {q.dtype}")
    if q.dim() != 4 or q.shape[-1] != FP8_HEAD_DIM or min(q.shape[:3]) <= 0:
        raise ValueError(f"q must be [b, s_q, h_q, {FP8_HEAD_DIM}] with b, s_q, h_q > 0 with the FP8 cache, "
                         f"got shape {tuple(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError("q's last dimension must be contiguous")
    if k_cache.dtype not in _PACKED_DTYPES:
        raise TypeError(f"k_cache must hold FP8 cache bytes (uint8, int8 or float8_e4m3fn) when is_fp8_kvcache=True, "
                        f"got {k_cache.dtype}")
    if (k_cache.dim() != 4 or k_cache.shape[2] != 1 or k_cache.shape[3] != FP8_BYTES_PER_TOKEN
            or k_cache.shape[0] <= 0 or k_cache.shape[1] <= 0):
        raise ValueError(f"k_cache must be [num_blocks, page_block_size, 1, {FP8_BYTES_PER_TOKEN}] (656 bytes per "
                         f"token, h_kv = 1), got shape {tuple(k_cache.shape)}")
    if k_cache.stride(-1) != 1 or (k_cache.shape[1] > 1 and k_cache.stride(1) != FP8_BYTES_PER_TOKEN):
        raise ValueError(f"k_cache must have stride(1) == {FP8_BYTES_PER_TOKEN} and stride(3) == 1, got strides "
                         f"{tuple(k_cache.stride())}")
    return q.shape


def flash_mla_dense_fp8(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                        softmax_scale, causal, attn_sink=None, topk_length=None, extra_k_cache=None,
                        extra_indices_in_kvcache=None, extra_topk_length=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The dense FP8 branch of ``flash_mla_with_kvcache`` (``is_fp8_kvcache=True``, no ``indices``): dense paged
    decode with bf16 q over the 656-byte cache; same split-KV metadata as the bf16 path (config records
    ``is_fp8_kvcache=True``). Returns ``(out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32)``."""
    from cutemla.interface import KERNEL, FlashMLASchedMeta, _check_config, _schedule, _select_backend
    from cutemla.validation import debug_checks, validate_sched_tensors

    b, s_q, h_q, page = validate_dense_fp8_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, attn_sink,
                                                  topk_length, extra_k_cache, extra_indices_in_kvcache,
                                                  extra_topk_length)
    softmax_scale = check_softmax_scale(softmax_scale, FP8_HEAD_DIM)
    causal = bool(causal) and s_q > 1
    backend = _select_backend(q.device)
    use_kernel = backend == KERNEL and q.device.type == "cuda"
    if use_kernel and page != 64:
        raise ValueError(f"k_cache.shape[1] (page_block_size) must be 64 for the CuTe DSL kernel, got {page} (the "
                         "PyTorch reference path, CUTEMLA_BACKEND=reference, accepts any page size)")
    if debug_enabled():
        debug_checks(q, k_cache, block_table, cache_seqlens)
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError("num_splits must be None when tile_scheduler_metadata is a FlashMLASchedMeta")
        current = (b, s_q, h_q, page, 1, causal, True, None, None, None)
        sched = tile_scheduler_metadata
        if sched.have_initialized:
            _check_config(sched, current)
            meta, num_splits = sched.tile_scheduler_metadata, sched.num_splits
        else:
            meta, num_splits = _schedule(cache_seqlens, s_q, h_q, 1, backend)
            sched.config = FlashMLASchedMeta.Config(*current)
            sched.tile_scheduler_metadata, sched.num_splits = meta, num_splits
            sched.have_initialized = True
    elif isinstance(tile_scheduler_metadata, torch.Tensor):
        if num_splits is None:
            raise ValueError("num_splits is required with a tile_scheduler_metadata tensor")
        validate_sched_tensors(tile_scheduler_metadata, num_splits, b, q.device)
        meta = tile_scheduler_metadata
    else:
        raise TypeError("tile_scheduler_metadata must be a FlashMLASchedMeta (from get_mla_metadata()) or an int32 "
                        f"[num_sm_parts, 8] tensor, got {type(tile_scheduler_metadata).__name__}")
    if use_kernel:
        from cutemla.kernels.dense_fp8_decode import run_dense_fp8_decode

        return run_dense_fp8_decode(q, _kernel_ready_cache(k_cache), block_table, cache_seqlens, meta, num_splits,
                                    softmax_scale, causal)
    from cutemla.reference_sparse import dense_fp8_mla_decode_reference

    return dense_fp8_mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
