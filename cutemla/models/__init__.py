"""Model layers built on cutemla's decode (reference implementations for engines to copy from)."""
from cutemla.models.deepseek_mla import (
    DeepseekMLAAttention,
    MLAConfig,
    PagedLatentCache,
    StepSlots,
    step_metadata,
)
from cutemla.models.tensor_parallel import ShardedMLAAttention, shard_mla_attention, tp_forward

__all__ = ["DeepseekMLAAttention", "MLAConfig", "PagedLatentCache", "ShardedMLAAttention", "StepSlots",
           "shard_mla_attention", "step_metadata", "tp_forward"]
