"""Tensor-parallel (head-sharded) MLA decode: each rank owns ``num_heads / world_size`` query heads.

This is how serving engines (vLLM, SGLang) run DeepSeek attention over ``TP`` GPUs:

* **Sharded by query head** (rank ``r`` owns heads ``[r * h_local, (r + 1) * h_local)``): the rows of the query
  projection (``q_proj``, or ``q_b_proj`` after the replicated ``q_a_proj`` + ``q_a_layernorm``), the rows of
  ``kv_b_proj`` for those heads (which hold both absorbed ``W_UK`` and ``W_UV``), and the matching *input*
  columns of ``o_proj`` (row-parallel).
* **Replicated**: ``kv_a_proj_with_mqa`` and ``kv_a_layernorm`` (the 576-wide latent + RoPE key is shared by
  all heads, ``h_kv = 1``), and therefore the whole paged latent cache. Every rank writes the same rows into
  its own copy of the cache; MLA's cache cannot be split by heads, which is why TP does not shrink it.
* **Reduced**: ``o_proj`` of rank ``r`` maps only its heads' values, so each rank's output is a partial sum;
  an all-reduce over ranks gives the full layer output. The ``o_proj`` bias (``attention_bias=True``) lives on
  rank 0 only, so it is added exactly once by the sum.

The sharded layer is an ordinary :class:`DeepseekMLAAttention` with a per-rank config (``num_heads =
h_local``), so its decode is cutemla's decode with ``h_q = h_local`` (schedule it with that head count:
``step_metadata(cache, s_q, sharded.config.num_heads)``), and its parameter names are those of the full
layer, sliced (what a per-rank checkpoint shard holds; see :func:`shard_state_dict`).
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import torch
from torch import nn

from cutemla.models.deepseek_mla import DeepseekMLAAttention, MLAConfig, PagedLatentCache, StepSlots

__all__ = ["ShardedMLAAttention", "shard_mla_attention", "shard_state_dict", "local_config", "tp_forward"]


def _check_tp(num_heads: int, rank: int, world_size: int) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_heads % world_size != 0:
        raise ValueError(f"num_heads={num_heads} must be divisible by world_size={world_size} "
                         "(query heads are split evenly over ranks)")


def local_config(config: MLAConfig, world_size: int) -> MLAConfig:
    """The per-rank config: ``num_heads // world_size`` heads, everything else (scale included) unchanged."""
    _check_tp(config.num_heads, 0, world_size)
    # softmax_scale depends on the head dims only, so the rank's scale equals the full layer's.
    return dataclasses.replace(config, num_heads=config.num_heads // world_size)


def shard_state_dict(state_dict: Dict[str, torch.Tensor], config: MLAConfig, rank: int,
                     world_size: int) -> Dict[str, torch.Tensor]:
    """Rank ``rank``'s slice of a full :class:`DeepseekMLAAttention` / HF ``DeepseekV3Attention`` state dict.

    Head-major rows of ``q_proj`` / ``q_b_proj`` (``[h * (d_nope + d_rope), in]``) and ``kv_b_proj``
    (``[h * (d_nope + d_v), 512]``) are sliced by head; ``o_proj.weight`` (``[hidden, h * d_v]``) by input
    column; ``o_proj.bias`` is kept on rank 0 only; every other entry is replicated. Slices are views.
    """
    _check_tp(config.num_heads, rank, world_size)
    h_local = config.num_heads // world_size
    qk_head = config.qk_nope_head_dim + config.qk_rope_head_dim
    kv_head = config.qk_nope_head_dim + config.v_head_dim
    row_per_head = {"q_proj.weight": qk_head, "q_b_proj.weight": qk_head, "kv_b_proj.weight": kv_head}
    out = {}
    for name, tensor in state_dict.items():
        if name in row_per_head:
            rows = h_local * row_per_head[name]
            out[name] = tensor[rank * rows: (rank + 1) * rows]
        elif name == "o_proj.weight":
            cols = h_local * config.v_head_dim
            out[name] = tensor[:, rank * cols: (rank + 1) * cols]
        elif name == "o_proj.bias":
            if rank == 0:
                out[name] = tensor
        else:
            out[name] = tensor
    return out


class ShardedMLAAttention(DeepseekMLAAttention):
    """Rank ``rank`` of ``world_size`` of a head-sharded :class:`DeepseekMLAAttention`.

    ``config`` is the *full* layer's config; ``self.config`` is the per-rank one (``num_heads = h_local``), so
    every method of the base class (``latent``, ``query``, ``forward``, ``output``) works on the rank's heads.
    ``forward(hidden, step, cache, layer, meta, num_splits)`` returns this rank's *partial* output
    ``[b, s, hidden_size]``; the sum over ranks (:func:`tp_forward`'s all-reduce) is the full layer output.
    ``meta`` / ``num_splits`` must be scheduled for ``h_q = self.config.num_heads``.
    """

    def __init__(self, config: MLAConfig, rank: int, world_size: int):
        _check_tp(config.num_heads, rank, world_size)
        super().__init__(local_config(config, world_size))
        self.full_config = config
        self.rank, self.world_size = rank, world_size
        self.head_start = rank * self.config.num_heads  # first global head index owned by this rank
        if config.attention_bias and rank != 0:  # the row-parallel bias is added once, by rank 0
            self.o_proj = nn.Linear(self.o_proj.in_features, self.o_proj.out_features, bias=False)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, heads=[{self.head_start}, "
                f"{self.head_start + self.config.num_heads}) of {self.full_config.num_heads}")


def shard_mla_attention(layer: DeepseekMLAAttention, rank: int, world_size: int) -> ShardedMLAAttention:
    """Rank ``rank``'s :class:`ShardedMLAAttention` of ``layer``, on ``layer``'s device and dtype (weights copied)."""
    if not isinstance(layer, DeepseekMLAAttention) or isinstance(layer, ShardedMLAAttention):
        raise TypeError(f"layer must be an unsharded DeepseekMLAAttention, got {type(layer).__name__}")
    weight = layer.kv_b_proj.weight
    with torch.device("meta"):  # no throwaway random init; real storage comes from the copy below
        sharded = ShardedMLAAttention(layer.config, rank, world_size)
    sharded.to_empty(device=weight.device)
    sharded.to(weight.dtype)
    sharded.load_state_dict(shard_state_dict(layer.state_dict(), layer.config, rank, world_size), strict=True)
    return sharded.train(layer.training)


def tp_forward(sharded: DeepseekMLAAttention, hidden: torch.Tensor, step: StepSlots, cache: PagedLatentCache,
               layer: int, meta: torch.Tensor, num_splits: torch.Tensor, group=None) -> torch.Tensor:
    """The full layer output on every rank: the rank's partial output, all-reduced (sum) over ``group``.

    With ``torch.distributed`` not initialised, or a group of one rank, this is the partial output itself
    (correct only when ``sharded`` owns every head, i.e. ``world_size == 1``). The all-reduce is in place, in
    the output's dtype (NCCL sums bf16 natively on GPUs, as engines do).
    """
    partial = sharded(hidden, step, cache, layer, meta, num_splits)
    world_size = getattr(sharded, "world_size", 1)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        if dist.get_world_size(group) != world_size:
            raise ValueError(f"group has {dist.get_world_size(group)} ranks but the layer is sharded "
                             f"over world_size={world_size}")
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    elif world_size != 1:
        raise RuntimeError(f"tp_forward on a layer sharded over world_size={world_size} needs an initialised "
                           "torch.distributed process group of that size")
    return partial
