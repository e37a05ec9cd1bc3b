"""Split-KV scheduling for MLA decode: FlashMLA's tile-scheduler metadata, bit-exact.

``get_decoding_sched_meta(cache_seqlens, s_q, h_q, h_kv)`` returns ``(tile_scheduler_metadata [num_sm_parts, 8],
num_splits [b + 1])`` (int32, on ``cache_seqlens.device``). The contract the decode kernel relies on is in
``cutemla.schedule.policy``'s docstring; ``validate_metadata`` checks it. Swap the policy to experiment with
other schedules: the decode kernel only consumes the metadata.
"""
from __future__ import annotations

import functools

import torch

from .policy import (
    BLOCK_SIZE_M,
    FLASHMLA_POLICY,
    SchedulePolicy,
    plan_python,
    validate_metadata,
)
from .reference_impl import META_WORDS, flashmla_plan

# SM count assumed for CPU tensors (no device to ask): an H100 SXM.
DEFAULT_NUM_SMS = 132

__all__ = [
    "BLOCK_SIZE_M",
    "DEFAULT_NUM_SMS",
    "FLASHMLA_POLICY",
    "META_WORDS",
    "SchedulePolicy",
    "flashmla_plan",
    "get_decoding_sched_meta",
    "num_sm_parts",
    "plan_python",
    "validate_metadata",
]


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def _device_num_sms(device: torch.device) -> int:  # cached: get_device_properties costs microseconds a call
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


@functools.lru_cache(maxsize=None)
def _device_plan_fn(block_size_n: int, fixed_overhead_num_blocks: int):
    """The compiled device scheduler, looked up once per policy constants (the import and the compile cache's
    key building cost a few us a call)."""
    from .device import get_sched_meta_fn  # imports cutlass: only when needed

    return get_sched_meta_fn(block_size_n, fixed_overhead_num_blocks)


def num_sm_parts(num_sms: int, s_q: int, h_q: int, h_kv: int, policy: SchedulePolicy | None = None) -> int:
    """Number of partitions (decode grid z extent) for this problem under ``policy`` (default FlashMLA's)."""
    if policy is None or policy is FLASHMLA_POLICY:
        return _default_num_sm_parts(num_sms, s_q, h_q, h_kv)
    return _num_sm_parts(num_sms, s_q, h_q, h_kv, policy)


@functools.lru_cache(maxsize=1024, typed=True)
def _default_num_sm_parts(num_sms, s_q, h_q, h_kv) -> int:
    # Cached for the stock policy: a bad argument raises, and exceptions are not cached. typed=True because
    # True == 1 with the same hash, and a bool must still be rejected.
    return _num_sm_parts(num_sms, s_q, h_q, h_kv, FLASHMLA_POLICY)


def _num_sm_parts(num_sms, s_q, h_q, h_kv, policy) -> int:
    for value, name in ((num_sms, "num_sms"), (s_q, "s_q"), (h_q, "h_q"), (h_kv, "h_kv")):
        _check_positive_int(value, name)
    if h_q % h_kv != 0:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    parts = policy.num_sm_parts(num_sms, s_q, h_q, h_kv)
    return _check_positive_int(int(parts), "policy.num_sm_parts(...)")


def get_decoding_sched_meta(
    cache_seqlens: torch.Tensor,
    s_q: int,
    h_q: int,
    h_kv: int,
    *,
    num_sms: int | None = None,
    policy: SchedulePolicy | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV schedule for one decode call: ``(tile_scheduler_metadata, num_splits)``.

    cache_seqlens: int32 ``[b]`` (b >= 1), KV length per request, on CPU or CUDA. s_q, h_q, h_kv: queries per
    request, query heads, KV heads (h_q % h_kv == 0). num_sms: SMs to fill; default: the device's count on CUDA,
    132 (H100 SXM) on CPU. policy: a :class:`SchedulePolicy`, default :data:`FLASHMLA_POLICY`.

    Returns int32 tensors on ``cache_seqlens.device``: ``meta [num_sm_parts, 8]`` (word 7 is 0) and
    ``num_splits [b + 1]``. With the default policy (or any policy that keeps ``SchedulePolicy.plan``) these
    equal FlashMLA's bit for bit.

    On CUDA the stock plan runs as a one-CTA kernel on the current stream: no host sync, safe to capture in a
    CUDA graph (replays recompute the schedule from the buffer's current values). A policy overriding ``plan``
    is computed on the host: the seqlens are copied to the CPU (a sync, not graph-capturable) and the result
    copied back. On CPU everything is computed in Python.
    """
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] < 1:
        raise ValueError(f"cache_seqlens must be 1-D with b >= 1 entries, got shape {tuple(cache_seqlens.shape)}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    policy = policy or FLASHMLA_POLICY
    if not isinstance(policy, SchedulePolicy):
        raise TypeError(f"policy must be a SchedulePolicy, got {type(policy).__name__}")
    device = cache_seqlens.device
    if num_sms is None:
        num_sms = _device_num_sms(device)
    parts = num_sm_parts(num_sms, s_q, h_q, h_kv, policy)
    batch = cache_seqlens.shape[0]

    if device.type == "cuda" and policy.uses_flashmla_plan:
        from cutemla.kernels import needs_device_guard

        seqlens = cache_seqlens.contiguous()
        meta = torch.empty((parts, META_WORDS), dtype=torch.int32, device=device)
        num_splits = torch.empty((batch + 1,), dtype=torch.int32, device=device)
        fn = _device_plan_fn(policy.block_size_n, policy.fixed_overhead_num_blocks)
        # TVM-FFI launches on the current stream of the tensors' device; make that device current too so the
        # launch uses its context (skipped in the common case: it costs a few microseconds).
        if needs_device_guard(device.index):
            with torch.cuda.device(device):
                fn(seqlens, meta, num_splits)
        else:
            fn(seqlens, meta, num_splits)
        return meta, num_splits

    meta, num_splits = policy.plan(cache_seqlens.cpu(), parts)
    meta = torch.as_tensor(meta, dtype=torch.int32)
    num_splits = torch.as_tensor(num_splits, dtype=torch.int32)
    if tuple(meta.shape) != (parts, META_WORDS) or tuple(num_splits.shape) != (batch + 1,):
        raise ValueError(f"policy.plan returned shapes {tuple(meta.shape)} and {tuple(num_splits.shape)}; "
                         f"expected ({parts}, {META_WORDS}) and ({batch + 1},)")
    return meta.to(device), num_splits.to(device)
