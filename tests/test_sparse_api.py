"""flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...) on the CPU: routing to the sparse reference,
input checks, sched_meta handling (the kernel itself is tested in test_sparse_decode_gpu.py)."""
import math

import pytest
import torch

from cutemla import flash_mla_with_kvcache, get_mla_metadata
from cutemla.layouts.fp8_cache import quantize_fp8_cache
from cutemla.reference_sparse import dense_fp8_mla_decode_reference, sparse_mla_decode_reference
from cutemla.sparse_interface import check_indices_in_range

D_QK = 576


def _inputs(b=2, s_q=2, h_q=16, topk=128, page=64, num_blocks=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = (torch.randn(num_blocks, page, 1, D_QK, generator=gen) / 10).to(torch.bfloat16)
    packed = quantize_fp8_cache(cache)
    q = (torch.randn(b, s_q, h_q, D_QK, generator=gen) / 10).to(torch.bfloat16)
    indices = torch.randint(0, num_blocks * page, (b, s_q, topk), generator=gen, dtype=torch.int32)
    indices[torch.rand(b, s_q, topk, generator=gen) < 0.2] = -1
    return q, packed, indices


def _call(q, packed, indices, **kwargs):
    kwargs.setdefault("softmax_scale", D_QK ** -0.55)
    return flash_mla_with_kvcache(q, packed, None, None, 512, get_mla_metadata()[0], is_fp8_kvcache=True,
                                  indices=indices, **kwargs)


def test_sparse_call_matches_reference(reference_backend):
    q, packed, indices = _inputs()
    sink = torch.tensor([math.inf, -math.inf] + [0.5] * 14)
    topk_length = torch.tensor([128, 70], dtype=torch.int32)
    out, lse = _call(q, packed, indices, attn_sink=sink, topk_length=topk_length)
    ref_out, ref_lse = sparse_mla_decode_reference(q, packed, indices, D_QK ** -0.55, attn_sink=sink,
                                                   topk_length=topk_length)
    assert out.shape == (2, 2, 16, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 16, 2) and lse.dtype == torch.float32
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert torch.all(out[:, :, 0] == 0)  # sink +inf


def test_sparse_call_default_scale_and_views(reference_backend):
    q, packed, indices = _inputs(h_q=4)
    out, lse = _call(q, packed.view(torch.float8_e4m3fn), indices, softmax_scale=None)
    ref_out, ref_lse = sparse_mla_decode_reference(q, packed, indices)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_sparse_sched_meta_is_filled_and_checked(reference_backend):
    q, packed, indices = _inputs()
    sched_meta, _ = get_mla_metadata()
    flash_mla_with_kvcache(q, packed, None, None, 512, sched_meta, is_fp8_kvcache=True, indices=indices)
    assert sched_meta.have_initialized and sched_meta.config.is_fp8_kvcache and sched_meta.config.topk == 128
    flash_mla_with_kvcache(q, packed, None, None, 512, sched_meta, is_fp8_kvcache=True, indices=indices)
    with pytest.raises(ValueError, match="topk"):
        flash_mla_with_kvcache(q, packed, None, None, 512, sched_meta, is_fp8_kvcache=True, indices=indices[..., :64])


BAD = [
    ("q-dtype", lambda q, p, i: dict(q=q.half()), TypeError, "q must be torch.bfloat16"),
    ("q-dim", lambda q, p, i: dict(q=q[..., :512]), ValueError, "q must be"),
    ("cache-dtype", lambda q, p, i: dict(k_cache=p.float()), TypeError, "k_cache"),
    ("cache-shape", lambda q, p, i: dict(k_cache=p[..., :512]), ValueError, "656"),
    ("indices-dtype", lambda q, p, i: dict(indices=i.long()), TypeError, "indices"),
    ("indices-shape", lambda q, p, i: dict(indices=i[:1]), ValueError, "indices"),
    ("sink-shape", lambda q, p, i: dict(attn_sink=torch.zeros(3)), ValueError, "attn_sink"),
    ("sink-dtype", lambda q, p, i: dict(attn_sink=torch.zeros(16, dtype=torch.float64)), TypeError, "attn_sink"),
    ("topk_length-dtype", lambda q, p, i: dict(topk_length=torch.zeros(2)), TypeError, "topk_length"),
    ("causal", lambda q, p, i: dict(causal=True), ValueError, "causal"),
    ("head_dim_v", lambda q, p, i: dict(head_dim_v=576), ValueError, "head_dim_v"),
    ("extra", lambda q, p, i: dict(extra_k_cache=p), NotImplementedError, "extra_k_cache"),
    ("bad-id", lambda q, p, i: dict(indices=torch.full_like(i, 5 * 64)), ValueError, "indices"),
]


@pytest.mark.parametrize("make,exc,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_sparse_bad_inputs(reference_backend, make, exc, needle):
    q, packed, indices = _inputs()
    args = dict(q=q, k_cache=packed, indices=indices, head_dim_v=512)
    args.update(make(q, packed, indices))
    with pytest.raises(exc, match=needle):
        flash_mla_with_kvcache(args.pop("q"), args.pop("k_cache"), None, None, args.pop("head_dim_v"),
                               get_mla_metadata()[0], is_fp8_kvcache=True, **args)


def test_bf16_cache_with_fp8_flag_and_bf16_sparse_not_implemented(reference_backend):
    q, packed, indices = _inputs()
    bf16_cache = torch.zeros(5, 64, 1, D_QK, dtype=torch.bfloat16)
    lengths = torch.tensor([10, 20], dtype=torch.int32)
    table = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="is_fp8_kvcache"):
        flash_mla_with_kvcache(q, bf16_cache, table, lengths, 512, get_mla_metadata()[0], is_fp8_kvcache=True)
    with pytest.raises(NotImplementedError, match="indices"):
        flash_mla_with_kvcache(q, bf16_cache, table, lengths, 512, get_mla_metadata()[0], indices=indices)
    with pytest.raises(NotImplementedError, match="attn_sink"):
        flash_mla_with_kvcache(q, packed, table, lengths, 512, get_mla_metadata()[0], is_fp8_kvcache=True,
                               attn_sink=torch.zeros(16))


@pytest.mark.parametrize("causal", [False, True])
def test_dense_fp8_call_matches_reference(reference_backend, causal):
    q, packed, _ = _inputs(b=3, s_q=2, h_q=8)
    lengths = torch.tensor([100, 0, 37], dtype=torch.int32)
    table = torch.tensor([[4, 1], [0, 0], [2, 3]], dtype=torch.int32)
    sched_meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q, packed, table, lengths, 512, sched_meta, causal=causal, is_fp8_kvcache=True)
    ref_out, ref_lse = dense_fp8_mla_decode_reference(q, packed, table, lengths, causal=causal)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert sched_meta.have_initialized and sched_meta.config.is_fp8_kvcache
    assert sched_meta.tile_scheduler_metadata is not None
    # Reuse with the same shapes; a dense bf16 call with this sched_meta is inconsistent.
    flash_mla_with_kvcache(q, packed, table, lengths, 512, sched_meta, causal=causal, is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="is_fp8_kvcache"):
        flash_mla_with_kvcache(q, torch.zeros(5, 64, 1, D_QK, dtype=torch.bfloat16), table, lengths, 512, sched_meta,
                               causal=causal)


def test_check_indices_in_range():
    _, packed, indices = _inputs()
    check_indices_in_range(indices, packed)
    bad = indices.clone()
    bad[1, 0, 3] = -2
    with pytest.raises(ValueError, match=r"indices\[1, 0, 3\] = -2"):
        check_indices_in_range(bad, packed)
    # Masked by topk_length: never read, so never an error.
    check_indices_in_range(bad, packed, topk_length=torch.tensor([128, 3], dtype=torch.int32))


def test_choose_num_splits():
    from cutemla.kernels.sparse_decode import MAX_GRID_Z, choose_num_splits

    # Big grids are never split; small ones split into >= 4-tile chunks up to the SM count.
    assert choose_num_splits(b=128, s_q=2, h_q=128, topk=2048, num_sms=132) == 1
    assert choose_num_splits(b=2, s_q=2, h_q=128, topk=2048, num_sms=132) == 8
    assert choose_num_splits(b=1, s_q=1, h_q=16, topk=8192, num_sms=132) == 32
    assert choose_num_splits(b=1, s_q=1, h_q=16, topk=64, num_sms=132) == 1
    assert choose_num_splits(b=1, s_q=1, h_q=64, topk=100000, num_sms=132) == 132
    for b in (1, 3, 70000 // 132):
        assert b * choose_num_splits(b=b, s_q=1, h_q=16, topk=1 << 20, num_sms=100000) <= MAX_GRID_Z
