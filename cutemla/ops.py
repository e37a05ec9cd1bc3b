"""PyTorch custom ops for MLA decode and its scheduler, for ``torch.compile`` and low-overhead eager calls.

Two ops live in the ``cutemla`` namespace:

* ``torch.ops.cutemla.mla_decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
  softmax_scale, causal) -> (out, lse)``: the dense paged decode (the CuTe DSL kernel on an sm90 GPU, else the
  PyTorch reference).
* ``torch.ops.cutemla.sched_meta(cache_seqlens, s_q, h_q, h_kv, num_sms) -> (meta, num_splits)``: FlashMLA's
  split-KV schedule (``cutemla.schedule.get_decoding_sched_meta``).

Both return fresh tensors (``mutates_args=()``) and have fakes computed from shapes and ints only, so
``torch.compile(fullgraph=True)`` traces through them without running anything.

The public wrappers :func:`mla_decode` and :func:`sched_meta` go through the dispatcher only while
``torch.compile`` traces (``torch.compiler.is_compiling()``); in eager mode they call the implementation
directly. The dispatcher adds tens of microseconds per call (quack measured ~60 us on H100), which is more
than the decode kernel itself at small batch; a compiled graph or a CUDA graph replay pays it zero times.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from cutemla.reference import mla_decode_reference
from cutemla.validation import (
    SCHED_META_ROW_WORDS,
    SUPPORTED_HEAD_DIM_V,
    check_causal,
    check_softmax_scale,
    validate_decode_inputs,
    validate_sched_tensors,
)

__all__ = ["mla_decode", "sched_meta", "default_num_sms"]

D_V = SUPPORTED_HEAD_DIM_V


# ----------------------------------------------------------------------------------------------------------
# Implementations (what the ops run; the eager wrappers call these directly)


def _uses_kernel(device: torch.device) -> bool:
    # Same choice (and CUTEMLA_BACKEND override, and warn-once fallback) as flash_mla_with_kvcache; cached per
    # (mode, device), so this is a dict lookup after the first call.
    from cutemla.interface import KERNEL, _select_backend

    return _select_backend(device) == KERNEL


def _mla_decode_impl(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                     softmax_scale: float, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if _uses_kernel(q.device):
        from cutemla import kernels

        return kernels.run_dense_decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                                        num_splits, softmax_scale, causal)
    return mla_decode_reference(q, k_cache, block_table, cache_seqlens, D_V, softmax_scale, causal)


def default_num_sms(device) -> int:
    """SMs the schedule fills on ``device``: the CUDA device's count, else 132 (an H100 SXM)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _num_sms_of(device)


@functools.lru_cache(maxsize=None)
def _num_sms_of(device: torch.device) -> int:  # cached: get_device_properties costs microseconds
    from cutemla.schedule import DEFAULT_NUM_SMS

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def _sched_meta_impl(cache_seqlens, s_q: int, h_q: int, h_kv: int, num_sms: int):
    from cutemla.schedule import get_decoding_sched_meta

    device = cache_seqlens.device
    if device.type == "cuda" and not _uses_kernel(device):
        # Not an sm90 GPU: the scheduler kernel may not run there, so plan on the host (a sync) and copy back.
        meta, splits = get_decoding_sched_meta(cache_seqlens.cpu(), s_q, h_q, h_kv, num_sms=num_sms)
        return meta.to(device), splits.to(device)
    return get_decoding_sched_meta(cache_seqlens, s_q, h_q, h_kv, num_sms=num_sms)


# ----------------------------------------------------------------------------------------------------------
# Ops and fakes


@torch.library.custom_op("cutemla::mla_decode", mutates_args=())
def _mla_decode_op(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                   cache_seqlens: torch.Tensor, tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor,
                   softmax_scale: float, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _mla_decode_impl(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                            softmax_scale, causal)


@_mla_decode_op.register_fake
def _mla_decode_fake(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                     softmax_scale, causal):
    if q.dim() != 4:
        raise ValueError(f"q must be [b, s_q, h_q, d], got shape {tuple(q.shape)}")
    b, s_q, h_q, _ = q.shape
    out = q.new_empty((b, s_q, h_q, D_V))
    lse = q.new_empty((b, h_q, s_q), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("cutemla::sched_meta", mutates_args=())
def _sched_meta_op(cache_seqlens: torch.Tensor, s_q: int, h_q: int, h_kv: int,
                   num_sms: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _sched_meta_impl(cache_seqlens, s_q, h_q, h_kv, num_sms)


@_sched_meta_op.register_fake
def _sched_meta_fake(cache_seqlens, s_q, h_q, h_kv, num_sms):
    from cutemla.schedule import num_sm_parts

    parts = num_sm_parts(num_sms, s_q, h_q, h_kv)  # ints only: the grid size never depends on the lengths
    meta = cache_seqlens.new_empty((parts, SCHED_META_ROW_WORDS), dtype=torch.int32)
    splits = cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,), dtype=torch.int32)
    return meta, splits


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def mla_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               meta: torch.Tensor, num_splits: torch.Tensor, softmax_scale: Optional[float] = None,
               causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode with precomputed metadata; ``torch.compile``-friendly (fullgraph) and cheap in eager.

    Same tensors and results as ``flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, meta,
    num_splits, softmax_scale, causal)`` with the old-style metadata from :func:`sched_meta` (or
    ``get_mla_metadata(cache_seqlens, ...)``): ``out [b, s_q, h_q, 512]`` in q's dtype, ``lse [b, h_q, s_q]``
    fp32. Eager calls run the structural checks of ``flash_mla_with_kvcache`` (cached by layout, no sync)
    and call the implementation without the dispatcher; while compiling, the call becomes one
    ``torch.ops.cutemla.mla_decode`` node and only the fake's shape logic runs at trace time.
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        causal = bool(causal) and q.shape[1] > 1
        return torch.ops.cutemla.mla_decode(q, k_cache, block_table, cache_seqlens, meta, num_splits,
                                            float(softmax_scale), causal)
    shape = validate_decode_inputs(q, k_cache, block_table, cache_seqlens, D_V)
    softmax_scale = check_softmax_scale(softmax_scale, shape.d)
    causal = check_causal(causal) and shape.s_q > 1
    validate_sched_tensors(meta, num_splits, shape.b, q.device)
    return _mla_decode_impl(q, k_cache, block_table, cache_seqlens, meta, num_splits, softmax_scale, causal)


def sched_meta(cache_seqlens: torch.Tensor, s_q: int, h_q: int, h_kv: int,
               num_sms: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])`` for one decode step.

    ``s_q`` queries per request, ``h_q`` query heads, ``h_kv`` KV heads; ``num_sms`` defaults to the device's
    SM count (132 on CPU). Shares one schedule across every layer of the step. No host sync on an sm90 GPU.
    """
    if num_sms is None:
        num_sms = default_num_sms(cache_seqlens.device)
    if torch.compiler.is_compiling():
        return torch.ops.cutemla.sched_meta(cache_seqlens, s_q, h_q, h_kv, num_sms)
    return _sched_meta_impl(cache_seqlens, s_q, h_q, h_kv, num_sms)
