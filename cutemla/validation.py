"""Argument checks for the public API, run before anything touches the data.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, value or layout) with a
message that names the argument and what is supported, so a caller sees *which* input is off instead of a
kernel fault.

Two tiers keep the per-call host cost low:

* Structural checks (types, dtypes, devices, ranks, shapes, strides) only look at tensor metadata. They run on
  every call, and the bulk of them is cached with ``functools.lru_cache`` keyed by (shape, stride, dtype,
  device), so a decode loop with steady shapes pays for a few attribute reads and one dict lookup.
* Value checks (negative lengths, lengths beyond the block table, page ids out of range) need the data on the
  host, i.e. a device sync, which would break CUDA-graph capture and cost microseconds per call. They live in
  ``debug_checks`` and run only when ``CUTEMLA_DEBUG=1`` is set or ``cutemla.set_debug(True)`` was called.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple, Optional

import torch

from cutemla._env import env_get

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_HEAD_DIM_V",
    "KERNEL_PAGE_BLOCK_SIZE",
    "SCHED_META_ROW_WORDS",
    "DecodeShape",
    "check_dense_only",
    "validate_decode_inputs",
    "validate_kernel_inputs",
    "validate_sched_tensors",
    "validate_metadata_args",
    "check_softmax_scale",
    "check_causal",
    "set_debug",
    "debug_enabled",
    "debug_checks",
]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (512, 576)
SUPPORTED_HEAD_DIM_V = 512
KERNEL_PAGE_BLOCK_SIZE = 64
SCHED_META_ROW_WORDS = 8
# TMA needs 16-byte aligned base addresses and 16-byte multiple strides (kernel-plan §3).
KERNEL_ALIGN_BYTES = 16

_DTYPE_NAMES = "torch.bfloat16 or torch.float16"


class DecodeShape(NamedTuple):
    """The problem sizes read off validated inputs."""

    b: int
    s_q: int
    h_q: int
    d: int
    num_blocks: int
    page_block_size: int
    h_kv: int
    max_blocks: int


# ----------------------------------------------------------------------------------------------------------
# Unsupported features


def check_dense_only(
    is_fp8_kvcache=False,
    indices=None,
    attn_sink=None,
    extra_k_cache=None,
    extra_indices_in_kvcache=None,
    topk_length=None,
    extra_topk_length=None,
) -> None:
    """Reject FlashMLA's FP8 / sparse (DSA) arguments: cutemla implements the dense BF16/FP16 decode only."""
    if (not is_fp8_kvcache and indices is None and attn_sink is None and extra_k_cache is None
            and extra_indices_in_kvcache is None and topk_length is None and extra_topk_length is None):
        return  # the common case, without building the table below
    if is_fp8_kvcache:
        raise NotImplementedError(
            "is_fp8_kvcache=True is not supported: cutemla implements dense decode over a bfloat16/float16 "
            "k_cache only (FP8 KV cache is not implemented yet)"
        )
    sparse_args = {
        "indices": indices,
        "attn_sink": attn_sink,
        "extra_k_cache": extra_k_cache,
        "extra_indices_in_kvcache": extra_indices_in_kvcache,
        "topk_length": topk_length,
        "extra_topk_length": extra_topk_length,
    }
    given = [name for name, value in sparse_args.items() if value is not None]
    if given:
        raise NotImplementedError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not supported: cutemla implements dense "
            "decode only (sparse / DSA decode is not implemented yet); pass None"
        )


# ----------------------------------------------------------------------------------------------------------
# Structural checks (cached)


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _layout_key(t: torch.Tensor) -> tuple:
    # torch.Size is a tuple subclass: hashable and equal to plain tuples, so no conversion is needed.
    return (t.shape, t.stride(), t.dtype, t.device)


def _require_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def validate_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v) -> DecodeShape:
    """Check the tensors of ``flash_mla_with_kvcache`` and return their sizes. Cheap; no device sync."""
    if not (type(head_dim_v) is int and isinstance(q, torch.Tensor) and isinstance(k_cache, torch.Tensor)
            and isinstance(block_table, torch.Tensor) and isinstance(cache_seqlens, torch.Tensor)):
        _require_tensor("q", q)  # the slow path names the argument that is off
        _require_tensor("k_cache", k_cache)
        _require_tensor("block_table", block_table)
        _require_tensor("cache_seqlens", cache_seqlens)
        head_dim_v = _require_int("head_dim_v", head_dim_v)
    # The layout keys inline (_layout_key's calls cost ~0.1 us each on this hot path).
    return _check_decode_structure(
        (q.shape, q.stride(), q.dtype, q.device), (k_cache.shape, k_cache.stride(), k_cache.dtype, k_cache.device),
        (block_table.shape, block_table.stride(), block_table.dtype, block_table.device),
        (cache_seqlens.shape, cache_seqlens.stride(), cache_seqlens.dtype, cache_seqlens.device), head_dim_v)


@functools.lru_cache(maxsize=512)
def _check_decode_structure(q_key, k_key, bt_key, sl_key, head_dim_v: int) -> DecodeShape:
    q_shape, q_stride, q_dtype, q_device = q_key
    k_shape, k_stride, k_dtype, k_device = k_key
    bt_shape, bt_stride, bt_dtype, bt_device = bt_key
    sl_shape, sl_stride, sl_dtype, sl_device = sl_key
    q_shape, k_shape, bt_shape, sl_shape = tuple(q_shape), tuple(k_shape), tuple(bt_shape), tuple(sl_shape)

    # dtypes
    if q_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must have dtype {_DTYPE_NAMES}, got {q_dtype}")
    if k_dtype != q_dtype:
        hint = " (an FP8 k_cache is not supported)" if k_dtype in (torch.uint8, torch.int8) or "float8" in str(k_dtype) else ""
        raise TypeError(f"k_cache must have the same dtype as q ({q_dtype}), got {k_dtype}{hint}")
    for name, dtype in (("block_table", bt_dtype), ("cache_seqlens", sl_dtype)):
        if dtype != torch.int32:
            raise TypeError(f"{name} must have dtype torch.int32 (int32 is required), got {dtype}; use {name}.int()")

    # ranks
    if len(q_shape) != 4:
        raise ValueError(f"q must be 4-D [b, s_q, h_q, d], got shape {q_shape}")
    if len(k_shape) != 4:
        raise ValueError(f"k_cache must be 4-D [num_blocks, page_block_size, h_kv, d], got shape {k_shape}")
    if len(bt_shape) != 2:
        raise ValueError(f"block_table must be 2-D [b, max_blocks], got shape {bt_shape}")
    if len(sl_shape) != 1:
        raise ValueError(f"cache_seqlens must be 1-D [b], got shape {sl_shape}")

    # devices
    for name, device in (("k_cache", k_device), ("block_table", bt_device), ("cache_seqlens", sl_device)):
        if device != q_device:
            raise ValueError(f"{name} must be on the same device as q ({q_device}), got {device}")

    # sizes
    b, s_q, h_q, d = q_shape
    num_blocks, page_block_size, h_kv, d_k = k_shape
    if b <= 0:
        raise ValueError(f"q.shape[0] (batch size b) must be > 0, got q shape {q_shape}")
    if s_q < 1:
        raise ValueError(f"q.shape[1] (s_q, query tokens per request) must be >= 1, got q shape {q_shape}")
    if h_q < 1:
        raise ValueError(f"q.shape[2] (h_q) must be >= 1, got q shape {q_shape}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q.shape[-1] (head dim d) must be 512 or 576, got {d}")
    if d_k != d:
        raise ValueError(f"k_cache.shape[-1] (head dim) must equal q.shape[-1] = {d}, got {d_k}")
    if num_blocks < 1:
        raise ValueError(f"k_cache.shape[0] (num_blocks) must be >= 1, got k_cache shape {k_shape}")
    if page_block_size < 1:
        raise ValueError(f"k_cache.shape[1] (page_block_size) must be >= 1, got k_cache shape {k_shape}")
    if h_kv < 1:
        raise ValueError(f"k_cache.shape[2] (h_kv) must be >= 1, got k_cache shape {k_shape}")
    if h_q % h_kv != 0:
        raise ValueError(f"q.shape[2] (h_q = {h_q}) must be a multiple of k_cache.shape[2] (h_kv = {h_kv})")
    if head_dim_v != SUPPORTED_HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {SUPPORTED_HEAD_DIM_V}, got {head_dim_v}")
    if bt_shape[0] != b:
        raise ValueError(f"block_table.shape[0] must equal the batch size b = q.shape[0] = {b}, got shape {bt_shape}")
    if sl_shape[0] != b:
        raise ValueError(f"cache_seqlens must have shape [b] = [{b}] (b = q.shape[0]), got shape {sl_shape}")

    # layouts: only the last dimension must be dense; other strides are free.
    for name, shape, stride in (("q", q_shape, q_stride), ("k_cache", k_shape, k_stride),
                                ("block_table", bt_shape, bt_stride)):
        if shape[-1] > 1 and stride[-1] != 1:
            raise ValueError(
                f"{name} must have a contiguous last dimension ({name}.stride(-1) == 1), got strides {stride}"
            )
    if b > 1 and sl_stride[0] != 1:
        raise ValueError(f"cache_seqlens must be contiguous, got stride {sl_stride}; use cache_seqlens.contiguous()")

    return DecodeShape(b, s_q, h_q, d, num_blocks, page_block_size, h_kv, bt_shape[1])


def validate_kernel_inputs(shape: DecodeShape, q: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Extra limits of the CuTe DSL kernel (the PyTorch reference path does not need them).

    k_cache is read by TMA straight from the caller's memory, so it needs a 16-byte aligned base and 16-byte
    multiple strides. q has no such limit here: the launcher copies a misaligned q (it is small).
    """
    _check_kernel_structure(shape.page_block_size, _layout_key(k_cache))
    misalignment = k_cache.data_ptr() % KERNEL_ALIGN_BYTES
    if misalignment:
        raise ValueError(
            f"k_cache must start at a {KERNEL_ALIGN_BYTES}-byte aligned address for the CuTe DSL kernel "
            f"(TMA), got data_ptr % {KERNEL_ALIGN_BYTES} = {misalignment}"
        )


@functools.lru_cache(maxsize=256)
def _check_kernel_structure(page_block_size: int, k_key) -> None:
    if page_block_size != KERNEL_PAGE_BLOCK_SIZE:
        raise ValueError(
            f"k_cache.shape[1] (page_block_size) must be {KERNEL_PAGE_BLOCK_SIZE} for the CuTe DSL kernel, got "
            f"{page_block_size} (the PyTorch reference path, CUTEMLA_BACKEND=reference, accepts any page size)"
        )
    shape, stride, dtype, _device = k_key
    elems = KERNEL_ALIGN_BYTES // dtype.itemsize
    if any(n > 1 and s % elems for n, s in zip(shape[:-1], stride[:-1])):
        raise ValueError(
            f"k_cache strides must be multiples of {elems} elements ({KERNEL_ALIGN_BYTES} bytes) for the CuTe "
            f"DSL kernel (TMA), except the last; got strides {stride}"
        )


def validate_sched_tensors(tile_scheduler_metadata, num_splits, b: int, device: torch.device) -> None:
    """Check old-style metadata tensors: ``[num_sm_parts, 8]`` int32 and ``[b + 1]`` int32 on q's device."""
    _require_tensor("tile_scheduler_metadata", tile_scheduler_metadata)
    _require_tensor("num_splits", num_splits)
    _check_sched_structure(
        _layout_key(tile_scheduler_metadata), tile_scheduler_metadata.is_contiguous(),
        _layout_key(num_splits), num_splits.is_contiguous(), b, device,
    )


@functools.lru_cache(maxsize=256)
def _check_sched_structure(meta_key, meta_contig: bool, splits_key, splits_contig: bool, b: int, device) -> None:
    for name, (shape, _stride, dtype, dev), contig in (("tile_scheduler_metadata", meta_key, meta_contig),
                                                      ("num_splits", splits_key, splits_contig)):
        if dtype != torch.int32:
            raise TypeError(f"{name} must have dtype torch.int32, got {dtype}")
        if dev != device:
            raise ValueError(f"{name} must be on the same device as q ({device}), got {dev}")
        if not contig:
            raise ValueError(f"{name} must be contiguous")
    meta_shape, splits_shape = tuple(meta_key[0]), tuple(splits_key[0])
    if len(meta_shape) != 2 or meta_shape[1] != SCHED_META_ROW_WORDS or meta_shape[0] < 1:
        raise ValueError(
            f"tile_scheduler_metadata must have shape [num_sm_parts >= 1, {SCHED_META_ROW_WORDS}] "
            f"(from get_mla_metadata), got {meta_shape}"
        )
    if splits_shape != (b + 1,):
        raise ValueError(f"num_splits must have shape [b + 1] = [{b + 1}] (b = q.shape[0]), got {splits_shape}")


def validate_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
                           is_fp8_kvcache=False, topk=None) -> tuple[int, int, int]:
    """Check old-style ``get_mla_metadata`` arguments; return ``(s_q, h_q, h_kv)`` for the scheduler.

    ``num_q_tokens_per_head_k`` is ``s_q * h_q // h_kv``. Without ``num_heads_q`` the split into s_q and h_q
    is unknown, but the scheduler only depends on their product, so it is folded as ``s_q = 1``.
    """
    check_dense_only(is_fp8_kvcache=is_fp8_kvcache, indices=None)
    if topk is not None:
        raise NotImplementedError(
            "topk is not supported: cutemla implements dense decode only (sparse / DSA decode is not "
            "implemented yet); pass topk=None"
        )
    _require_tensor("cache_seqlens", cache_seqlens)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(
            f"cache_seqlens must have dtype torch.int32 (int32 is required), got {cache_seqlens.dtype}; "
            "use cache_seqlens.int()"
        )
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] < 1:
        raise ValueError(f"cache_seqlens must be 1-D [b] with b > 0, got shape {tuple(cache_seqlens.shape)}")
    if not cache_seqlens.is_contiguous():
        raise ValueError("cache_seqlens must be contiguous; use cache_seqlens.contiguous()")
    tokens = _require_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    h_kv = _require_int("num_heads_k", num_heads_k)
    if tokens < 1:
        raise ValueError(f"num_q_tokens_per_head_k (s_q * h_q // h_kv) must be a positive int, got {tokens}")
    if h_kv < 1:
        raise ValueError(f"num_heads_k must be a positive int, got {h_kv}")
    if num_heads_q is None:
        return 1, tokens * h_kv, h_kv
    h_q = _require_int("num_heads_q", num_heads_q)
    if h_q < 1 or h_q % h_kv:
        raise ValueError(f"num_heads_q must be a positive multiple of num_heads_k = {h_kv}, got {h_q}")
    if (tokens * h_kv) % h_q:
        raise ValueError(
            f"num_q_tokens_per_head_k ({tokens}) must equal s_q * num_heads_q // num_heads_k for an integer s_q; "
            f"with num_heads_q = {h_q} and num_heads_k = {h_kv} it is not a multiple of {h_q // h_kv}"
        )
    return (tokens * h_kv) // h_q, h_q, h_kv


def check_softmax_scale(softmax_scale, d: int) -> float:
    if softmax_scale is None:
        return d ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None (None means d ** -0.5), got {type(softmax_scale).__name__}")
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return softmax_scale


def check_causal(causal) -> bool:
    if causal is True or causal is False:
        return causal
    if isinstance(causal, int) and causal in (0, 1):
        return bool(causal)
    raise TypeError(f"causal must be a bool, got {causal!r}")


# ----------------------------------------------------------------------------------------------------------
# Value checks (debug only: they sync with the device)

_debug_override: Optional[bool] = None


def set_debug(enabled: Optional[bool] = True) -> None:
    """Turn the value checks of every call on or off; ``None`` goes back to the ``CUTEMLA_DEBUG`` env var.

    The checks copy ``cache_seqlens`` and ``block_table`` to the host (a device sync per call), so they are
    off by default and must stay off while capturing CUDA graphs.
    """
    global _debug_override
    _debug_override = None if enabled is None else bool(enabled)


def debug_enabled() -> bool:
    if _debug_override is not None:
        return _debug_override
    return env_get("CUTEMLA_DEBUG") not in (None, "", "0")


def debug_checks(q, k_cache, block_table, cache_seqlens, num_splits=None, tile_scheduler_metadata=None) -> None:
    """Value checks that need a host sync: lengths within the block table, page ids within k_cache.

    Only the block-table entries a request needs (``ceil(cache_seqlens[i] / page_block_size)``) are checked;
    the rest may hold garbage, as in FlashMLA. With old-style metadata, pass ``tile_scheduler_metadata`` too:
    it is then checked against the current lengths (``cutemla.schedule.validate_metadata``), which catches
    metadata reused after ``cache_seqlens`` changed the page count of a request.
    """
    num_blocks, page = k_cache.shape[0], k_cache.shape[1]
    max_blocks = block_table.shape[1]
    seqlens = cache_seqlens.detach().to("cpu", torch.int64)
    negative = (seqlens < 0).nonzero()
    if negative.numel():
        i = int(negative[0, 0])
        raise ValueError(f"cache_seqlens[{i}] = {int(seqlens[i])} is negative; lengths must be >= 0")
    capacity = max_blocks * page
    too_long = (seqlens > capacity).nonzero()
    if too_long.numel():
        i = int(too_long[0, 0])
        raise ValueError(
            f"cache_seqlens[{i}] = {int(seqlens[i])} exceeds the block table capacity "
            f"block_table.shape[1] * page_block_size = {max_blocks} * {page} = {capacity}"
        )
    needed = (seqlens + page - 1) // page
    table = block_table.detach().to("cpu", torch.int64)
    used = torch.arange(max_blocks)[None, :] < needed[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    where = bad.nonzero()
    if where.numel():
        i, j = int(where[0, 0]), int(where[0, 1])
        raise ValueError(
            f"block_table[{i}, {j}] = {int(table[i, j])} is not a page id in [0, num_blocks = {num_blocks}) "
            f"but request {i} needs it (cache_seqlens[{i}] = {int(seqlens[i])})"
        )
    if num_splits is not None:
        splits = num_splits.detach().to("cpu", torch.int64)
        steps = splits[1:] - splits[:-1]
        if int(splits[0]) != 0 or bool((steps < 1).any()):
            raise ValueError(
                "num_splits must start at 0 and increase by >= 1 per request (an exclusive prefix sum of splits "
                f"from get_mla_metadata), got {splits.tolist()}"
            )
        if tile_scheduler_metadata is not None:
            from cutemla.schedule import validate_metadata  # lazy: validation stays import-light

            try:
                # Flags (words 5, 6) are FlashMLA's bookkeeping the kernel does not read; custom policies may differ.
                # Blocks are counted in the scheduler's 64-token blocks whatever the page size (the reference path).
                validate_metadata(tile_scheduler_metadata, num_splits, seqlens, check_flags=False)
            except ValueError as exc:
                raise ValueError(
                    f"tile_scheduler_metadata / num_splits do not fit the current cache_seqlens ({exc}): your input "
                    "arguments are inconsistent with the metadata; call get_mla_metadata(cache_seqlens, ...) again "
                    "after the lengths change"
                ) from None
