"""Random decode problems for differential tests: adversarial lengths, paging and memory layouts.

``draw_spec(rng, kernel=...)`` draws one :class:`RandomSpec` from a ``random.Random``; ``build_inputs(spec,
device)`` turns it into tensors. Everything is a pure function of the spec (values come from a torch
generator seeded with ``spec.seed``), so a failing case is reproduced from its printed spec alone.

What is randomised, beyond sizes and dtype:

* lengths from the edge set {0, 1, page-1, page, page+1, 2*page+1} or uniform up to ``max_len``, with an
  optional skew (one long request among short ones);
* the page pool: pages are a random permutation of a pool with spare (never used) pages, so tables are
  both permuted and sparse; every cache row that is not a live token is NaN;
* block-table entries past each request's needed pages hold garbage (FlashMLA's 2147480000, -1, random
  ints, or page ids of *other* requests);
* views: q, k_cache and block_table may be slices of bigger NaN-filled tensors (padded head dim, every other
  head, every other batch row, a transposed [b, h, s, d] buffer, an offset into a bigger page pool).

With ``kernel=True`` only what the CuTe DSL kernel accepts is drawn: page size 64 and 16-byte aligned cache
views (q may be misaligned: the launcher copies it).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Optional, Tuple

import torch

from cutemla.testing import UNUSED_BLOCK_ID, DecodeCase, DecodeInputs

__all__ = ["RandomSpec", "draw_spec", "build_inputs", "case_rng"]

GARBAGE_KINDS = ("unused_id", "negative", "random", "alias")
Q_VIEWS = ("contiguous", "padded_d", "head_slice", "batch_slice", "transposed", "misaligned")
CACHE_VIEWS = ("contiguous", "pool_offset", "padded_d", "head_slice")
CACHE_VIEWS_CPU_ONLY = ("padded_odd", "misaligned")
TABLE_VIEWS = ("contiguous", "row_slice")


@dataclasses.dataclass(frozen=True)
class RandomSpec:
    seed: int
    seqlens: Tuple[int, ...]
    s_q: int
    h_q: int
    h_kv: int
    d: int
    page_size: int
    causal: bool
    dtype: torch.dtype
    spare_pages: int
    extra_columns: int
    garbage: str
    q_view: str
    cache_view: str
    table_view: str
    softmax_scale: Optional[float]

    @property
    def b(self) -> int:
        return len(self.seqlens)

    def short(self) -> str:
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        lens = list(self.seqlens) if self.b <= 8 else f"{list(self.seqlens[:8])}+{self.b - 8} more"
        return (f"seed={self.seed} b={self.b} s_q={self.s_q} h_q={self.h_q} h_kv={self.h_kv} d={self.d} "
                f"page={self.page_size} causal={self.causal} {dt} lens={lens} spare={self.spare_pages} "
                f"extra_cols={self.extra_columns} garbage={self.garbage} q={self.q_view} "
                f"cache={self.cache_view} table={self.table_view} scale={self.softmax_scale}")


def case_rng(base_seed: int, index: int) -> random.Random:
    """The generator of case ``index`` of a run: each case is reproducible on its own."""
    return random.Random(base_seed * 1_000_003 + index)


def _draw_seqlens(rng: random.Random, b: int, page: int, max_len: int) -> Tuple[int, ...]:
    edges = [0, 1, page - 1, page, page + 1, 2 * page + 1]
    edges = [n for n in edges if 0 <= n <= max_len]

    def one(limit: int) -> int:
        if rng.random() < 0.5:
            return rng.choice([n for n in edges if n <= limit] or [0])
        return rng.randint(0, limit)

    if b > 1 and rng.random() < 0.3:  # skew: one long request among short ones
        short_limit = max(1, max_len // 16)
        lens = [one(short_limit) for _ in range(b)]
        lens[rng.randrange(b)] = rng.randint(max_len // 2, max_len)
    else:
        lens = [one(max_len) for _ in range(b)]
    return tuple(lens)


def draw_spec(rng: random.Random, *, kernel: bool, max_b: int = 8, max_len: int = 700,
              dtypes=(torch.bfloat16, torch.float16)) -> RandomSpec:
    """One random problem. ``kernel=True`` keeps to what the CuTe DSL kernel supports."""
    page = 64 if kernel else rng.choice((64, 64, 64, 16, 32, 1, 7))
    b = rng.randint(1, max_b)
    s_q = rng.choice((1, 1, 1, 2, 3, 4))
    h_kv = rng.choice((1, 1, 1, 2, 3, 8))
    group = rng.choice((1, 2, 3, 8, 16, 21, 64, 128 // h_kv or 1))
    h_q = min(h_kv * group, 128 - 128 % h_kv)
    cache_views = CACHE_VIEWS if kernel else CACHE_VIEWS + CACHE_VIEWS_CPU_ONLY
    return RandomSpec(
        seed=rng.randrange(2**31),
        seqlens=_draw_seqlens(rng, b, page, max_len),
        s_q=s_q,
        h_q=h_q,
        h_kv=h_kv,
        d=rng.choice((576, 576, 512)),
        page_size=page,
        causal=rng.random() < 0.5,
        dtype=rng.choice(dtypes),
        spare_pages=rng.choice((0, 0, 1, 5)),
        extra_columns=rng.choice((0, 1, 3)),
        garbage=rng.choice(GARBAGE_KINDS),
        q_view=rng.choice(Q_VIEWS),
        cache_view=rng.choice(cache_views),
        table_view=rng.choice(TABLE_VIEWS),
        softmax_scale=rng.choice((None, None, None, 0.05, 0.1)),
    )


def _randn_into(view: torch.Tensor, gen: torch.Generator) -> None:
    """FlashMLA's data: randn / 10 clamped to [-1, 1], rounded once to the view's dtype."""
    values = (torch.randn(view.shape, generator=gen, device=view.device) / 10).clamp_(-1.0, 1.0)
    view.copy_(values)


def _nan(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _q_view(spec: RandomSpec, device) -> torch.Tensor:
    b, s_q, h_q, d = spec.b, spec.s_q, spec.h_q, spec.d
    kind = spec.q_view
    if kind == "padded_d":
        return _nan((b, s_q, h_q, d + 64), spec.dtype, device)[..., :d]
    if kind == "head_slice":
        return _nan((b, s_q, 2 * h_q, d), spec.dtype, device)[:, :, 1::2]
    if kind == "batch_slice":
        return _nan((2 * b + 1, s_q, h_q, d), spec.dtype, device)[1::2]
    if kind == "transposed":
        return _nan((b, h_q, s_q, d), spec.dtype, device).transpose(1, 2)
    if kind == "misaligned":
        flat = _nan((b * s_q * h_q * d + 1,), spec.dtype, device)
        return flat[1:].view(b, s_q, h_q, d)
    return torch.empty(b, s_q, h_q, d, dtype=spec.dtype, device=device)


def _cache_view(spec: RandomSpec, num_blocks: int, device) -> torch.Tensor:
    page, h_kv, d = spec.page_size, spec.h_kv, spec.d
    kind = spec.cache_view
    if kind == "pool_offset":
        return _nan((num_blocks + 3, page, h_kv, d), spec.dtype, device)[2:2 + num_blocks]
    if kind == "padded_d":
        return _nan((num_blocks, page, h_kv, d + 64), spec.dtype, device)[..., :d]
    if kind == "head_slice":
        return _nan((num_blocks, page, 2 * h_kv, d), spec.dtype, device)[:, :, ::2]
    if kind == "padded_odd":  # 2-byte row stride misalignment: fine for the reference, not for TMA
        return _nan((num_blocks, page, h_kv, d + 1), spec.dtype, device)[..., :d]
    if kind == "misaligned":
        flat = _nan((num_blocks * page * h_kv * d + 1,), spec.dtype, device)
        return flat[1:].view(num_blocks, page, h_kv, d)
    return _nan((num_blocks, page, h_kv, d), spec.dtype, device)


def build_inputs(spec: RandomSpec, device="cpu") -> DecodeInputs:
    """Tensors for ``spec`` on ``device``; ``.case`` is a :class:`DecodeCase` with the same sizes."""
    device = torch.device(device)
    page = spec.page_size
    index_gen = random.Random(spec.seed)
    value_gen = torch.Generator(device=device)
    value_gen.manual_seed(spec.seed)

    needed = [-(-n // page) for n in spec.seqlens]
    used_pages = sum(needed)
    num_blocks = max(1, used_pages + spec.spare_pages)
    pool = list(range(num_blocks))
    index_gen.shuffle(pool)  # permuted, and with spare pages, sparse
    columns = max(1, max(needed)) + spec.extra_columns

    def garbage() -> int:
        if spec.garbage == "unused_id":
            return UNUSED_BLOCK_ID
        if spec.garbage == "negative":
            return -1
        if spec.garbage == "random":
            return index_gen.randint(-2**31, 2**31 - 1)
        return index_gen.randrange(num_blocks)  # "alias": some page, maybe another request's; still never read

    rows, owned, cursor = [], [], 0
    for nb in needed:
        mine = pool[cursor:cursor + nb]
        cursor += nb
        owned.append(mine)
        rows.append(mine + [garbage() for _ in range(columns - nb)])
    table = torch.tensor(rows, dtype=torch.int32)
    if spec.table_view == "row_slice":
        wide = torch.full((2 * spec.b, columns + 5), UNUSED_BLOCK_ID, dtype=torch.int32)
        wide[::2, :columns] = table
        table = wide.to(device)[::2, :columns]
    else:
        table = table.to(device)

    kcache = _cache_view(spec, num_blocks, device)
    live = torch.zeros(num_blocks, page, dtype=torch.bool)
    for n, mine in zip(spec.seqlens, owned):
        if mine:
            live[torch.tensor(mine)] = (torch.arange(len(mine) * page) < n).view(len(mine), page)
    values = torch.empty(kcache.shape, dtype=spec.dtype, device=device)
    _randn_into(values, value_gen)
    live = live.to(device)
    kcache[live] = values[live]  # every other row stays NaN

    q = _q_view(spec, device)
    _randn_into(q, value_gen)

    seqlens = torch.tensor(spec.seqlens, dtype=torch.int32, device=device)
    case = DecodeCase(b=spec.b, s_q=spec.s_q, s_k=max(spec.seqlens), h_q=spec.h_q, h_kv=spec.h_kv, d=spec.d,
                      page_size=page, causal=spec.causal, dtype=spec.dtype, seed=spec.seed)
    return DecodeInputs(q, kcache, table, seqlens, case)
