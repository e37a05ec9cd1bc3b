"""Split-KV combine: the torch contract against a hand computation (CPU), the CuTe DSL kernel's sm_90a
build (CPU), and the kernel against the torch contract (GPU)."""
from __future__ import annotations

import math

import pytest
import torch

from cutemla.kernels import combine
from cutemla.kernels.combine import HEAD_DIM_V, combine_splits, combine_splits_torch
from cutemla.kernels.ptx_report import run_report

LOG2_E = 1.0 / math.log(2.0)
SENTINEL = 7.0  # what untouched out/lse entries hold


# ---------------------------------------------------------------------------------------------------------
# Hand computation: a small attention problem, split along its keys the way the decode kernel would.
# ---------------------------------------------------------------------------------------------------------

def _attend_piece(q, k, v, allowed, scale):
    """One split's partial for rows q [R, d] over keys k/v [N, *] (float64): (O/L [R, 512], base-2 lse [R])."""
    logits2 = (q @ k.T) * scale * LOG2_E
    logits2 = torch.where(allowed, logits2, -math.inf)
    m = logits2.amax(dim=1, keepdim=True) if k.shape[0] else torch.full((q.shape[0], 1), -math.inf, dtype=q.dtype)
    m_safe = torch.where(m == -math.inf, torch.zeros_like(m), m)
    p = torch.exp2(logits2 - m_safe)
    denom = p.sum(dim=1, keepdim=True)
    o = (p @ v) / torch.where(denom == 0, torch.ones_like(denom), denom)  # empty rows: O = 0
    lse2 = torch.where(denom == 0, torch.full_like(denom, -math.inf), torch.log2(denom) + m_safe)
    return o, lse2.squeeze(1)


def _attend_full(q, k, v, allowed, scale):
    """Unsplit attention of rows q [R, d]: (out [R, 512], natural lse [R], +inf and 0 for empty rows)."""
    logits = torch.where(allowed, (q @ k.T) * scale, -math.inf)
    lse = torch.logsumexp(logits, dim=1) if k.shape[0] else torch.full((q.shape[0],), -math.inf, dtype=q.dtype)
    empty = lse == -math.inf
    p = torch.where(empty[:, None], torch.zeros_like(logits), torch.exp(logits - torch.where(empty, 0.0, lse)[:, None]))
    return p @ v, torch.where(empty, torch.full_like(lse, math.inf), lse)


def _build_split_problem(seqlens, splits, s_q, h_q, h_kv, out_dtype, seed=0, d=64):
    """Random MLA-like problem (causal, bottom-right aligned) split along keys.

    Returns (o_accum, lse_accum, num_splits, out, lse, expected_out, expected_lse); requests with one split
    have out/lse = SENTINEL both in `out` and in the expectation (the combine must not touch them).
    """
    gen = torch.Generator().manual_seed(seed)
    b, g = len(seqlens), h_q // h_kv
    rows = s_q * g
    scale = d ** -0.5
    q = torch.randn(b, s_q, h_q, d, generator=gen, dtype=torch.float64) * 2
    keys = [torch.randn(n, h_kv, d, generator=gen, dtype=torch.float64) for n in seqlens]
    values = [torch.randn(n, h_kv, HEAD_DIM_V, generator=gen, dtype=torch.float64) for n in seqlens]
    bounds = [0]
    for count in splits:
        bounds.append(bounds[-1] + count)
    total_splits = bounds[-1] + 2  # the caller allocates more rows than it uses
    o_accum = torch.full((total_splits, h_kv, rows, HEAD_DIM_V), float("nan"))
    lse_accum = torch.full((total_splits, h_kv, rows), float("nan"))
    out = torch.full((b, s_q, h_q, HEAD_DIM_V), SENTINEL, dtype=out_dtype)
    lse = torch.full((b, h_q, s_q), SENTINEL)
    expected_out = out.clone().double()
    expected_lse = lse.clone().double()
    for i, n in enumerate(seqlens):
        key_idx = torch.arange(n)
        for hk in range(h_kv):
            # Rows in the kernel's order: row r is (s = r // g, head = hk * g + r % g).
            row_s = torch.arange(rows) // g
            row_head = hk * g + torch.arange(rows) % g
            q_rows = q[i, row_s, row_head]
            allowed = key_idx[None, :] < (n - (s_q - 1 - row_s))[:, None]
            piece_bounds = torch.linspace(0, n, splits[i] + 1).round().long().tolist()
            for j in range(splits[i]):
                lo, hi = piece_bounds[j], piece_bounds[j + 1]
                o, l2 = _attend_piece(q_rows, keys[i][lo:hi, hk], values[i][lo:hi, hk], allowed[:, lo:hi], scale)
                o_accum[bounds[i] + j, hk] = o.float()
                lse_accum[bounds[i] + j, hk] = l2.float()
        if splits[i] <= 1:
            continue
        # The expectation per (s, head), straight from the query layout, not through the row mapping.
        for s in range(s_q):
            for h in range(h_q):
                allowed = (key_idx < n - (s_q - 1 - s))[None, :]
                o, l = _attend_full(q[i, s, h][None], keys[i][:, h // g], values[i][:, h // g], allowed, scale)
                expected_out[i, s, h] = o[0]
                expected_lse[i, h, s] = l[0]
    num_splits = torch.tensor(bounds, dtype=torch.int32)
    return o_accum, lse_accum, num_splits, out, lse, expected_out, expected_lse


def _assert_out_close(got, expected):
    dtype = got.dtype
    torch.testing.assert_close(got.double(), expected.to(dtype).double(),
                               atol=1e-3, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3)


# ---------------------------------------------------------------------------------------------------------
# CPU: the torch contract
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s_q,h_q,h_kv", [(1, 1, 1), (2, 4, 2), (2, 6, 1), (3, 4, 4)])
def test_torch_combine_reproduces_unsplit_softmax(out_dtype, s_q, h_q, h_kv):
    seqlens = [50, 20, 37, 9, 64]
    splits = [3, 1, 4, 2, 7]  # 7 pieces of 64 keys: some pieces are causally empty for early queries
    o_accum, lse_accum, num_splits, out, lse, expected_out, expected_lse = _build_split_problem(
        seqlens, splits, s_q, h_q, h_kv, out_dtype, seed=s_q * 100 + h_q)
    combine_splits_torch(o_accum, lse_accum, num_splits, out, lse)
    _assert_out_close(out, expected_out)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
    # The 1-split request keeps whatever the decode kernel wrote.
    assert torch.all(out[1] == SENTINEL) and torch.all(lse[1] == SENTINEL)


def test_torch_combine_empty_rows_give_zero_and_plus_inf():
    # Request 0 has no keys at all (every split -inf); request 1 has 2 keys with s_q = 3, so under the
    # causal mask query 0 sees nothing while queries 1 and 2 do; request 2 has one non-empty split of 3.
    seqlens, splits, s_q, h_q = [0, 2, 130], [3, 2, 3], 3, 2
    o_accum, lse_accum, num_splits, out, lse, expected_out, expected_lse = _build_split_problem(
        seqlens, splits, s_q, h_q, 1, torch.bfloat16, seed=3)
    # Request 2: make splits 0 and 2 empty for every row, so only split 1 carries weight.
    lse_accum[num_splits[2]] = -math.inf
    lse_accum[num_splits[2] + 2] = -math.inf
    single = o_accum[num_splits[2] + 1].clone()
    combine_splits_torch(o_accum, lse_accum, num_splits, out, lse)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == math.inf)
    assert torch.all(out[1, 0] == 0) and torch.all(lse[1, :, 0] == math.inf)
    assert torch.isfinite(lse[1, :, 1:]).all()
    _assert_out_close(out[1], expected_out[1])
    # One live split: out is that split's O, lse its own lse converted to natural log.
    _assert_out_close(out[2], single.view(s_q, h_q, HEAD_DIM_V).double())
    torch.testing.assert_close(lse[2], (lse_accum[num_splits[2] + 1] * math.log(2)).view(s_q, h_q).T)


def test_torch_combine_ignores_partials_of_empty_splits():
    """A split with lse -inf has weight 0: its O row must not matter, even if it is NaN or inf."""
    o_accum, lse_accum, num_splits, out, lse, expected_out, expected_lse = _build_split_problem(
        [64, 33], [5, 4], 2, 4, 1, torch.float16, seed=5)
    empty = torch.zeros(lse_accum.shape, dtype=torch.bool)
    empty[1, :, ::2] = True
    empty[6, :, 1] = True
    empty[-2:] = True  # unused rows past the last request stay NaN as allocated
    lse_accum[empty] = -math.inf
    o_accum[empty] = float("nan")
    o_accum[7, :, 3] = float("inf")
    lse_accum[7, :, 3] = -math.inf
    reference_out, reference_lse = out.clone(), lse.clone()
    clean_o = torch.where(empty[..., None] | torch.isinf(o_accum), torch.zeros_like(o_accum), o_accum)
    combine_splits_torch(clean_o, lse_accum, num_splits, reference_out, reference_lse)
    combine_splits_torch(o_accum, lse_accum, num_splits, out, lse)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out, reference_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, reference_lse, atol=0, rtol=0)


def test_combine_splits_on_cpu_uses_the_torch_path():
    o_accum, lse_accum, num_splits, out, lse, expected_out, expected_lse = _build_split_problem(
        [40, 10], [3, 2], 2, 2, 1, torch.bfloat16, seed=7)
    combine_splits(o_accum, lse_accum, num_splits, out, lse)
    _assert_out_close(out, expected_out)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


def _small_args():
    o_accum = torch.zeros(4, 1, 2, HEAD_DIM_V)
    return dict(o_accum=o_accum, lse_accum=torch.zeros(4, 1, 2), num_splits=torch.tensor([0, 2, 4], dtype=torch.int32),
                out=torch.zeros(2, 1, 2, HEAD_DIM_V, dtype=torch.bfloat16), lse=torch.zeros(2, 2, 1))


@pytest.mark.parametrize("name,value,error", [
    ("o_accum", torch.zeros(4, 1, 2, 576), ValueError),
    ("o_accum", torch.zeros(4, 1, 2, HEAD_DIM_V, dtype=torch.float16), TypeError),
    ("o_accum", torch.zeros(4, 1, HEAD_DIM_V, 2).transpose(2, 3), ValueError),
    ("lse_accum", torch.zeros(4, 1, 3), ValueError),
    ("num_splits", torch.tensor([0, 2, 4], dtype=torch.int64), TypeError),
    ("num_splits", torch.tensor([0, 4], dtype=torch.int32), ValueError),
    ("out", torch.zeros(2, 1, 2, HEAD_DIM_V), TypeError),
    ("out", torch.zeros(2, 1, 4, HEAD_DIM_V, dtype=torch.bfloat16), ValueError),
    ("lse", torch.zeros(2, 1, 2), ValueError),
    ("lse", [0.0], TypeError),
])
def test_bad_arguments_raise(name, value, error):
    args = _small_args()
    args[name] = value
    with pytest.raises(error, match=name):
        combine_splits(**args)
    with pytest.raises(error, match=name):
        combine_splits_torch(**args)


def test_out_view_normalises_size_one_strides_only():
    base = torch.zeros(1, 1, 2, HEAD_DIM_V + 6, dtype=torch.bfloat16)
    odd = base.as_strided((1, 1, 2, HEAD_DIM_V), (3, 5, HEAD_DIM_V + 4, 1))
    fixed = combine._aligned_out_view(odd)
    assert fixed.stride()[2:] == (HEAD_DIM_V + 4, 1) and fixed.stride()[0] % 4 == 0 == fixed.stride()[1] % 4
    assert fixed.data_ptr() == odd.data_ptr()
    with pytest.raises(ValueError, match="stride"):
        combine._aligned_out_view(base.as_strided((1, 1, 2, HEAD_DIM_V), (4, 4, HEAD_DIM_V + 2, 1)))
    with pytest.raises(ValueError, match="aligned"):
        combine._aligned_out_view(base.view(-1)[1:1 + 2 * HEAD_DIM_V].view(1, 1, 2, HEAD_DIM_V))


def test_launch_shape_deep_limit_follows_the_sm_count():
    # Two rows per SM: 264 on 132 SMs, 156 on a 78-SM part (where 256 rows would take a second wave).
    assert combine.launch_shape(2, 1, 128, num_sms=132) == combine.CTA_PER_ROW_DEEP
    assert combine.launch_shape(1, 1, 264, num_sms=132) == combine.CTA_PER_ROW_DEEP
    assert combine.launch_shape(1, 1, 272, num_sms=132) == combine.CTA_PER_ROW
    assert combine.launch_shape(2, 1, 128, num_sms=78) == combine.CTA_PER_ROW
    assert combine.launch_shape(1, 1, 128, num_sms=78) == combine.CTA_PER_ROW_DEEP


def test_launch_shape_splits_rows_only_for_small_problems():
    assert combine.launch_shape(1, 1, 128) == combine.CTA_PER_ROW_DEEP
    assert combine.launch_shape(2, 1, 128) == combine.CTA_PER_ROW_DEEP
    assert combine.launch_shape(4, 1, 128) == combine.CTA_PER_ROW
    assert combine.launch_shape(8, 1, 128) == combine.WARP_PER_ROW
    assert combine.launch_shape(128, 1, 16) == combine.WARP_PER_ROW


def test_accumulators_get_canonical_strides():
    odd = torch.zeros(4, 1, 2, HEAD_DIM_V).as_strided((4, 1, 2, HEAD_DIM_V), (2 * HEAD_DIM_V, 7, HEAD_DIM_V, 1))
    assert odd.is_contiguous()  # torch ignores a size-1 dim's stride; TVM-FFI's stride check does not
    fixed = combine._canonical_contiguous(odd)
    assert fixed.stride() == (2 * HEAD_DIM_V, 2 * HEAD_DIM_V, HEAD_DIM_V, 1) and fixed.data_ptr() == odd.data_ptr()
    plain = torch.zeros(3, 2, 5)
    assert combine._canonical_contiguous(plain) is plain


# ---------------------------------------------------------------------------------------------------------
# CPU: the CuTe DSL kernel builds for sm_90a
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.compile
@pytest.mark.parametrize("config", ["bf16", "fp16", "bf16_cta_per_row", "fp16_cta_per_row", "bf16_cta_per_row_deep",
                                    "fp16_cta_per_row_deep"])
def test_kernel_compiles_for_sm90a(config):
    report = run_report("cutemla.kernels.combine", config)
    assert report["kernels"] == 1, report
    assert report["spill_bytes"] == 0 and report["stack_bytes"] == 0, report
    assert report["ptxas_warnings"] == [], report
    # <= 128 registers keeps two 256-thread CTAs (four 128-thread ones) per SM. The deep shape keeps 32 partial
    # rows in flight per lane instead: <= 168 still fits three of its CTAs per SM (combine.DEEP_ROWS_PER_SM).
    assert 0 < report["registers"][0] <= (168 if config.endswith("_deep") else 128), report
    ptx = report["ptx"]
    assert ptx["target_sm90a"] == 1 and ptx["local_memory"] == 0, report
    assert ptx["griddepcontrol"] >= 1, report  # PDL wait is on by default


# ---------------------------------------------------------------------------------------------------------
# GPU: the CuTe DSL kernel against the torch contract
# ---------------------------------------------------------------------------------------------------------

def _random_partials(b, s_q, h_q, h_kv, max_splits, dtype, seed, device="cuda", out_width=HEAD_DIM_V + 64,
                     min_splits=1):
    gen = torch.Generator().manual_seed(seed)
    rows = s_q * (h_q // h_kv)
    counts = torch.randint(min_splits, max_splits + 1, (b,), generator=gen)
    counts[0] = max(int(counts[0]), 2)  # at least one request that the kernel must combine
    num_splits = torch.zeros(b + 1, dtype=torch.int32)
    num_splits[1:] = torch.cumsum(counts, 0)
    total_splits = int(num_splits[-1]) + 3
    lse_accum = torch.randn(total_splits, h_kv, rows, generator=gen) * 4 + 2
    lse_accum[torch.rand(lse_accum.shape, generator=gen) < 0.15] = -math.inf
    lse_accum[:, :, rows // 2] = -math.inf  # one row that is empty in every split of every request
    o_accum = torch.randn(total_splits, h_kv, rows, HEAD_DIM_V, generator=gen)
    o_accum[lse_accum == -math.inf] = float("nan")  # never read as a contribution
    # out is a slice of a wider buffer: the kernel must use its strides and write nothing else.
    out_buffer = torch.full((b, s_q, h_q, out_width), SENTINEL, dtype=dtype)
    lse = torch.full((b, h_q, s_q), SENTINEL)
    tensors = [o_accum, lse_accum, num_splits, out_buffer, lse]
    return [t.to(device) for t in tensors]


def _check_kernel_against_torch(o_accum, lse_accum, num_splits, out_buffer, lse, fn=None):
    ref_buffer, ref_lse = out_buffer.clone(), lse.clone()
    combine_splits_torch(o_accum, lse_accum, num_splits, ref_buffer[..., :HEAD_DIM_V], ref_lse)
    if fn is None:
        combine_splits(o_accum, lse_accum, num_splits, out_buffer[..., :HEAD_DIM_V], lse)
    else:
        fn(o_accum, lse_accum, num_splits, out_buffer[..., :HEAD_DIM_V], lse)
    torch.cuda.synchronize()
    torch.testing.assert_close(out_buffer.float(), ref_buffer.float(), atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    # The contract's special cases hold exactly, not just within tolerance.
    assert torch.equal(out_buffer[..., HEAD_DIM_V:], ref_buffer[..., HEAD_DIM_V:])
    empty_rows = (ref_lse == math.inf).transpose(1, 2)  # [b, s_q, h_q]
    assert torch.equal(lse == math.inf, ref_lse == math.inf)
    assert torch.all(out_buffer[..., :HEAD_DIM_V][empty_rows] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h_q,h_kv", [(1, 1), (16, 1), (16, 2), (128, 1), (128, 2)])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("b", [1, 5, 64])
def test_kernel_matches_torch(b, s_q, h_q, h_kv, dtype):
    seed = b * 1000 + s_q * 100 + h_q + h_kv
    _check_kernel_against_torch(*_random_partials(b, s_q, h_q, h_kv, 20, dtype, seed))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [combine.WARP_PER_ROW, combine.CTA_PER_ROW, combine.CTA_PER_ROW_DEEP])
@pytest.mark.parametrize("max_splits", [33, 150])
def test_kernel_many_splits(max_splits, shape):
    """More than 32 splits per request: the weights come in several 32-lane chunks; past 128 splits the
    LSEs no longer all fit the lanes' registers (LSE_REGS) and the rest are read from memory."""
    fn = combine.compile_combine(torch.bfloat16, True, *shape)
    _check_kernel_against_torch(*_random_partials(3, 1, 64, 1, max_splits, torch.bfloat16, seed=max_splits,
                                                  min_splits=33), fn=fn)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [combine.WARP_PER_ROW, combine.CTA_PER_ROW, combine.CTA_PER_ROW_DEEP])
@pytest.mark.parametrize("max_splits", [4, 40])
def test_kernel_launch_shapes(shape, max_splits):
    """Every launch shape on the same problems, whatever `launch_shape` would pick for them."""
    fn = combine.compile_combine(torch.float16, True, *shape)
    _check_kernel_against_torch(*_random_partials(3, 2, 16, 2, max_splits, torch.float16, seed=max_splits), fn=fn)


@pytest.mark.gpu
def test_kernel_long_query_grid():
    """s_q = 4096, h_q = 16: 65,536 rows per kv head; the row blocks sit in grid x (FlashMLA issue #114)."""
    _check_kernel_against_torch(*_random_partials(1, 4096, 16, 1, 2, torch.float16, seed=11, out_width=HEAD_DIM_V,
                                                  min_splits=2))


@pytest.mark.gpu
@pytest.mark.parametrize("use_pdl", [False, True])
def test_kernel_pdl_flag(use_pdl):
    fn = combine.compile_combine(torch.bfloat16, use_pdl=use_pdl)
    _check_kernel_against_torch(*_random_partials(5, 2, 16, 1, 8, torch.bfloat16, seed=21), fn=fn)


@pytest.mark.gpu
def test_kernel_in_cuda_graph():
    o_accum, lse_accum, num_splits, out_buffer, lse = _random_partials(4, 1, 128, 1, 12, torch.bfloat16, seed=31)
    ref_buffer, ref_lse = out_buffer.clone(), lse.clone()
    combine_splits_torch(o_accum, lse_accum, num_splits, ref_buffer[..., :HEAD_DIM_V], ref_lse)
    out = out_buffer[..., :HEAD_DIM_V]
    combine_splits(o_accum, lse_accum, num_splits, out, lse)  # compile outside the capture
    out_buffer.fill_(SENTINEL)
    lse.fill_(SENTINEL)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            combine_splits(o_accum, lse_accum, num_splits, out, lse)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.all(lse == SENTINEL)  # capture does not run the kernel
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out_buffer.float(), ref_buffer.float(), atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
