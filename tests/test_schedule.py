"""The split-KV scheduler (pure Python): FlashMLA bit-exactness, invariants, the policy seam, the public entry.

The reference in ``cutemla.schedule.reference_impl`` is cross-checked against ``cuda_transliteration`` below,
an independent line-by-line Python rendering of FlashMLA's ``get_mla_metadata_kernel`` (v1.0.0) that keeps
its flat dynamic shared-memory array, its 32-lane strided sum with a butterfly reduction, and the
out-of-bounds ``first_block_idx_shared[b]`` read that aliases ``last_block_idx_shared[0]``.
"""
from __future__ import annotations

import random

import pytest
import torch

from cutemla.schedule import (
    FLASHMLA_POLICY,
    SchedulePolicy,
    flashmla_plan,
    get_decoding_sched_meta,
    num_sm_parts,
    plan_python,
    validate_metadata,
)

# ----------------------------------------------------------------------------------------------------------
# Independent formulation: FlashMLA's CUDA kernel, transliterated.


def c_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def cuda_transliteration(seqlens_k, num_sm_parts, block_size_n=64, fixed_overhead_num_blocks=5):
    batch_size = len(seqlens_k)
    shared_mem = [None] * (batch_size * 5 + 1)  # None = never written
    num_blocks_shared = 0
    num_splits_shared = batch_size
    seqlens_k_shared = batch_size * 2 + 1
    first_block_idx_shared = batch_size * 3 + 1
    last_block_idx_shared = batch_size * 4 + 1

    lane_totals = [0] * 32
    for thread_idx in range(32):
        total_num_blocks = 0
        for i in range(thread_idx, batch_size, 32):
            cur_s_k = seqlens_k[i]
            shared_mem[seqlens_k_shared + i] = cur_s_k
            first_token_idx = 0
            last_token_idx = max(cur_s_k - 1, 0)
            cur_first_block_idx = c_div(first_token_idx, block_size_n)
            cur_last_block_idx = c_div(last_token_idx, block_size_n)
            num_blocks = cur_last_block_idx - cur_first_block_idx + 1
            total_num_blocks += num_blocks + fixed_overhead_num_blocks
            shared_mem[num_blocks_shared + i] = num_blocks
            shared_mem[first_block_idx_shared + i] = cur_first_block_idx
            shared_mem[last_block_idx_shared + i] = cur_last_block_idx
        lane_totals[thread_idx] = total_num_blocks
    offset = 16
    while offset >= 1:  # __shfl_xor_sync butterfly
        lane_totals = [lane_totals[t] + lane_totals[t ^ offset] for t in range(32)]
        offset //= 2
    total_num_blocks = lane_totals[0]

    meta = []
    payload = c_div(total_num_blocks + num_sm_parts - 1, num_sm_parts) + fixed_overhead_num_blocks
    now_req_idx = now_block = now_n_split_idx = cum_num_splits = 0
    shared_mem[num_splits_shared + 0] = 0
    for _ in range(num_sm_parts):
        cur = {}
        cur["begin_req_idx"] = now_req_idx
        cur["begin_block_idx"] = now_block + shared_mem[first_block_idx_shared + now_req_idx]
        cur["begin_split_idx"] = now_n_split_idx
        cur["is_first_req_splitted"] = int(now_block != 0)
        remain_payload = payload
        while now_req_idx < batch_size:
            num_blocks = shared_mem[num_blocks_shared + now_req_idx]
            now_remain_blocks = num_blocks - now_block
            if remain_payload >= now_remain_blocks + fixed_overhead_num_blocks:
                cum_num_splits += now_n_split_idx + 1
                shared_mem[num_splits_shared + now_req_idx + 1] = cum_num_splits
                remain_payload -= now_remain_blocks + fixed_overhead_num_blocks
                now_req_idx += 1
                now_block = 0
                now_n_split_idx = 0
            else:
                if remain_payload - fixed_overhead_num_blocks > 0:
                    now_block += remain_payload - fixed_overhead_num_blocks
                    now_n_split_idx += 1
                    remain_payload = 0
                break
        cur["end_req_idx"] = now_req_idx if now_block > 0 else now_req_idx - 1
        if now_block > 0:
            cur["end_block_idx"] = now_block + shared_mem[first_block_idx_shared + now_req_idx]
        elif shared_mem[seqlens_k_shared + now_req_idx - 1] == 0:
            cur["end_block_idx"] = 0
        else:
            cur["end_block_idx"] = shared_mem[last_block_idx_shared + now_req_idx - 1] + 1
        cur["is_last_req_splitted"] = int(
            cur["end_block_idx"] != shared_mem[last_block_idx_shared + cur["end_req_idx"]] + 1
            and shared_mem[seqlens_k_shared + cur["end_req_idx"]] != 0)
        if cur["begin_req_idx"] == cur["end_req_idx"]:
            merged = int(cur["is_first_req_splitted"] or cur["is_last_req_splitted"])
            cur["is_first_req_splitted"] = cur["is_last_req_splitted"] = merged
        meta.append([cur["begin_req_idx"], cur["end_req_idx"], cur["begin_block_idx"], cur["end_block_idx"],
                     cur["begin_split_idx"], cur["is_first_req_splitted"], cur["is_last_req_splitted"]])
    assert now_req_idx == batch_size and now_block == 0 and now_n_split_idx == 0
    num_splits = shared_mem[num_splits_shared:num_splits_shared + batch_size + 1]
    return meta, num_splits


# ----------------------------------------------------------------------------------------------------------
# Random batches.

SM_COUNTS = [1, 2, 7, 66, 78, 114, 132, 160]
HEAD_CONFIGS = [  # (s_q, h_q, h_kv)
    (1, 128, 1), (2, 128, 1), (1, 16, 1), (1, 64, 1), (4, 64, 2), (1, 3, 3), (2, 126, 3), (1, 8, 8), (3, 63, 1),
    (64, 128, 1),
]


def random_seqlens(rng: random.Random, batch: int) -> list[int]:
    kind = rng.choice(["uniform", "zeros", "short", "edges", "equal", "one_long"])
    if kind == "uniform":
        return [rng.randint(0, 70000) for _ in range(batch)]
    if kind == "zeros":  # about half empty, as in FlashMLA's corner test
        return [0 if rng.random() < 0.5 else rng.randint(1, 70000) for _ in range(batch)]
    if kind == "short":
        return [rng.randint(0, 200) for _ in range(batch)]
    if kind == "edges":  # block boundaries
        return [max(0, 64 * rng.randint(0, 1000) + rng.choice([-1, 0, 1])) for _ in range(batch)]
    if kind == "equal":
        return [rng.randint(0, 70000)] * batch
    lengths = [rng.randint(0, 64) for _ in range(batch)]
    lengths[rng.randrange(batch)] = rng.randint(10000, 70000)
    return lengths


def random_cases(count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        batch = rng.choice([1, 2, 3, rng.randint(1, 40), rng.randint(1, 300)])
        seqlens = random_seqlens(rng, batch)
        s_q, h_q, h_kv = rng.choice(HEAD_CONFIGS)
        parts = num_sm_parts(rng.choice(SM_COUNTS), s_q, h_q, h_kv)
        if rng.random() < 0.25:
            parts = rng.randint(1, 200)  # any partition count, e.g. more partitions than requests
        yield seqlens, parts


def test_matches_cuda_transliteration_on_random_batches():
    cases = 0
    for seqlens, parts in random_cases(600, seed=1234):
        meta, num_splits = flashmla_plan(seqlens, parts)
        want_meta, want_splits = cuda_transliteration(seqlens, parts)
        assert [row[:7] for row in meta] == want_meta, (seqlens, parts)
        assert num_splits == want_splits, (seqlens, parts)
        assert all(row[7] == 0 for row in meta)
        cases += 1
    assert cases == 600


@pytest.mark.parametrize("block_size_n,overhead", [(64, 0), (64, 3), (64, 12), (32, 5), (128, 1)])
def test_other_constants_match_transliteration(block_size_n, overhead):
    for seqlens, parts in random_cases(80, seed=block_size_n * 100 + overhead):
        meta, num_splits = flashmla_plan(seqlens, parts, block_size_n=block_size_n,
                                         fixed_overhead_num_blocks=overhead)
        want_meta, want_splits = cuda_transliteration(seqlens, parts, block_size_n, overhead)
        assert [row[:7] for row in meta] == want_meta
        assert num_splits == want_splits
        validate_metadata(torch.tensor(meta, dtype=torch.int32), torch.tensor(num_splits, dtype=torch.int32),
                          seqlens, block_size_n)


def test_hand_worked_example_with_trailing_partition():
    # seqlens [200, 0, 1000]: last blocks [3, 0, 15], counted blocks [4, 1, 16], total 4+1+16 + 3*5 = 36,
    # 6 partitions -> payload ceil(36/6) + 5 = 11. Worked through by hand from FlashMLA's kernel.
    meta, num_splits = flashmla_plan([200, 0, 1000], 6)
    assert meta == [
        [0, 0, 0, 4, 0, 0, 0, 0],  # request 0 whole (cost 9); 2 left < 1 + 5, no cut
        [1, 1, 0, 0, 0, 0, 0, 0],  # the empty request: end_block 0; 5 left, a cut would be empty
        [2, 2, 0, 6, 0, 1, 1, 0],  # request 2 cut after 11 - 5 = 6 blocks
        [2, 2, 6, 12, 1, 1, 1, 0],
        [2, 2, 12, 16, 2, 1, 1, 0],  # last piece (cost 4 + 5): flags merged since begin_req == end_req
        [3, 2, 3, 16, 0, 0, 0, 0],  # trailing: begin_req == b, begin_block = last block of request 0 (aliasing)
    ]
    assert num_splits == [0, 1, 2, 5]


def test_trailing_partitions_follow_the_aliasing_quirk():
    seen = 0
    for seqlens, parts in random_cases(400, seed=99):
        meta, _ = flashmla_plan(seqlens, parts)
        b = len(seqlens)
        last_block_0 = max(seqlens[0] - 1, 0) // 64
        end_of_last = 0 if seqlens[-1] == 0 else max(seqlens[-1] - 1, 0) // 64 + 1
        for row in meta:
            if row[0] == b:
                assert row[:7] == [b, b - 1, last_block_0, end_of_last, 0, 0, 0]
                seen += 1
    assert seen > 100  # the random mix does exercise trailing rows


# ----------------------------------------------------------------------------------------------------------
# Invariants, checked directly (independently of validate_metadata).


def check_invariants(seqlens, parts, meta, num_splits):
    b = len(seqlens)
    nblk = [-(-s // 64) for s in seqlens]
    assert len(meta) == parts and len(num_splits) == b + 1 and num_splits[0] == 0
    assert num_splits[b] <= b + parts
    pieces = [[] for _ in range(b)]  # per request, (lo, hi) in partition order
    split_ids = [[] for _ in range(b)]
    for row in meta:
        begin_req, end_req, begin_block, end_block, begin_split = row[:5]
        if begin_req >= b:
            continue
        for r in range(begin_req, end_req + 1):
            lo = begin_block if r == begin_req else 0
            hi = end_block if r == end_req else nblk[r]
            assert lo < hi or nblk[r] == 0
            pieces[r].append((lo, hi))
            split_ids[r].append(num_splits[r] + (begin_split if r == begin_req else 0))
    for r in range(b):
        # The pieces, in partition order, tile [0, nblk) exactly: every block once, in order.
        edges = [0]
        for lo, hi in pieces[r]:
            assert lo == edges[-1], f"request {r}: gap or overlap at block {lo}"
            edges.append(hi)
        assert edges[-1] == nblk[r], f"request {r}: blocks from {edges[-1]} not covered"
        count = num_splits[r + 1] - num_splits[r]
        assert count == len(pieces[r]) >= 1  # splits == partitions touching the request
        assert split_ids[r] == list(range(num_splits[r], num_splits[r + 1]))  # consecutive, partition order
        if nblk[r] <= 1:
            assert count == 1, "a request of at most one block is never split"


def test_invariants_on_random_batches():
    for seqlens, parts in random_cases(400, seed=7):
        meta, num_splits = flashmla_plan(seqlens, parts)
        check_invariants(seqlens, parts, meta, num_splits)
        validate_metadata(torch.tensor(meta, dtype=torch.int32), torch.tensor(num_splits, dtype=torch.int32),
                          torch.tensor(seqlens, dtype=torch.int32))


def test_num_sm_parts_formula():
    assert num_sm_parts(132, 1, 128, 1) == 66
    assert num_sm_parts(132, 1, 16, 1) == 132
    assert num_sm_parts(132, 2, 128, 1) == 33
    assert num_sm_parts(132, 1, 128, 8) == 132 // 8 // 1
    assert num_sm_parts(132, 4, 64, 2) == 132 // 2 // 2
    assert num_sm_parts(132, 64, 128, 1) == 1  # 8192 query rows = 128 m-blocks; 132 // 128 = 1
    assert num_sm_parts(78, 128, 128, 1) == 1  # 256 m-blocks: 78 // 256 = 0, clamped to 1 (FlashMLA once gave 0)
    assert num_sm_parts(1, 1, 1, 1) == 1
    with pytest.raises(ValueError, match="multiple of h_kv"):
        num_sm_parts(132, 1, 10, 3)
    with pytest.raises(ValueError, match="s_q"):
        num_sm_parts(132, 0, 128, 1)


# ----------------------------------------------------------------------------------------------------------
# validate_metadata must reject broken schedules.


def _valid_case():
    seqlens = [200, 0, 1000, 5000, 64, 65]
    meta, num_splits = FLASHMLA_POLICY.plan(seqlens, 8)
    validate_metadata(meta, num_splits, seqlens)
    return seqlens, meta, num_splits


def _split_row(meta, b):
    """A partition holding a middle piece of a split request (begin_req == end_req, begin_split > 0)."""
    return next(p for p in range(meta.shape[0])
                if meta[p, 0] < b and meta[p, 0] == meta[p, 1] and meta[p, 4] > 0 and meta[p, 3] - meta[p, 2] > 1)


@pytest.mark.parametrize("corruption,message", [
    (lambda m, s, b: s.__setitem__(0, 1), "num_splits\\[0\\]"),
    (lambda m, s, b: m.__setitem__((_split_row(m, b), 3), m[_split_row(m, b), 3] - 1), "not covered"),
    (lambda m, s, b: m.__setitem__((_split_row(m, b), 2), m[_split_row(m, b), 2] - 1), "covered twice"),
    (lambda m, s, b: m.__setitem__((_split_row(m, b), 4), 0), "split indices"),
    (lambda m, s, b: m.__setitem__((0, 5), 1 - m[0, 5]), "flags"),
    (lambda m, s, b: m.__setitem__((0, 1), b), "end_req"),
    (lambda m, s, b: s.__setitem__(slice(2, None), s[2:] + 1), "split indices"),
    (lambda m, s, b: m.__setitem__((slice(None), 0), b), "split indices"),  # every partition idle
])
def test_validate_metadata_rejects(corruption, message):
    seqlens, meta, num_splits = _valid_case()
    corruption(meta, num_splits, len(seqlens))
    with pytest.raises(ValueError, match=message):
        validate_metadata(meta, num_splits, seqlens)


def test_validate_metadata_rejects_shapes_and_dtypes():
    seqlens, meta, num_splits = _valid_case()
    with pytest.raises(ValueError, match="int32"):
        validate_metadata(meta.long(), num_splits, seqlens)
    with pytest.raises(ValueError, match="b \\+ 1"):
        validate_metadata(meta, num_splits[:-1], seqlens)
    with pytest.raises(ValueError, match="shape"):
        validate_metadata(meta[:, :7], num_splits, seqlens)


# ----------------------------------------------------------------------------------------------------------
# The policy seam and the public entry (CPU path).


def test_policy_constants_and_validation():
    assert FLASHMLA_POLICY == SchedulePolicy(64, 5) and FLASHMLA_POLICY.uses_flashmla_plan
    with pytest.raises(ValueError, match="fixed_overhead_num_blocks"):
        SchedulePolicy(fixed_overhead_num_blocks=-1)
    with pytest.raises(ValueError, match="block_size_n"):
        SchedulePolicy(block_size_n=0)
    # Other constants give other (still valid) schedules: the constants are really used.
    rng = random.Random(5)
    differs = 0
    for _ in range(50):
        seqlens = random_seqlens(rng, rng.randint(1, 200))
        default = FLASHMLA_POLICY.plan(seqlens, 66)
        lazy = SchedulePolicy(fixed_overhead_num_blocks=40).plan(seqlens, 66)
        validate_metadata(*lazy, seqlens)
        differs += not torch.equal(default[0], lazy[0])
    assert differs > 25


class OnePartitionPerRequest(SchedulePolicy):
    """A user policy: as many partitions as requests... capped by num_sm_parts; never splits."""

    def plan(self, cache_seqlens, num_sm_parts):
        seqlens = [int(s) for s in cache_seqlens]
        b = len(seqlens)
        meta = []
        per_part = -(-b // num_sm_parts)
        for p in range(num_sm_parts):
            lo, hi = p * per_part, min((p + 1) * per_part, b)
            if lo >= hi:
                meta.append([b, b - 1, 0, 0, 0, 0, 0, 0])
            else:
                meta.append([lo, hi - 1, 0, -(-seqlens[hi - 1] // 64), 0, 0, 0, 0])
        return torch.tensor(meta, dtype=torch.int32), torch.arange(b + 1, dtype=torch.int32)


class FewerParts(SchedulePolicy):
    def num_sm_parts(self, num_sms, s_q, h_q, h_kv):
        return max(super().num_sm_parts(num_sms, s_q, h_q, h_kv) // 2, 1)


def test_custom_policies_on_cpu():
    seqlens = torch.tensor([0, 10, 4000, 70000, 64, 128, 129], dtype=torch.int32)
    custom = OnePartitionPerRequest()
    assert not custom.uses_flashmla_plan
    meta, num_splits = get_decoding_sched_meta(seqlens, 1, 128, 1, num_sms=10, policy=custom)
    assert meta.shape == (5, 8) and num_splits.tolist() == list(range(8))
    validate_metadata(meta, num_splits, seqlens)

    fewer = FewerParts()
    assert fewer.uses_flashmla_plan  # only the partition count changed: the device kernel still applies
    meta, num_splits = get_decoding_sched_meta(seqlens, 1, 128, 1, policy=fewer)
    assert meta.shape == (33, 8)
    want_meta, want_splits = cuda_transliteration(seqlens.tolist(), 33)
    assert meta[:, :7].tolist() == want_meta and num_splits.tolist() == want_splits


def test_get_decoding_sched_meta_cpu():
    seqlens = torch.tensor([300, 0, 4096, 70000, 1], dtype=torch.int32)
    meta, num_splits = get_decoding_sched_meta(seqlens, 1, 128, 1)  # 132 SMs assumed on CPU -> 66 parts
    assert meta.dtype == num_splits.dtype == torch.int32
    assert meta.device.type == num_splits.device.type == "cpu"
    assert meta.shape == (66, 8) and num_splits.shape == (6,)
    want_meta, want_splits = cuda_transliteration(seqlens.tolist(), 66)
    assert meta[:, :7].tolist() == want_meta and num_splits.tolist() == want_splits
    assert (meta[:, 7] == 0).all()
    py_meta, py_splits = plan_python(seqlens, 66)
    assert torch.equal(py_meta, meta) and torch.equal(py_splits, num_splits)

    meta, _ = get_decoding_sched_meta(seqlens, 2, 64, 2, num_sms=78)
    assert meta.shape == (num_sm_parts(78, 2, 64, 2), 8)


@pytest.mark.parametrize("args,kwargs,error,message", [
    (([1, 2], 1, 128, 1), {}, TypeError, "torch.Tensor"),
    ((torch.tensor([1, 2]), 1, 128, 1), {}, TypeError, "int32"),
    ((torch.zeros(0, dtype=torch.int32), 1, 128, 1), {}, ValueError, "b >= 1"),
    ((torch.zeros(2, 2, dtype=torch.int32), 1, 128, 1), {}, ValueError, "1-D"),
    ((torch.tensor([5, -1], dtype=torch.int32), 1, 128, 1), {}, ValueError, "non-negative"),
    ((torch.tensor([5], dtype=torch.int32), 1, 128, 3), {}, ValueError, "multiple of h_kv"),
    ((torch.tensor([5], dtype=torch.int32), 1, 128, 1), {"num_sms": 0}, ValueError, "num_sms"),
    ((torch.tensor([5], dtype=torch.int32), 1, 128, 1), {"policy": "fast"}, TypeError, "SchedulePolicy"),
])
def test_get_decoding_sched_meta_rejects_bad_input(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        get_decoding_sched_meta(*args, **kwargs)
