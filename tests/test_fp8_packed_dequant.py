"""The FP8 producer's packed dequant (MlaSparseDecodeFp8(packed_dequant=True)) emulated on the CPU, bit for bit.

`e4m3x2_to_scaled_bf16x2` is inline PTX: prmt (sign mode) -> shl 4 -> and 0x87F087F0 -> mul.rn.bf16x2 by 2^120
-> mul.rn.bf16x2 by (bf16(scale), bf16(scale)). This test replays those integer steps on every 32-bit word of a
token's NoPE bytes (all 256 e4m3 codes in every byte position) and the two bf16 multiplies as exact products
rounded once to bf16 (float64 -> float32 is exact for these products, then one float32 -> bf16 rounding), and
compares the result with the reference dequantiser `layouts.fp8_cache.dequantize_fp8_cache` (the fp32 path the
default kernel config implements) over scales from 2^-126 to 2^127, non-powers of two and bf16 rounding ties.
Identical for all 254 non-NaN codes; the two NaN codes (0x7F, 0xFF) come out as +-480 * bf16(scale).

What the CPU cannot show: that the hardware's mul.rn.bf16x2 keeps bf16 subnormal inputs (PTX: bf16 multiplies
support subnormals; e4m3 subnormals become bf16 subnormals times 2^-120). The GPU check is
tests/test_fp8_packed_dequant_gpu.py (packed and default kernels give identical outputs).
"""
import struct

import numpy as np
import pytest
import torch

from cutemla.layouts.fp8_cache import (FP8_BYTES_PER_TOKEN, FP8_NOPE_DIM, FP8_SCALE_OFFSET,
                                       dequantize_fp8_cache)

from cutemla.kernels.sparse_decode import BF16X2_2POW120, PRMT_HI, PRMT_LO  # noqa: E402

NAN_CODES = (0x7F, 0xFF)


def prmt(a: np.ndarray, selector: int) -> np.ndarray:
    """PTX prmt.b32 d, a, 0, selector (default mode): byte k of d is byte (nibble k & 7) of {0, a}, or with
    the nibble's bit 3 set, that byte's sign bit replicated."""
    a = a.astype(np.uint64)
    out = np.zeros_like(a)
    for k in range(4):
        nib = (selector >> (4 * k)) & 0xF
        src = nib & 7
        byte = (a >> np.uint64(8 * src)) & np.uint64(0xFF) if src < 4 else np.zeros_like(a)
        if nib & 8:
            byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out |= byte << np.uint64(8 * k)
    return out.astype(np.uint32)


def bf16_bits_to_f64(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float64 values that are exact in float32 -> nearest bf16 (ties to even), as float64."""
    with np.errstate(over="ignore"):
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16).float().double().numpy()


def mul_rn_bf16x2(a_bits: np.ndarray, b_f64: np.ndarray) -> np.ndarray:
    """One lane of mul.rn.bf16x2: the exact product of two bf16 values rounded once to bf16 (float64 holds
    a 8-bit x 8-bit significand product exactly; these products are also exact in float32)."""
    prod = bf16_bits_to_f64(a_bits) * b_f64
    with np.errstate(over="ignore"):
        p32 = prod.astype(np.float32)
    # Exact in float32 wherever float32 does not overflow (there bf16 overflows too: inf either way).
    fin = np.isfinite(p32)
    assert np.array_equal(p32[fin].astype(np.float64), prod[fin], equal_nan=True)
    return round_to_bf16(prod)


def emulate_packed(nope_bytes: np.ndarray, scale_f32: np.ndarray) -> np.ndarray:
    """[tokens, 512] uint8 codes, [tokens, 4] fp32 scales -> [tokens, 512] float64 (bf16 values) as the
    packed kernel computes them: per lane 4 words of 4 bytes, word w -> bf16 pairs (bytes 0, 1), (2, 3)."""
    words = nope_bytes.reshape(-1, 4).copy().view(np.uint32).reshape(nope_bytes.shape[0], FP8_NOPE_DIM // 4)
    s_bf16 = torch.from_numpy(scale_f32).to(torch.bfloat16).double().numpy()  # cvt.rn.bf16x2.f32 (s, s)
    s_word = np.repeat(s_bf16, 32, axis=1)  # 128 values = 32 words per scale tile
    two120 = bf16_bits_to_f64(np.array([BF16X2_2POW120 & 0xFFFF]))[0]
    assert two120 == 2.0 ** 120 and (BF16X2_2POW120 >> 16) == (BF16X2_2POW120 & 0xFFFF)
    out = np.empty((nope_bytes.shape[0], FP8_NOPE_DIM), dtype=np.float64)
    for k, selector in enumerate((PRMT_LO, PRMT_HI)):
        t = ((prmt(words, selector).astype(np.uint64) << np.uint64(4)) & np.uint64(0x87F087F0)).astype(np.uint32)
        for half in range(2):
            xb = (t >> np.uint32(16 * half)) & np.uint32(0xFFFF)
            x = mul_rn_bf16x2(xb, two120)  # the e4m3 value, exactly
            x_bits = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint32)
            assert np.array_equal(bf16_bits_to_f64(x_bits), x, equal_nan=True)
            out[:, 4 * np.arange(FP8_NOPE_DIM // 4) + 2 * k + half] = mul_rn_bf16x2(x_bits, s_word)
    return out


SCALES = ([2.0 ** e for e in (-126, -125, -120, -100, -20, -13, -1, 0, 1, 7, 8, 9, 60, 100, 119, 120, 127)]
          + [0.0123, 3.7, 1000.5, 1e30, 1.5e-38, 448.0 / 3, 1.00390625, 1.01171875,  # bf16 ties and near-ties
             struct.unpack("<f", struct.pack("<I", 0x3F808000))[0], struct.unpack("<f", struct.pack("<I", 0x3F818000))[0],
             -2.0, -0.75, 0.0])


def make_tokens(scales):
    """Tokens whose every 128-value tile holds codes 0..127 or 128..255 (two tokens: every code in every
    tile position's byte lane, both halves), 4 scales per token from `scales`, zero RoPE."""
    codes = np.arange(256, dtype=np.uint8)
    rows = []
    for i, s in enumerate(scales):
        for shift in (0, 128):
            tok = np.zeros(FP8_BYTES_PER_TOKEN, dtype=np.uint8)
            for tile in range(4):
                tok[tile * 128:(tile + 1) * 128] = np.roll(codes, -(shift + 37 * tile + i))[:128]
            tok[FP8_SCALE_OFFSET:FP8_SCALE_OFFSET + 16] = np.array([s] * 4, dtype=np.float32).view(np.uint8)
            rows.append(tok)
    return np.stack(rows)


def test_prmt_selectors_place_bytes_with_sign():
    w = np.array([0x80_7F_01_FF], dtype=np.uint32)
    assert prmt(w, PRMT_LO)[0] == 0x0001_FFFF  # b1 = 0x01 (sign 0x00), b0 = 0xFF (sign 0xFF)
    assert prmt(w, PRMT_HI)[0] == 0xFF80_007F  # b3 = 0x80 (sign 0xFF), b2 = 0x7F (sign 0x00)


def test_packed_dequant_matches_reference_for_every_code_and_scale():
    tokens = make_tokens(SCALES)
    ref = dequantize_fp8_cache(torch.from_numpy(tokens)).double().numpy()[:, :FP8_NOPE_DIM]
    got = emulate_packed(tokens[:, :FP8_NOPE_DIM], tokens[:, FP8_SCALE_OFFSET:FP8_SCALE_OFFSET + 16].copy()
                         .view(np.float32))
    codes = tokens[:, :FP8_NOPE_DIM]
    nan_code = np.isin(codes, NAN_CODES)
    # Bit-identical (as bf16 bits, so signed zeros count) wherever the code is not NaN.
    ref_bits = ref.astype(np.float32).view(np.uint32)
    got_bits = got.astype(np.float32).view(np.uint32)
    ref_nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got) & ~nan_code, ref_nan & ~nan_code)  # 0 * inf-like NaNs agree
    same = (ref_bits == got_bits) | (np.isnan(ref) & np.isnan(got))
    bad = ~same & ~nan_code
    assert not bad.any(), (f"{bad.sum()} values differ, e.g. code {codes[bad][:5]} ref {ref[bad][:5]} "
                           f"got {got[bad][:5]}")
    # Every code appeared in every byte lane of a word (the prmt selectors cover all four).
    for lane in range(4):
        assert set(codes[:, lane::4].ravel().tolist()) == set(range(256))
    # The NaN codes: finite +-480 * bf16(scale) where that is finite (documented deviation).
    s_bf16 = torch.from_numpy(tokens[:, FP8_SCALE_OFFSET:FP8_SCALE_OFFSET + 16].copy().view(np.float32)) \
        .to(torch.bfloat16).double().numpy()
    expect = round_to_bf16(np.where(codes == 0x7F, 480.0, -480.0) * np.repeat(s_bf16, 128, axis=1))
    assert np.array_equal(got[nan_code], expect[nan_code], equal_nan=True)
    assert np.isnan(ref[nan_code]).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_dequant_matches_reference_on_quantised_caches(seed):
    """Caches made by quantize_fp8_cache (power-of-two scales across the whole range, including the
    overflow-edge scale 2^120): no NaN codes, so every byte must match."""
    from cutemla.layouts.fp8_cache import quantize_fp8_cache

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 1, 576, generator=gen, dtype=torch.float64)
    mag = 10.0 ** torch.empty(4, 16, 1, 4, dtype=torch.float64).uniform_(-30, 38, generator=gen)
    x[..., :512] *= mag.repeat_interleave(128, dim=-1)
    x[0, 0, 0, :128] = 3.3e38  # the scale-2^120 edge
    packed = quantize_fp8_cache(x.to(torch.bfloat16)).reshape(-1, FP8_BYTES_PER_TOKEN).numpy()
    ref = dequantize_fp8_cache(torch.from_numpy(packed)).float().numpy()[:, :FP8_NOPE_DIM]
    got = emulate_packed(packed[:, :FP8_NOPE_DIM], packed[:, FP8_SCALE_OFFSET:FP8_SCALE_OFFSET + 16].copy()
                         .view(np.float32)).astype(np.float32)
    assert not np.isin(packed[:, :FP8_NOPE_DIM], NAN_CODES).any()
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
