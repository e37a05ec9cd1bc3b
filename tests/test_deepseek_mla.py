"""DeepseekMLAAttention (absorbed, paged, cutemla decode) against Hugging Face DeepseekV3Attention (unabsorbed)."""
import pytest
import torch

from cutemla.models.deepseek_mla import (
    DeepseekMLAAttention,
    MLAConfig,
    PagedLatentCache,
    split_steps,
    step_metadata,
)

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf  # noqa: E402

STEPS = (3, 1, 2, 1, 1)  # tokens per decode step: a 3-token chunk (causal s_q > 1), singles, an MTP pair


@pytest.fixture(autouse=True)
def _reference_backend(reference_backend):
    yield


def _hf_attention(q_lora_rank, rope_interleave, seed):
    config = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=512,
        qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=24, rope_interleave=rope_interleave,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_hidden_layers=1, vocab_size=32)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    attn = hf.DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; make them matter
        for module in attn.modules():
            if isinstance(module, hf.DeepseekV3RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return config, attn


def _hf_full_sequence(config, attn, hidden):
    b, t, _ = hidden.shape
    positions = torch.arange(t).expand(b, t)
    cos, sin = hf.DeepseekV3RotaryEmbedding(config)(hidden, positions)
    mask = torch.full((t, t), float("-inf")).triu(1).expand(b, 1, t, t)
    out, _ = attn(hidden, (cos, sin), mask)
    return out


@pytest.mark.parametrize("q_lora_rank,rope_interleave", [(32, True), (None, False)])
def test_decode_steps_match_transformers(q_lora_rank, rope_interleave):
    config, hf_attn = _hf_attention(q_lora_rank, rope_interleave, seed=0)
    ours = DeepseekMLAAttention(MLAConfig.from_hf(config))
    ours.load_state_dict(hf_attn.state_dict(), strict=True)
    b, total = 2, sum(STEPS)
    hidden = torch.randn(b, total, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _hf_full_sequence(config, hf_attn, hidden)
        # page_size 4 so the 8 tokens span several non-contiguous pages
        cache = PagedLatentCache(1, num_blocks=16, batch=b, max_blocks_per_seq=4, page_size=4, dtype=torch.float32)
        for start, stop in split_steps(total, STEPS):
            step = cache.reserve(stop - start)
            meta, splits = step_metadata(cache, stop - start, config.num_attention_heads)
            got = ours(hidden[:, start:stop], step, cache, 0, meta, splits)
            torch.testing.assert_close(got, want[:, start:stop], rtol=1e-4, atol=1e-5)
    assert cache.lengths == [total] * b
    assert cache.block_table[0, 0] != 0 or cache.block_table[0, 1] != 1  # physical pages are shuffled


def test_bf16_kernel_path_close_to_fp32():
    """The bf16 layer goes through cutemla.ops.mla_decode with the step's metadata (the GPU path's call)."""
    config, hf_attn = _hf_attention(32, True, seed=3)
    ours32 = DeepseekMLAAttention(MLAConfig.from_hf(config))
    ours32.load_state_dict(hf_attn.state_dict())
    ours16 = DeepseekMLAAttention(MLAConfig.from_hf(config)).to(torch.bfloat16)
    ours16.load_state_dict(hf_attn.state_dict())
    hidden = torch.randn(3, 70, config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _hf_full_sequence(config, hf_attn, hidden)
        cache = PagedLatentCache(1, num_blocks=8, batch=3, max_blocks_per_seq=2, page_size=64, dtype=torch.bfloat16)
        for start, stop in split_steps(70, (68, 2)):
            step = cache.reserve(stop - start)
            meta, splits = step_metadata(cache, stop - start, config.num_attention_heads)
            got = ours16(hidden[:, start:stop].bfloat16(), step, cache, 0, meta, splits)
        torch.testing.assert_close(got.float(), want[:, 68:], rtol=0.05, atol=0.02)


def test_config_rejects_non_576_latent():
    with pytest.raises(ValueError, match="576"):
        MLAConfig(hidden_size=64, num_heads=4, kv_lora_rank=256)
