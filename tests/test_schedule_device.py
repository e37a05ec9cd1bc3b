"""The scheduler's CuTe DSL kernel: compiles for sm_90a on CPU; on an sm90 GPU, equals the Python reference."""
from __future__ import annotations

import random

import pytest
import torch

from cutemla.schedule import (
    SchedulePolicy,
    flashmla_plan,
    get_decoding_sched_meta,
    num_sm_parts,
    validate_metadata,
)

HEAD_CONFIGS = [(1, 128, 1), (2, 128, 1), (1, 16, 1), (4, 64, 2), (2, 126, 3), (1, 8, 8), (64, 128, 1)]


@pytest.mark.compile
def test_kernel_compiles_for_sm90a_without_spills():
    from cutemla.kernels.ptx_report import run_report

    report = run_report("cutemla.schedule.device", "default")
    assert report["kernels"] == 1
    assert report["spill_bytes"] == 0 and report["stack_bytes"] == 0
    assert report["ptx"]["target_sm90a"] >= 1
    assert report["ptx"]["local_memory"] == 0


@pytest.mark.compile
def test_compiled_function_takes_three_tensors_and_the_env_stream():
    # The fake stream compiled with use_tvm_ffi_env_stream=True is not a call argument: the function takes
    # (cache_seqlens, meta, num_splits) and launches on torch's current stream. TVM-FFI checks the arguments
    # before launching, so this runs without a GPU.
    from cutemla.schedule.device import compile_sched_meta

    fn = compile_sched_meta()
    seqlens = torch.zeros(3, dtype=torch.int32)
    meta = torch.zeros(4, 8, dtype=torch.int32)
    num_splits = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="device_type=cuda"):
        fn(seqlens, meta, num_splits)
    with pytest.raises(TypeError, match="3 positional arguments"):
        fn(seqlens, meta, num_splits, None)


def random_seqlens(rng: random.Random, batch: int) -> list[int]:
    kind = rng.choice(["uniform", "zeros", "short", "edges", "equal"])
    if kind == "uniform":
        return [rng.randint(0, 70000) for _ in range(batch)]
    if kind == "zeros":
        return [0 if rng.random() < 0.5 else rng.randint(1, 70000) for _ in range(batch)]
    if kind == "short":
        return [rng.randint(0, 200) for _ in range(batch)]
    if kind == "edges":
        return [max(0, 64 * rng.randint(0, 1000) + rng.choice([-1, 0, 1])) for _ in range(batch)]
    return [rng.randint(0, 70000)] * batch


def expected(seqlens, parts, policy=SchedulePolicy()):
    meta, num_splits = flashmla_plan(seqlens, parts, block_size_n=policy.block_size_n,
                                     fixed_overhead_num_blocks=policy.fixed_overhead_num_blocks)
    return torch.tensor(meta, dtype=torch.int32), torch.tensor(num_splits, dtype=torch.int32)


@pytest.mark.gpu
def test_device_matches_python_on_random_batches():
    rng = random.Random(2024)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for case in range(150):
        batch = rng.choice([1, 2, 3, 31, 32, 33, rng.randint(1, 300), rng.randint(1, 1024)])
        seqlens = random_seqlens(rng, batch)
        s_q, h_q, h_kv = rng.choice(HEAD_CONFIGS)
        sms = rng.choice([num_sms, 132, 78, 1, 160])
        meta, num_splits = get_decoding_sched_meta(
            torch.tensor(seqlens, dtype=torch.int32, device="cuda"), s_q, h_q, h_kv, num_sms=sms)
        assert meta.is_cuda and num_splits.is_cuda
        want_meta, want_splits = expected(seqlens, num_sm_parts(sms, s_q, h_q, h_kv))
        assert torch.equal(meta.cpu(), want_meta), (case, seqlens, sms, s_q, h_q, h_kv)
        assert torch.equal(num_splits.cpu(), want_splits), (case, seqlens, sms, s_q, h_q, h_kv)


@pytest.mark.gpu
def test_device_default_sm_count_and_large_batches():
    rng = random.Random(7)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch in (4096, 20000):
        seqlens = random_seqlens(rng, batch)
        meta, num_splits = get_decoding_sched_meta(torch.tensor(seqlens, dtype=torch.int32, device="cuda"), 1, 64, 1)
        want_meta, want_splits = expected(seqlens, num_sm_parts(num_sms, 1, 64, 1))
        assert torch.equal(meta.cpu(), want_meta) and torch.equal(num_splits.cpu(), want_splits)
        validate_metadata(meta, num_splits, seqlens)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", [SchedulePolicy(fixed_overhead_num_blocks=0), SchedulePolicy(32, 3)])
def test_device_with_other_constants(policy):
    rng = random.Random(policy.fixed_overhead_num_blocks)
    for _ in range(30):
        seqlens = random_seqlens(rng, rng.randint(1, 500))
        meta, num_splits = get_decoding_sched_meta(
            torch.tensor(seqlens, dtype=torch.int32, device="cuda"), 1, 128, 1, num_sms=132, policy=policy)
        want_meta, want_splits = expected(seqlens, 66, policy)
        assert torch.equal(meta.cpu(), want_meta) and torch.equal(num_splits.cpu(), want_splits)


class NoSplitPolicy(SchedulePolicy):
    """Overrides plan: runs on the host even for CUDA tensors."""

    def plan(self, cache_seqlens, num_sm_parts):
        b = len(cache_seqlens)
        meta = [[0, b - 1, 0, -(-int(cache_seqlens[-1]) // 64), 0, 0, 0, 0]]
        meta += [[b, b - 1, 0, 0, 0, 0, 0, 0]] * (num_sm_parts - 1)
        return torch.tensor(meta, dtype=torch.int32), torch.arange(b + 1, dtype=torch.int32)


@pytest.mark.gpu
def test_host_policy_on_cuda():
    seqlens = torch.tensor([5, 0, 700, 64], dtype=torch.int32, device="cuda")
    meta, num_splits = get_decoding_sched_meta(seqlens, 1, 128, 1, num_sms=132, policy=NoSplitPolicy())
    assert meta.is_cuda and meta.shape == (66, 8)
    assert meta[0].tolist() == [0, 3, 0, 1, 0, 0, 0, 0] and num_splits.tolist() == [0, 1, 2, 3, 4]
    validate_metadata(meta, num_splits, seqlens)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    rng = random.Random(11)
    batch, s_q, h_q, h_kv, sms = 96, 2, 128, 1, 132
    parts = num_sm_parts(sms, s_q, h_q, h_kv)
    seqlens = torch.tensor(random_seqlens(rng, batch), dtype=torch.int32, device="cuda")
    get_decoding_sched_meta(seqlens, s_q, h_q, h_kv, num_sms=sms)  # compile/load outside the capture
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta, num_splits = get_decoding_sched_meta(seqlens, s_q, h_q, h_kv, num_sms=sms)
    for _ in range(6):
        values = random_seqlens(rng, batch)
        seqlens.copy_(torch.tensor(values, dtype=torch.int32))
        meta.fill_(-1)
        num_splits.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        want_meta, want_splits = expected(values, parts)
        assert torch.equal(meta.cpu(), want_meta) and torch.equal(num_splits.cpu(), want_splits)
