"""DeepSeek-V3 Multi-head Latent Attention for decode, with absorbed weights over a paged latent cache.

The layer keeps the same parameters (and names) as Hugging Face ``DeepseekV3Attention``, so
``layer.load_state_dict(hf_attention.state_dict())`` works, but it never expands the latent into per-head keys
and values. With ``c`` the normalised 512-d KV latent of a token and ``k_pe`` its roped 64-d key:

    score_h = q_nope_h . (W_UK_h c) + q_pe_h . k_pe = (W_UK_h^T q_nope_h) . c + q_pe_h . k_pe
    out_h   = W_UV_h (sum_t p_t c_t)

so the query ``[W_UK_h^T q_nope_h, q_pe_h]`` (576 wide) attends directly to the cached ``[c, k_pe]`` rows with
``h_kv = 1``; the 512-d result is mapped through ``W_UV`` per head and then ``W_O``. The cache stores 576
values per token instead of ``h * (d_nope + d_rope + d_v)``, and the attention is exactly cutemla's decode.
"""
from __future__ import annotations

import dataclasses
import random
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from cutemla import ops
from cutemla.reference import mla_decode_reference

__all__ = ["MLAConfig", "PagedLatentCache", "StepSlots", "RMSNorm", "DeepseekMLAAttention", "apply_rope",
           "step_metadata", "split_steps"]


@dataclasses.dataclass
class MLAConfig:
    """The attention-relevant fields of a DeepSeek-V3 config (kv_lora_rank + qk_rope_head_dim must be 576)."""

    hidden_size: int
    num_heads: int
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    softmax_scale: Optional[float] = None  # default (qk_nope_head_dim + qk_rope_head_dim) ** -0.5

    def __post_init__(self):
        if (self.kv_lora_rank, self.qk_rope_head_dim) != (512, 64):
            raise ValueError("cutemla's decode needs kv_lora_rank=512 and qk_rope_head_dim=64 (576-wide latent), "
                             f"got {self.kv_lora_rank} and {self.qk_rope_head_dim}")

    @property
    def scale(self) -> float:
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        return float(self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5

    @classmethod
    def from_hf(cls, config) -> "MLAConfig":
        """From a ``transformers`` ``DeepseekV3Config`` (default RoPE only; YaRN would change freqs and scale)."""
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rope.get('rope_type')!r}: only default RoPE is implemented")
        return cls(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                   q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
                   qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
                   v_head_dim=config.v_head_dim, rope_theta=float(rope.get("rope_theta", 10000.0)),
                   rope_interleave=bool(getattr(config, "rope_interleave", True)),
                   rms_norm_eps=config.rms_norm_eps, attention_bias=bool(config.attention_bias))


# ----------------------------------------------------------------------------------------------------------
# Paged latent cache


@dataclasses.dataclass
class StepSlots:
    """Where this step's new tokens go: ``positions`` (RoPE positions) and flat cache ``slots``, both [b, s]."""

    positions: torch.Tensor  # int64 [b, s]
    slots: torch.Tensor  # int64 [b, s]: page_id * page_size + offset


class PagedLatentCache:
    """A 576-wide latent cache per layer in fixed-size pages, shared block table and lengths for all layers.

    ``kv[layer]`` is ``[num_blocks, page_size, 1, 576]`` (cutemla's ``k_cache``). Pages are handed out from a
    free list (shuffled, so logical order differs from physical order, as in a real engine) when a request
    grows into a new page. Page bookkeeping is on the host; the tensors live on ``device``.
    """

    def __init__(self, num_layers: int, num_blocks: int, batch: int, max_blocks_per_seq: int, page_size: int = 64,
                 dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0):
        self.page_size, self.batch, self.max_blocks_per_seq = page_size, batch, max_blocks_per_seq
        self.kv = torch.zeros(num_layers, num_blocks, page_size, 1, 576, dtype=dtype, device=device)
        self.block_table = torch.zeros(batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.lengths: List[int] = [0] * batch
        self._pages: List[List[int]] = [[] for _ in range(batch)]
        self._free = list(range(num_blocks))
        random.Random(seed).shuffle(self._free)

    def reserve(self, num_new: int) -> StepSlots:
        """Grow every request by ``num_new`` tokens: assign pages, update block table and lengths."""
        positions, slots = [], []
        for i in range(self.batch):
            start, stop = self.lengths[i], self.lengths[i] + num_new
            while len(self._pages[i]) * self.page_size < stop:
                if not self._free:
                    raise RuntimeError("PagedLatentCache is out of pages")
                if len(self._pages[i]) == self.max_blocks_per_seq:
                    raise RuntimeError(f"request {i} exceeds max_blocks_per_seq={self.max_blocks_per_seq}")
                self._pages[i].append(self._free.pop())
            pos = list(range(start, stop))
            positions.append(pos)
            slots.append([self._pages[i][t // self.page_size] * self.page_size + t % self.page_size for t in pos])
            self.lengths[i] = stop
        device = self.kv.device
        table = torch.zeros(self.batch, self.max_blocks_per_seq, dtype=torch.int32)
        for i, pages in enumerate(self._pages):
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.block_table.copy_(table.to(device))
        self.cache_seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32).to(device))
        return StepSlots(torch.tensor(positions, dtype=torch.long).to(device),
                         torch.tensor(slots, dtype=torch.long).to(device))

    def write(self, layer: int, latent: torch.Tensor, slots: torch.Tensor) -> None:
        """Store ``latent [b, s, 576]`` at ``slots [b, s]`` of ``layer`` (device-side scatter, no sync)."""
        flat = self.kv[layer].view(-1, 576)
        flat.index_copy_(0, slots.reshape(-1), latent.reshape(-1, 576).to(flat.dtype))


# ----------------------------------------------------------------------------------------------------------
# Layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, interleave: bool) -> torch.Tensor:
    """RoPE on the last dim of ``x [b, s, ..., d]`` at ``positions [b, s]``.

    ``interleave`` rotates pairs (x0, x1), (x2, x3), ... (DeepSeek's weight layout) and returns the rotated
    evens then odds, as transformers does; otherwise pairs (x_i, x_{i+d/2}). Either way q and k get the same
    permutation, so dot products are what matter.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    angles = positions.float()[..., None] * inv_freq  # [b, s, d/2]
    while angles.dim() < x.dim():
        angles = angles.unsqueeze(-2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class DeepseekMLAAttention(nn.Module):
    """DeepSeek-V3 attention for decode (``s`` new tokens per request), absorbed, over a :class:`PagedLatentCache`.

    Parameter names match ``transformers``' ``DeepseekV3Attention``. ``forward`` writes the new tokens' latents
    to the cache, then attends with cutemla (``cutemla.ops.mla_decode``; float32 weights use the fp32
    reference directly, for checking). The metadata comes from ``cutemla.ops.sched_meta`` once per step,
    computed *after* ``cache.reserve`` so the lengths include the new tokens.
    """

    def __init__(self, config: MLAConfig):
        super().__init__()
        self.config = c = config
        h, qk_head = c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, h * qk_head, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * qk_head, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def absorbed_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W_UK [h, d_nope, 512], W_UV [h, d_v, 512])``: views of ``kv_b_proj.weight``."""
        c = self.config
        w = self.kv_b_proj.weight.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    def latent(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The cache rows of the new tokens: ``[b, s, 576]`` = normalised latent, roped key."""
        c = self.config
        kv_c, k_pe = self.kv_a_proj_with_mqa(hidden).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(kv_c), apply_rope(k_pe, positions, c.rope_theta, c.rope_interleave)],
                         dim=-1)

    def query(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The absorbed query ``[b, s, h, 576]``."""
        c = self.config
        b, s, _ = hidden.shape
        q = self.q_proj(hidden) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_pe = q.view(b, s, c.num_heads, -1).split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        w_uk, _ = self.absorbed_weights()
        q_latent = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)
        return torch.cat([q_latent, apply_rope(q_pe, positions, c.rope_theta, c.rope_interleave)], dim=-1)

    def forward(self, hidden: torch.Tensor, step: StepSlots, cache: PagedLatentCache, layer: int,
                meta: torch.Tensor, num_splits: torch.Tensor) -> torch.Tensor:
        """``hidden [b, s, hidden_size]`` of the new tokens -> attention output ``[b, s, hidden_size]``."""
        c = self.config
        cache.write(layer, self.latent(hidden, step.positions), step.slots)
        q = self.query(hidden, step.positions).to(cache.kv.dtype)
        kv = cache.kv[layer]
        if q.dtype == torch.float32:  # only the reference computes in fp32; the kernel takes bf16/fp16
            o_latent, _ = mla_decode_reference(q, kv, cache.block_table, cache.cache_seqlens, 512, c.scale, True)
        else:
            o_latent, _ = ops.mla_decode(q, kv, cache.block_table, cache.cache_seqlens, meta, num_splits,
                                         c.scale, causal=True)
        return self.output(o_latent.to(hidden.dtype))

    def output(self, o_latent: torch.Tensor) -> torch.Tensor:
        """Attention result in latent space ``[b, s, h, 512]`` -> ``[b, s, hidden_size]`` (W_UV, then W_O)."""
        c = self.config
        b, s = o_latent.shape[:2]
        _, w_uv = self.absorbed_weights()
        o = torch.einsum("bshr,hvr->bshv", o_latent, w_uv)
        return self.o_proj(o.reshape(b, s, c.num_heads * c.v_head_dim))


def step_metadata(cache: PagedLatentCache, s_q: int, num_heads: int,
                  num_sms: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The split-KV schedule of one step, shared by every layer (call after ``cache.reserve``)."""
    return ops.sched_meta(cache.cache_seqlens, s_q, num_heads, 1, num_sms)


def split_steps(total: int, sizes: Sequence[int]) -> List[Tuple[int, int]]:
    """``(start, stop)`` token ranges of consecutive steps of the given sizes (helper for tests/examples)."""
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    if start != total:
        raise ValueError(f"step sizes sum to {start}, expected {total}")
    return out
