"""Model layers built on cutemla's decode (reference implementations for engines to copy from)."""
from cutemla.models.deepseek_mla import (
    DeepseekMLAAttention,
    MLAConfig,
    PagedLatentCache,
    StepSlots,
    step_metadata,
)

__all__ = ["DeepseekMLAAttention", "MLAConfig", "PagedLatentCache", "StepSlots", "step_metadata"]
