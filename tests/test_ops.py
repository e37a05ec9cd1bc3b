"""torch.library ops (cutemla.ops): opcheck, torch.compile(fullgraph=True), fakes, eager == compiled."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cutemla
from cutemla import ops
from cutemla.schedule import get_decoding_sched_meta, num_sm_parts
from cutemla.testing import DecodeCase, make_decode_inputs

CASES = [
    DecodeCase(b=2, s_q=1, s_k=70, h_q=4, h_kv=1, varlen=True, seed=1),
    DecodeCase(b=3, s_q=2, s_k=90, h_q=8, h_kv=2, varlen=True, causal=True, zero_frac=0.3, seed=2),
    DecodeCase(b=1, s_q=1, s_k=40, h_q=4, h_kv=1, d=512, dtype=torch.float16, seed=3),
]


@pytest.fixture(autouse=True)
def _reference_backend(reference_backend):
    yield


def _op_args(x):
    meta, splits = get_decoding_sched_meta(x.cache_seqlens, x.case.s_q, x.case.h_q, x.case.h_kv)
    scale = x.case.d ** -0.5
    return (x.q, x.kcache, x.block_table, x.cache_seqlens, meta, splits, scale, x.case.causal)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck_mla_decode(case):
    x = make_decode_inputs(case)
    torch.library.opcheck(torch.ops.cutemla.mla_decode.default, _op_args(x))


@pytest.mark.parametrize("s_q,h_q,h_kv", [(1, 16, 1), (2, 128, 1), (1, 8, 2)])
def test_opcheck_sched_meta(s_q, h_q, h_kv):
    seqlens = torch.tensor([5, 0, 300, 64], dtype=torch.int32)
    torch.library.opcheck(torch.ops.cutemla.sched_meta.default, (seqlens, s_q, h_q, h_kv, 132))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_op_matches_public_api(case):
    x = make_decode_inputs(case)
    args = _op_args(x)
    want = cutemla.flash_mla_with_kvcache(x.q, x.kcache, x.block_table, x.cache_seqlens, 512, args[4], args[5],
                                          causal=case.causal)
    for got in (torch.ops.cutemla.mla_decode(*args), ops.mla_decode(*args[:6], causal=case.causal)):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_sched_meta_op_matches_scheduler():
    seqlens = torch.tensor([5, 0, 300, 64, 1000], dtype=torch.int32)
    want = get_decoding_sched_meta(seqlens, 2, 64, 1, num_sms=78)
    for got in (torch.ops.cutemla.sched_meta(seqlens, 2, 64, 1, 78), ops.sched_meta(seqlens, 2, 64, 1, 78)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fake_shapes_and_dtypes():
    with FakeTensorMode():
        q = torch.empty(5, 2, 32, 576, dtype=torch.bfloat16)
        kcache = torch.empty(40, 64, 1, 576, dtype=torch.bfloat16)
        block_table = torch.empty(5, 8, dtype=torch.int32)
        seqlens = torch.empty(5, dtype=torch.int32)
        meta, splits = torch.ops.cutemla.sched_meta(seqlens, 2, 32, 1, 132)
        out, lse = torch.ops.cutemla.mla_decode(q, kcache, block_table, seqlens, meta, splits, 0.1, True)
    assert meta.shape == (num_sm_parts(132, 2, 32, 1), 8) and meta.dtype == torch.int32
    assert splits.shape == (6,) and splits.dtype == torch.int32
    assert out.shape == (5, 2, 32, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (5, 32, 2) and lse.dtype == torch.float32


def _step(q, kcache, block_table, seqlens, s_q: int, h_q: int, h_kv: int, causal: bool):
    meta, splits = ops.sched_meta(seqlens, s_q, h_q, h_kv, num_sms=132)
    out, lse = ops.mla_decode(q, kcache, block_table, seqlens, meta, splits, causal=causal)
    return out.float() * 2 + 1, lse  # some surrounding compute for the compiler to fuse


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    case = CASES[1]
    x = make_decode_inputs(case)
    args = (x.q, x.kcache, x.block_table, x.cache_seqlens, case.s_q, case.h_q, case.h_kv, case.causal)
    want = _step(*args)
    compiled = torch.compile(_step, fullgraph=True, backend=backend)
    got = compiled(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    # New lengths (same shapes) reuse the graph and give the new answer: nothing was baked in at trace time.
    seqlens2 = torch.clamp(x.cache_seqlens - 7, min=0)
    args2 = args[:3] + (seqlens2,) + args[4:]
    want2, got2 = _step(*args2), compiled(*args2)
    torch.testing.assert_close(got2[0], want2[0], rtol=0, atol=0)
    assert not torch.equal(want2[1], want[1])


def test_eager_wrapper_bypasses_dispatcher(monkeypatch):
    """Eager mla_decode never enters torch.ops (that is the point of the wrapper); compiled code does."""
    calls = []
    real = ops._mla_decode_impl

    def spy(*a):
        calls.append(torch.compiler.is_compiling())
        return real(*a)

    monkeypatch.setattr(ops, "_mla_decode_impl", spy)
    x = make_decode_inputs(CASES[0])
    args = _op_args(x)
    ops.mla_decode(*args[:6])
    assert calls == [False]


def test_eager_wrapper_validates():
    x = make_decode_inputs(CASES[0])
    args = _op_args(x)
    with pytest.raises(ValueError, match="num_splits"):
        ops.mla_decode(*args[:5], args[5][:-1])
    with pytest.raises(TypeError, match="q"):
        ops.mla_decode(x.q.float(), *args[1:6])
