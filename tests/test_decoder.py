"""MLADecoder: plan/run against the reference (live batch < max_batch, several layers), and CUDA-graph replay."""
import pytest
import torch

import cutemla
from cutemla.decoder import MLADecoder
from cutemla.testing import LSE_TOL, OUT_TOL, DecodeCase, assert_close_flashmla, make_decode_inputs


@pytest.fixture(autouse=True)
def _reference_backend(clean_api_state, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("CUTEMLA_BACKEND", "reference")


def _check(out, lse, x, causal):
    want_out, want_lse = cutemla.mla_decode_reference(x.q.cpu(), x.kcache.cpu(), x.block_table.cpu(),
                                                      x.cache_seqlens.cpu(), causal=causal)
    assert_close_flashmla("out", out.cpu(), want_out, **OUT_TOL)
    assert_close_flashmla("lse", lse.cpu(), want_lse, **LSE_TOL)


@pytest.mark.parametrize("s_q,causal", [(1, True), (2, True), (2, False)])
def test_plan_run_small_live_batch_several_layers(s_q, causal):
    max_batch, b, h_q = 6, 3, 8
    dec = MLADecoder(max_batch, s_q, h_q, 1, dtype=torch.bfloat16, device="cpu", max_blocks_per_seq=8,
                     causal=causal)
    layers = [make_decode_inputs(DecodeCase(b=b, s_q=s_q, s_k=150, h_q=h_q, h_kv=1, varlen=True, seed=0))]
    # Same lengths and block table, new q and cache for the other "layers" (different seeds for the values).
    for seed in (1, 2):
        other = make_decode_inputs(DecodeCase(b=b, s_q=s_q, s_k=150, h_q=h_q, h_kv=1, varlen=True, seed=0))
        gen = torch.Generator().manual_seed(seed)
        other.q.copy_(torch.randn(other.q.shape, generator=gen) / 10)
        valid = ~other.kcache.isnan()
        other.kcache[valid] = (torch.randn(int(valid.sum()), generator=gen) / 10).to(other.kcache.dtype)
        layers.append(other)
    dec.plan(layers[0].cache_seqlens)
    assert dec.batch == b and torch.equal(dec.cache_seqlens[b:], torch.zeros(max_batch - b, dtype=torch.int32))
    results = [dec.run(x.q, x.kcache, x.block_table) for x in layers]
    for (out, lse), x in zip(results[-1:], layers[-1:]):
        assert out.shape == (b, s_q, h_q, 512) and lse.shape == (b, h_q, s_q)
        _check(out, lse, x, causal)
    # Results are views of static buffers: copy out before the next run, as an engine would consume them.
    out_buf = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16)
    lse_buf = torch.empty(b, h_q, s_q)
    for x in layers:
        out, lse = dec.run(x.q, x.kcache, x.block_table, out=out_buf, lse=lse_buf)
        assert out is out_buf and lse is lse_buf
        _check(out, lse, x, causal)
    # Padded rows: length 0 -> out 0, lse +inf.
    assert torch.all(dec.out[b:] == 0) and torch.all(torch.isinf(dec.lse[b:]))


def test_replan_with_new_lengths_and_inplace_buffers():
    dec = MLADecoder(4, 1, 16, 1, device="cpu", max_blocks_per_seq=8)
    x = make_decode_inputs(DecodeCase(b=4, s_q=1, s_k=300, h_q=16, h_kv=1, varlen=True, seed=5))
    # Engine-style: write straight into the static buffers and plan without arguments.
    dec.cache_seqlens.copy_(x.cache_seqlens)
    dec.block_table[:, : x.block_table.shape[1]].copy_(x.block_table)
    dec.q_buf.copy_(x.q)
    dec.plan()
    out, lse = dec.run(dec.q_buf, x.kcache, dec.block_table)
    _check(out, lse, x, True)
    shorter = torch.clamp(x.cache_seqlens - 100, min=0)
    dec.plan(shorter)
    out, lse = dec.run(x.q, x.kcache, x.block_table)
    x.cache_seqlens = shorter
    _check(out, lse, x, True)


def test_run_validates_against_plan():
    dec = MLADecoder(4, 1, 16, 1, device="cpu", max_blocks_per_seq=4)
    x = make_decode_inputs(DecodeCase(b=2, s_q=1, s_k=100, h_q=16, h_kv=1))
    with pytest.raises(RuntimeError, match="before plan"):
        dec.run(x.q, x.kcache, x.block_table)
    dec.plan(x.cache_seqlens)
    with pytest.raises(ValueError, match="q must be"):
        dec.run(x.q[:1], x.kcache, x.block_table)
    with pytest.raises(TypeError, match="q must be"):
        dec.run(x.q.half(), x.kcache, x.block_table)
    with pytest.raises(ValueError, match="block_table"):
        dec.run(x.q, x.kcache, torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens"):
        dec.plan(torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="h_q"):
        MLADecoder(4, 1, 15, 2, device="cpu")


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_with_new_lengths():
    torch.manual_seed(0)
    max_batch, b, s_q, h_q, pages = 8, 5, 1, 16, 16
    dec = MLADecoder(max_batch, s_q, h_q, 1, device="cuda", max_blocks_per_seq=pages)
    num_blocks = b * pages
    kcache = (torch.randn(num_blocks, 64, 1, 576, device="cuda") / 10).bfloat16()
    q = (torch.randn(b, s_q, h_q, 576, device="cuda") / 10).bfloat16()
    seqlens = torch.full((b,), 64, dtype=torch.int32, device="cuda")
    block_table = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(b, pages)
    out = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device="cuda")

    def step():
        dec.plan(seqlens)
        dec.run(q, kcache, block_table, out=out, lse=lse)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(1)
    for replay in range(4):
        seqlens.copy_(torch.randint(0, pages * 64 + 1, (b,), generator=gen, dtype=torch.int32))
        block_table.copy_(torch.randperm(num_blocks, generator=gen).to(torch.int32).view(b, pages))
        q.copy_((torch.randn(q.shape, generator=gen) / 10).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_lse = cutemla.mla_decode_reference(q.cpu(), kcache.cpu(), block_table.cpu(), seqlens.cpu())
        assert_close_flashmla(f"out (replay {replay})", out.cpu(), want_out, **OUT_TOL)
        assert_close_flashmla(f"lse (replay {replay})", lse.cpu(), want_lse, **LSE_TOL)


def test_kernel_path_prepares_launches_once_per_cache(monkeypatch):
    """On the kernel path, run() launches into the static buffers with arguments prepared once per KV cache
    (by address, shape, strides): a second run of the same cache makes no new preparation; another cache does.
    The launches themselves are stubbed (CPU), so this checks the bookkeeping, not the kernel."""
    from cutemla import kernels, ops

    prepared, launched = [], []

    def fake_launches(q, kcache, block_table, seqlens, meta, splits, scale, causal, out, lse, o_accum, lse_accum):
        prepared.append(kcache)
        assert out is dec.out and lse is dec.lse and o_accum.shape[0] == dec.max_batch + dec.num_sm_parts
        assert lse_accum.shape == o_accum.shape[:3] and q is dec.q_buf and meta is dec.tile_scheduler_metadata
        return ("decode", (kcache,), "combine", ())

    monkeypatch.setattr(ops, "_uses_kernel", lambda device: True)
    monkeypatch.setattr(kernels, "dense_decode_launches", fake_launches)
    monkeypatch.setattr(kernels, "launch", lambda *args: launched.append(args))
    dec = MLADecoder(4, 1, 16, 1, dtype=torch.bfloat16, device="cpu", max_blocks_per_seq=2)
    dec.plan(torch.tensor([70, 3], dtype=torch.int32))
    q = torch.zeros(2, 1, 16, 576, dtype=torch.bfloat16)
    caches = [torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16) for _ in range(2)]
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    for _ in range(3):
        for cache in caches:
            out, lse = dec.run(q, cache, table)
            assert out.shape == (2, 1, 16, 512) and out.data_ptr() == dec.out.data_ptr()
            assert lse.shape == (2, 16, 1) and lse.data_ptr() == dec.lse.data_ptr()
    assert len(prepared) == 2 and prepared[0] is caches[0] and prepared[1] is caches[1]
    assert len(launched) == 6 and launched[-1][1] == (caches[1],)
    with pytest.raises(ValueError, match="kv_cache"):  # the per-run checks still apply to a cached cache
        dec.run(q, caches[0][:, :32], table)
