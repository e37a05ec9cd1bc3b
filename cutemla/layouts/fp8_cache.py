"""FlashMLA's DeepSeek-V3.2 FP8 latent-cache format: 656 bytes per token (no cutlass import).

Layout of one token (design/flashmla.md §6; FlashMLA's ``flash_mla_with_kvcache`` docstring and
``tests/quant.py``), for a latent row of ``d_qk = 576 = 512 NoPE + 64 RoPE`` values:

=============  ==============================================================================
bytes          content
=============  ==============================================================================
``[0, 512)``   512 ``float8_e4m3fn`` NoPE values, ``e4m3(x / scale_t)`` for tile ``t = col // 128``
``[512, 528)`` 4 ``float32`` scales, one per 128-value NoPE tile (native little-endian byte order)
``[528, 656)`` 64 ``bfloat16`` RoPE values, copied bit for bit (never quantised)
=============  ==============================================================================

The packed cache is a ``uint8`` tensor ``[num_blocks, page_size, 1, 656]`` (``h_kv`` is always 1 in this
format); the sparse kernel requires ``stride(1) == 656`` (bytes per token), which the tensors built here have.
FlashMLA also accepts ``int8`` / ``float8_e4m3fn`` views of the same bytes; :func:`dequantize_fp8_cache`
does too.

Quantiser (FlashMLA's reference quantiser, ``tests/quant.py``): per 128-value tile,
``scale = 2 ** ceil(log2(max(amax / 448, 1e-4)))`` computed in fp32, where ``amax`` is the tile's
``max |x|`` and 448 is the largest finite e4m3fn value. The scale is a power of two (a UE8M0 value stored as
fp32), so ``x / scale`` is exact and ``|x / scale| <= 448`` always holds: nothing overflows and the e4m3
rounding (round to nearest even) is the only error. The ``1e-4`` floor makes the smallest scale
``2 ** ceil(log2(1e-4)) = 2 ** -13`` (about 1.22e-4, *not* 1e-4); an all-zero tile gets that scale and
stays exactly zero.

Error bound (e4m3 has 3 mantissa bits, smallest subnormal ``2 ** -9``): for a finite bf16 input ``x``,
``|dequant(x) - x| <= max(|x| * 2 ** -4, scale * 2 ** -10)``; since ``scale < 2 * max(amax / 448, 2 ** -13)``
this is at most ``2 ** -4`` of the tile's ``amax``, or ``2 ** -23`` absolute in a tile under the floor.
One overflow edge: a value within ``2 ** -5`` (relative) of bf16's max (``255 * 2 ** 120``) has scale ``2 ** 120``
and e4m3 rounds 255 up to 256, so its packed byte is finite but it dequantises to ``+-inf`` (``2 ** 128``
overflows bf16), in this function and in the kernel alike.

Non-finite inputs: a NaN or +-inf anywhere in a NoPE tile makes the tile's ``amax`` non-finite, hence its
scale NaN or inf, and the *whole tile* dequantises to NaN (``x / inf`` is 0 but ``0 * inf`` is NaN; ``inf / inf``
and anything with a NaN scale are NaN). FlashMLA's reference quantiser behaves the same way. RoPE values are
copied, so a NaN stays a NaN there. Tests rely on this: a NaN-poisoned bf16 cache stays poisoned once packed.

Dequantiser (:func:`dequantize_fp8_cache`), bit-exact with the sm90 sparse kernel's producer
(``csrc/sm90/decode/sparse_fp8/components/dequant.h``): ``fp8 -> fp32 -> bf16 (round to nearest)``, then a
bf16 multiply by ``bf16(scale)`` (the fp32 scale rounded to nearest bf16), rounded to nearest bf16. The
fp8 -> bf16 step is exact (4 significant bits fit in bf16's 8); torch's CPU bf16 multiply forms the exact
product in fp32 and rounds once, like the GPU's ``__hmul2``. For scales produced by :func:`quantize_fp8_cache`
(powers of two in bf16 range) the product is exact, so this also equals FlashMLA's test dequantiser
(``fp8 -> fp32``, times the fp32 scale, rounded to bf16). The two differ only for hand-made non-power-of-two
scales, where this function follows the kernel.
"""
from __future__ import annotations

import torch

__all__ = [
    "FP8_BYTES_PER_TOKEN",
    "FP8_NOPE_DIM",
    "FP8_ROPE_DIM",
    "FP8_TILE_SIZE",
    "FP8_NUM_TILES",
    "FP8_E4M3_MAX",
    "FP8_SCALE_FLOOR",
    "FP8_SCALE_OFFSET",
    "FP8_ROPE_OFFSET",
    "quantize_fp8_cache",
    "dequantize_fp8_cache",
    "fp8_cache_scales",
]

FP8_NOPE_DIM = 512
FP8_ROPE_DIM = 64
FP8_TILE_SIZE = 128
FP8_NUM_TILES = FP8_NOPE_DIM // FP8_TILE_SIZE  # 4
FP8_HEAD_DIM = FP8_NOPE_DIM + FP8_ROPE_DIM  # 576
FP8_SCALE_OFFSET = FP8_NOPE_DIM  # 512
FP8_ROPE_OFFSET = FP8_SCALE_OFFSET + 4 * FP8_NUM_TILES  # 528
FP8_BYTES_PER_TOKEN = FP8_ROPE_OFFSET + 2 * FP8_ROPE_DIM  # 656
FP8_E4M3_MAX = 448.0
FP8_SCALE_FLOOR = 1e-4

_PACKED_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)


def _tile_scales(nope: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., 4]`` UE8M0 scales of ``nope`` ``[..., 4, 128]`` (fp32), FlashMLA's rule."""
    amax = nope.abs().amax(dim=-1)  # NaN propagates (torch.amax does), giving a NaN scale for the tile
    ratio = torch.clamp_min(amax / FP8_E4M3_MAX, FP8_SCALE_FLOOR)  # clamp keeps NaN as NaN
    # exp2 of an integer-valued fp32 is exact; the tests check every scale is a power of two bit for bit.
    return torch.exp2(torch.ceil(torch.log2(ratio)))


def quantize_fp8_cache(kcache: torch.Tensor) -> torch.Tensor:
    """Pack a bf16 latent cache ``[num_blocks, page_size, 1, 576]`` into the 656-byte FP8 format.

    Args:
        kcache: ``bfloat16`` ``[num_blocks, page_size, 1, 576]`` (any strides, any device). Columns
            ``[0, 512)`` are quantised per 128-value tile; ``[512, 576)`` (RoPE) are copied bit for bit.

    Returns:
        A new contiguous ``uint8`` tensor ``[num_blocks, page_size, 1, 656]`` on ``kcache.device``
        (``stride(1) == 656``). See the module docstring for the byte layout, the scale rule and what
        happens to NaN / inf inputs (they turn their whole 128-value tile into NaN).

    Raises:
        TypeError: ``kcache`` is not a bf16 tensor.
        ValueError: ``kcache`` is not ``[num_blocks, page_size, 1, 576]``.
    """
    if not isinstance(kcache, torch.Tensor):
        raise TypeError(f"kcache must be a torch.Tensor, got {type(kcache).__name__}")
    if kcache.dtype != torch.bfloat16:
        raise TypeError(f"kcache must be bfloat16 (the FP8 format stores RoPE as bf16), got {kcache.dtype}")
    if kcache.dim() != 4 or kcache.shape[2] != 1 or kcache.shape[3] != FP8_HEAD_DIM:
        raise ValueError(
            f"kcache must be [num_blocks, page_size, 1, {FP8_HEAD_DIM}] (h_kv = 1, d = 512 NoPE + 64 RoPE), "
            f"got shape {tuple(kcache.shape)}"
        )
    num_blocks, page_size = kcache.shape[0], kcache.shape[1]
    tokens = kcache[:, :, 0, :]  # [num_blocks, page, 576]

    nope = tokens[..., :FP8_NOPE_DIM].float().reshape(num_blocks, page_size, FP8_NUM_TILES, FP8_TILE_SIZE)
    scales = _tile_scales(nope)  # [num_blocks, page, 4] fp32
    # Division by a power of two is exact; the cast rounds to nearest even and |x/scale| <= 448 by construction.
    nope_fp8 = (nope / scales.unsqueeze(-1)).to(torch.float8_e4m3fn)

    packed = torch.empty(num_blocks, page_size, 1, FP8_BYTES_PER_TOKEN, dtype=torch.uint8, device=kcache.device)
    rows = packed[:, :, 0, :]
    rows[..., :FP8_SCALE_OFFSET] = nope_fp8.reshape(num_blocks, page_size, FP8_NOPE_DIM).view(torch.uint8)
    rows[..., FP8_SCALE_OFFSET:FP8_ROPE_OFFSET] = scales.contiguous().view(torch.uint8)
    rows[..., FP8_ROPE_OFFSET:] = tokens[..., FP8_NOPE_DIM:].contiguous().view(torch.uint8)
    return packed


def _as_token_bytes(packed: torch.Tensor, name: str) -> torch.Tensor:
    """``packed [..., 656]`` -> contiguous ``uint8 [N, 656]`` whose base is 4-byte aligned (bit casts need it)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype not in _PACKED_DTYPES:
        raise TypeError(f"{name} must be uint8, int8 or float8_e4m3fn bytes, got {packed.dtype}")
    if packed.dim() < 1 or packed.shape[-1] != FP8_BYTES_PER_TOKEN:
        raise ValueError(
            f"{name} must be [..., {FP8_BYTES_PER_TOKEN}] (bytes per token), got shape {tuple(packed.shape)}"
        )
    flat = packed.view(torch.uint8).reshape(-1, FP8_BYTES_PER_TOKEN)
    if not flat.is_contiguous() or flat.storage_offset() % 4 != 0:
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat


def fp8_cache_scales(packed: torch.Tensor) -> torch.Tensor:
    """The fp32 tile scales ``[..., 4]`` stored in a packed cache ``[..., 656]`` (a copy)."""
    flat = _as_token_bytes(packed, "packed")
    scales = flat[:, FP8_SCALE_OFFSET:FP8_ROPE_OFFSET].view(torch.float32)
    return scales.reshape(*packed.shape[:-1], FP8_NUM_TILES).clone()


def dequantize_fp8_cache(packed: torch.Tensor) -> torch.Tensor:
    """Unpack ``[..., 656]`` FP8 bytes into bf16 ``[..., 576]`` exactly as the sm90 sparse kernel does.

    NoPE column ``c`` of a token is ``bf16(fp32(fp8[c])) * bf16(scale[c // 128])`` rounded to nearest bf16;
    RoPE columns are the stored bf16 bits. Works on any leading shape (a whole cache
    ``[num_blocks, page, 1, 656]`` or gathered tokens ``[n, 656]``) and any device.

    Raises:
        TypeError: ``packed`` is not uint8 / int8 / float8_e4m3fn.
        ValueError: the last dim of ``packed`` is not 656.
    """
    flat = _as_token_bytes(packed, "packed")
    num_tokens = flat.shape[0]
    nope = flat[:, :FP8_SCALE_OFFSET].view(torch.float8_e4m3fn).float().to(torch.bfloat16)
    scales = flat[:, FP8_SCALE_OFFSET:FP8_ROPE_OFFSET].view(torch.float32).to(torch.bfloat16)
    rope = flat[:, FP8_ROPE_OFFSET:].view(torch.bfloat16)

    out = torch.empty(num_tokens, FP8_HEAD_DIM, dtype=torch.bfloat16, device=flat.device)
    # bf16 x bf16: exact product in fp32, one rounding to bf16 (the GPU's __hmul2 gives the same bits).
    out[:, :FP8_NOPE_DIM] = (
        nope.view(num_tokens, FP8_NUM_TILES, FP8_TILE_SIZE) * scales.unsqueeze(-1)
    ).view(num_tokens, FP8_NOPE_DIM)
    out[:, FP8_NOPE_DIM:] = rope
    return out.view(*packed.shape[:-1], FP8_HEAD_DIM)
