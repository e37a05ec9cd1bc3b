"""PyTorch references for MLA decode over FlashMLA's FP8 latent cache (DeepSeek-V3.2 sparse / DSA decode).

Both functions read the 656-byte-per-token cache of :mod:`cutemla.layouts.fp8_cache` and dequantise tokens
exactly like the sm90 sparse kernel (``fp8 -> fp32 -> bf16 (RN) x bf16(scale)``); the arithmetic after that is
float64 matmuls rounded to fp32 and an fp32 softmax, as in :func:`cutemla.reference.mla_decode_reference`.

Sparse decode semantics (``flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...)``; design/flashmla.md
§1 "Sparse path" and §6 "Indices", FlashMLA ``tests/ref.py::ref_sparse_attn_decode``):

* ``indices[i, j, k]`` is a *global* token id ``page * page_size + offset`` into the cache, already resolved
  through the block table (FlashMLA's ``abs_indices2indices_in_kvcache``); there is no block table or length.
* Only ``-1`` marks an invalid slot (skipped: no load, logit ``-inf``). The kernel does not check any other
  out-of-range value (it faults); this reference raises ``ValueError`` instead, naming the slot.
* With ``topk_length`` ``[b]``, slots ``k >= topk_length[i]`` are masked too and never read (even if they hold
  garbage). FlashMLA's sm90 V3.2 kernel asserts ``topk_length is None`` (only MODEL1 uses it there); the
  reference supports it with the MODEL1 meaning.
* Duplicate indices are not merged: each slot is one key (as in FlashMLA's reference).
* ``lse`` is the natural-log logsumexp of the scaled scores over the valid slots. A row with no valid slot
  gets ``out = 0`` and ``lse = +inf``.
* ``attn_sink`` ``[h_q]`` fp32 scales each head's output by ``exp(lse) / (exp(lse) + exp(sink))``, computed as
  ``sigmoid(lse - sink)`` so that ``sink = -inf`` gives 1 and ``sink = +inf`` gives 0 without overflow; the
  returned ``lse`` is unaffected, and rows with no valid slot stay ``out = 0``, ``lse = +inf``.
* ``lse`` is returned as FlashMLA returns it: ``[b, h_q, s_q]``, a transposed view of a ``[b, s_q, h_q]``
  buffer (non-contiguous when ``h_q > 1`` and ``s_q > 1``).

The reference is wider than the kernel on purpose: any ``h_q >= 1`` (kernel: 64 or 128) and any ``topk >= 1``
(kernel: a multiple of 64), so it can also check edge cases; the public API enforces the kernel's limits.

Dense decode over the FP8 cache (:func:`dense_fp8_mla_decode_reference`) is a cutemla extension (FlashMLA's
dense sm90 path only takes bf16/fp16 caches): the paged, block-table semantics of
:func:`cutemla.reference.mla_decode_reference` applied to the dequantised cache.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from cutemla.layouts.fp8_cache import FP8_BYTES_PER_TOKEN, FP8_HEAD_DIM, dequantize_fp8_cache
from cutemla.reference import mla_decode_reference

__all__ = ["sparse_mla_decode_reference", "dense_fp8_mla_decode_reference", "INVALID_INDEX"]

INVALID_INDEX = -1
SPARSE_HEAD_DIM_V = 512
_PACKED_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_attn_sink(attn_sink, h_q: int) -> None:
    """attn_sink: None, or a float32 [h_q] tensor (one sink logit per query head)."""
    if attn_sink is None:
        return
    _check_tensor("attn_sink", attn_sink)
    if attn_sink.dtype != torch.float32:
        raise TypeError(f"attn_sink must be torch.float32, got {attn_sink.dtype}")
    if attn_sink.shape != (h_q,):
        raise ValueError(f"attn_sink must be [h_q={h_q}], got shape {tuple(attn_sink.shape)}")


def _check_q(q: torch.Tensor) -> None:
    _check_tensor("q", q)
    if q.dtype != torch.bfloat16:
        raise TypeError(f"q must be bfloat16 (the FP8 cache dequantises to bf16), got {q.dtype}")
    if q.dim() != 4 or q.shape[-1] != FP8_HEAD_DIM:
        raise ValueError(f"q must be [b, s_q, h_q, {FP8_HEAD_DIM}], got shape {tuple(q.shape)}")
    if min(q.shape[:3]) <= 0:
        raise ValueError(f"q must have b, s_q, h_q > 0, got shape {tuple(q.shape)}")


def _check_packed_cache(name: str, kcache: torch.Tensor) -> None:
    _check_tensor(name, kcache)
    if kcache.dtype not in _PACKED_DTYPES:
        raise TypeError(f"{name} must hold FP8 cache bytes as uint8, int8 or float8_e4m3fn, got {kcache.dtype}")
    if kcache.dim() != 4 or kcache.shape[2] != 1 or kcache.shape[3] != FP8_BYTES_PER_TOKEN:
        raise ValueError(
            f"{name} must be [num_blocks, page_size, 1, {FP8_BYTES_PER_TOKEN}] (656 bytes per token, h_kv = 1), "
            f"got shape {tuple(kcache.shape)}"
        )
    if kcache.shape[0] <= 0 or kcache.shape[1] <= 0:
        raise ValueError(f"{name} must have num_blocks, page_size > 0, got shape {tuple(kcache.shape)}")


def _gather_tokens(kcache: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Dequantised bf16 ``[n, 576]`` rows of the global token ids ``token_ids`` ``[n]`` (only those bytes are read)."""
    page_size = kcache.shape[1]
    token_ids = token_ids.to(device=kcache.device, dtype=torch.long)
    token_bytes = kcache.view(torch.uint8)[token_ids // page_size, token_ids % page_size, 0]  # [n, 656]
    return dequantize_fp8_cache(token_bytes)


def sparse_mla_decode_reference(
    q: torch.Tensor,
    kcache_fp8: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: Optional[float] = None,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    d_v: int = 512,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse (top-k) MLA decode over the FP8 cache, FlashMLA V3.2 semantics (see the module docstring).

    Args:
        q: ``[b, s_q, h_q, 576]`` bf16, any strides.
        kcache_fp8: ``[num_blocks, page_size, 1, 656]`` FP8 cache bytes (uint8 / int8 / float8_e4m3fn), any
            page size, any strides. Only the tokens named by valid slots are read (others may be garbage/NaN).
        indices: ``[b, s_q, topk]`` int32 (int64 accepted) global token ids ``page * page_size + offset``;
            ``-1`` = skip. Every other value in a slot that is not masked by ``topk_length`` must lie in
            ``[0, num_blocks * page_size)``.
        softmax_scale: score multiplier; ``None`` means ``576 ** -0.5`` (FlashMLA's default ``d_qk ** -0.5``).
        attn_sink: optional ``[h_q]`` fp32 per-head sink logits (``+-inf`` allowed).
        topk_length: optional ``[b]`` int32 (int64 accepted), ``0 <= topk_length[i] <= topk``: request ``i``
            uses only slots ``[0, topk_length[i])``. Read back to the host once.
        d_v: value width, must be 512 (V is the first 512 dequantised columns of each key).

    Returns:
        ``(out, lse)``: ``out`` ``[b, s_q, h_q, 512]`` bf16; ``lse`` ``[b, h_q, s_q]`` fp32 natural log
        (a transposed view of a ``[b, s_q, h_q]`` buffer, like FlashMLA). Empty rows: ``out`` 0, ``lse`` +inf.

    Raises:
        TypeError / ValueError: bad dtypes or shapes (naming the argument); an index other than ``-1`` outside
        the cache in an unmasked slot (the kernel would fault there instead).
    """
    _check_q(q)
    _check_packed_cache("kcache_fp8", kcache_fp8)
    _check_tensor("indices", indices)
    b, s_q, h_q, d = q.shape
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"indices must be int32 (int64 accepted by the reference), got {indices.dtype}")
    if indices.dim() != 3 or indices.shape[0] != b or indices.shape[1] != s_q or indices.shape[2] <= 0:
        raise ValueError(f"indices must be [b={b}, s_q={s_q}, topk >= 1], got shape {tuple(indices.shape)}")
    if d_v != SPARSE_HEAD_DIM_V:
        raise ValueError(f"d_v must be {SPARSE_HEAD_DIM_V}, got {d_v}")
    topk = indices.shape[2]
    check_attn_sink(attn_sink, h_q)
    device = q.device
    slot_valid = indices.to(device) != INVALID_INDEX  # [b, s_q, topk]
    if topk_length is not None:
        _check_tensor("topk_length", topk_length)
        if topk_length.dtype not in _INDEX_DTYPES:
            raise TypeError(f"topk_length must be int32 (int64 accepted by the reference), got {topk_length.dtype}")
        if topk_length.shape != (b,):
            raise ValueError(f"topk_length must be [b={b}], got shape {tuple(topk_length.shape)}")
        lengths = topk_length.to(device=device, dtype=torch.long)
        bad = (lengths < 0) | (lengths > topk)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"topk_length[{i}] = {int(lengths[i])} is outside [0, topk = {topk}]")
        slot_valid &= torch.arange(topk, device=device).view(1, 1, topk) < lengths.view(b, 1, 1)

    num_tokens = kcache_fp8.shape[0] * kcache_fp8.shape[1]
    ids = indices.to(device=device, dtype=torch.long)
    out_of_range = slot_valid & ((ids < 0) | (ids >= num_tokens))
    if bool(out_of_range.any()):
        i, j, k = (int(v) for v in out_of_range.nonzero()[0])
        raise ValueError(
            f"indices[{i}, {j}, {k}] = {int(ids[i, j, k])} is neither -1 nor a token id in "
            f"[0, num_blocks * page_size = {num_tokens}) (the kernel does not check this and would fault)"
        )
    scale = float(d ** -0.5) if softmax_scale is None else float(softmax_scale)

    # Keys of the valid slots only; invalid slots stay 0 and are masked to -inf below, so no unused byte of the
    # cache (which may be NaN) ever reaches the arithmetic.
    rows = b * s_q
    slot_valid = slot_valid.reshape(rows, topk)
    keys = torch.zeros(rows, topk, d, dtype=torch.float64, device=device)
    keys[slot_valid] = _gather_tokens(kcache_fp8, ids.reshape(rows, topk)[slot_valid]).to(device).double()

    queries = q.reshape(rows, h_q, d).double()
    # float64 products of bf16 values are exact; rounding to fp32 then matches an fp32-accumulating reference.
    scores = (torch.matmul(queries, keys.transpose(1, 2)) * scale).float()  # [rows, h_q, topk]
    scores = scores.masked_fill(~slot_valid.unsqueeze(1), -math.inf)
    row_lse = torch.logsumexp(scores, dim=-1)  # [rows, h_q]; -inf for rows without a valid slot
    has_keys = torch.isfinite(row_lse)
    safe_lse = torch.where(has_keys, row_lse, torch.zeros_like(row_lse))
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))  # masked slots: exp(-inf) = 0; empty rows: all 0
    out = torch.matmul(probs.double(), keys[..., :d_v]).float()  # [rows, h_q, d_v]

    if attn_sink is not None:
        # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink): finite for +-inf sinks, no overflow.
        sink_factor = torch.sigmoid(row_lse - attn_sink.to(device).view(1, h_q))
        out = out * torch.where(has_keys, sink_factor, torch.zeros_like(sink_factor)).unsqueeze(-1)

    lse = torch.where(has_keys, row_lse, torch.full_like(row_lse, math.inf))
    out = out.view(b, s_q, h_q, d_v).to(torch.bfloat16)
    return out, lse.view(b, s_q, h_q).transpose(1, 2)


def dense_fp8_mla_decode_reference(
    q: torch.Tensor,
    kcache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = 512,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense paged MLA decode reading the FP8 cache; same signature as ``mla_decode_reference``.

    Dequantises only the first ``cache_seqlens[i]`` tokens of each request's needed pages (tail rows of the
    last page and pages past the needed count are never read, so they may hold NaN / garbage), packs them into
    a compact bf16 cache with a fresh block table, and runs :func:`cutemla.reference.mla_decode_reference` on
    it. The result therefore equals the bf16 reference on ``dequantize_fp8_cache(kcache)`` wherever that is
    finite.

    Args:
        q: ``[b, s_q, h_q, 576]`` bf16.
        kcache: ``[num_blocks, page_size, 1, 656]`` FP8 cache bytes (uint8 / int8 / float8_e4m3fn).
        block_table, cache_seqlens, head_dim_v, softmax_scale, causal: as in ``mla_decode_reference``
            (``softmax_scale`` ``None`` means ``576 ** -0.5``).

    Returns:
        ``(out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32)``.
    """
    _check_q(q)
    _check_packed_cache("kcache", kcache)
    _check_tensor("block_table", block_table)
    _check_tensor("cache_seqlens", cache_seqlens)
    b = q.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [b={b}, max_blocks], got shape {tuple(block_table.shape)}")
    if block_table.dtype not in _INDEX_DTYPES:
        raise TypeError(f"block_table dtype must be int32 (int64 accepted by the reference), got {block_table.dtype}")
    if cache_seqlens.shape != (b,):
        raise ValueError(f"cache_seqlens must be [b={b}], got shape {tuple(cache_seqlens.shape)}")
    if cache_seqlens.dtype not in _INDEX_DTYPES:
        raise TypeError(
            f"cache_seqlens dtype must be int32 (int64 accepted by the reference), got {cache_seqlens.dtype}"
        )
    num_blocks, page_size = kcache.shape[0], kcache.shape[1]
    max_blocks = block_table.shape[1]
    seqlens = [int(n) for n in cache_seqlens.tolist()]
    for i, n in enumerate(seqlens):
        if n < 0 or n > max_blocks * page_size:
            raise ValueError(
                f"cache_seqlens[{i}] = {n} is outside [0, max_blocks * page_size = {max_blocks * page_size}]"
            )

    pages_needed = [-(-n // page_size) for n in seqlens]
    compact = torch.zeros(max(1, sum(pages_needed)), page_size, 1, FP8_HEAD_DIM, dtype=torch.bfloat16, device=q.device)
    compact_table = torch.zeros(b, max_blocks, dtype=torch.int32, device=q.device)
    first_page = 0
    for i, (n, num_pages) in enumerate(zip(seqlens, pages_needed)):
        if n == 0:
            continue
        pages = block_table[i, :num_pages].to(device=kcache.device, dtype=torch.long)
        bad = (pages < 0) | (pages >= num_blocks)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"block_table[{i}, {j}] = {int(pages[j])} is not a valid page id in [0, {num_blocks}) "
                f"but is needed for cache_seqlens[{i}] = {n}"
            )
        token_pos = torch.arange(n, device=kcache.device)
        token_ids = pages[token_pos // page_size] * page_size + token_pos % page_size
        compact_rows = compact[first_page:first_page + num_pages].view(num_pages * page_size, FP8_HEAD_DIM)
        compact_rows[:n] = _gather_tokens(kcache, token_ids).to(q.device)
        compact_table[i, :num_pages] = torch.arange(first_page, first_page + num_pages, dtype=torch.int32)
        first_page += num_pages

    return mla_decode_reference(q, compact, compact_table, cache_seqlens, head_dim_v=head_dim_v,
                                softmax_scale=softmax_scale, causal=causal)
