"""The packed-dequant producer (configs *_packed, the defaults) gives the same bits as the unpacked one, on an
sm90 GPU.

Both variants share the consumers, so identical K tiles give identical outputs: out and lse are compared as raw
bits (NaN payloads included). The caches hold every e4m3 code except the two NaN codes in every byte position,
e4m3 subnormals included (the packed path turns them into bf16 subnormals times 2^-120 and relies on
mul.rn.bf16x2 keeping subnormals), and scales across the bf16 range (2^-126 .. 2^120 and non-powers of two).
The CPU emulation of the same sequence is tests/test_fp8_packed_dequant.py.
    python -m pytest -q -m gpu tests/test_fp8_packed_dequant_gpu.py
"""
import pytest
import torch

from cutemla.layouts.fp8_cache import FP8_BYTES_PER_TOKEN, FP8_NOPE_DIM, FP8_SCALE_OFFSET
from cutemla.testing import DecodeCase, make_decode_inputs
from test_sparse_decode_gpu import SM_SCALE, SparseCase, make_inputs

pytestmark = pytest.mark.gpu

NAN_CODES = (0x7F, 0xFF)
SCALES = [2.0 ** -126, 2.0 ** -100, 2.0 ** -13, 0.0123, 1.0, 3.7, 2.0 ** 8, 1000.5, 2.0 ** 60, 2.0 ** 120]


def every_code(packed: torch.Tensor, seed: int, extreme_scales: bool) -> torch.Tensor:
    """Overwrite the NoPE bytes of every live token (finite scales: the tests' NaN-poisoned tokens, which no
    kernel may read, stay poisoned) with random non-NaN codes; with extreme_scales also set each tile's scale
    from SCALES (the outputs may then hold inf / NaN: still compared bit for bit)."""
    gen = torch.Generator().manual_seed(seed)
    flat = packed.view(-1, FP8_BYTES_PER_TOKEN)
    live = torch.isfinite(flat[:, FP8_SCALE_OFFSET:FP8_SCALE_OFFSET + 16].contiguous().view(torch.float32)) \
        .all(dim=1).nonzero().squeeze(1)
    n = live.numel()
    codes = torch.tensor([c for c in range(256) if c not in NAN_CODES], dtype=torch.uint8)
    pick = torch.randint(0, len(codes), (n, FP8_NOPE_DIM), generator=gen)
    rows = flat[live]
    rows[:, :FP8_NOPE_DIM] = codes[pick].to(flat.device)
    if extreme_scales:
        s = torch.tensor(SCALES, dtype=torch.float32)[torch.randint(0, len(SCALES), (n, 4), generator=gen)]
        rows[:, FP8_SCALE_OFFSET:FP8_SCALE_OFFSET + 16] = s.view(torch.uint8).to(flat.device)
    flat[live] = rows
    return packed


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    dt = torch.int16 if a.element_size() == 2 else torch.int32
    return torch.equal(a.contiguous().view(dt), b.contiguous().view(dt))


SPARSE = [SparseCase(b=4, s_q=2, h_q=64, topk=2048, page=64, s_kv=2046),
          SparseCase(b=3, s_q=2, h_q=128, topk=200, page=61, topk_length=True),
          SparseCase(b=8, s_q=1, h_q=16, topk=512, page=64)]


@pytest.mark.parametrize("extreme_scales", [False, True])
@pytest.mark.parametrize("case", SPARSE, ids=str)
@pytest.mark.parametrize("base,packed", [("sparse_fp8", "sparse_fp8_packed"),
                                         ("sparse_fp8_pipelined", "sparse_fp8_pipelined_packed"),
                                         ("sparse_fp8_u8", "sparse_fp8_u8_packed")])
def test_sparse_packed_is_bit_identical(case, base, packed, extreme_scales):
    from cutemla.kernels.sparse_decode import run_sparse_fp8_decode

    q, cache, indices, _, sink, topk_length = make_inputs(case)
    cache = every_code(cache, case.seed, extreme_scales)
    for splits in (1, 3):
        a = run_sparse_fp8_decode(q, cache, indices, SM_SCALE, attn_sink=sink, topk_length=topk_length,
                                  num_splits=splits, config=base)
        b = run_sparse_fp8_decode(q, cache, indices, SM_SCALE, attn_sink=sink, topk_length=topk_length,
                                  num_splits=splits, config=packed)
        torch.cuda.synchronize()
        assert same_bits(a[0], b[0]) and same_bits(a[1], b[1]), (case, packed, splits)


DENSE = [DecodeCase(b=4, s_q=2, s_k=700, h_q=64, h_kv=1, varlen=True, causal=True),
         DecodeCase(b=2, s_q=1, s_k=4096, h_q=128, h_kv=1)]


@pytest.mark.parametrize("extreme_scales", [False, True])
@pytest.mark.parametrize("case", DENSE, ids=str)
@pytest.mark.parametrize("packed", ["dense_fp8_packed", "dense_fp8_u8_packed"])
def test_dense_packed_is_bit_identical(clean_api_state, monkeypatch, case, packed, extreme_scales):
    from cutemla import flash_mla_with_kvcache, get_mla_metadata
    from cutemla.kernels.dense_fp8_decode import run_dense_fp8_decode
    from cutemla.layouts.fp8_cache import quantize_fp8_cache

    monkeypatch.setenv("CUTEMLA_BACKEND", "kernel")
    inputs = make_decode_inputs(case, device="cuda", generate_on_device=True)
    cache = every_code(quantize_fp8_cache(inputs.kcache), case.seed, extreme_scales)
    sched = get_mla_metadata()[0]  # the API fills in the scheduler metadata on its first call
    flash_mla_with_kvcache(inputs.q, cache, inputs.block_table, inputs.cache_seqlens, 512, sched,
                           causal=case.causal, is_fp8_kvcache=True)
    args = (inputs.q, cache, inputs.block_table, inputs.cache_seqlens, sched.tile_scheduler_metadata,
            sched.num_splits, 576 ** -0.5, case.causal)
    a = run_dense_fp8_decode(*args, config="dense_fp8")
    b = run_dense_fp8_decode(*args, config=packed)
    torch.cuda.synchronize()
    assert same_bits(a[0], b[0]) and same_bits(a[1], b[1])
