"""FlashMLA's split-KV decoding scheduler, in plain Python (the readable reference).

FlashMLA (deepseek-ai/FlashMLA, ``get_decoding_sched_meta.cu`` at v1.0.0) splits the KV work of a batch of
requests over ``num_sm_parts`` partitions. Each partition is one CTA column of the decode grid; it walks a
contiguous run of (request, 64-token block) pairs. A request whose blocks land in several partitions is
"split": each piece writes fp32 partial results that a combine kernel merges afterwards.

The algorithm is a greedy fill. Every request costs ``nblk + fixed_overhead_num_blocks`` units of work (the
overhead models the per-request prologue/epilogue: loading Q, writing O). Each partition gets the same
budget, ``payload = ceil(total / num_sm_parts) + overhead``. A partition takes whole requests while they fit
and cuts the next one when they don't (the cut piece also pays the overhead, so it gets
``remaining_budget - overhead`` blocks, and only if that is positive).

This module reproduces the metadata bit-exactly (words 0-6 of each row, and ``num_splits``), including the
quirks of the CUDA kernel:

* a request of length 0 is counted as 1 block when balancing (its block range is still empty: end_block 0);
* trailing partitions that get no work (``begin_req == b``) read ``first_block_idx_shared[b]``, one past the
  end of that shared-memory array, which aliases ``last_block_idx_shared[0]``; so their begin_block is the
  last block index of request 0, their end_req is ``b - 1`` and their end_block is request ``b - 1``'s end.
  The decode kernel ignores such rows (``begin_req >= b``), but we reproduce them so the tensors compare equal.

Word 7 of each row is padding (uninitialised in FlashMLA); cutemla writes 0.
"""
from __future__ import annotations

from typing import Sequence

META_WORDS = 8  # one DecodingSchedMeta row: 7 int32 fields + 1 pad word

# Column indices of a metadata row.
BEGIN_REQ = 0  # first request of the partition
END_REQ = 1  # last request of the partition (inclusive)
BEGIN_BLOCK = 2  # first block of begin_req (inclusive)
END_BLOCK = 3  # end block of end_req (exclusive)
BEGIN_SPLIT = 4  # split index of begin_req's piece, relative to num_splits[begin_req]
FIRST_SPLIT = 5  # is_first_req_splitted: begin_req has more than one split
LAST_SPLIT = 6  # is_last_req_splitted: end_req has more than one split


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_sm_parts_formula(num_sms: int, s_q: int, h_q: int, h_kv: int, block_size_m: int = 64) -> int:
    """FlashMLA's dense-decode partition count.

    The decode grid is (ceil(q_rows / 64), h_kv, num_sm_parts) with q_rows = s_q * h_q / h_kv query rows per
    KV head, so this many partitions fill the GPU with one CTA per SM. C++ integer division, left to right;
    at least 1 (FlashMLA before 2025-04 lacked the max and crashed with many heads).
    """
    q_rows_per_kv_head = s_q * h_q // h_kv
    return max(num_sms // h_kv // ceil_div(q_rows_per_kv_head, block_size_m), 1)


def last_block_index(seqlen: int, block_size_n: int) -> int:
    """Index of the block holding the last token; 0 for an empty request (which then counts as 1 block)."""
    return max(seqlen - 1, 0) // block_size_n


def flashmla_plan(
    cache_seqlens: Sequence[int],
    num_sm_parts: int,
    *,
    block_size_n: int = 64,
    fixed_overhead_num_blocks: int = 5,
) -> tuple[list[list[int]], list[int]]:
    """Run FlashMLA's scheduler on a list of sequence lengths.

    Returns ``(meta, num_splits)`` as Python lists: ``meta`` has ``num_sm_parts`` rows of 8 ints,
    ``num_splits`` has ``b + 1`` ints (exclusive prefix sum of splits per request).
    """
    seqlens = [int(s) for s in cache_seqlens]
    batch = len(seqlens)
    overhead = fixed_overhead_num_blocks
    if batch == 0:
        raise ValueError("cache_seqlens must hold at least one request (FlashMLA requires b > 0)")
    if num_sm_parts < 1:
        raise ValueError(f"num_sm_parts must be >= 1, got {num_sm_parts}")
    if any(s < 0 for s in seqlens):
        raise ValueError("cache_seqlens must be non-negative")

    last_block = [last_block_index(s, block_size_n) for s in seqlens]
    num_blocks = [lb + 1 for lb in last_block]  # an empty request still counts one block of work

    total = sum(n + overhead for n in num_blocks)
    payload = ceil_div(total, num_sm_parts) + overhead

    def end_of(req: int) -> int:
        """Exclusive end block of a request that is finished: 0 for an empty request."""
        return 0 if seqlens[req] == 0 else last_block[req] + 1

    meta: list[list[int]] = []
    num_splits = [0] * (batch + 1)
    req = 0  # current request
    block = 0  # first block of `req` not yet assigned
    split = 0  # number of pieces of `req` already assigned to earlier partitions
    cum_splits = 0

    for _ in range(num_sm_parts):
        begin_req = req
        # FlashMLA adds first_block_idx_shared[req] (always 0 for a real request). For trailing partitions
        # req == b, and that out-of-range read lands on last_block_idx_shared[0].
        begin_block = block + (0 if req < batch else last_block[0])
        begin_split = split
        first_split = block != 0

        budget = payload
        while req < batch:
            remaining = num_blocks[req] - block
            if budget >= remaining + overhead:
                # The rest of this request fits: finish it.
                cum_splits += split + 1
                num_splits[req + 1] = cum_splits
                budget -= remaining + overhead
                req, block, split = req + 1, 0, 0
            else:
                # Cut the request; the piece pays the overhead too, so it is only taken if it is non-empty.
                if budget - overhead > 0:
                    block += budget - overhead
                    split += 1
                    budget = 0
                break

        if block > 0:  # stopped in the middle of `req`
            end_req, end_block = req, block
        else:  # stopped right after finishing req - 1 (for trailing partitions: still req - 1 == b - 1)
            end_req, end_block = req - 1, end_of(req - 1)
        last_split = end_block != last_block[end_req] + 1 and seqlens[end_req] != 0
        if begin_req == end_req:
            first_split = last_split = first_split or last_split
        meta.append([begin_req, end_req, begin_block, end_block, begin_split, int(first_split), int(last_split), 0])

    # Guaranteed by the budget: every partition removes at least ceil(total / num_sm_parts) units of work.
    assert req == batch and block == 0 and split == 0, "scheduler did not assign every block"
    return meta, num_splits
