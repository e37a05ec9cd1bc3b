"""The scheduling seam: how the decode kernel's KV work is cut into partitions, and the metadata contract.

A :class:`SchedulePolicy` decides two things:

* ``num_sm_parts(num_sms, s_q, h_q, h_kv)``: how many partitions (the grid's z extent) to use;
* ``plan(cache_seqlens, num_sm_parts)``: which (request, block) ranges each partition processes.

The default, :data:`FLASHMLA_POLICY`, is FlashMLA's greedy scheduler, reproduced bit-exactly. It also runs as a
CuTe DSL kernel (see ``cutemla.schedule.device``), which is what ``get_decoding_sched_meta`` uses on CUDA, so
it needs no host sync and can be captured in a CUDA graph. A policy that only changes the constants
(``SchedulePolicy(fixed_overhead_num_blocks=3)``) or overrides ``num_sm_parts`` keeps that device path; a
subclass that overrides ``plan`` runs on the host (one sync, not graph-safe).

Metadata contract (what the decode kernel reads; :func:`validate_metadata` checks it)
------------------------------------------------------------------------------------
``meta`` is int32 ``[num_sm_parts, 8]``; row p = ``[begin_req, end_req, begin_block, end_block,
begin_split_idx, is_first_req_splitted, is_last_req_splitted, 0]``. ``num_splits`` is int32 ``[b + 1]``,
the exclusive prefix sum of splits per request: request r owns split rows ``[num_splits[r], num_splits[r+1])``
of the fp32 accumulators, which have ``b + num_sm_parts`` rows, so ``num_splits[b] <= b + num_sm_parts``.

Partition p with ``begin_req >= b`` does nothing. Otherwise it processes requests ``begin_req..end_req``
(inclusive) in order. With ``nblk(r) = ceil(seqlen[r] / 64)`` (0 for an empty request), request r's block range
in partition p is ``[begin_block if r == begin_req else 0, end_block if r == end_req else nblk(r))``. It writes
split index ``num_splits[r] + (begin_split_idx if r == begin_req else 0)``. Request r is "split" (each piece
writes fp32 partial O and log-sum-exp for the combine kernel) iff ``num_splits[r+1] - num_splits[r] > 1``;
otherwise its one partition writes the final output directly. Every request, even an empty one, must be
touched by exactly as many partitions as it has splits (an empty request's partition writes out 0, lse +inf).
The flags in words 5 and 6 mirror FlashMLA (``begin_req`` / ``end_req`` has more than one split); the cutemla
kernel does not need them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .reference_impl import (
    BEGIN_BLOCK,
    BEGIN_REQ,
    BEGIN_SPLIT,
    END_BLOCK,
    END_REQ,
    FIRST_SPLIT,
    LAST_SPLIT,
    META_WORDS,
    ceil_div,
    flashmla_plan,
    num_sm_parts_formula,
)

# Query rows handled by one CTA of the decode kernel (FlashMLA's BLOCK_SIZE_M).
BLOCK_SIZE_M = 64


def _as_int_list(values, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {values.dtype}")
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


@dataclass(frozen=True)
class SchedulePolicy:
    """FlashMLA's split-KV scheduler with its two constants; subclass to change how work is cut.

    ``block_size_n`` is the KV block (and page) size the blocks are counted in; the decode kernel uses 64.
    ``fixed_overhead_num_blocks`` is the cost, in blocks, charged per request piece for its prologue and
    epilogue; a larger value makes the scheduler split less eagerly.
    """

    block_size_n: int = 64
    fixed_overhead_num_blocks: int = 5

    def __post_init__(self):
        if not isinstance(self.block_size_n, int) or self.block_size_n < 1:
            raise ValueError(f"block_size_n must be a positive int, got {self.block_size_n!r}")
        if not isinstance(self.fixed_overhead_num_blocks, int) or self.fixed_overhead_num_blocks < 0:
            raise ValueError(
                f"fixed_overhead_num_blocks must be a non-negative int, got {self.fixed_overhead_num_blocks!r}")

    def num_sm_parts(self, num_sms: int, s_q: int, h_q: int, h_kv: int) -> int:
        """Partitions per KV head: ``max(num_sms // h_kv // ceil_div(s_q * h_q // h_kv, 64), 1)``."""
        return num_sm_parts_formula(num_sms, s_q, h_q, h_kv, BLOCK_SIZE_M)

    def plan(self, cache_seqlens: Sequence[int] | torch.Tensor, num_sm_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Metadata on the host: ``(meta int32 [num_sm_parts, 8], num_splits int32 [b + 1])`` CPU tensors.

        Overriding this moves ``get_decoding_sched_meta`` on CUDA to a host computation (a sync per call).
        An override must satisfy the contract in this module's docstring (check it with ``validate_metadata``).
        """
        seqlens = _as_int_list(cache_seqlens, "cache_seqlens")
        meta, num_splits = flashmla_plan(
            seqlens, num_sm_parts,
            block_size_n=self.block_size_n, fixed_overhead_num_blocks=self.fixed_overhead_num_blocks)
        return (torch.tensor(meta, dtype=torch.int32).reshape(num_sm_parts, META_WORDS),
                torch.tensor(num_splits, dtype=torch.int32))

    @property
    def uses_flashmla_plan(self) -> bool:
        """True when ``plan`` is the stock algorithm, which the device kernel reproduces."""
        return type(self).plan is SchedulePolicy.plan


FLASHMLA_POLICY = SchedulePolicy()


def plan_python(cache_seqlens, num_sm_parts: int, policy: SchedulePolicy | None = None):
    """``policy.plan`` (default FlashMLA's) on the host; returns CPU int32 tensors."""
    return (policy or FLASHMLA_POLICY).plan(cache_seqlens, num_sm_parts)


def validate_metadata(meta, num_splits, cache_seqlens, block_size_n: int = 64, *, check_flags: bool = True) -> None:
    """Raise ValueError naming the first violated invariant of the metadata contract (module docstring).

    Accepts tensors (any device; this copies them to the host) or nested lists. Checks: shapes and dtypes;
    ``num_splits`` starts at 0, every request has >= 1 split, total <= b + num_sm_parts; every active row has
    ``begin_req <= end_req < b``; each (request, piece) has a block range inside ``[0, nblk)``, non-empty
    unless the request is empty, and a split index inside the request's range; per request the pieces use
    each of its split indices exactly once and, in split order, tile ``[0, nblk)`` exactly once; an empty
    request has exactly one split. With ``check_flags``, words 5/6 must equal "begin_req / end_req has more
    than one split" on active rows (FlashMLA's semantics).
    """
    for name, value in (("meta", meta), ("num_splits", num_splits)):
        if isinstance(value, torch.Tensor) and value.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {value.dtype}")
    rows = meta.tolist() if isinstance(meta, torch.Tensor) else [list(r) for r in meta]
    splits = _as_int_list(num_splits, "num_splits")
    seqlens = _as_int_list(cache_seqlens, "cache_seqlens")
    batch = len(seqlens)
    num_parts = len(rows)

    if num_parts < 1 or any(len(r) != META_WORDS for r in rows):
        raise ValueError(f"meta must have shape [num_sm_parts >= 1, {META_WORDS}]")
    if len(splits) != batch + 1:
        raise ValueError(f"num_splits must have b + 1 = {batch + 1} entries, got {len(splits)}")
    if any(s < 0 for s in seqlens):
        raise ValueError("cache_seqlens must be non-negative")
    if splits[0] != 0:
        raise ValueError(f"num_splits[0] must be 0, got {splits[0]}")
    for r in range(batch):
        if splits[r + 1] - splits[r] < 1:
            raise ValueError(f"request {r} has {splits[r + 1] - splits[r]} splits; every request needs >= 1")
    if splits[batch] > batch + num_parts:
        raise ValueError(f"total splits {splits[batch]} exceed b + num_sm_parts = {batch + num_parts}")

    nblk = [ceil_div(s, block_size_n) for s in seqlens]
    pieces: list[list[tuple[int, int, int, int]]] = [[] for _ in range(batch)]  # (split, lo, hi, partition)
    for p, row in enumerate(rows):
        begin_req, end_req = row[BEGIN_REQ], row[END_REQ]
        if begin_req >= batch:
            continue  # an idle partition
        if not 0 <= begin_req <= end_req < batch:
            raise ValueError(f"meta row {p}: need 0 <= begin_req <= end_req < b, got {begin_req}, {end_req}")
        if row[BEGIN_SPLIT] < 0:
            raise ValueError(f"meta row {p}: begin_split_idx {row[BEGIN_SPLIT]} is negative")
        for r in range(begin_req, end_req + 1):
            lo = row[BEGIN_BLOCK] if r == begin_req else 0
            hi = row[END_BLOCK] if r == end_req else nblk[r]
            split = splits[r] + (row[BEGIN_SPLIT] if r == begin_req else 0)
            if not 0 <= lo <= hi <= nblk[r]:
                raise ValueError(f"meta row {p}: request {r} block range [{lo}, {hi}) is outside [0, {nblk[r]})")
            if nblk[r] > 0 and lo == hi:
                raise ValueError(f"meta row {p}: request {r} (non-empty) gets an empty block range [{lo}, {hi})")
            if not splits[r] <= split < splits[r + 1]:
                raise ValueError(f"meta row {p}: request {r} split index {split} is outside "
                                 f"[{splits[r]}, {splits[r + 1]})")
            pieces[r].append((split, lo, hi, p))
        if check_flags:
            want_first = int(splits[begin_req + 1] - splits[begin_req] > 1)
            want_last = int(splits[end_req + 1] - splits[end_req] > 1)
            if row[FIRST_SPLIT] != want_first or row[LAST_SPLIT] != want_last:
                raise ValueError(f"meta row {p}: split flags {row[FIRST_SPLIT]}, {row[LAST_SPLIT]} should be "
                                 f"{want_first}, {want_last}")

    for r in range(batch):
        count = splits[r + 1] - splits[r]
        got = sorted(pieces[r])
        if [s for s, *_ in got] != list(range(splits[r], splits[r + 1])):
            raise ValueError(f"request {r}: partitions use split indices {[s for s, *_ in got]}, "
                             f"expected each of {list(range(splits[r], splits[r + 1]))} once")
        if nblk[r] == 0 and count != 1:
            raise ValueError(f"request {r} is empty but has {count} splits; it must have exactly 1")
        position = 0
        for _, lo, hi, p in got:
            if lo != position:
                raise ValueError(f"request {r}: blocks [{position}, {lo}) are not covered in split order "
                                 f"(partition {p} starts at {lo})" if lo > position else
                                 f"request {r}: block {lo} is covered twice (partition {p})")
            position = hi
        if position != nblk[r]:
            raise ValueError(f"request {r}: blocks [{position}, {nblk[r]}) are not covered")
