"""Head-sharded (tensor-parallel) MLA: partial outputs sum to the layer output; the torchrun example runs.

The sums over ranks are simulated in one process (no torch.distributed) in the first tests; the example runs
as a real 2-process job (gloo on CPU; NCCL on 2 GPUs in the gpu test).
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from cutemla import flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference
from cutemla.models.deepseek_mla import DeepseekMLAAttention, MLAConfig, PagedLatentCache, step_metadata
from cutemla.models.tensor_parallel import (
    ShardedMLAAttention,
    local_config,
    shard_mla_attention,
    shard_state_dict,
    tp_forward,
)
from cutemla.testing import LSE_TOL, OUT_TOL, assert_close_flashmla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (3, 1, 1)  # tokens per step: a causal 3-token chunk, then single-token decode steps


@pytest.fixture(autouse=True)
def _reference_backend(reference_backend):
    yield


def _layer(num_heads, q_lora_rank=16, attention_bias=False, dtype=torch.float32, seed=0):
    config = MLAConfig(hidden_size=32, num_heads=num_heads, q_lora_rank=q_lora_rank, qk_nope_head_dim=8,
                       v_head_dim=8, attention_bias=attention_bias)
    torch.manual_seed(seed)
    layer = DeepseekMLAAttention(config).eval()
    with torch.no_grad():  # every weight (norms and biases too) random and O(1), so a wrong slice shows
        for param in layer.parameters():
            param.normal_(0.0, 0.3)
    return layer.to(dtype)


def _cache(dtype=torch.float32, batch=2):
    # page_size 4 so the 5 tokens of STEPS span two shuffled pages
    return PagedLatentCache(1, num_blocks=8, batch=batch, max_blocks_per_seq=4, page_size=4, dtype=dtype)


def _hidden(batch, tokens, width, dtype=torch.float32):
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(7)).to(dtype)


def _full_and_tp_sum(layer, world_size, steps=STEPS, batch=2):
    """Per step: the unsharded layer's output and the sum over ranks of the sharded partial outputs."""
    shards = [shard_mla_attention(layer, rank, world_size) for rank in range(world_size)]
    full_cache, tp_cache = _cache(layer.kv_b_proj.weight.dtype, batch), _cache(layer.kv_b_proj.weight.dtype, batch)
    hidden = _hidden(batch, sum(steps), layer.config.hidden_size, layer.kv_b_proj.weight.dtype)
    pairs, start = [], 0
    with torch.no_grad():
        for n in steps:
            x = hidden[:, start:start + n]
            start += n
            step = full_cache.reserve(n)
            meta, splits = step_metadata(full_cache, n, layer.config.num_heads)
            want = layer(x, step, full_cache, 0, meta, splits)
            step = tp_cache.reserve(n)  # one cache shared by the simulated ranks: each writes the same rows
            meta, splits = step_metadata(tp_cache, n, shards[0].config.num_heads)
            got = sum(shard(x, step, tp_cache, 0, meta, splits) for shard in shards)
            pairs.append((got, want))
    torch.testing.assert_close(tp_cache.kv, full_cache.kv, rtol=0, atol=0)  # replicated latent cache
    return shards, pairs


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("q_lora_rank,attention_bias", [(16, True), (None, False)])
def test_partials_sum_to_layer_output_16_heads(world_size, q_lora_rank, attention_bias):
    layer = _layer(16, q_lora_rank, attention_bias)
    shards, pairs = _full_and_tp_sum(layer, world_size)
    assert [s.config.num_heads for s in shards] == [16 // world_size] * world_size
    assert [s.head_start for s in shards] == [r * 16 // world_size for r in range(world_size)]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if attention_bias:  # the o_proj bias lives on rank 0 only (added once by the sum)
        assert shards[0].o_proj.bias is not None
        assert all(s.o_proj.bias is None for s in shards[1:])


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_partials_sum_to_layer_output_128_heads(world_size):
    """DeepSeek-V3's 128 heads (tiny projections): 128, 64, 32, 16 heads per rank."""
    layer = _layer(128, q_lora_rank=16, attention_bias=True, seed=1)
    shards, pairs = _full_and_tp_sum(layer, world_size, steps=(2, 1))
    assert shards[-1].config.num_heads == 128 // world_size
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 16])
def test_per_rank_head_counts_through_cutemla_api(world_size):
    """Each rank's decode is a plain cutemla call with h_q = 128 / TP (128, 64, 32, 16, 8): it must equal the
    unsharded computation's slice of heads (the absorbed query and the attention out / lse)."""
    layer = _layer(128, q_lora_rank=None, seed=2)
    rank = world_size - 1  # the last rank: its slices start furthest from 0
    shard = shard_mla_attention(layer, rank, world_size)
    h_local = 128 // world_size
    heads = slice(rank * h_local, (rank + 1) * h_local)
    cache = _cache(torch.bfloat16)
    x = _hidden(2, 3, 32)
    with torch.no_grad():
        step = cache.reserve(3)
        cache.write(0, layer.latent(x, step.positions), step.slots)
        step = cache.reserve(1)  # a decode step: 4 tokens cached, one new query token per request
        x = x[:, -1:]
        cache.write(0, shard.latent(x, step.positions), step.slots)
        q_full = layer.query(x, step.positions)
        q_local = shard.query(x, step.positions)
    assert q_local.shape == (2, 1, h_local, 576)
    torch.testing.assert_close(q_local, q_full[:, :, heads], rtol=1e-6, atol=1e-6)

    sched_meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q_local.bfloat16(), cache.kv[0], cache.block_table, cache.cache_seqlens,
                                      512, sched_meta, softmax_scale=layer.config.scale, causal=True)
    ref_out, ref_lse = mla_decode_reference(q_full.bfloat16(), cache.kv[0], cache.block_table, cache.cache_seqlens,
                                            512, layer.config.scale, True)
    assert out.shape == (2, 1, h_local, 512) and lse.shape == (2, h_local, 1)
    assert_close_flashmla("out", out.float(), ref_out[:, :, heads].float(), **OUT_TOL)
    assert_close_flashmla("lse", lse, ref_lse[:, heads], **LSE_TOL)


def test_bf16_partials_through_ops_path():
    """bf16 weights take cutemla.ops.mla_decode (the GPU path's call) with each rank's own schedule."""
    layer = _layer(32, q_lora_rank=16, attention_bias=True, seed=3)
    want32 = _full_and_tp_sum(layer, 1, steps=(1, 1))[1]
    _, pairs = _full_and_tp_sum(layer.to(torch.bfloat16), 4, steps=(1, 1))
    for (got, want), (want_fp32, _) in zip(pairs, want32):
        scale = want_fp32.abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= 2e-2 * scale
        assert (got.float() - want_fp32).abs().max().item() <= 3e-2 * scale


def test_sharded_state_dict_shapes_and_bias():
    layer = _layer(16, q_lora_rank=16, attention_bias=True)
    state = shard_state_dict(layer.state_dict(), layer.config, 3, 4)
    assert state["q_b_proj.weight"].shape == (4 * 72, 16)
    assert state["kv_b_proj.weight"].shape == (4 * 16, 512)
    assert state["o_proj.weight"].shape == (32, 4 * 8)
    assert "o_proj.bias" not in state
    torch.testing.assert_close(state["kv_a_proj_with_mqa.weight"], layer.kv_a_proj_with_mqa.weight)
    torch.testing.assert_close(state["o_proj.weight"], layer.o_proj.weight[:, 96:128])
    assert local_config(layer.config, 4).num_heads == 4 and local_config(layer.config, 4).scale == layer.config.scale
    shard = shard_mla_attention(layer, 3, 4)
    assert isinstance(shard, ShardedMLAAttention) and shard.kv_b_proj.weight.dtype == torch.float32


def test_bad_sharding_raises():
    layer = _layer(16)
    with pytest.raises(ValueError, match="world_size"):
        shard_mla_attention(layer, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        shard_mla_attention(layer, 4, 4)
    with pytest.raises(TypeError, match="layer"):
        shard_mla_attention(shard_mla_attention(layer, 0, 2), 0, 2)


def test_tp_forward_without_process_group():
    layer = _layer(16)
    cache = _cache()
    x = _hidden(2, 1, 32)
    with torch.no_grad():
        step = cache.reserve(1)
        meta, splits = step_metadata(cache, 1, 16)
        want = layer(x, step, cache, 0, meta, splits)
        got = tp_forward(shard_mla_attention(layer, 0, 1), x, step, cache, 0, meta, splits)  # identity reduce
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        with pytest.raises(RuntimeError, match="process group"):
            tp_forward(shard_mla_attention(layer, 0, 2), x, step, cache, 0, meta, splits)


def _run_example(nproc, *args, timeout=300):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="1")
    if "cuda" in args:
        env.pop("CUTEMLA_BACKEND", None)  # auto: the CuTe DSL kernel on sm90
    else:
        env["CUTEMLA_BACKEND"] = "reference"
    # python -m torch.distributed.run is torchrun, with this interpreter
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(ROOT, "examples", "tensor_parallel_decode.py"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _check_example_output(out, nproc, heads_per_rank):
    assert f"TP={nproc} " in out and f"heads/rank={heads_per_rank} of 128" in out
    match = re.search(r"max abs error vs single-device layer: ([0-9.e+-]+) \(tolerance ([0-9.e+-]+)", out)
    assert match and float(match.group(1)) <= float(match.group(2))
    assert "check passed" in out
    speed = re.search(rf"TP={nproc}: ([0-9.]+) tokens/s", out)
    assert speed and float(speed.group(1)) > 0


def test_example_two_ranks_gloo_cpu():
    out = _run_example(2, "--device", "cpu", "--steps", "2")
    _check_example_output(out, 2, 64)
    assert "final_len=65 pages/seq=2" in out  # context 63 + 2 steps: the cache grew into a second page


@pytest.mark.gpu
def test_example_two_ranks_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    out = _run_example(2, "--device", "cuda", "--steps", "16", timeout=600)
    _check_example_output(out, 2, 64)
