"""PyTorch reference for paged MLA decode: the numerical spec the kernels are checked against.

Semantics (identical to deepseek-ai/FlashMLA's dense decode, ``flash_mla_with_kvcache``):

* ``q`` is ``[b, s_q, h_q, d]``; ``kcache`` is a paged latent cache ``[num_blocks, page_size, h_kv, d]``
  whose first ``head_dim_v`` (= 512) columns double as V (one shared cache, no separate V tensor).
* Request ``i`` owns the logical token sequence ``0 .. cache_seqlens[i] - 1``; token ``t`` lives at
  ``kcache[block_table[i, t // page_size], t % page_size]``.
* Query head ``h`` reads kv head ``h // (h_q // h_kv)`` (grouped-query mapping).
* Scores are ``softmax_scale * (q . k)`` with ``softmax_scale`` defaulting to ``d ** -0.5``.
* ``causal`` is bottom-right aligned: query ``j`` (0-based, of ``s_q``) of request ``i`` attends keys
  ``[0, cache_seqlens[i] - (s_q - 1 - j))``. ``s_q == 1`` forces causal off (it is a no-op then anyway).
* ``lse`` is the natural-log ``logsumexp`` of the scaled scores. A (request, query, head) row with no key to
  attend (``cache_seqlens[i] == 0``, or causal with ``cache_seqlens[i] < s_q - j``) gets ``out = 0`` and
  ``lse = +inf``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["mla_decode_reference", "SUPPORTED_HEAD_DIMS", "SUPPORTED_HEAD_DIM_V"]

SUPPORTED_HEAD_DIMS = (512, 576)
SUPPORTED_HEAD_DIM_V = 512
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _validate(q, kcache, block_table, cache_seqlens, head_dim_v) -> None:
    for name, t in (("q", q), ("kcache", kcache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [b, s_q, h_q, d], got shape {tuple(q.shape)}")
    if kcache.dim() != 4:
        raise ValueError(f"kcache must be [num_blocks, page_size, h_kv, d], got shape {tuple(kcache.shape)}")
    b, s_q, h_q, d = q.shape
    _, page_size, h_kv, d_k = kcache.shape
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q dtype must be bfloat16 or float16 (float32 accepted by the reference), got {q.dtype}")
    if kcache.dtype != q.dtype:
        raise TypeError(f"kcache dtype must equal q dtype {q.dtype}, got {kcache.dtype}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q head dim d must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    if d_k != d:
        raise ValueError(f"kcache head dim ({d_k}) must equal q head dim ({d})")
    if head_dim_v != SUPPORTED_HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {SUPPORTED_HEAD_DIM_V}, got {head_dim_v}")
    if b <= 0 or s_q <= 0 or h_q <= 0:
        raise ValueError(f"q must have b, s_q, h_q > 0, got shape {tuple(q.shape)}")
    if page_size <= 0 or h_kv <= 0:
        raise ValueError(f"kcache must have page_size, h_kv > 0, got shape {tuple(kcache.shape)}")
    if h_q % h_kv != 0:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [b={b}, max_blocks], got shape {tuple(block_table.shape)}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_table dtype must be int32 (int64 accepted by the reference), got {block_table.dtype}")
    if cache_seqlens.shape != (b,):
        raise ValueError(f"cache_seqlens must be [b={b}], got shape {tuple(cache_seqlens.shape)}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens dtype must be int32 (int64 accepted by the reference), got {cache_seqlens.dtype}")


def mla_decode_reference(
    q: torch.Tensor,
    kcache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = 512,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode attention on ``q.device`` (CPU or CUDA), fp32 softmax with float64 matmuls.

    Scores ``q . k`` and the ``P @ V`` products are accumulated in float64 (exact products of the 16-bit
    inputs, and no TF32 / reduced-precision matmul setting can degrade them) and rounded to fp32;
    ``logsumexp``, the exponentials and the normalisation are fp32, as in FlashMLA's fp32 reference.

    Args:
        q: ``[b, s_q, h_q, d]`` bf16 or fp16 (fp32 also accepted here), ``d`` in {512, 576}. Any strides.
        kcache: ``[num_blocks, page_size, h_kv, d]``, same dtype as ``q``, any ``page_size >= 1``.
            ``kcache[..., :head_dim_v]`` is V. Any strides.
        block_table: ``[b, max_blocks]`` int32 physical page ids. Only the first
            ``ceil(cache_seqlens[i] / page_size)`` entries of row ``i`` are read; the rest may hold garbage.
        cache_seqlens: ``[b]`` int32 token counts, ``0 <= cache_seqlens[i] <= max_blocks * page_size``.
            Zero is allowed. Read back to the host once (this is a reference, not a graph-capturable op).
        head_dim_v: must be 512.
        softmax_scale: score multiplier; ``None`` means ``d ** -0.5``.
        causal: bottom-right aligned causal mask over the ``s_q`` queries; ignored when ``s_q == 1``.

    Returns:
        ``(out, lse)``: ``out`` ``[b, s_q, h_q, head_dim_v]`` in ``q.dtype`` (the fp32 result, rounded);
        ``lse`` ``[b, h_q, s_q]`` fp32, natural log. Rows with nothing to attend: ``out`` 0, ``lse`` +inf.

    Cache rows at token positions ``>= cache_seqlens[i]`` never enter the arithmetic (they may be NaN), and
    block-table entries past the needed count are never dereferenced.

    Raises:
        TypeError / ValueError: on unsupported dtypes, shapes, head dims, or out-of-range lengths/page ids.
    """
    _validate(q, kcache, block_table, cache_seqlens, head_dim_v)
    b, s_q, h_q, d = q.shape
    num_blocks, page_size, h_kv, _ = kcache.shape
    group = h_q // h_kv
    scale = float(d ** -0.5) if softmax_scale is None else float(softmax_scale)
    causal = bool(causal) and s_q > 1
    device = q.device

    seqlens = [int(n) for n in cache_seqlens.tolist()]
    max_tokens = block_table.shape[1] * page_size
    for i, n in enumerate(seqlens):
        if n < 0 or n > max_tokens:
            raise ValueError(
                f"cache_seqlens[{i}] = {n} is outside [0, max_blocks * page_size = {max_tokens}]"
            )

    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=device)

    # Key j is visible to query r iff j < n - (s_q - 1 - r), i.e. j - r < n - s_q + 1.
    query_pos = torch.arange(s_q, device=device)

    for i, n in enumerate(seqlens):
        if n == 0:
            continue
        num_pages = -(-n // page_size)
        pages = block_table[i, :num_pages].to(device=device, dtype=torch.long)
        bad = (pages < 0) | (pages >= num_blocks)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"block_table[{i}, {j}] = {int(pages[j])} is not a valid page id in [0, {num_blocks}) "
                f"but is needed for cache_seqlens[{i}] = {n}"
            )
        # [num_pages, page, h_kv, d] -> the first n tokens only; the tail of the last page is dropped here,
        # before any arithmetic, so NaN-poisoned padding cannot leak.
        keys = kcache[pages].reshape(num_pages * page_size, h_kv, d)[:n]
        keys = keys.permute(1, 0, 2).double()  # [h_kv, n, d]
        values = keys[..., :head_dim_v]  # [h_kv, n, dv]

        # Fold (group, s_q) into rows per kv head: row g * s_q + r is query r of query head kv * group + g.
        queries = q[i].permute(1, 0, 2).reshape(h_kv, group * s_q, d).double()
        # float64 products: exact for 16-bit inputs and immune to TF32 / reduced-precision matmul settings.
        scores = (torch.matmul(queries, keys.transpose(1, 2)) * scale).float()  # [h_kv, group*s_q, n]
        scores = scores.view(h_kv, group, s_q, n)
        if causal:
            key_pos = torch.arange(n, device=device)
            visible = (key_pos[None, :] - query_pos[:, None]) < (n - s_q + 1)  # [s_q, n]
            scores = scores.masked_fill(~visible, -math.inf)

        row_lse = torch.logsumexp(scores, dim=-1)  # [h_kv, group, s_q]; -inf for empty rows
        has_keys = torch.isfinite(row_lse)
        safe_lse = torch.where(has_keys, row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(scores - safe_lse.unsqueeze(-1))  # masked keys: exp(-inf) = 0; empty rows all 0
        row_out = torch.matmul(probs.view(h_kv, group * s_q, n).double(), values).float()

        out[i] = row_out.view(h_kv, group, s_q, head_dim_v).reshape(h_q, s_q, head_dim_v).permute(1, 0, 2)
        lse[i] = torch.where(has_keys, row_lse, torch.full_like(row_lse, math.inf)).reshape(h_q, s_q)

    return out.to(q.dtype), lse
