"""cutemla.reference (the numerical spec) checked against the independent float64 oracle in cutemla.testing,
plus the test utilities themselves (input generator, FlashMLA tolerance check, metric formulas)."""

import math

import pytest
import torch

from cutemla.reference import mla_decode_reference
from cutemla.testing import (
    LSE_TOL,
    OUT_TOL,
    UNUSED_BLOCK_ID,
    DecodeCase,
    assert_close_flashmla,
    cos_diff,
    decode_bytes,
    decode_flops,
    dense_attention_oracle,
    make_decode_inputs,
)

BF16, FP16 = torch.bfloat16, torch.float16


def run_reference(inputs, **kwargs):
    return mla_decode_reference(
        inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, head_dim_v=inputs.case.dv, **kwargs
    )


def expected_empty_rows(inputs, causal):
    """[b, s_q] bool: query rows with no visible key, derived from the lengths alone."""
    s_q = inputs.case.s_q
    n = inputs.cache_seqlens.cpu().long()[:, None]
    j = torch.arange(s_q)[None, :]
    visible = n - (s_q - 1 - j) if (causal and s_q > 1) else n.expand(-1, s_q)
    return visible <= 0


def check_against_oracle(inputs, causal, softmax_scale=None):
    """Reference vs oracle: FlashMLA tolerances, a much tighter bound, and no NaN leakage."""
    out, lse = run_reference(inputs, causal=causal, softmax_scale=softmax_scale)
    case = inputs.case
    assert out.shape == (case.b, case.s_q, case.h_q, case.dv) and out.dtype == case.dtype
    assert lse.shape == (case.b, case.h_q, case.s_q) and lse.dtype == torch.float32

    # NaN-poisoned cache rows must never leak: out is finite everywhere, lse is +inf exactly on empty rows.
    empty = expected_empty_rows(inputs, causal)  # [b, s_q]
    assert torch.isfinite(out).all()
    assert torch.equal(lse == math.inf, empty[:, None, :].expand_as(lse))
    assert torch.isfinite(lse[~empty[:, None, :].expand_as(lse)]).all()
    assert (out.permute(0, 2, 1, 3)[empty[:, None, :].expand(-1, case.h_q, -1)] == 0).all()

    ref_out, ref_lse = dense_attention_oracle(inputs, softmax_scale=softmax_scale, causal=causal, out_dtype=torch.float64)
    assert_close_flashmla("out", out, ref_out.to(case.dtype), **OUT_TOL)
    assert_close_flashmla("lse", lse, ref_lse, **LSE_TOL)

    # Tighter than FlashMLA's bar: an fp32 computation rounded once to the output dtype is within half an ulp
    # (unit roundoff u) of the exact value, plus fp32 noise; lse agrees to fp32 precision.
    unit_roundoff = {BF16: 2.0**-8, FP16: 2.0**-11}[case.dtype]
    err = (out.double() - ref_out).abs()
    bound = unit_roundoff * ref_out.abs() * (1 + 1e-3) + 1e-6
    assert (err <= bound).all(), f"out not correctly rounded: worst excess {(err - bound).max().item():.3g}"
    finite = torch.isfinite(ref_lse)
    lse_err = (lse[finite].double() - ref_lse[finite].double()).abs()
    assert (lse_err <= 2e-6 * ref_lse[finite].double().abs() + 2e-6).all(), f"lse err {lse_err.max().item():.3g}"
    return out, lse


# The FlashMLA dense-decode correctness grid, trimmed for CPU time but touching every value of every axis:
# b {1,2,6,64} x s_q {1,2,4} x s_k {20,140,4096} x h_q {1,3,9,63,64,126,128} x h_kv {1,2,3,8} x varlen x causal,
# plus zero-length requests (FlashMLA's corner cases). The s_k=4096 cases keep b * h_q * s_q small.
def C(b, s_q, s_k, h_q, h_kv, **kw):
    return DecodeCase(b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=h_kv, **kw)


MATRIX = [
    C(1, 1, 20, 1, 1),
    C(1, 2, 20, 3, 3, causal=True),
    C(1, 4, 4096, 128, 1, varlen=True, causal=True),
    C(1, 1, 4096, 64, 8),
    C(1, 2, 140, 126, 2, varlen=True),
    C(2, 1, 140, 9, 1, varlen=True),
    C(2, 2, 140, 9, 3, varlen=True, causal=True),
    C(2, 4, 20, 63, 3, causal=True),
    C(2, 2, 4096, 126, 2, varlen=True, causal=True),
    C(2, 1, 20, 128, 8, varlen=True, seed=1),
    C(2, 4, 140, 64, 8, varlen=True, causal=True, seed=2),
    C(6, 1, 140, 3, 1),
    C(6, 2, 20, 64, 2, causal=True),
    C(6, 4, 140, 126, 3, varlen=True, causal=True),
    C(6, 4, 140, 128, 8, causal=True),
    C(6, 2, 140, 63, 1, varlen=True),
    C(6, 1, 4096, 64, 2, varlen=True),
    C(6, 2, 20, 9, 3, varlen=True, causal=True, seed=3),
    C(64, 1, 20, 1, 1, varlen=True),
    C(64, 2, 140, 9, 1, varlen=True, causal=True),
    C(64, 4, 20, 64, 8, causal=True),
    C(64, 1, 140, 128, 2, varlen=True),
    C(64, 2, 140, 1, 1, varlen=True, causal=True),
    C(64, 4, 140, 3, 3, varlen=True, causal=True, seed=4),
    # zero-length requests
    C(64, 2, 140, 126, 3, varlen=True, causal=True, zero_frac=0.5),
    C(6, 2, 4096, 128, 1, varlen=True, causal=True, zero_frac=0.5),
    C(6, 4, 20, 63, 1, varlen=True, zero_frac=0.5, seed=5),
    C(2, 1, 20, 3, 1, zero_frac=1.0),
]


@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_reference_matches_oracle(case):
    inputs = make_decode_inputs(case)
    check_against_oracle(inputs, case.causal)


@pytest.mark.parametrize(
    "case",
    [
        C(2, 2, 140, 9, 3, d=512, varlen=True, causal=True),
        C(6, 1, 20, 64, 1, d=512),
        C(1, 4, 4096, 63, 3, d=512, varlen=True, causal=True, zero_frac=0.0),
    ],
    ids=str,
)
def test_head_dim_512(case):
    check_against_oracle(make_decode_inputs(case), case.causal)


@pytest.mark.parametrize("page_size", [1, 7, 16, 64, 100])
def test_page_sizes(page_size):
    case = C(6, 2, 140, 9, 3, page_size=page_size, varlen=True, causal=True, zero_frac=0.2)
    check_against_oracle(make_decode_inputs(case), causal=True)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_dtypes(dtype, causal):
    case = C(6, 2, 140, 64, 2, dtype=dtype, varlen=True, causal=causal)
    check_against_oracle(make_decode_inputs(case), causal)


def test_fp16_and_bf16_data_match():
    # Same seed, same fp32 draws: the two dtypes differ only by rounding.
    a = make_decode_inputs(C(2, 2, 140, 9, 3, dtype=BF16, varlen=True))
    b = make_decode_inputs(C(2, 2, 140, 9, 3, dtype=FP16, varlen=True))
    assert torch.equal(a.cache_seqlens, b.cache_seqlens) and torch.equal(a.block_table, b.block_table)
    assert (a.q.float() - b.q.float()).abs().max() < 4e-3


def test_softmax_scale_override():
    inputs = make_decode_inputs(C(2, 2, 140, 9, 3, varlen=True, causal=True))
    out_scaled, lse_scaled = check_against_oracle(inputs, causal=True, softmax_scale=0.3)
    out_default, lse_default = run_reference(inputs, causal=True)
    explicit_default, explicit_lse = run_reference(inputs, causal=True, softmax_scale=576**-0.5)
    assert torch.equal(out_default, explicit_default) and torch.equal(lse_default, explicit_lse)
    assert (lse_scaled - lse_default).abs().max() > 1e-2  # the override really changed something


def test_causal_with_fewer_keys_than_queries():
    # s_k = 2 < s_q = 4: bottom-right alignment leaves queries 0 and 1 with nothing to attend.
    case = C(2, 4, 2, 9, 3, causal=True, page_size=16)
    inputs = make_decode_inputs(case)
    out, lse = check_against_oracle(inputs, causal=True)
    assert torch.isinf(lse[:, :, :2]).all() and (lse[:, :, :2] > 0).all()
    assert (out[:, :2] == 0).all()
    assert torch.isfinite(lse[:, :, 2:]).all()
    # Query 2 sees key 0 only (its out is that key's V); query 3 sees both keys.
    v0 = inputs.kcache[inputs.block_table[:, 0].long(), 0]  # [b, h_kv, d]
    expected_q2 = v0[:, torch.arange(9) // 3, :512]
    assert torch.equal(out[:, 2], expected_q2)


def test_causal_ignored_for_single_query():
    inputs = make_decode_inputs(C(6, 1, 140, 9, 3, varlen=True))
    out_a, lse_a = run_reference(inputs, causal=False)
    out_b, lse_b = run_reference(inputs, causal=True)
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)


def test_causal_mask_is_bottom_right_aligned():
    # With s_k = s_q = 4 the last query sees all keys and the first sees only key 0, so its lse is that one score.
    case = C(1, 4, 4, 3, 1, causal=True, page_size=4, dtype=FP16)
    inputs = make_decode_inputs(case)
    _, lse = check_against_oracle(inputs, causal=True)
    k0 = inputs.kcache[inputs.block_table[0, 0].long(), 0, 0].double()
    score0 = (inputs.q[0, 0].double() @ k0) * 576**-0.5  # [h_q]
    torch.testing.assert_close(lse[0, :, 0].double(), score0, rtol=0, atol=1e-6)
    _, lse_full = run_reference(inputs, causal=False)
    torch.testing.assert_close(lse[0, :, 3], lse_full[0, :, 3], rtol=0, atol=0)


def test_empty_rows_give_zero_out_and_inf_lse():
    inputs = make_decode_inputs(C(6, 2, 140, 9, 3, varlen=True, causal=True, zero_frac=0.5))
    zero = inputs.cache_seqlens == 0
    assert 0 < int(zero.sum()) < 6
    out, lse = run_reference(inputs, causal=True)
    assert (out[zero] == 0).all()
    assert (lse[zero] == math.inf).all()
    assert torch.isfinite(lse[~zero]).all()


def test_garbage_block_table_entries_are_never_read():
    inputs = make_decode_inputs(C(6, 2, 140, 9, 3, page_size=16, varlen=True, causal=True, zero_frac=0.2))
    out, lse = run_reference(inputs, causal=True)
    needed = -(-inputs.cache_seqlens.long() // 16)
    cols = torch.arange(inputs.block_table.shape[1])
    unused = cols[None, :] >= needed[:, None]
    assert unused.any() and (inputs.block_table[unused] == UNUSED_BLOCK_ID).all()
    # Other kinds of garbage (negative, int32 max, -1): the result must not change, nor anything raise.
    for garbage in (-1, -(2**31), 2**31 - 1):
        table = inputs.block_table.clone()
        table[unused] = garbage
        out_g, lse_g = mla_decode_reference(inputs.q, inputs.kcache, table, inputs.cache_seqlens, causal=True)
        assert torch.equal(out_g, out) and torch.equal(lse_g, lse)


def test_needed_block_table_entry_out_of_range_raises():
    inputs = make_decode_inputs(C(2, 1, 140, 9, 3))
    table = inputs.block_table.clone()
    table[1, 2] = UNUSED_BLOCK_ID  # request 1 needs pages 0..2
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]"):
        mla_decode_reference(inputs.q, inputs.kcache, table, inputs.cache_seqlens)


def test_non_contiguous_inputs():
    inputs = make_decode_inputs(C(2, 2, 140, 9, 3, varlen=True, causal=True))
    out, lse = run_reference(inputs, causal=True)
    # Same values through strided views: q with a padded head dim, kcache with heads interleaved in memory.
    q_padded = torch.zeros(*inputs.q.shape[:-1], 640, dtype=inputs.q.dtype)
    q_padded[..., :576] = inputs.q
    k_swapped = inputs.kcache.transpose(1, 2).contiguous().transpose(1, 2)
    table_wide = torch.zeros(2, inputs.block_table.shape[1] * 2, dtype=torch.int32)
    table_wide[:, ::2] = inputs.block_table
    out_s, lse_s = mla_decode_reference(
        q_padded[..., :576], k_swapped, table_wide[:, ::2], inputs.cache_seqlens, causal=True
    )
    assert torch.equal(out_s, out) and torch.equal(lse_s, lse)


def test_reference_honours_head_mapping():
    # Query head h must use kv head h // (h_q // h_kv): make kv heads distinct and check per-head outputs.
    inputs = make_decode_inputs(C(1, 1, 1, 6, 3, page_size=1))
    out, _ = run_reference(inputs)
    kv_row = inputs.kcache[inputs.block_table[0, 0].long(), 0]  # [h_kv, d]; single key => out = V
    for h in range(6):
        assert torch.equal(out[0, 0, h], kv_row[h // 2, :512])


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must be"),
        (lambda a: a.update(q=a["q"].float(), kcache=a["kcache"].float().half()), TypeError, "kcache dtype"),
        (lambda a: a.update(q=a["q"].to(torch.int8)), TypeError, "q dtype"),
        (lambda a: a.update(q=a["q"][..., :320], kcache=a["kcache"][..., :320]), ValueError, "head dim"),
        (lambda a: a.update(kcache=a["kcache"][..., :512]), ValueError, "kcache head dim"),
        (lambda a: a.update(head_dim_v=576), ValueError, "head_dim_v"),
        (lambda a: a.update(kcache=a["kcache"][:, :, :2]), ValueError, "multiple of h_kv"),
        (lambda a: a.update(block_table=a["block_table"].float()), TypeError, "block_table dtype"),
        (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table must be"),
        (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "cache_seqlens must be"),
        (lambda a: a.update(cache_seqlens=a["cache_seqlens"] * 0 - 1), ValueError, "outside"),
        (lambda a: a.update(cache_seqlens=a["cache_seqlens"] * 0 + 10**6), ValueError, "outside"),
        (lambda a: a.update(q=[1.0]), TypeError, "torch.Tensor"),
    ],
)
def test_reference_rejects_bad_input(mutate, exc, match):
    inputs = make_decode_inputs(C(2, 1, 20, 9, 3))
    args = dict(q=inputs.q, kcache=inputs.kcache, block_table=inputs.block_table, cache_seqlens=inputs.cache_seqlens)
    mutate(args)
    with pytest.raises(exc, match=match):
        mla_decode_reference(**args)


# ---------------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [C(6, 2, 140, 9, 3, varlen=True, zero_frac=0.3), C(3, 4, 5, 3, 1, page_size=1), C(2, 1, 0, 3, 1, page_size=16)],
    ids=str,
)
def test_generator_layout(case):
    inputs = make_decode_inputs(case)
    lengths = inputs.cache_seqlens
    assert lengths.dtype == torch.int32 and inputs.block_table.dtype == torch.int32
    if case.varlen:
        assert (lengths[lengths > 0] >= case.s_q).all()
    else:
        assert (lengths == case.s_k).all() or case.zero_frac > 0
    if case.s_k > 0:
        assert int((lengths == 0).sum()) == math.ceil(case.zero_frac * case.b)
    needed = (-(-lengths.long() // case.page_size)).tolist()
    num_blocks = inputs.kcache.shape[0]
    assert num_blocks == max(1, sum(needed))
    assert inputs.block_table.shape[1] * case.page_size >= max(lengths.tolist())
    used = torch.cat([inputs.block_table[i, :nb] for i, nb in enumerate(needed)]).long()
    assert sorted(used.tolist()) == list(range(sum(needed)))  # a permutation of the physical pages
    expected_nan = torch.ones(num_blocks, case.page_size, dtype=torch.bool)
    for i, nb in enumerate(needed):
        assert (inputs.block_table[i, nb:] == UNUSED_BLOCK_ID).all()
        for j in range(nb):
            rows = min(case.page_size, int(lengths[i]) - j * case.page_size)
            expected_nan[int(inputs.block_table[i, j]), :rows] = False
    assert torch.equal(torch.isnan(inputs.kcache).all(dim=(2, 3)), expected_nan)
    assert not torch.isnan(inputs.kcache).any(dim=(2, 3))[~expected_nan].any()
    q = inputs.q.float()
    assert q.abs().max() <= 1 and 0.05 < q.std() < 0.15


def test_generator_is_deterministic_and_seeded():
    case = C(6, 2, 140, 9, 3, varlen=True, zero_frac=0.3)
    a, b = make_decode_inputs(case), make_decode_inputs(case)
    for name in ("q", "kcache", "block_table", "cache_seqlens"):
        assert torch.equal(torch.nan_to_num(getattr(a, name)), torch.nan_to_num(getattr(b, name)))
    c = make_decode_inputs(C(6, 2, 140, 9, 3, varlen=True, zero_frac=0.3, seed=1))
    assert not torch.equal(a.q, c.q) and not torch.equal(a.cache_seqlens, c.cache_seqlens)


def test_case_validation_and_ids():
    assert str(C(2, 1, 140, 9, 3)) == "b2-sq1-sk140-hq9-hkv3-bf16"
    assert str(C(2, 2, 140, 9, 3, d=512, page_size=16, varlen=True, causal=True, zero_frac=0.5, dtype=FP16, seed=3)) == (
        "b2-sq2-sk140-hq9-hkv3-d512-p16-var-causal-z0.5-fp16-s3"
    )
    with pytest.raises(ValueError, match="multiple of h_kv"):
        C(2, 1, 140, 9, 2)
    with pytest.raises(ValueError, match="zero_frac"):
        C(2, 1, 140, 9, 3, zero_frac=1.5)


# ---------------------------------------------------------------------------------------------------------
# assert_close_flashmla must be able to fail
# ---------------------------------------------------------------------------------------------------------


def _sample(shape=(4, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) / 10


def test_assert_close_accepts_equal_and_within_tolerance():
    x = _sample()
    assert_close_flashmla("same", x, x.clone(), **OUT_TOL)
    assert_close_flashmla("abs", x + 7e-4, x, abs_tol=8e-4, rel_tol=0.0 + 1e-12)
    assert_close_flashmla("rel", x * (1 + 0.015), x, abs_tol=1e-12, rel_tol=2.01 / 128)


def test_assert_close_catches_a_perturbed_element():
    x = _sample()
    y = x.clone()
    y[1, 2, 3] += 0.05
    with pytest.raises(AssertionError, match=r"1 of 60 elements fail.*\(1, 2, 3\)"):
        assert_close_flashmla("out", y, x, **OUT_TOL)


def test_assert_close_catches_bf16_ulp_noise_in_lse():
    lse = torch.full((2, 3), 8.0) + _sample((2, 3)).abs()
    with pytest.raises(AssertionError, match="lse"):
        assert_close_flashmla("lse", lse + 2e-3, lse, **LSE_TOL)


def test_assert_close_inf_and_nan_positions():
    x = _sample((8,))
    x[2] = math.inf
    x[5] = -math.inf
    x[6] = math.nan
    assert_close_flashmla("inf-ok", x.clone(), x, **LSE_TOL)
    flipped = x.clone()
    flipped[2] = -math.inf
    with pytest.raises(AssertionError, match=r"\+inf positions differ"):
        assert_close_flashmla("sign", flipped, x, **LSE_TOL)
    finite_instead = x.clone()
    finite_instead[5] = 0.0
    with pytest.raises(AssertionError, match="-inf positions differ"):
        assert_close_flashmla("missing", finite_instead, x, **LSE_TOL)
    no_nan = x.clone()
    no_nan[6] = 1.0
    with pytest.raises(AssertionError, match="nan positions differ"):
        assert_close_flashmla("nan", no_nan, x, **LSE_TOL)


def test_assert_close_cosine_diff_can_fail():
    # Every element within abs_tol, yet the vectors disagree in direction: only the cosine check catches it.
    x = torch.full((1000,), 1e-5)
    y = x + torch.where(torch.arange(1000) % 2 == 0, 5e-4, -5e-4)
    assert_close_flashmla("no-cos", y, x, abs_tol=8e-4, rel_tol=2.01 / 128)
    assert cos_diff(y, x) > 0.5
    with pytest.raises(AssertionError, match="cosine diff"):
        assert_close_flashmla("cos", y, x, **OUT_TOL)
    assert cos_diff(torch.zeros(4), torch.zeros(4)) == 0.0


def test_assert_close_shape_and_dtype():
    x = _sample()
    with pytest.raises(AssertionError, match="shape"):
        assert_close_flashmla("shape", x[:2], x, **OUT_TOL)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close_flashmla("dtype", x.to(BF16), x, **OUT_TOL)
    assert_close_flashmla("dtype-off", x.double(), x, **OUT_TOL, check_dtype=False)


# ---------------------------------------------------------------------------------------------------------
# Oracle self-checks and metric formulas
# ---------------------------------------------------------------------------------------------------------


def test_oracle_single_key_and_uniform_keys():
    # One key: out = its V, lse = its scaled score. Identical keys: out = V, lse = score + ln(n).
    inputs = make_decode_inputs(C(1, 1, 5, 3, 1, page_size=2))
    phys = inputs.block_table[0, :3].long()
    key = inputs.kcache[phys[0], 0].clone()
    inputs.kcache[phys[:2]] = key  # tokens 0-3
    inputs.kcache[phys[2], 0] = key  # token 4; row 1 of this page stays NaN
    out, lse = dense_attention_oracle(inputs, out_dtype=torch.float64)
    score = (inputs.q[0, 0].double() @ key[0].double()) * 576**-0.5
    torch.testing.assert_close(lse[0, :, 0].double(), score + math.log(5), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 0], key[0, :512].double().expand(3, -1), rtol=0, atol=1e-12)


def test_metric_formulas():
    assert decode_flops(128, 2, 128, 1, 4096.0) == 128 * 128 * 2 * 4096 * 2 * (576 + 512)
    assert decode_bytes(128, 2, 128, 1, 4096.0) == 128 * (2 * 128 * 576 * 2 + 4096 * 576 * 2 + 2 * 128 * 512 * 2)
    assert decode_bytes(2, 1, 16, 8, 100.5, d=512) == 2 * (16 * 512 * 2 + 100.5 * 8 * 512 * 2 + 16 * 512 * 2)
    assert decode_flops(1, 1, 1, 1, 10.0, d=512, dv=512) == 10 * 2 * 1024


@pytest.mark.gpu
def test_reference_on_cuda_matches_cpu():
    case = C(6, 2, 4096, 128, 1, varlen=True, causal=True, zero_frac=0.3)
    cpu = make_decode_inputs(case)
    gpu = make_decode_inputs(case, device="cuda")
    assert torch.equal(torch.nan_to_num(gpu.kcache.cpu()), torch.nan_to_num(cpu.kcache))
    out_c, lse_c = run_reference(cpu, causal=True)
    out_g, lse_g = run_reference(gpu, causal=True)
    assert out_g.device.type == "cuda"
    assert_close_flashmla("out", out_g.cpu(), out_c, **OUT_TOL)
    assert_close_flashmla("lse", lse_g.cpu(), lse_c, **LSE_TOL)
