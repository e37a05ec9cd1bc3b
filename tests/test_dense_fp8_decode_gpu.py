"""Dense paged decode over the FP8 cache (is_fp8_kvcache=True, no indices) against the reference, on an sm90 GPU.

Inputs are FlashMLA's dense test data (cutemla.testing.make_decode_inputs: NaN rows past every length, unused
block-table entries 2147480000, random page permutation) quantised with quantize_fp8_cache, so every token a
kernel must not read is NaN. The reference is dense_fp8_mla_decode_reference (the bf16 reference on the
dequantised cache). Tolerances: FlashMLA's dense ones (cutemla.testing.OUT_TOL / LSE_TOL).
One kernel variant (+ the combine) is compiled; expect well under a minute on an H100:
    python -m pytest -q -m gpu tests/test_dense_fp8_decode_gpu.py
"""
import pytest
import torch

from cutemla import flash_mla_with_kvcache, get_mla_metadata
from cutemla.layouts.fp8_cache import quantize_fp8_cache
from cutemla.reference_sparse import dense_fp8_mla_decode_reference
from cutemla.testing import LSE_TOL, OUT_TOL, DecodeCase, assert_close_flashmla, make_decode_inputs

pytestmark = pytest.mark.gpu

CASES = [
    DecodeCase(b=1, s_q=1, s_k=64, h_q=64, h_kv=1),
    DecodeCase(b=1, s_q=1, s_k=4096, h_q=128, h_kv=1),  # split over many partitions, combine
    DecodeCase(b=2, s_q=1, s_k=20, h_q=16, h_kv=1),
    DecodeCase(b=6, s_q=2, s_k=140, h_q=128, h_kv=1, varlen=True, causal=True),
    DecodeCase(b=64, s_q=1, s_k=4096, h_q=16, h_kv=1, varlen=True),
    DecodeCase(b=6, s_q=4, s_k=1000, h_q=32, h_kv=1, varlen=True, causal=True),
    DecodeCase(b=64, s_q=2, s_k=140, h_q=64, h_kv=1, varlen=True, causal=True, zero_frac=0.3),
    DecodeCase(b=5, s_q=1, s_k=300, h_q=3, h_kv=1, zero_frac=0.4, seed=3),
]


@pytest.fixture
def kernel_backend(clean_api_state, monkeypatch):
    monkeypatch.setenv("CUTEMLA_BACKEND", "kernel")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dense_fp8_matches_reference(kernel_backend, case):
    inputs = make_decode_inputs(case, device="cuda", generate_on_device=True)
    packed = quantize_fp8_cache(inputs.kcache)
    out, lse = flash_mla_with_kvcache(inputs.q, packed, inputs.block_table, inputs.cache_seqlens, 512,
                                      get_mla_metadata()[0], causal=case.causal, is_fp8_kvcache=True)
    ref_out, ref_lse = dense_fp8_mla_decode_reference(inputs.q, packed, inputs.block_table, inputs.cache_seqlens,
                                                      causal=case.causal)
    torch.cuda.synchronize()
    assert out.shape == ref_out.shape and out.dtype == torch.bfloat16
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_close_flashmla("out", out.float(), ref_out.float(), **OUT_TOL)
    assert_close_flashmla("lse", lse, ref_lse, **LSE_TOL)
    empty = inputs.cache_seqlens == 0
    if empty.any():
        assert torch.all(out[empty] == 0) and torch.all(torch.isinf(lse[empty]) & (lse[empty] > 0))
