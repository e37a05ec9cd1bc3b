"""FlashMLA-compatible entry points: ``get_mla_metadata`` and ``flash_mla_with_kvcache`` (dense decode).

Both FlashMLA call styles work:

* New (FlashMLA >= Jan 2026): ``sched_meta, _ = get_mla_metadata()`` returns an empty
  :class:`FlashMLASchedMeta`; the first ``flash_mla_with_kvcache(..., sched_meta)`` computes the split-KV
  schedule on the device and caches it; later calls (other layers of the same step) reuse it and check that
  their configuration matches.
* Old (FlashMLA <= Sep 2025, SGLang): ``meta, num_splits = get_mla_metadata(cache_seqlens,
  s_q * h_q // h_kv, h_kv)`` returns the two int32 tensors, passed back as
  ``flash_mla_with_kvcache(..., meta, num_splits)``.

Backend: the CuTe DSL kernel when it can run on the tensors' device (an sm90 GPU), otherwise the PyTorch
reference (``cutemla.reference``) with a one-time warning. ``CUTEMLA_BACKEND=auto|reference|kernel`` overrides
the choice; ``kernel`` raises instead of falling back, and on an sm90 device a kernel that fails to load
always raises. The kernel path does no host sync and no data-dependent allocation, so it can be captured in a
CUDA graph.
"""
from __future__ import annotations

import dataclasses
import importlib
import operator
import warnings
from typing import Optional, Tuple, Union

import torch

from cutemla import kernels  # torch-side launchers only: cutlass loads with the first kernel call
from cutemla._env import env_get
from cutemla.reference import mla_decode_reference
from cutemla.validation import (
    check_causal,
    check_dense_only,
    check_softmax_scale,
    debug_checks,
    debug_enabled,
    validate_decode_inputs,
    validate_kernel_inputs,
    validate_metadata_args,
    validate_sched_tensors,
)

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache", "active_backend"]

KERNEL = "kernel"
REFERENCE = "reference"
BACKEND_MODES = ("auto", REFERENCE, KERNEL)


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Split-KV schedule of one decode step, filled by the first ``flash_mla_with_kvcache`` that uses it.

    Reuse it across calls (e.g. all layers of a step) only while the shapes and the *values* of
    ``cache_seqlens`` stay the same; the shapes are checked (``config``), the values only in debug mode.
    """

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]
        extra_page_block_size: Optional[int] = None
        extra_topk: Optional[int] = None

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None  # int32 [num_sm_parts, 8]
    num_splits: Optional[torch.Tensor] = None  # int32 [b + 1]
    # Host copy of cache_seqlens at fill time, kept only in debug mode to catch reuse after the values changed.
    _debug_seqlens: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False, compare=False)


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(FlashMLASchedMeta.Config))
_config_values = operator.attrgetter(*_CONFIG_FIELDS)  # one C call instead of a generator of getattr (~2 us)
_CONFIG_SOURCES = {
    "b": "q.shape[0] (batch size)",
    "s_q": "q.shape[1] (s_q)",
    "h_q": "q.shape[2] (h_q)",
    "page_block_size": "k_cache.shape[1] (page_block_size)",
    "h_k": "k_cache.shape[2] (h_kv)",
    "causal": "causal (after s_q == 1 turns it off)",
    "is_fp8_kvcache": "is_fp8_kvcache",
    "topk": "indices.shape[-1] (topk)",
    "extra_page_block_size": "extra_k_cache.shape[1]",
    "extra_topk": "extra_indices_in_kvcache.shape[-1]",
}


# ----------------------------------------------------------------------------------------------------------
# Backend selection


_backend_by_key: dict = {}
_fallback_warned = False


def _reset_backend_state() -> None:
    """Forget cached backend choices and the warn-once flag (for tests)."""
    global _fallback_warned
    _backend_by_key.clear()
    _fallback_warned = False


def _is_sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _unavailable_reason(kernels, device: torch.device) -> str:
    explain = getattr(kernels, "unavailable_reason", None)
    if explain is not None:
        reason = explain(device)
        if reason:
            return str(reason)
    if device.type != "cuda":
        return "not a CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"compute capability sm_{major}{minor}; the kernels need sm_90"
    return "cutemla.kernels.kernels_available() returned False"


def _resolve_backend(mode: str, device: torch.device) -> str:
    global _fallback_warned
    normalized = mode.strip().lower()
    if normalized not in BACKEND_MODES:
        raise ValueError(f"CUTEMLA_BACKEND must be one of {', '.join(BACKEND_MODES)}; got {mode!r}")
    if normalized == REFERENCE:
        return REFERENCE
    try:
        kernels = importlib.import_module("cutemla.kernels")
        available = bool(kernels.kernels_available(device))
        reason = None if available else _unavailable_reason(kernels, device)
    except Exception as exc:
        # On Hopper a broken kernel build is a bug to surface, never a silent 100x slowdown.
        if normalized == KERNEL or _is_sm90(device):
            raise RuntimeError(f"cutemla: the CuTe DSL kernel failed to load on {device}: {exc!r}") from exc
        available, reason = False, f"loading cutemla.kernels failed: {exc!r}"
    if available:
        return KERNEL
    if normalized == KERNEL:
        raise RuntimeError(
            f"cutemla: CUTEMLA_BACKEND=kernel but the CuTe DSL kernel is unavailable on {device} ({reason}); "
            "unset CUTEMLA_BACKEND (or set it to auto or reference) to use the PyTorch reference path"
        )
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"cutemla: CuTe DSL kernel unavailable on {device} ({reason}); using the PyTorch reference path "
            "(slow; set CUTEMLA_BACKEND=reference to silence this warning)",
            RuntimeWarning,
            stacklevel=4,
        )
    return REFERENCE


def _select_backend(device: torch.device) -> str:
    mode = env_get("CUTEMLA_BACKEND") or "auto"  # read per call: tests and tools switch it at run time
    key = (mode, device)
    backend = _backend_by_key.get(key)
    if backend is None:
        backend = _resolve_backend(mode, device)
        _backend_by_key[key] = backend
    return backend


def active_backend(device: Union[torch.device, str, None] = None) -> str:
    """``"kernel"`` or ``"reference"``: what ``flash_mla_with_kvcache`` uses for tensors on ``device``."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _select_backend(device)


# ----------------------------------------------------------------------------------------------------------
# Metadata


def _schedule(cache_seqlens: torch.Tensor, s_q: int, h_q: int, h_kv: int, backend: str):
    """``(tile_scheduler_metadata, num_splits)`` on ``cache_seqlens.device``.

    The kernel path runs the scheduler on the device (no sync). The reference path does not need the schedule
    but fills it for the same observable behaviour; it plans on the host (sized for the device's SM count) so
    that it never touches the CuTe DSL, which may not run there.
    """
    from cutemla.schedule import get_decoding_sched_meta

    device = cache_seqlens.device
    if backend == KERNEL or device.type == "cpu":
        return get_decoding_sched_meta(cache_seqlens, s_q, h_q, h_kv)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    meta, num_splits = get_decoding_sched_meta(cache_seqlens.cpu(), s_q, h_q, h_kv, num_sms=num_sms)
    return meta.to(device), num_splits.to(device)


def _old_style_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
                        is_fp8_kvcache=False, topk=None) -> Tuple[torch.Tensor, torch.Tensor]:
    s_q, h_q, h_kv = validate_metadata_args(
        cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q, is_fp8_kvcache, topk)
    return _schedule(cache_seqlens, s_q, h_q, h_kv, _select_backend(cache_seqlens.device))


def get_mla_metadata(*args, **kwargs):
    """FlashMLA's ``get_mla_metadata``, in both of its historical forms.

    * ``get_mla_metadata()`` (any non-tensor arguments are ignored, as in FlashMLA) returns
      ``(FlashMLASchedMeta(), None)``; the first ``flash_mla_with_kvcache`` call fills the object.
    * ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
      is_fp8_kvcache=False, topk=None)`` with an int32 ``cache_seqlens`` tensor returns
      ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])`` on its device, where
      ``num_q_tokens_per_head_k = s_q * h_q // h_kv``.
    """
    cache_seqlens = args[0] if args else kwargs.get("cache_seqlens")
    if isinstance(cache_seqlens, torch.Tensor):
        return _old_style_metadata(*args, **kwargs)
    return FlashMLASchedMeta(), None


def _check_config(sched_meta: FlashMLASchedMeta, current: tuple) -> None:
    config = sched_meta.config
    if config is None:
        raise ValueError("tile_scheduler_metadata (FlashMLASchedMeta) says have_initialized but has no config")
    stored = _config_values(config)
    if stored == current:
        return
    for name, old, new in zip(_CONFIG_FIELDS, stored, current):
        if old != new:
            raise ValueError(
                f"sched_meta.config.{name} = {old!r} but {_CONFIG_SOURCES[name]} is {new!r}: your input arguments "
                "are inconsistent with sched_meta (tile_scheduler_metadata). Reuse a FlashMLASchedMeta only for "
                "calls with the same shapes and cache_seqlens; call get_mla_metadata() again for a new one."
            )


def _lazy_schedule(sched_meta: FlashMLASchedMeta, shape, causal: bool, cache_seqlens: torch.Tensor,
                   backend: str, debug: bool):
    current = (shape.b, shape.s_q, shape.h_q, shape.page_block_size, shape.h_kv, causal, False, None, None, None)
    if sched_meta.have_initialized:
        _check_config(sched_meta, current)
        meta, num_splits = sched_meta.tile_scheduler_metadata, sched_meta.num_splits
        if meta is None or num_splits is None:
            raise ValueError("tile_scheduler_metadata (FlashMLASchedMeta) is initialized but holds no tensors")
        if meta.device != cache_seqlens.device:
            raise ValueError(
                f"sched_meta was filled on {meta.device} but the inputs are on {cache_seqlens.device}: "
                "your input arguments are inconsistent with sched_meta"
            )
        if debug and sched_meta._debug_seqlens is not None:
            if not torch.equal(sched_meta._debug_seqlens, cache_seqlens.detach().cpu()):
                raise ValueError(
                    "cache_seqlens values changed since sched_meta was filled: your input arguments are "
                    "inconsistent with sched_meta; call get_mla_metadata() again after the lengths change"
                )
        return meta, num_splits
    meta, num_splits = _schedule(cache_seqlens, shape.s_q, shape.h_q, shape.h_kv, backend)
    sched_meta.config = FlashMLASchedMeta.Config(*current)
    sched_meta.tile_scheduler_metadata = meta
    sched_meta.num_splits = num_splits
    sched_meta._debug_seqlens = cache_seqlens.detach().cpu().clone() if debug else None
    sched_meta.have_initialized = True
    return meta, num_splits


# ----------------------------------------------------------------------------------------------------------
# Decode


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: Union[FlashMLASchedMeta, torch.Tensor],
    num_splits: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices_in_kvcache: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode attention, a drop-in for FlashMLA's dense ``flash_mla_with_kvcache``.

    Args:
        q: ``[b, s_q, h_q, d]`` bfloat16 or float16, ``d`` in {512, 576}; last dimension contiguous.
        k_cache: ``[num_blocks, page_block_size, h_kv, d]``, q's dtype; ``k_cache[..., :512]`` is V.
            The kernel needs ``page_block_size == 64``; the reference path takes any size.
        block_table: ``[b, max_blocks]`` int32 page ids; entries past a request's needed pages are never read.
        cache_seqlens: ``[b]`` int32 token counts (0 allowed), contiguous.
        head_dim_v: must be 512.
        tile_scheduler_metadata: a :class:`FlashMLASchedMeta` from ``get_mla_metadata()`` (then ``num_splits``
            must be None), or the old-style int32 ``[num_sm_parts, 8]`` tensor.
        num_splits: the old-style int32 ``[b + 1]`` tensor, or None with a ``FlashMLASchedMeta``.
        softmax_scale: defaults to ``d ** -0.5``.
        causal: bottom-right aligned causal mask over the s_q queries; ignored when ``s_q == 1``.
        is_fp8_kvcache, indices, attn_sink, topk_length: FlashMLA's sparse (top-k) decode over the FP8 cache,
            used when ``is_fp8_kvcache=True`` and ``indices`` is given (``k_cache`` then holds 656-byte FP8
            tokens; see :mod:`cutemla.sparse_interface`). ``is_fp8_kvcache=True`` without ``indices`` is dense
            decode over that cache (bf16 q; a cutemla extension). Sparse decode over a bf16 cache and
            ``extra_k_cache`` / ``extra_indices_in_kvcache`` / ``extra_topk_length`` raise NotImplementedError.

    Returns:
        ``(out, lse)``: ``out [b, s_q, h_q, 512]`` in q's dtype and ``lse [b, h_q, s_q]`` float32 (natural log).
        A row with no key to attend gets ``out = 0`` and ``lse = +inf``.
    """
    if is_fp8_kvcache is True:
        # Decode over the 656-byte FP8 cache, sparse (indices) or dense: cutemla/sparse_interface.py.
        from cutemla import sparse_interface

        if indices is not None:
            return sparse_interface.flash_mla_sparse_fp8(
                q, k_cache, indices, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale,
                check_causal(causal), attn_sink, topk_length, extra_k_cache, extra_indices_in_kvcache,
                extra_topk_length)
        return sparse_interface.flash_mla_dense_fp8(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
            softmax_scale, check_causal(causal), attn_sink, topk_length, extra_k_cache, extra_indices_in_kvcache,
            extra_topk_length)
    check_dense_only(is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache,
                     topk_length, extra_topk_length)
    shape = validate_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v)
    softmax_scale = check_softmax_scale(softmax_scale, shape.d)
    causal = check_causal(causal) and shape.s_q > 1
    backend = _select_backend(q.device)
    if backend == KERNEL:
        validate_kernel_inputs(shape, q, k_cache)
    debug = debug_enabled()

    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError(
                "num_splits must be None when tile_scheduler_metadata is a FlashMLASchedMeta (new-style "
                "get_mla_metadata()); pass the num_splits tensor only with the old-style metadata tensor"
            )
        if debug:  # before scheduling, which would trip over bad lengths with a less precise message
            debug_checks(q, k_cache, block_table, cache_seqlens)
        meta, num_splits = _lazy_schedule(tile_scheduler_metadata, shape, causal, cache_seqlens, backend, debug)
    elif isinstance(tile_scheduler_metadata, torch.Tensor):
        if num_splits is None:
            raise ValueError(
                "num_splits is required with a tile_scheduler_metadata tensor (old-style get_mla_metadata("
                "cache_seqlens, ...) returns both); or use sched_meta, _ = get_mla_metadata()"
            )
        validate_sched_tensors(tile_scheduler_metadata, num_splits, shape.b, q.device)
        meta = tile_scheduler_metadata
        if debug:
            debug_checks(q, k_cache, block_table, cache_seqlens, num_splits=num_splits,
                         tile_scheduler_metadata=tile_scheduler_metadata)
    else:
        raise TypeError(
            "tile_scheduler_metadata must be a FlashMLASchedMeta (from get_mla_metadata()) or an int32 "
            f"[num_sm_parts, 8] tensor (from get_mla_metadata(cache_seqlens, ...)), got "
            f"{type(tile_scheduler_metadata).__name__}"
        )

    if backend == KERNEL:
        return kernels.run_dense_decode(q, k_cache, block_table, cache_seqlens, meta, num_splits,
                                        softmax_scale, causal)
    return mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
