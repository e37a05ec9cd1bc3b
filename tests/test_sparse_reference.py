"""Sparse (top-k) and dense decode references over the FP8 cache, against independent float64 oracles (CPU)."""
import math

import pytest
import torch

from cutemla.layouts.fp8_cache import dequantize_fp8_cache, quantize_fp8_cache
from cutemla.reference import mla_decode_reference
from cutemla.reference_sparse import dense_fp8_mla_decode_reference, sparse_mla_decode_reference
from cutemla.testing import DecodeCase, make_decode_inputs

D_QK = 576
SM_SCALE = D_QK ** -0.55  # FlashMLA's sparse tests use d_qk^-0.55
GARBAGE_ID = 2147480000


def _sparse_case(b, s_q, h_q, topk, page, seed, invalid_frac=0.2, empty_rows=False, with_topk_length=False,
                 with_sink=False):
    """q, a NaN-poisoned packed cache, indices (some -1), optional topk_length / attn_sink.

    Every cache token not named by a valid slot is poisoned with 0xFF bytes (NaN in all three fields); slots
    masked by topk_length hold garbage ids or -1.
    """
    gen = torch.Generator().manual_seed(seed)
    num_tokens = max(2 * topk, 3 * page)
    num_blocks = -(-num_tokens // page) + 1  # one spare page
    bf16_cache = (torch.randn(num_blocks, page, 1, D_QK, generator=gen) / 10).clamp(-1, 1).to(torch.bfloat16)
    packed = quantize_fp8_cache(bf16_cache)
    q = (torch.randn(b, s_q, h_q, D_QK, generator=gen) / 10).clamp(-1, 1).to(torch.bfloat16)
    indices = torch.randint(0, num_blocks * page, (b, s_q, topk), generator=gen, dtype=torch.int32)
    indices[torch.rand(b, s_q, topk, generator=gen) < invalid_frac] = -1
    if empty_rows:
        indices[0, -1] = -1
    topk_length = None
    valid = indices != -1
    if with_topk_length:
        topk_length = torch.randint(0, topk + 1, (b,), generator=gen, dtype=torch.int32)
        topk_length[0] = topk
        if b > 1:
            topk_length[1] = 0
        masked = torch.arange(topk).view(1, 1, topk) >= topk_length.view(b, 1, 1).long()
        garbage = torch.where(torch.rand(b, s_q, topk, generator=gen) < 0.5, GARBAGE_ID, -7).to(torch.int32)
        indices = torch.where(masked, garbage, indices)
        valid &= ~masked
    used = torch.zeros(num_blocks * page, dtype=torch.bool)
    used[indices[valid].long()] = True
    packed.view(-1, 656)[~used] = 0xFF
    sink = None
    if with_sink:
        sink = torch.randn(h_q, generator=gen) * 2
        sink[0], sink[1] = math.inf, -math.inf
    return q, packed, indices, topk_length, sink


def _oracle(q, packed, indices, scale, sink=None, topk_length=None):
    """Slot-by-slot float64 attention: explicit valid list per row, float64 softmax and sink factor."""
    b, s_q, h_q, _ = q.shape
    topk = indices.shape[-1]
    tokens = dequantize_fp8_cache(packed).reshape(-1, D_QK).double()
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        limit = topk if topk_length is None else int(topk_length[i])
        for j in range(s_q):
            ids = [int(t) for t in indices[i, j, :limit].tolist() if int(t) != -1]
            if not ids:
                continue
            k = tokens[ids]  # [n, 576]
            s = q[i, j].double() @ k.T * scale  # [h_q, n]
            row_lse = torch.logsumexp(s, dim=-1)
            o = torch.softmax(s, dim=-1) @ k[:, :512]
            if sink is not None:
                factor = torch.tensor([0.0 if sv == math.inf else 1.0 if sv == -math.inf else
                                       1.0 / (1.0 + math.exp(sv - float(l))) for sv, l in zip(sink.tolist(), row_lse)],
                                      dtype=torch.float64)
                o = o * factor[:, None]
            out[i, j] = o
            lse[i, :, j] = row_lse
    return out, lse


def _assert_matches_oracle(out, lse, ref_out, ref_lse):
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    # out: the fp32 result rounded once to bf16 (2^-9 relative) plus fp32 accumulation noise.
    torch.testing.assert_close(out.double(), ref_out, atol=1e-6, rtol=2.0 ** -8)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


SWEEP = [(h, topk, page) for h in (64, 128) for topk, page in ((64, 64), (128, 2), (128, 61), (576, 61), (576, 2))]


@pytest.mark.parametrize("h_q,topk,page", SWEEP)
@pytest.mark.parametrize("b,s_q", [(1, 1), (4, 3)])
def test_sparse_matches_float64_oracle(h_q, topk, page, b, s_q):
    full = b > 1  # the batched cases also carry topk_length, an empty row and sinks (incl. +-inf)
    q, packed, indices, topk_length, sink = _sparse_case(
        b, s_q, h_q, topk, page, seed=h_q + topk + page + b, empty_rows=full, with_topk_length=full,
        with_sink=full)
    out, lse = sparse_mla_decode_reference(q, packed, indices, SM_SCALE, attn_sink=sink, topk_length=topk_length)
    assert out.shape == (b, s_q, h_q, 512) and lse.shape == (b, h_q, s_q)
    ref_out, ref_lse = _oracle(q, packed, indices, SM_SCALE, sink, topk_length)
    _assert_matches_oracle(out, lse, ref_out, ref_lse)
    if full:
        assert torch.isposinf(lse[0, :, -1]).all() and torch.all(out[0, -1] == 0)  # the all-invalid row
        assert torch.isposinf(lse[1]).all() and torch.all(out[1] == 0)  # topk_length 0
        assert torch.all(out[:, :, 0] == 0)  # sink +inf on head 0


def test_all_invalid_gives_zero_and_posinf_lse():
    q, packed, indices, _, sink = _sparse_case(2, 2, 64, 64, 64, seed=1, with_sink=True)
    indices[:] = -1
    for s in (None, sink):
        out, lse = sparse_mla_decode_reference(q, packed, indices, SM_SCALE, attn_sink=s)
        assert torch.all(out == 0) and torch.isposinf(lse).all()


def test_sink_scales_out_and_leaves_lse():
    q, packed, indices, _, _ = _sparse_case(2, 3, 64, 128, 61, seed=2)
    base_out, base_lse = sparse_mla_decode_reference(q, packed, indices, SM_SCALE)
    sink = torch.full((64,), 0.5)
    sink[0], sink[1], sink[2] = math.inf, -math.inf, 1e4
    out, lse = sparse_mla_decode_reference(q, packed, indices, SM_SCALE, attn_sink=sink)
    assert torch.equal(lse, base_lse)
    assert torch.all(out[:, :, 0] == 0) and torch.all(out[:, :, 2] == 0)
    assert torch.equal(out[:, :, 1], base_out[:, :, 1])
    factor = 1.0 / (1.0 + torch.exp(0.5 - base_lse[:, 3:].double()))  # [b, h, s_q]
    expected = base_out[:, :, 3:].double() * factor.transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(out[:, :, 3:].double(), expected, atol=1e-6, rtol=2.0 ** -7)
    assert not torch.allclose(out[:, :, 3:].double(), base_out[:, :, 3:].double(), rtol=1e-3, atol=0)


def test_default_scale_and_lse_layout():
    q, packed, indices, _, _ = _sparse_case(2, 3, 64, 64, 2, seed=3)
    out, lse = sparse_mla_decode_reference(q, packed, indices)
    out2, lse2 = sparse_mla_decode_reference(q, packed, indices, D_QK ** -0.5)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    assert lse.stride() == (3 * 64, 1, 64)  # FlashMLA: transpose(1, 2) of a [b, s_q, h_q] buffer


def test_unused_tokens_are_never_read_and_poison_is_detectable():
    q, packed, indices, topk_length, _ = _sparse_case(4, 3, 64, 128, 61, seed=4, with_topk_length=True)
    out, lse = sparse_mla_decode_reference(q, packed, indices, SM_SCALE, topk_length=topk_length)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    # The poison is live: making one *used* token NaN does reach the output, so the check above can fail.
    slot = (indices[0, 0] != -1).nonzero()[0, 0]
    token = int(indices[0, 0, slot])
    bad = packed.clone()
    bad.view(-1, 656)[token, :512] = 0xFF
    out_bad, _ = sparse_mla_decode_reference(q, bad, indices, SM_SCALE, topk_length=topk_length)
    assert torch.isnan(out_bad[0, 0]).all()


def test_out_of_range_index_raises_unless_masked():
    q, packed, indices, _, _ = _sparse_case(2, 1, 64, 64, 64, seed=5, invalid_frac=0.0)
    num_tokens = packed.shape[0] * packed.shape[1]
    for bad_value in (-2, num_tokens, GARBAGE_ID):
        bad = indices.clone()
        bad[1, 0, 5] = bad_value
        with pytest.raises(ValueError, match=r"indices\[1, 0, 5\]"):
            sparse_mla_decode_reference(q, packed, bad, SM_SCALE)
        # Behind topk_length the slot is never read, so it is not checked either.
        sparse_mla_decode_reference(q, packed, bad, SM_SCALE, topk_length=torch.tensor([64, 5], dtype=torch.int32))


def test_sparse_rejects_bad_arguments():
    q, packed, indices, _, _ = _sparse_case(1, 1, 64, 64, 64, seed=6)
    cases = [
        (TypeError, "q", dict(q=q.half())),
        (ValueError, "q", dict(q=q[..., :512])),
        (TypeError, "kcache_fp8", dict(kcache_fp8=packed.float())),
        (ValueError, "kcache_fp8", dict(kcache_fp8=packed[..., :576])),
        (TypeError, "indices", dict(indices=indices.float())),
        (ValueError, "indices", dict(indices=indices[0])),
        (TypeError, "attn_sink", dict(attn_sink=torch.zeros(64, dtype=torch.float16))),
        (ValueError, "attn_sink", dict(attn_sink=torch.zeros(32))),
        (ValueError, "topk_length", dict(topk_length=torch.tensor([65], dtype=torch.int32))),
        (ValueError, "topk_length", dict(topk_length=torch.tensor([1, 2], dtype=torch.int32))),
        (ValueError, "d_v", dict(d_v=448)),
    ]
    for exc, name, override in cases:
        kwargs = dict(q=q, kcache_fp8=packed, indices=indices, softmax_scale=SM_SCALE)
        kwargs.update(override)
        with pytest.raises(exc, match=name):
            sparse_mla_decode_reference(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Dense paged decode over the FP8 cache
# ----------------------------------------------------------------------------------------------------------

DENSE_CASES = [
    DecodeCase(b=3, s_q=1, s_k=150, h_q=16, h_kv=1, page_size=64, varlen=True, seed=1),
    DecodeCase(b=4, s_q=2, s_k=90, h_q=8, h_kv=1, page_size=16, varlen=True, causal=True, zero_frac=0.25, seed=2),
    DecodeCase(b=2, s_q=3, s_k=70, h_q=4, h_kv=1, page_size=7, causal=True, seed=3),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_dense_fp8_equals_bf16_reference_on_dequantized_cache(case):
    inp = make_decode_inputs(case)  # NaN past every length, garbage block-table entries
    packed = quantize_fp8_cache(inp.kcache)
    out, lse = dense_fp8_mla_decode_reference(inp.q, packed, inp.block_table, inp.cache_seqlens, causal=case.causal)
    assert torch.isfinite(out).all()
    deq_out, deq_lse = mla_decode_reference(inp.q, dequantize_fp8_cache(packed), inp.block_table, inp.cache_seqlens,
                                            causal=case.causal)
    assert torch.equal(out, deq_out)
    assert torch.equal(lse, deq_lse)


@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_dense_fp8_within_fp8_error_bound_of_bf16(case):
    """|lse_fp8 - lse_bf16| <= delta and |out_fp8 - out_bf16| <= |dV| + (e^(2 delta) - 1) max|V| + rounding.

    Per row, delta = scale * 2^-4 * max_j sum_c |q_c| |k_jc| over the 512 quantised columns bounds every score
    change (e4m3 keeps |dk| <= 2^-4 |k|; RoPE is exact); logsumexp is 1-Lipschitz in the max norm and each
    softmax weight moves by a factor within e^(+-2 delta).
    """
    inp = make_decode_inputs(case)
    packed = quantize_fp8_cache(inp.kcache)
    out8, lse8 = dense_fp8_mla_decode_reference(inp.q, packed, inp.block_table, inp.cache_seqlens, causal=case.causal)
    out16, lse16 = mla_decode_reference(inp.q, inp.kcache, inp.block_table, inp.cache_seqlens, causal=case.causal)
    assert torch.equal(torch.isinf(lse8), torch.isinf(lse16))
    scale = D_QK ** -0.5
    p = case.page_size
    saw_difference = False
    for i, n in enumerate(inp.cache_seqlens.tolist()):
        if n == 0:
            continue
        pages = inp.block_table[i, : -(-n // p)].long()
        k = inp.kcache[pages].reshape(-1, D_QK)[:n].double()
        v = k[:, :512]
        qi = inp.q[i].double()  # [s_q, h_q, 576]
        delta = scale * 2.0 ** -4 * (qi[..., :512].abs() @ k[:, :512].abs().T).amax(-1)  # [s_q, h_q]
        finite = torch.isfinite(lse16[i].T)
        lse_err = (lse8[i].T.double() - lse16[i].T.double()).abs()
        assert torch.all(lse_err[finite] <= delta[finite] * (1 + 1e-4) + 1e-5)
        vmax = v.abs().amax(0)  # [512]
        bound = vmax * 2.0 ** -4 + (torch.exp(2 * delta) - 1).unsqueeze(-1) * vmax + 2.0 ** -8 * vmax + 1e-6
        out_err = (out8[i].double() - out16[i].double()).abs()
        assert torch.all(out_err <= bound)
        saw_difference |= bool((out_err > 0).any())
    assert saw_difference, "FP8 and bf16 results are identical: the cache was not really quantised"


def test_dense_fp8_never_reads_past_lengths():
    case = DecodeCase(b=3, s_q=2, s_k=100, h_q=8, h_kv=1, page_size=16, varlen=True, causal=True, seed=9)
    inp = make_decode_inputs(case)
    packed = quantize_fp8_cache(inp.kcache)
    live = torch.zeros(packed.shape[0] * packed.shape[1], dtype=torch.bool)
    for i, n in enumerate(inp.cache_seqlens.tolist()):
        pos = torch.arange(n)
        live[inp.block_table[i, pos // 16].long() * 16 + pos % 16] = True
    packed.view(-1, 656)[~live] = 0xFF  # every byte of every dead token, scales and RoPE included
    out, lse = dense_fp8_mla_decode_reference(inp.q, packed, inp.block_table, inp.cache_seqlens, causal=True)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    # The poison is live: it does reach the result once a length grows by one token past a poisoned row.
    i = int(torch.argmax(inp.cache_seqlens))
    n = int(inp.cache_seqlens[i])
    assert n % 16, "this check needs a partly filled last page"
    longer = inp.cache_seqlens.clone()
    longer[i] = n + 1
    out_bad, _ = dense_fp8_mla_decode_reference(inp.q, packed, inp.block_table, longer, causal=True)
    assert torch.isnan(out_bad[i]).any()


def test_dense_fp8_rejects_bad_arguments():
    inp = make_decode_inputs(DecodeCase(b=2, s_q=1, s_k=40, h_q=4, h_kv=1, page_size=16, seed=4))
    packed = quantize_fp8_cache(inp.kcache)
    with pytest.raises(TypeError, match="kcache"):
        dense_fp8_mla_decode_reference(inp.q, inp.kcache, inp.block_table, inp.cache_seqlens)
    with pytest.raises(TypeError, match="q"):
        dense_fp8_mla_decode_reference(inp.q.half(), packed, inp.block_table, inp.cache_seqlens)
    bad_table = inp.block_table.clone()
    bad_table[1, 0] = packed.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]"):
        dense_fp8_mla_decode_reference(inp.q, packed, bad_table, inp.cache_seqlens)
    with pytest.raises(ValueError, match="cache_seqlens"):
        dense_fp8_mla_decode_reference(inp.q, packed, inp.block_table, inp.cache_seqlens * 1000)
