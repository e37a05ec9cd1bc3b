"""CPU tests of the host-side fast paths (issue 6): what they skip on a repeat call, and that anything that
differs from the call they remember is checked again. The compiled kernels are stubbed (no GPU needed)."""
import pytest
import torch

from cutemla import _env, kernels, ops
from cutemla.decoder import MLADecoder


@pytest.fixture
def stub_kernel_path(clean_api_state, monkeypatch):
    """The kernel path on CPU: compiled decode / combine are recorders, launches are recorded."""
    built, launched = [], []

    def get_decode_fn(dtype, d, schedule, prefetch):
        built.append(("decode", d, schedule, prefetch))
        return lambda *args: launched.append(("decode", args))

    def combine_kernel_for(dtype, b, h_kv, rows):
        built.append(("combine", b, h_kv, rows))
        return lambda *args: launched.append(("combine", args))

    monkeypatch.setattr(kernels, "kernels_available", lambda device: True)
    monkeypatch.setattr(kernels, "_launch", (get_decode_fn, combine_kernel_for))
    monkeypatch.setattr(kernels, "_dsl_dtype", lambda dtype: dtype)
    monkeypatch.setattr(kernels, "_compiled_launches", {})
    return built, launched


def _decoder(b=2):
    dec = MLADecoder(4, 1, 16, 1, dtype=torch.bfloat16, device="cpu", max_blocks_per_seq=2)
    dec.plan(torch.tensor([70, 3][:b], dtype=torch.int32))
    return dec


def test_env_get_follows_os_environ(monkeypatch):
    monkeypatch.delenv("CUTEMLA_TEST_VAR", raising=False)
    assert _env.env_get("CUTEMLA_TEST_VAR") is None
    monkeypatch.setenv("CUTEMLA_TEST_VAR", "x1")
    assert _env.env_get("CUTEMLA_TEST_VAR") == "x1"
    monkeypatch.delenv("CUTEMLA_TEST_VAR")
    assert _env.env_get("CUTEMLA_TEST_VAR") is None


def test_compiled_pair_cached_per_shape_and_env(stub_kernel_path, monkeypatch):
    built, launched = stub_kernel_path
    monkeypatch.delenv("CUTEMLA_L2_PREFETCH", raising=False)
    q = torch.zeros(2, 1, 16, 576, dtype=torch.bfloat16)
    kc = torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    sl = torch.zeros(2, dtype=torch.int32)
    meta, splits = torch.zeros(8, 8, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    for _ in range(3):
        kernels.run_dense_decode(q, kc, bt, sl, meta, splits, 0.1, False)
    assert len(built) == 2 and len(launched) == 6  # one lookup of each compiled function, then the cache
    monkeypatch.setenv("CUTEMLA_L2_PREFETCH", "3")  # read per call: switches the variant at once
    kernels.run_dense_decode(q, kc, bt, sl, meta, splits, 0.1, False)
    assert built[-2][0] == "decode" and built[-2][3] == 3
    kernels.run_dense_decode(q[:1], kc, bt[:1], sl[:1], meta, splits[:2], 0.1, False)  # another batch
    assert built[-1] == ("combine", 1, 1, 16)


def test_decoder_repeat_run_skips_preparation(stub_kernel_path, monkeypatch):
    built, launched = stub_kernel_path
    dec = _decoder()
    prepared = []
    real = kernels.dense_decode_launches
    monkeypatch.setattr(kernels, "dense_decode_launches", lambda *a, **k: prepared.append(a[1]) or real(*a, **k))
    cache = torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16)
    q = torch.ones(2, 1, 16, 576, dtype=torch.bfloat16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    dec.run(q, cache, table)
    assert torch.equal(dec.q_buf[:2], q) and torch.equal(dec.block_table[:2], table)  # copied in
    # Repeat calls: a new view of the same memory (same address, shape, strides, dtype) and the static-buffer
    # forms reuse the prepared launches.
    dec.run(q, cache[:], table)
    dec.run(dec.q_buf[:2], cache, dec.block_table[:2])
    out, lse = dec.run(None, cache, None)
    assert len(prepared) == 1 and len(launched) == 8
    assert out.shape == (2, 1, 16, 512) and lse.shape == (2, 16, 1) and out.data_ptr() == dec.out.data_ptr()
    # Fewer blocks (same address, new shape) is another cache: checked and prepared again.
    dec.run(None, cache[:2], None)
    assert len(prepared) == 2


@pytest.mark.parametrize("bad, error, match", [
    (lambda c: c.view(torch.float16), TypeError, "kv_cache must be torch.bfloat16"),  # same address, new dtype
    (lambda c: c[:, :32], ValueError, "kv_cache must be"),  # same address, new shape
    (lambda c: torch.zeros(c.numel() + 1, dtype=c.dtype)[1:].view(c.shape), ValueError, "aligned"),
    (lambda c: torch.zeros(c.shape, dtype=c.dtype).transpose(0, 1), ValueError, "kv_cache must be"),
])
def test_decoder_revalidates_a_different_cache(stub_kernel_path, bad, error, match):
    dec = _decoder()
    cache = torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16)
    dec.run(None, cache, None)  # warm: launches prepared for `cache`
    with pytest.raises(error, match=match):
        dec.run(None, bad(cache), None)


def test_decoder_checks_q_and_block_table_on_every_run(stub_kernel_path):
    dec = _decoder()
    cache = torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16)
    q = torch.zeros(2, 1, 16, 576, dtype=torch.bfloat16)
    table = torch.zeros(2, 2, dtype=torch.int32)
    dec.run(q, cache, table)
    before_q, before_table = dec.q_buf.clone(), dec.block_table.clone()
    for args, error, match in [
        ((q.half(), cache, table), TypeError, "q must be"),
        ((q[:1], cache, table), ValueError, "q must be"),
        ((q, cache, torch.zeros(2, 3, dtype=torch.int32)), ValueError, "block_table must be"),
        ((q, cache, table.long()), TypeError, "block_table must be int32"),
        ((q, cache, table[:1]), ValueError, "block_table must be"),
        ((q + 1, cache[:, :32], table + 1), ValueError, "kv_cache"),  # nothing copied before every check passed
    ]:
        with pytest.raises(error, match=match):
            dec.run(*args)
    assert torch.equal(dec.q_buf, before_q) and torch.equal(dec.block_table, before_table)
    dec.plan(torch.tensor([5], dtype=torch.int32))  # a new batch: the plan's shapes apply
    with pytest.raises(ValueError, match=r"q must be \[1, 1, 16, 576\]"):
        dec.run(q, cache, table)
    out, lse = dec.run(None, cache, None)
    assert out.shape == (1, 1, 16, 512) and lse.shape == (1, 16, 1)


def test_decoder_none_inputs_on_reference_path(reference_backend):
    dec = MLADecoder(2, 1, 16, 1, dtype=torch.bfloat16, device="cpu", max_blocks_per_seq=2)
    gen = torch.Generator().manual_seed(0)
    cache = (torch.randn(4, 64, 1, 576, generator=gen) / 10).bfloat16()
    q = (torch.randn(2, 1, 16, 576, generator=gen) / 10).bfloat16()
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    dec.plan(torch.tensor([70, 3], dtype=torch.int32))
    want_out, want_lse = (t.clone() for t in dec.run(q, cache, table))
    dec.q_buf.zero_()
    dec.q_buf[:2].copy_(q)
    out, lse = dec.run(None, cache, None)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    with pytest.raises(ValueError, match="kv_cache"):  # the reference path checks the cache on every run
        dec.run(None, cache[:, :32], None)


def test_launch_skips_the_device_query_with_one_device(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_one_device", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls.append(1) or 0)
    kernels.launch(lambda: calls.append("decode"), (), None, (), 1)
    assert calls == ["decode"]
