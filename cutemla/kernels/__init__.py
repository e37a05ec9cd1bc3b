"""CuTe DSL kernels for sm_90a and their torch-facing launchers.

Importing this package does not import cutlass; the first kernel call does (and compiles, or loads
the compiled object from the disk cache).
"""
from __future__ import annotations

import functools
import math

import torch

from .._env import env_get
from ..layouts.cache import fold_q, lse_rows_view, out_rows_view
from ..layouts.tiles import D_V, PAGE_SIZE

_TORCH_TO_DSL = {torch.bfloat16: "BFloat16", torch.float16: "Float16"}
# The decode kernel's consumer schedule: "pipelined" or "split_s" (kernels/decode.py), or
# "seesaw" (kernels/seesaw.py, d = 576 only).
# CUTEMLA_DECODE_SCHEDULE overrides it for experiments.
DEFAULT_SCHEDULE = "seesaw"
# Blocks ahead of its TMA loads that the producer warms L2 with (CUTEMLA_L2_PREFETCH overrides),
# used only when a KV head has more than one 64-row M tile (h_q * s_q / h_kv > 64): there the CTAs
# of the other M tiles read the same pages, and the H100 A/B (perf/results/2026-11-25-h100-ab.csv)
# showed 1227 vs 1447 us at 128x1x16k h128. With one M tile it only costs: 1058 vs 871 us at h16.
DEFAULT_L2_PREFETCH = 2


def kernels_available(device) -> bool:
    """True when the CuTe DSL decode kernels can run on `device`: an sm90 CUDA device with the DSL."""
    return unavailable_reason(device) is None


def unavailable_reason(device) -> str | None:
    """Why the kernels cannot run on `device`, or None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"compute capability {major}.{minor} is not sm90 (Hopper)"
    try:
        from . import jit  # noqa: F401  (pins the arch before cutlass loads)
        import cutlass  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        return f"the CuTe DSL is not importable ({exc})"
    return None


def _tma_ready(t: torch.Tensor, name: str, copy_ok: bool) -> torch.Tensor:
    """TMA needs a 16-byte-aligned base and 16-byte-multiple strides (the last one is 1).

    Size-1 dims can carry any stride in torch; give them a harmless one so the compiled kernel's
    divisibility check passes. A misaligned q is copied (it is small); a misaligned cache is an error.
    """
    if t.data_ptr() % 16 == 0 and _strides_fit(t.stride(), t.element_size()):
        return t  # the common case: a cached verdict per stride tuple (the generator below costs ~1 us)
    elems = 16 // t.element_size()
    shape, strides = t.shape, t.stride()
    if any(s % elems for s, n in zip(strides[:-1], shape[:-1]) if n > 1) or t.data_ptr() % 16:
        if not copy_ok:
            raise ValueError(f"{name} must have a 16-byte aligned base and 16-byte multiple strides "
                             f"for TMA; got strides {tuple(strides)}")
        # A fresh allocation: .contiguous() would hand back a misaligned but contiguous q as is.
        t = t.clone(memory_format=torch.contiguous_format)
        strides = t.stride()
    if any(n == 1 and s % elems for s, n in zip(strides[:-1], shape[:-1])):
        t = t.as_strided(shape, [s if n > 1 or s % elems == 0 else elems for s, n in zip(strides, shape)])
    return t


@functools.lru_cache(maxsize=1024)
def _strides_fit(strides: tuple, element_size: int) -> bool:
    """Every stride but the last is a multiple of 16 bytes (then no dim, size-1 or not, needs a fix-up)."""
    elems = 16 // element_size
    return all(s % elems == 0 for s in strides[:-1])


_DSL_DTYPES = {}


def _dsl_dtype(dtype: torch.dtype):
    """The cutlass dtype of a torch dtype (cutlass is imported on first use, then looked up)."""
    found = _DSL_DTYPES.get(dtype)
    if found is None:
        import cutlass

        found = _DSL_DTYPES[dtype] = getattr(cutlass, _TORCH_TO_DSL[dtype])
    return found


def decode_variant(d: int, rows: int, schedule: str | None = None) -> tuple[str, int]:
    """(schedule, L2 prefetch blocks) of the decode kernel for head dim d and `rows` folded query
    rows per KV head (s_q * h_q / h_kv). CUTEMLA_DECODE_SCHEDULE / CUTEMLA_L2_PREFETCH override."""
    schedule = schedule or env_get("CUTEMLA_DECODE_SCHEDULE") or DEFAULT_SCHEDULE
    if schedule.startswith("seesaw") and d != 576:
        schedule = "pipelined"  # the seesaw keeps P tiles in the RoPE columns
    # The seesaw (with its EVICT_FIRST K loads) is fastest without L2 prefetch at every batch size
    # (perf/results/2026-11-25-h100-ab-final.csv: at h128, 54.7 vs 60.5 us at 32x2k, 79.9 vs 93.7 at 4x32k).
    default_prefetch = 0 if schedule.startswith("seesaw") or rows <= 64 else DEFAULT_L2_PREFETCH
    prefetch = env_get("CUTEMLA_L2_PREFETCH")
    return schedule, default_prefetch if prefetch is None else int(prefetch)


_LOG2_E = math.log2(math.e)
_launch = None  # (get_decode_fn, combine_kernel_for), imported on first use


def _launch_functions():
    """The kernel modules' entry points, imported once (a function-level import costs ~2 us a call)."""
    global _launch
    if _launch is None:
        from .combine import combine_kernel_for
        from .decode import get_decode_fn

        _launch = (get_decode_fn, combine_kernel_for)
    return _launch


# (dtype, d, b, h_kv, rows, schedule, CUTEMLA_DECODE_SCHEDULE, CUTEMLA_L2_PREFETCH) -> (decode, combine).
# get_decode_fn / combine_kernel_for cost several us a call (imports, key building, the compile cache's lock-free
# lookup); the environment values are part of the key, so changing them between calls still switches variants.
_compiled_launches: dict = {}


def _compiled_pair(dtype, d: int, b: int, h_kv: int, rows: int, schedule):
    key = (dtype, d, b, h_kv, rows, schedule, env_get("CUTEMLA_DECODE_SCHEDULE"), env_get("CUTEMLA_L2_PREFETCH"))
    pair = _compiled_launches.get(key)
    if pair is None:
        if len(_compiled_launches) >= 4096:  # batch sizes are part of the key: bound it for long-running servers
            _compiled_launches.clear()
        get_decode_fn, combine_kernel_for = _launch_functions()
        decode = get_decode_fn(_dsl_dtype(dtype), d, *decode_variant(d, rows, schedule))
        pair = _compiled_launches[key] = (decode, combine_kernel_for(dtype, b, h_kv, rows))
    return pair


def dense_decode_launches(q, kcache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                          softmax_scale, causal, out, lse, o_accum, lse_accum, schedule=None):
    """The two launches of a decode into given buffers: ``(decode, decode_args, combine, combine_args)``.

    ``decode(*decode_args)`` then, unless ``combine`` is None, ``combine(*combine_args)`` run it on the current
    stream. out ``[b, s_q, h_q, 512]`` (q's dtype) and lse fp32 ``[b, h_q, s_q]`` must be contiguous;
    o_accum fp32 ``[>= b + num_sm_parts, h_kv, s_q * h_q / h_kv, 512]`` and lse_accum fp32 ``[same, h_kv,
    rows]`` are the split workspace, contiguous (MLADecoder owns one; prepare_dense_decode allocates one). The
    seesaw writes rows of out and o_accum by bulk copy (kernels/epilogue.py), so their bases must be 16-byte
    aligned, as torch's allocations (and row slices of them) are.
    """
    b, s_q, h_q, d = q.shape
    h_kv = kcache.shape[2]
    assert kcache.shape[1] == PAGE_SIZE
    rows = s_q * (h_q // h_kv)
    decode, combine = _compiled_pair(q.dtype, d, b, h_kv, rows, schedule)
    q_rows = _tma_ready(fold_q(q, h_kv), "q", copy_ok=True)
    kcache = _tma_ready(kcache, "k_cache", copy_ok=False)
    # The buffers are fresh or the decoder's own: contiguous, so no layout fix-ups (launch_combine's).
    decode_args = (q_rows, kcache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                   out_rows_view(out, h_kv), lse_rows_view(lse, h_kv), o_accum, lse_accum,
                   float(softmax_scale) * _LOG2_E, int(bool(causal) and s_q > 1))
    return decode, decode_args, combine, (o_accum, lse_accum, num_splits, out, lse)


def prepare_dense_decode(q, kcache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                         softmax_scale, causal, schedule=None):
    """`dense_decode_launches` into fresh buffers: ``(decode, decode_args, combine, combine_args, out, lse)``.

    Every torch call here costs host time (~2-4 us each on the H100 host), so it makes as few as it can:
    fresh buffers already have the layouts the compiled kernels declare.
    """
    b, s_q, h_q, _ = q.shape
    h_kv = kcache.shape[2]
    rows = s_q * (h_q // h_kv)
    max_splits = b + tile_scheduler_metadata.shape[0]  # FlashMLA's bound on the number of splits
    device = q.device
    out = torch.empty(b, s_q, h_q, D_V, dtype=q.dtype, device=device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=device)
    o_accum = torch.empty(max_splits, h_kv, rows, D_V, dtype=torch.float32, device=device)
    lse_accum = torch.empty(max_splits, h_kv, rows, dtype=torch.float32, device=device)
    launches = dense_decode_launches(q, kcache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                                     softmax_scale, causal, out, lse, o_accum, lse_accum, schedule)
    return (*launches, out, lse)


_one_device = None  # whether this process sees a single CUDA device (fixed once CUDA is initialised)


def needs_device_guard(device_index) -> bool:
    """Whether a TVM-FFI launch for tensors on CUDA device `device_index` must make it current first.

    TVM-FFI launches on the current device's current stream, so a switch is needed only when the tensors
    are elsewhere (the guard costs ~6 us of host time). With one visible device they cannot be elsewhere,
    and the current_device() query (~1 us on the H100 host) is skipped too.
    """
    global _one_device
    if device_index is None:
        return False
    if _one_device is None:
        _one_device = torch.cuda.device_count() == 1
    return not _one_device and device_index != torch.cuda.current_device()


def launch(decode, decode_args, combine, combine_args, device_index=None) -> None:
    """Run the launches of `dense_decode_launches` on the current stream of `device_index`'s device."""
    if not needs_device_guard(device_index):
        decode(*decode_args)
        if combine is not None:
            combine(*combine_args)
    else:
        with torch.cuda.device(device_index):
            decode(*decode_args)
            if combine is not None:
                combine(*combine_args)


def run_dense_decode(q, kcache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                     softmax_scale, causal, schedule=None):
    """Split-KV decode + combine on the current stream. Inputs must already be validated.

    q [b, s_q, h_q, d]; kcache [num_blocks, 64, h_kv, d]; block_table [b, max_blocks] int32;
    cache_seqlens [b] int32; metadata from cutemla.schedule. Returns (out [b, s_q, h_q, 512] in q's
    dtype, lse [b, h_q, s_q] fp32 natural log). No host sync; allocations depend only on shapes.
    schedule: the decode kernel's consumer loop ("seesaw", "pipelined" or "split_s"; experiments:
    "seesaw_exact", "seesaw_named", "seesaw_no_evict_first", "seesaw_r224"); default CUTEMLA_DECODE_SCHEDULE or
    DEFAULT_SCHEDULE (see decode_variant).
    """
    decode, decode_args, combine, combine_args, out, lse = prepare_dense_decode(
        q, kcache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, softmax_scale, causal,
        schedule)
    launch(decode, decode_args, combine, combine_args, q.device.index)
    return out, lse
