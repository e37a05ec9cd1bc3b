"""The FP8 kernels' launchers hand the compiled functions tensors that fit the fake tensors they were compiled
for (dtype, rank, static sizes and strides, stride divisibility, base alignment, shared symbolic sizes), so
TVM-FFI accepts them on the GPU. Checked on the CPU with the launchers' own argument builders."""
import math

import pytest
import torch

from cutemla.layouts.fp8_cache import quantize_fp8_cache

pytest.importorskip("cutlass")

from cutlass.cute.typing import SymInt  # noqa: E402

from cutemla.kernels import dense_fp8_decode, sparse_combine, sparse_decode  # noqa: E402

_DTYPES = {"BFloat16": torch.bfloat16, "Uint8": torch.uint8, "Int32": torch.int32, "Float32": torch.float32}


def check_against_fakes(fakes, actual):
    assert len(fakes) == len(actual)
    bound = {}
    for i, (fake, real) in enumerate(zip(fakes, actual)):
        if not hasattr(fake, "element_type"):  # scalars
            assert isinstance(real, (int, float)), (i, type(real))
            continue
        assert isinstance(real, torch.Tensor), i
        assert _DTYPES[fake.element_type.__name__] == real.dtype, (i, fake.element_type, real.dtype)
        assert len(fake.shape) == real.dim(), (i, fake.shape, real.shape)
        for d, (n, st) in enumerate(zip(fake.shape, fake.stride)):
            if isinstance(n, SymInt):
                if n.symbol is not None:
                    assert bound.setdefault(n.symbol, real.shape[d]) == real.shape[d], (i, d, n.symbol)
            else:
                assert n == real.shape[d], (i, d, n, real.shape)
            if isinstance(st, SymInt):
                assert real.stride(d) % st.divisibility == 0, (i, d, real.stride(d), st.divisibility)
            else:
                assert st == real.stride(d), (i, d, st, real.stride())
        assert real.data_ptr() % fake._assumed_align == 0, (i, fake._assumed_align)


def _sparse_inputs(b, s_q, h_q, topk, noncontig=False):
    cache = quantize_fp8_cache(torch.randn(6, 64, 1, 576).to(torch.bfloat16))
    q = torch.randn(b, s_q, h_q, 576).to(torch.bfloat16)
    indices = torch.randint(-1, 6 * 64, (b, s_q, topk), dtype=torch.int32)
    if noncontig:
        q = torch.cat([q, q[..., :64]], -1)[..., :576]
        indices = torch.cat([indices, indices], -1)[..., :topk]
    return q, cache, indices


@pytest.mark.parametrize("b,s_q,h_q,topk,splits,sink,lengths,noncontig", [
    (2, 1, 64, 128, 1, False, False, False),
    (1, 2, 16, 100, 3, True, True, True),
    (3, 1, 128, 2048, 1, True, False, False),
    (3, 2, 32, 256, 2, True, True, True),
])
def test_sparse_launch_args_fit_the_compiled_signature(b, s_q, h_q, topk, splits, sink, lengths, noncontig):
    with torch.device("cpu"):
        q, cache, indices = _sparse_inputs(b, s_q, h_q, topk, noncontig)
        step = 2 if noncontig else 1  # strided sink / topk_length are made contiguous
        sink_t = torch.zeros(h_q * step)[::step] if sink else None
        lengths_t = torch.full((b * step,), topk, dtype=torch.int32)[::step] if lengths else None
        args = sparse_decode.sparse_launch_args(
            q, cache.view(torch.float8_e4m3fn), indices, 576 ** -0.5, sink_t, lengths_t, splits)
    check_against_fakes(sparse_decode._fake_args(), args)
    assert args[-1] == splits and math.isclose(args[9], 576 ** -0.5 * math.log2(math.e))
    if splits > 1:
        assert args[7].shape == (b * splits, 1, s_q * h_q, 512)
        # What the launcher hands the split combine: partials, sink (or dummy), out, lse, flag.
        check_against_fakes(sparse_combine._fake_args(), (args[7], args[8], args[4], args[5], args[6], args[11]))


@pytest.mark.parametrize("b,s_q,h_q,causal", [(2, 1, 64, False), (3, 2, 16, True), (1, 4, 128, True)])
def test_dense_fp8_launch_args_fit_the_compiled_signature(b, s_q, h_q, causal):
    from cutemla.schedule import get_decoding_sched_meta

    cache = quantize_fp8_cache(torch.randn(6, 64, 1, 576).to(torch.bfloat16))
    q = torch.randn(b, s_q, h_q, 576).to(torch.bfloat16)
    seqlens = torch.tensor([100, 5, 300][:b], dtype=torch.int32)
    table = torch.arange(b * 5, dtype=torch.int32).view(b, 5) % 6
    meta, num_splits = get_decoding_sched_meta(seqlens, s_q, h_q, 1, num_sms=132)
    args = dense_fp8_decode.dense_launch_args(q, cache, table, seqlens, meta, num_splits, 0.1, causal)
    check_against_fakes(dense_fp8_decode._fake_args(), args)
    assert args[-1] == int(causal and s_q > 1)


def test_checker_catches_a_mismatch():
    q, cache, indices = _sparse_inputs(2, 1, 64, 128)
    args = list(sparse_decode.sparse_launch_args(q, cache, indices, 0.1, None, None, 1))
    args[2] = args[2].long()  # int64 indices
    with pytest.raises(AssertionError):
        check_against_fakes(sparse_decode._fake_args(), args)
    args = list(sparse_decode.sparse_launch_args(q, cache, indices, 0.1, None, None, 1))
    args[1] = torch.zeros(7 * 64 * 656, dtype=torch.uint8).as_strided((6, 64, 1, 656), (64 * 656 + 8, 656, 656, 1))
    with pytest.raises(AssertionError):  # block stride not a multiple of 16 bytes
        check_against_fakes(sparse_decode._fake_args(), args)
