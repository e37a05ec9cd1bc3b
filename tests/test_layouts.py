"""Torch-side layouts the kernels rely on: query-row folding, output views, TMA-ready strides."""
import pytest
import torch

from cutemla.kernels import _tma_ready
from cutemla.layouts.cache import fold_q, lse_rows_view, out_rows_view

SHAPES = [(2, 1, 16, 1), (2, 3, 16, 1), (2, 1, 16, 2), (2, 2, 6, 3), (1, 4, 128, 8)]


@pytest.mark.parametrize("b,s_q,h_q,h_kv", SHAPES)
def test_row_r_of_kv_head_k_is_query_position_r_div_g_head_k_g_plus_r_mod_g(b, s_q, h_q, h_kv):
    g = h_q // h_kv
    q = torch.randn(b, s_q, h_q, 8)
    folded = fold_q(q, h_kv)
    assert folded.shape == (b, s_q * g, h_kv, 8)
    for r in range(s_q * g):
        for k in range(h_kv):
            assert torch.equal(folded[:, r, k], q[:, r // g, k * g + r % g])
    # A view (no copy) whenever the folded rows are affine in memory.
    if h_kv == 1 or s_q == 1:
        assert folded.data_ptr() == q.data_ptr()


@pytest.mark.parametrize("b,s_q,h_q,h_kv", SHAPES)
def test_output_views_index_the_same_rows(b, s_q, h_q, h_kv):
    g = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, 512)
    lse = torch.zeros(b, h_q, s_q)
    out_v, lse_v = out_rows_view(out, h_kv), lse_rows_view(lse, h_kv)
    for r in range(s_q * g):
        for k in range(h_kv):
            out_v[:, r // g, k, r % g] += 1  # the kernel's (g, s_q) row decomposition
            lse_v[:, k, r % g, r // g] += 1
    assert torch.all(out == 1) and torch.all(lse == 1)


def test_tma_ready_fixes_size_one_strides_without_copying():
    q = torch.randn(2, 4, 1, 576, dtype=torch.bfloat16)
    odd = q.as_strided(q.shape, (4 * 576, 576, 3, 1))  # a size-1 dim with a 6-byte stride
    ready = _tma_ready(odd, "q", copy_ok=True)
    assert ready.data_ptr() == q.data_ptr()
    assert ready.stride()[2] % 8 == 0 and torch.equal(ready, q)


def test_tma_ready_copies_misaligned_q_and_rejects_misaligned_cache():
    big = torch.randn(2, 4, 1, 580, dtype=torch.bfloat16)
    q = big[..., :576]  # row stride 580 elements = 1160 bytes, not a 16-byte multiple
    ready = _tma_ready(q, "q", copy_ok=True)
    assert ready.is_contiguous() and torch.equal(ready, q)
    with pytest.raises(ValueError, match="k_cache"):
        _tma_ready(q, "k_cache", copy_ok=False)


def test_tma_ready_copies_a_contiguous_q_with_a_misaligned_base():
    flat = torch.randn(2 * 4 * 576 + 1, dtype=torch.bfloat16)
    q = flat[1:].view(2, 4, 1, 576)  # contiguous, base 2 bytes past an aligned address
    assert q.is_contiguous() and q.data_ptr() % 16
    ready = _tma_ready(q, "q", copy_ok=True)
    assert ready.data_ptr() % 16 == 0 and torch.equal(ready, q)
