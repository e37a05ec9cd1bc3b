"""FP8 (DeepSeek-V3.2, 656 B/token) cache packing: layout, scale rule, error bound, edge values (CPU)."""
import math
import struct

import pytest
import torch

from cutemla.layouts.fp8_cache import (
    FP8_BYTES_PER_TOKEN,
    dequantize_fp8_cache,
    fp8_cache_scales,
    quantize_fp8_cache,
)

SCALE_MIN = 2.0 ** -13  # 2 ** ceil(log2(1e-4)): the smallest scale the 1e-4 floor allows


def _cache(num_blocks=3, page=5, seed=0, spread=True):
    """bf16 [num_blocks, page, 1, 576]; with ``spread`` each 128-tile gets its own magnitude (1e-7 .. 1e3)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_blocks, page, 1, 576, generator=gen, dtype=torch.float64)
    if spread:
        mag = 10.0 ** torch.empty(num_blocks, page, 1, 5, dtype=torch.float64).uniform_(-7, 3, generator=gen)
        x[..., :512] *= mag[..., :4].repeat_interleave(128, dim=-1)
    return x.to(torch.bfloat16)


def _expected_scales_f64(x):
    """FlashMLA's rule evaluated independently in float64 with Python math, per token and tile."""
    amax = x[..., 0, :512].double().abs().reshape(*x.shape[:2], 4, 128).amax(-1)
    return amax.apply_(lambda a: 2.0 ** math.ceil(math.log2(max(a / 448.0, 1e-4))))


def test_packed_shape_dtype_strides():
    x = _cache(4, 7)
    p = quantize_fp8_cache(x)
    assert p.dtype == torch.uint8
    assert p.shape == (4, 7, 1, FP8_BYTES_PER_TOKEN)
    assert p.stride() == (7 * 656, 656, 656, 1)
    # A strided input (a slice of a padded buffer) packs to the same bytes.
    big = torch.full((4, 9, 2, 600), float("nan"), dtype=torch.bfloat16)
    big[:, 1:8, 1:2, 10:586] = x
    assert torch.equal(quantize_fp8_cache(big[:, 1:8, 1:2, 10:586]), p)


def test_byte_layout_little_endian_fields():
    x = torch.zeros(1, 1, 1, 576, dtype=torch.bfloat16)
    x[..., 0] = 1.0  # tile 0 amax 1 -> scale 2^ceil(log2(1/448)) = 2^-8; 1/scale = 256 = e4m3 0x78
    x[..., 130] = -3.0  # tile 1 amax 3 -> scale 2^ceil(log2(3/448)) = 2^-7; -3/2^-7 = -384 = e4m3 0xFC
    x[..., 512] = 1.5  # RoPE bf16 0x3FC0
    raw = bytes(quantize_fp8_cache(x).reshape(-1).tolist())
    assert raw[0] == 0x78 and raw[130] == 0xFC and raw[1] == 0
    assert struct.unpack("<4f", raw[512:528]) == (2.0 ** -8, 2.0 ** -7, SCALE_MIN, SCALE_MIN)
    assert struct.unpack("<H", raw[528:530])[0] == 0x3FC0
    assert raw[530:] == bytes(126)


def test_rope_bytes_exact():
    x = _cache(2, 9, seed=1)
    x[0, 3, 0, 530] = float("nan")
    x[1, 2, 0, 575] = float("-inf")
    p = quantize_fp8_cache(x)
    stored = p[..., 528:].contiguous().view(torch.int16)
    assert torch.equal(stored, x[..., 512:].contiguous().view(torch.int16))
    rope_bits = x[..., 512:].contiguous().view(torch.int16)
    assert torch.equal(dequantize_fp8_cache(p)[..., 512:].view(torch.int16), rope_bits)


def test_scales_are_powers_of_two_following_the_rule():
    x = _cache(5, 11, seed=2)
    # Boundary tiles: amax exactly 448 * 2^k (scale 2^k), and one bf16 ulp above it (scale 2^(k+1)).
    x[0, 0, 0, :128] = 448.0
    x[0, 1, 0, 128:256] = 448.0 * 2.0 ** -3
    x[0, 2, 0, 256:384] = torch.tensor(448.0 * 1.0078125, dtype=torch.bfloat16)
    x[0, 3, 0, 384:512] = 0.0
    scales = fp8_cache_scales(quantize_fp8_cache(x))
    assert scales.dtype == torch.float32 and scales.shape == (5, 11, 1, 4)
    bits = scales.view(torch.int32)
    assert torch.all((bits & 0x7FFFFF) == 0), "every scale must be an exact power of two"
    assert torch.all(scales >= SCALE_MIN) and torch.all(scales > 1e-4)
    assert torch.equal(scales[..., 0, :].double(), _expected_scales_f64(x))
    assert scales[0, 0, 0, 0] == 1.0 and scales[0, 1, 0, 1] == 2.0 ** -3 and scales[0, 2, 0, 2] == 2.0
    assert scales[0, 3, 0, 3] == SCALE_MIN


def test_dequantized_values_within_e4m3_bound():
    x = _cache(6, 13, seed=3)
    p = quantize_fp8_cache(x)
    deq = dequantize_fp8_cache(p)
    assert deq.dtype == torch.bfloat16 and deq.shape == x.shape
    xs = x[..., 0, :512].double().reshape(6, 13, 4, 128)
    err = (deq[..., 0, :512].double().reshape(6, 13, 4, 128) - xs).abs()
    scale = fp8_cache_scales(p)[..., 0, :].double().unsqueeze(-1)
    # 3 mantissa bits: half an ulp is 2^-4 of |x| for normals; subnormal spacing is 2^-9 * scale.
    assert torch.all(err <= torch.maximum(xs.abs() * 2.0 ** -4, scale * 2.0 ** -10))
    amax = xs.abs().amax(-1, keepdim=True)
    assert torch.all(err <= amax * 2.0 ** -4 + 2.0 ** -23)
    # The bound is not vacuous: quantisation really loses bits, about 2^-6 of |x| on average.
    rel = (err / xs.abs().clamp_min(1e-30))[xs.abs() > scale * 2.0 ** -6]
    assert 2.0 ** -8 < float(rel.mean()) < 2.0 ** -5


def test_dequant_equals_flashmla_fp32_product_for_pow2_scales():
    p = quantize_fp8_cache(_cache(3, 7, seed=4))
    flat = p.reshape(-1, 656)
    fp8_values = flat[:, :512].view(torch.float8_e4m3fn).float().view(-1, 4, 128)
    fp32 = fp8_values * flat[:, 512:528].view(torch.float32).unsqueeze(-1)
    assert torch.equal(dequantize_fp8_cache(p).reshape(-1, 576)[:, :512], fp32.reshape(-1, 512).to(torch.bfloat16))


def test_dequant_uses_bf16_scale_for_hand_made_scales():
    # A non-power-of-two scale is rounded to bf16 before the multiply, as the kernel does (__hmul2 with
    # bf16(scale)); an fp32-scale product would differ.
    fp8_values = torch.arange(0, 0x7F, dtype=torch.uint8)  # every finite non-negative e4m3 bit pattern
    token = torch.zeros(656, dtype=torch.uint8)
    token[: len(fp8_values)] = fp8_values
    scale = 0.3
    token[512:528] = torch.tensor([scale] * 4, dtype=torch.float32).view(torch.uint8)
    got = dequantize_fp8_cache(token)[: len(fp8_values)].double()
    vals = fp8_values.view(torch.float8_e4m3fn).double()
    bf16_scale = float(torch.tensor(scale).to(torch.bfloat16))
    assert bf16_scale != float(torch.tensor(scale, dtype=torch.float32))
    expected = (vals * bf16_scale).to(torch.bfloat16).double()  # exact product (<= 12 bits), one rounding
    assert torch.equal(got, expected)
    fp32_scale = (vals * float(torch.tensor(scale, dtype=torch.float32))).to(torch.bfloat16).double()
    assert not torch.equal(got, fp32_scale)


def test_zeros_stay_zero():
    x = _cache(2, 4, seed=5)
    x[0, 1] = 0.0  # whole token
    x[1, 2, 0, 0:512:3] = 0.0  # scattered zeros in tiles with non-zero amax
    p = quantize_fp8_cache(x)
    deq = dequantize_fp8_cache(p)
    assert torch.all(p[0, 1, 0, :512] == 0)
    assert torch.all(fp8_cache_scales(p)[0, 1] == SCALE_MIN)
    assert torch.all(deq[0, 1] == 0)
    assert torch.all(deq[1, 2, 0, 0:512:3] == 0)


@pytest.mark.parametrize("k", [-20, -13, 0, 7, 100, 118])
def test_extreme_values_do_not_overflow(k):
    x = torch.zeros(1, 2, 1, 576, dtype=torch.bfloat16)
    top = 448.0 * 2.0 ** k
    x[0, 0, 0, :512] = torch.linspace(-top, top, 512, dtype=torch.float64).to(torch.bfloat16)
    x[0, 0, 0, 0] = -top
    x[0, 0, 0, 511] = top
    x[0, 1, 0, :512] = 1.5 * 2.0 ** 127 * (1 if k % 2 else -1)  # large but e4m3-exact: 384 * 2^119
    p = quantize_fp8_cache(x)
    deq = dequantize_fp8_cache(p)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0, 1, 0, :512], x[0, 1, 0, :512])
    if k >= -13:  # at or above the floor, the tile max hits e4m3's 448 exactly and comes back exact
        assert int(p[0, 0, 0, 511]) == 0x7E and int(p[0, 0, 0, 0]) == 0xFE
        assert float(deq[0, 0, 0, 511]) == top and float(deq[0, 0, 0, 0]) == -top
    err = (deq[..., :512].double() - x[..., :512].double()).abs()
    assert torch.all(err <= x[..., :512].double().abs().amax(-1, keepdim=True) * 2.0 ** -4 + 2.0 ** -23)


def test_values_near_bf16_max_round_up_to_inf_on_dequant():
    # Documented edge: bf16 max is 255 * 2^120; its tile scale is 2^120 and e4m3 rounds 255 to 256, so the
    # packed byte is finite (256) but 256 * 2^120 = 2^128 overflows bf16 in the dequant multiply (as on GPU).
    x = torch.zeros(1, 1, 1, 576, dtype=torch.bfloat16)
    x[..., :128] = torch.finfo(torch.bfloat16).max
    x[..., 128] = 2.0 ** 127  # one bf16 ulp lower in relative terms: 128 * 2^120 comes back exact
    p = quantize_fp8_cache(x)
    assert not torch.isnan(p[..., :512].view(torch.float8_e4m3fn).float()).any()
    assert fp8_cache_scales(p)[0, 0, 0, 0] == 2.0 ** 120
    deq = dequantize_fp8_cache(p)
    assert torch.isposinf(deq[..., :128]).all()
    assert float(deq[0, 0, 0, 128]) == 2.0 ** 127


def test_nan_or_inf_poisons_only_its_tile():
    x = _cache(1, 3, seed=6, spread=False)
    clean = dequantize_fp8_cache(quantize_fp8_cache(x))
    x[0, 0, 0, 140] = float("nan")  # tile 1 of token 0
    x[0, 2, 0, 300] = float("inf")  # tile 2 of token 2
    deq = dequantize_fp8_cache(quantize_fp8_cache(x))
    assert torch.isnan(deq[0, 0, 0, 128:256]).all()
    assert torch.isnan(deq[0, 2, 0, 256:384]).all()
    untouched = torch.ones(3, 576, dtype=torch.bool)
    untouched[0, 128:256] = False
    untouched[2, 256:384] = False
    assert torch.equal(deq[0, :, 0][untouched], clean[0, :, 0][untouched])


def test_packed_views_and_strides_accepted():
    x = _cache(3, 5, seed=7)
    p = quantize_fp8_cache(x)
    deq = dequantize_fp8_cache(p)
    # FlashMLA's test quantiser pads each page by one token: stride(0) = (page + 1) * 656.
    padded = torch.full((3, 6, 1, 656), 0xFF, dtype=torch.uint8)[:, :5]
    padded.copy_(p)
    assert torch.equal(dequantize_fp8_cache(padded), deq)
    assert torch.equal(dequantize_fp8_cache(p.view(torch.int8)), deq)
    assert torch.equal(dequantize_fp8_cache(p.view(torch.float8_e4m3fn)), deq)
    # An odd storage offset (bit casts need alignment) is handled by a copy.
    odd = torch.empty(1 + p.numel(), dtype=torch.uint8)[1:].view(p.shape)
    odd.copy_(p)
    assert torch.equal(dequantize_fp8_cache(odd), deq)
    assert torch.equal(dequantize_fp8_cache(p[1, 2, 0]), deq[1, 2, 0])  # one token


def test_quantize_rejects_bad_input():
    with pytest.raises(TypeError, match="kcache"):
        quantize_fp8_cache(torch.zeros(1, 2, 1, 576, dtype=torch.float16))
    with pytest.raises(ValueError, match="kcache"):
        quantize_fp8_cache(torch.zeros(1, 2, 2, 576, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="kcache"):
        quantize_fp8_cache(torch.zeros(1, 2, 1, 512, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="kcache"):
        quantize_fp8_cache([[0.0]])


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError, match="packed"):
        dequantize_fp8_cache(torch.zeros(2, 655, dtype=torch.uint8))
    with pytest.raises(TypeError, match="packed"):
        dequantize_fp8_cache(torch.zeros(2, 656, dtype=torch.float32))
