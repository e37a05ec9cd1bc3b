"""Shared test utilities: FlashMLA-style input generation, its tolerance check, an independent oracle, metrics.

Used by the CPU and GPU tests, the perf sweeps and the notebooks, so everything here is deterministic and
device-agnostic: inputs are generated on the CPU from a seeded ``torch.Generator`` and only then moved, so a
CPU run and a GPU run of the same :class:`DecodeCase` see bit-identical data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "DecodeCase",
    "DecodeInputs",
    "make_decode_inputs",
    "assert_close_flashmla",
    "cos_diff",
    "OUT_TOL",
    "LSE_TOL",
    "dense_attention_oracle",
    "decode_flops",
    "decode_bytes",
    "UNUSED_BLOCK_ID",
]

# FlashMLA's tests/test_flash_mla_dense_decoding.py tolerances (kernel output vs fp32 reference).
OUT_TOL = dict(abs_tol=8e-4, rel_tol=2.01 / 128, cos_diff_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536)

# What FlashMLA's tests write into block-table entries past a request's needed pages: a page id far out of
# range, so any kernel that dereferences one faults or reads garbage.
UNUSED_BLOCK_ID = 2147480000

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------------------------------------
# Input generation
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """One decode problem. ``s_k`` is the exact length, or the mean length when ``varlen``.

    ``zero_frac``: fraction of requests forced to length 0 (``ceil(zero_frac * b)`` of them, chosen at random).
    """

    b: int
    s_q: int
    s_k: int
    h_q: int
    h_kv: int
    d: int = 576
    dv: int = 512
    page_size: int = 64
    varlen: bool = False
    causal: bool = False
    dtype: torch.dtype = torch.bfloat16
    zero_frac: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("b", "s_q", "h_q", "h_kv", "d", "dv", "page_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecodeCase.{name} must be positive, got {getattr(self, name)}")
        if self.s_k < 0:
            raise ValueError(f"DecodeCase.s_k must be >= 0, got {self.s_k}")
        if self.h_q % self.h_kv != 0:
            raise ValueError(f"DecodeCase.h_q ({self.h_q}) must be a multiple of h_kv ({self.h_kv})")
        if self.dv > self.d:
            raise ValueError(f"DecodeCase.dv ({self.dv}) must be <= d ({self.d})")
        if not 0.0 <= self.zero_frac <= 1.0:
            raise ValueError(f"DecodeCase.zero_frac must be in [0, 1], got {self.zero_frac}")
        if self.dtype not in _DTYPE_NAMES:
            raise TypeError(f"DecodeCase.dtype must be bfloat16 or float16 (float32 for debugging), got {self.dtype}")

    def __str__(self) -> str:
        parts = [f"b{self.b}", f"sq{self.s_q}", f"sk{self.s_k}", f"hq{self.h_q}", f"hkv{self.h_kv}"]
        if self.d != 576:
            parts.append(f"d{self.d}")
        if self.dv != 512:
            parts.append(f"dv{self.dv}")
        if self.page_size != 64:
            parts.append(f"p{self.page_size}")
        if self.varlen:
            parts.append("var")
        if self.causal:
            parts.append("causal")
        if self.zero_frac:
            parts.append(f"z{self.zero_frac:g}")
        parts.append(_DTYPE_NAMES[self.dtype])
        if self.seed:
            parts.append(f"s{self.seed}")
        return "-".join(parts)


@dataclasses.dataclass
class DecodeInputs:
    """Tensors for one :class:`DecodeCase` (argument order matches ``flash_mla_with_kvcache``)."""

    q: torch.Tensor  # [b, s_q, h_q, d]
    kcache: torch.Tensor  # [num_blocks, page_size, h_kv, d]; rows past each seqlen are NaN
    block_table: torch.Tensor  # [b, max_blocks] int32; entries past the needed pages are UNUSED_BLOCK_ID
    cache_seqlens: torch.Tensor  # [b] int32
    case: DecodeCase

    def to(self, device: Union[str, torch.device]) -> "DecodeInputs":
        return DecodeInputs(
            self.q.to(device),
            self.kcache.to(device),
            self.block_table.to(device),
            self.cache_seqlens.to(device),
            self.case,
        )

    @property
    def mean_seqlen(self) -> float:
        return float(self.cache_seqlens.double().mean().item())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _clamped_randn(shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """randn/10 clamped to [-1, 1] (FlashMLA's data), produced in fp32 chunks to bound peak memory."""
    result = torch.empty(shape, dtype=dtype, device=gen.device)
    flat = result.view(-1)
    chunk = 1 << 24
    for start in range(0, flat.numel(), chunk):
        stop = min(start + chunk, flat.numel())
        flat[start:stop] = (torch.randn(stop - start, generator=gen, device=gen.device) / 10).clamp_(-1.0, 1.0)
    return result


def _make_seqlens(case: DecodeCase, gen: torch.Generator) -> torch.Tensor:
    if case.varlen:
        normal = torch.randn(case.b, generator=gen, dtype=torch.float64) * (case.s_k / 2) + case.s_k
        seqlens = torch.clamp(normal.round(), min=case.s_q).to(torch.int32)
    else:
        seqlens = torch.full((case.b,), case.s_k, dtype=torch.int32)
    if case.zero_frac > 0:
        num_zero = min(case.b, math.ceil(case.zero_frac * case.b))
        seqlens[torch.randperm(case.b, generator=gen)[:num_zero]] = 0
    return seqlens


def make_decode_inputs(case: DecodeCase, device: Union[str, torch.device] = "cpu",
                       generate_on_device: bool = False) -> DecodeInputs:
    """FlashMLA-style test data for ``case``, generated on the CPU and then moved to ``device``.

    ``generate_on_device=True`` draws q and the cache with a generator on ``device`` instead (much faster
    for big GPU cases; the values then differ from the CPU draw, lengths and block table do not).

    * ``q`` and the cache hold ``randn / 10`` clamped to [-1, 1], rounded once to ``case.dtype``.
    * Lengths: ``s_k`` each, or with ``varlen`` ``max(round(N(s_k, (s_k/2)^2)), s_q)`` per request; then
      ``ceil(zero_frac * b)`` random requests are set to 0.
    * Request ``i`` needs ``ceil(len_i / page_size)`` pages; physical pages are a random permutation of
      ``num_blocks = max(1, total needed)``. ``block_table`` has ``ceil(round_up(max_len, 256) / page_size)``
      columns (at least 1), like FlashMLA's padding; entries past a request's needed pages are
      :data:`UNUSED_BLOCK_ID`.
    * Every cache row not holding a valid token (the tail of each last page, any unused page) is NaN.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(case.seed)

    seqlens = _make_seqlens(case, gen)
    lengths = seqlens.tolist()
    pages_needed = [_cdiv(n, case.page_size) for n in lengths]
    num_blocks = max(1, sum(pages_needed))
    max_len = max(lengths)
    max_blocks = max(1, _cdiv(_cdiv(max_len, 256) * 256, case.page_size))

    value_gen = gen
    if generate_on_device and torch.device(device).type != "cpu":
        value_gen = torch.Generator(device=device)
        value_gen.manual_seed(case.seed)
    q = _clamped_randn((case.b, case.s_q, case.h_q, case.d), value_gen, case.dtype)
    kcache = _clamped_randn((num_blocks, case.page_size, case.h_kv, case.d), value_gen, case.dtype)

    physical = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.full((case.b, max_blocks), UNUSED_BLOCK_ID, dtype=torch.int32)
    valid_rows = torch.zeros(num_blocks, case.page_size, dtype=torch.bool)
    cursor = 0
    for i, (n, nb) in enumerate(zip(lengths, pages_needed)):
        if nb == 0:
            continue
        mine = physical[cursor : cursor + nb]
        cursor += nb
        block_table[i, :nb] = mine
        rows = torch.arange(nb * case.page_size) < n
        valid_rows[mine.long()] = rows.view(nb, case.page_size)
    kcache[~valid_rows.to(kcache.device)] = float("nan")

    inputs = DecodeInputs(q, kcache, block_table, seqlens, case)
    return inputs if torch.device(device).type == "cpu" else inputs.to(device)


# ----------------------------------------------------------------------------------------------------------
# FlashMLA's comparison (kernelkit check_is_allclose), as an assertion
# ----------------------------------------------------------------------------------------------------------


def _cos_diff_of_finite_f64(a: torch.Tensor, e: torch.Tensor) -> float:
    e_sq = float(torch.dot(e.reshape(-1), e.reshape(-1)))
    if e_sq < 1e-12:
        return 0.0
    a_sq = float(torch.dot(a.reshape(-1), a.reshape(-1)))
    return 1.0 - 2.0 * float(torch.dot(a.reshape(-1), e.reshape(-1))) / (e_sq + a_sq)


def _to_f64_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64, copy=True)


def cos_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``1 - 2*sum(a*b) / sum(a^2 + b^2)`` in float64 over finite entries; 0 when ``expected`` is ~all zero."""
    a, e = _to_f64_cpu(actual), _to_f64_cpu(expected)
    nonfinite = ~(torch.isfinite(a) & torch.isfinite(e))
    a[nonfinite] = 0.0
    e[nonfinite] = 0.0
    return _cos_diff_of_finite_f64(a, e)


def _unravel(flat_index: int, shape) -> Tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(index))


def assert_close_flashmla(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    abs_tol: float,
    rel_tol: float,
    cos_diff_tol: Optional[float] = None,
    check_dtype: bool = True,
) -> None:
    """Assert ``actual`` matches ``expected`` the way FlashMLA's ``kernelkit.check_is_allclose`` does.

    * Shapes must be equal (and dtypes, unless ``check_dtype=False``).
    * Positions of +inf, -inf and NaN must match exactly (so inf signs too); those entries are then zeroed.
    * Element-wise, in float64: passes if ``|a - e| < abs_tol`` OR ``|a - e| / (|e| + 1e-6) < rel_tol``.
    * If ``cos_diff_tol`` is given: ``|cos_diff(actual, expected)| <= cos_diff_tol`` (see :func:`cos_diff`).

    Raises AssertionError naming ``name`` with the failing count, the worst element and the cosine diff.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"`{name}` shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    if check_dtype and actual.dtype != expected.dtype:
        raise AssertionError(f"`{name}` dtype mismatch: actual {actual.dtype} vs expected {expected.dtype}")
    a, e = _to_f64_cpu(actual), _to_f64_cpu(expected)

    a_nonfinite, e_nonfinite = ~torch.isfinite(a), ~torch.isfinite(e)
    if bool(a_nonfinite.any()) or bool(e_nonfinite.any()):
        problems = []
        for label, where in (("+inf", lambda t: t == math.inf), ("-inf", lambda t: t == -math.inf), ("nan", torch.isnan)):
            a_mask, e_mask = where(a), where(e)
            if not torch.equal(a_mask, e_mask):
                first = tuple((a_mask != e_mask).nonzero()[0].tolist())
                problems.append(
                    f"{label} positions differ: {int(a_mask.sum())} in actual, {int(e_mask.sum())} in expected; "
                    f"first differing index {first}: actual {a[first].item()} vs expected {e[first].item()}"
                )
        if problems:
            raise AssertionError(f"`{name}` mismatch: " + "; ".join(problems))
        a[a_nonfinite] = 0.0  # same positions in both now
        e[e_nonfinite] = 0.0

    abs_err = (a - e).abs_()
    rel_err = abs_err / e.abs().add_(1e-6)
    passed = (abs_err < abs_tol).logical_or_(rel_err < rel_tol)
    cd = _cos_diff_of_finite_f64(a, e)

    if not bool(passed.all()):
        failing = ~passed
        worst = int(abs_err.masked_fill(passed, -1.0).reshape(-1).argmax())
        idx = _unravel(worst, a.shape)
        raise AssertionError(
            f"`{name}` mismatch: {int(failing.sum())} of {a.numel()} elements fail "
            f"(abs_tol={abs_tol:g}, rel_tol={rel_tol:g}); worst at {idx}: actual {a[idx].item():.9g} vs expected "
            f"{e[idx].item():.9g} (abs err {abs_err[idx].item():.3g}, rel err {rel_err[idx].item():.3g}); "
            f"max abs err {abs_err.max().item():.3g}; cos diff {cd:.3g}"
        )
    if cos_diff_tol is not None and abs(cd) > cos_diff_tol:
        raise AssertionError(f"`{name}` mismatch: cosine diff {cd:.3g} exceeds {cos_diff_tol:g}")


# ----------------------------------------------------------------------------------------------------------
# Independent dense oracle (validates cutemla.reference; deliberately shares no code with it)
# ----------------------------------------------------------------------------------------------------------


def dense_attention_oracle(
    inputs: DecodeInputs,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention over a de-paged, zero-padded copy of the cache with an explicit boolean mask.

    Token ``t`` of request ``i`` is fetched by per-token indexing ``kcache[block_table[i, t // P], t % P]``
    into a dense ``[b, max_len, h_kv, d]`` tensor (padding = 0). The mask is ``t < len_i`` and, when
    ``causal and s_q > 1``, ``t <= len_i - s_q + j`` for query ``j``. Returns ``(out, lse)``: ``out``
    ``[b, s_q, h_q, dv]`` in ``out_dtype`` (default ``q.dtype``), ``lse`` ``[b, h_q, s_q]`` fp32 natural log;
    rows with no visible key get out 0 and lse +inf.
    """
    q, kcache, block_table = inputs.q.cpu(), inputs.kcache.cpu(), inputs.block_table.cpu()
    lengths = inputs.cache_seqlens.cpu().long()
    b, s_q, h_q, d = q.shape
    _, page, h_kv, _ = kcache.shape
    dv = inputs.case.dv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    use_causal = causal and s_q > 1
    max_len = max(1, int(lengths.max()))

    dense_k = torch.zeros(b, max_len, h_kv, d, dtype=kcache.dtype)
    for i in range(b):
        n = int(lengths[i])
        if n == 0:
            continue
        t = torch.arange(n)
        dense_k[i, :n] = kcache[block_table[i, t // page].long(), t % page]

    key_idx = torch.arange(max_len)
    query_idx = torch.arange(s_q)
    kv_head_of = torch.arange(h_q) // (h_q // h_kv)

    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        mask = (key_idx[None, :] < n).expand(s_q, max_len)  # [s_q, L]
        if use_causal:
            mask = mask & (key_idx[None, :] <= (n - s_q + query_idx)[:, None])
        lonely = ~mask.any(dim=-1)  # [s_q]
        for kv in range(h_kv):
            heads = (kv_head_of == kv).nonzero().flatten()
            k_head = dense_k[i, :, kv].double()  # [L, d]
            q_heads = q[i][:, heads].double()  # [s_q, g, d]
            scores = torch.einsum("sgd,ld->gsl", q_heads, k_head) * scale
            scores = scores.masked_fill(~mask, float("-inf"))
            lse_heads = torch.logsumexp(scores, dim=-1)  # [g, s_q]
            probs = torch.softmax(scores, dim=-1)
            probs[:, lonely] = 0.0  # softmax over an all -inf row is NaN
            out[i][:, heads] = torch.einsum("gsl,lv->sgv", probs, k_head[:, :dv])
            lse_heads[:, lonely] = float("inf")
            lse[i][heads] = lse_heads

    return out.to(out_dtype or q.dtype), lse.float()


# ----------------------------------------------------------------------------------------------------------
# Baseline metric formulas (FlashMLA's test/benchmark accounting; 2-byte elements)
# ----------------------------------------------------------------------------------------------------------


def decode_flops(b: int, s_q: int, h_q: int, h_kv: int, mean_sk: float, d: int = 576, dv: int = 512) -> float:
    """FLOPs of one decode call: ``b * h_q * s_q * mean_sk * 2 * (d + dv)`` (h_kv does not enter)."""
    del h_kv  # MLA shares K/V across the grouped heads; compute scales with h_q only
    return float(b) * h_q * s_q * mean_sk * 2 * (d + dv)


def decode_bytes(b: int, s_q: int, h_q: int, h_kv: int, mean_sk: float, d: int = 576, dv: int = 512) -> float:
    """Bytes moved by one decode call: ``b * (s_q*h_q*d*2 + mean_sk*h_kv*d*2 + s_q*h_q*dv*2)`` (Q + KV + out)."""
    return float(b) * (s_q * h_q * d * 2 + mean_sk * h_kv * d * 2 + s_q * h_q * dv * 2)
