"""Scale: a large batch (b = 1024) and one very long request (262144 tokens).

CPU: the schedule for both (shapes, the metadata contract via ``validate_metadata``, workspace bounded by
b + num_sm_parts splits), and the public API on b = 1024 short requests against the oracle.
GPU (``-m gpu``): the kernel on both against the reference, and its memory: the only allocations beyond the
inputs are the outputs and a split workspace of (b + num_sm_parts) rows, i.e. O(b + SMs), never O(seqlen).
"""
import pytest
import torch

import cutemla
from cutemla.reference import mla_decode_reference
from cutemla.schedule import DEFAULT_NUM_SMS, get_decoding_sched_meta, num_sm_parts, validate_metadata
from cutemla.testing import LSE_TOL, OUT_TOL, DecodeCase, assert_close_flashmla, dense_attention_oracle
from cutemla.testing import make_decode_inputs

LONG = 262144


def _check_schedule(seqlens, s_q, h_q, h_kv, num_sms=DEFAULT_NUM_SMS):
    meta, num_splits = get_decoding_sched_meta(seqlens, s_q, h_q, h_kv, num_sms=num_sms)
    b = seqlens.shape[0]
    parts = num_sm_parts(num_sms, s_q, h_q, h_kv)
    assert meta.shape == (parts, 8) and meta.dtype == torch.int32
    assert num_splits.shape == (b + 1,) and num_splits.dtype == torch.int32
    validate_metadata(meta, num_splits, seqlens)
    assert int(num_splits[-1]) <= b + parts  # the split workspace the kernel allocates is enough
    return meta, num_splits


@pytest.mark.parametrize("s_q,h_q,h_kv", [(1, 16, 1), (1, 128, 1), (2, 64, 1), (1, 128, 8)])
def test_schedule_b1024(s_q, h_q, h_kv):
    gen = torch.Generator().manual_seed(1024)
    seqlens = torch.randint(0, 4097, (1024,), generator=gen, dtype=torch.int32)
    seqlens[::17] = 0
    _check_schedule(seqlens, s_q, h_q, h_kv)


@pytest.mark.parametrize("num_sms", [132, 114, 78])
@pytest.mark.parametrize("s_q,h_q,h_kv", [(1, 16, 1), (1, 128, 1), (4, 128, 1), (1, 64, 8)])
def test_schedule_one_262144_token_request(s_q, h_q, h_kv, num_sms):
    seqlens = torch.tensor([LONG], dtype=torch.int32)
    meta, num_splits = _check_schedule(seqlens, s_q, h_q, h_kv, num_sms)
    parts = meta.shape[0]
    splits = int(num_splits[1])
    # The one request is spread over (nearly) every partition, in equal pieces but the last (the remainder).
    assert parts // 2 < splits <= parts
    active = meta[meta[:, 0] < 1]
    sizes = (active[:, 3] - active[:, 2]).tolist()
    assert len(sizes) == splits and sum(sizes) == LONG // 64
    assert len(set(sizes[:-1])) == 1 and sizes[-1] <= sizes[0]


def test_api_b1024_short_requests(clean_api_state, monkeypatch):
    monkeypatch.setenv("CUTEMLA_BACKEND", "reference")
    case = DecodeCase(b=1024, s_q=1, s_k=40, h_q=8, h_kv=1, varlen=True, zero_frac=0.1, seed=4)
    inputs = make_decode_inputs(case)
    meta, _ = cutemla.get_mla_metadata()
    out, lse = cutemla.flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens,
                                              512, meta)
    assert meta.tile_scheduler_metadata.shape == (num_sm_parts(DEFAULT_NUM_SMS, 1, 8, 1), 8)
    validate_metadata(meta.tile_scheduler_metadata, meta.num_splits, inputs.cache_seqlens)
    expected_out, expected_lse = dense_attention_oracle(inputs)
    assert_close_flashmla("out", out.float(), expected_out.float(), **OUT_TOL)
    assert_close_flashmla("lse", lse, expected_lse, **LSE_TOL)


# ----------------------------------------------------------------------------------------------------------
# GPU


def _workspace_bytes(b, s_q, h_q, h_kv, parts, dtype_bytes):
    """What run_dense_decode allocates: out, lse, and (b + parts) split rows of fp32 O and lse."""
    rows = s_q * (h_q // h_kv)
    outputs = b * s_q * h_q * 512 * dtype_bytes + b * h_q * s_q * 4
    accum = (b + parts) * h_kv * rows * (512 + 1) * 4
    meta = parts * 8 * 4 + (b + 1) * 4
    return outputs + accum + meta


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    DecodeCase(b=1024, s_q=1, s_k=200, h_q=16, h_kv=1, varlen=True, zero_frac=0.1, seed=1),
    DecodeCase(b=1024, s_q=2, s_k=100, h_q=64, h_kv=1, varlen=True, causal=True, seed=2),
    DecodeCase(b=1, s_q=1, s_k=LONG, h_q=64, h_kv=1, seed=3),
    DecodeCase(b=1, s_q=2, s_k=LONG, h_q=128, h_kv=1, causal=True, dtype=torch.float16, seed=4),
], ids=str)
def test_kernel_at_scale(case):
    from cutemla.kernels import run_dense_decode

    inputs = make_decode_inputs(case, device="cuda", generate_on_device=True)
    scale = case.d ** -0.5
    # Compile (or load) first so the measured call allocates only what every call allocates.
    meta, num_splits = get_decoding_sched_meta(inputs.cache_seqlens, case.s_q, case.h_q, case.h_kv)
    run_dense_decode(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, meta, num_splits,
                     scale, case.causal)
    torch.cuda.synchronize()
    del meta, num_splits
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    meta, num_splits = get_decoding_sched_meta(inputs.cache_seqlens, case.s_q, case.h_q, case.h_kv)
    out, lse = run_dense_decode(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, meta,
                                num_splits, scale, case.causal)
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - before
    expected = _workspace_bytes(case.b, case.s_q, case.h_q, case.h_kv, meta.shape[0], 2)
    inputs_bytes = sum(t.numel() * t.element_size() for t in (inputs.q, inputs.kcache, inputs.block_table))
    slack = 16 << 20  # the caching allocator rounds each large block up to 2 MiB; q's folded copy if h_kv > 1
    print(f"\n{case}: inputs {inputs_bytes / 2**20:.1f} MiB, extra peak {peak_extra / 2**20:.2f} MiB "
          f"(bound {expected / 2**20:.2f} MiB + 16 MiB)")
    assert peak_extra <= expected + slack
    assert peak_extra <= 64 << 20 or case.b > 1  # one long request: O(SMs) workspace, nothing O(seqlen)

    ref_out, ref_lse = mla_decode_reference(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens,
                                            512, scale, case.causal)
    assert_close_flashmla("out", out.float(), ref_out.float(), **OUT_TOL)
    assert_close_flashmla("lse", lse, ref_lse, **LSE_TOL)
