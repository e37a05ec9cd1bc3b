"""Toy serving loop: a multi-layer DeepSeek-style MLA model decoding a batch over a growing paged latent cache.

Each step feeds one token per request (prompt tokens first, then greedy samples), grows the paged cache on the
host (a new page whenever a request crosses a page boundary), and runs every layer's attention through one
:class:`cutemla.decoder.MLADecoder` plan. On a CUDA device the whole step (schedule, all layers, logits) is
captured once in a CUDA graph and replayed: between replays only the *values* of the static buffers change
(token ids, positions, cache slots, block table, lengths). On CPU it runs eagerly on the reference path.

    python examples/serve_decode.py --device cpu --steps 4
    python examples/serve_decode.py --device cuda --steps 256 --batch 64 --layers 4
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from cutemla.decoder import MLADecoder  # noqa: E402
from cutemla.models.deepseek_mla import DeepseekMLAAttention, MLAConfig, PagedLatentCache, RMSNorm, StepSlots  # noqa: E402


class ToyMLAModel(nn.Module):
    """Embedding, ``layers`` x (norm, absorbed MLA attention, residual, norm, MLP, residual), norm, LM head."""

    def __init__(self, config: MLAConfig, layers: int, vocab: int):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(vocab, config.hidden_size)
        self.attn = nn.ModuleList(DeepseekMLAAttention(config) for _ in range(layers))
        self.attn_norm = nn.ModuleList(RMSNorm(config.hidden_size) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(config.hidden_size, 4 * config.hidden_size), nn.SiLU(),
                                               nn.Linear(4 * config.hidden_size, config.hidden_size))
                                 for _ in range(layers))
        self.mlp_norm = nn.ModuleList(RMSNorm(config.hidden_size) for _ in range(layers))
        self.norm = RMSNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, vocab, bias=False)

    def decode_step(self, tokens: torch.Tensor, step: StepSlots, cache: PagedLatentCache,
                    decoder: MLADecoder) -> torch.Tensor:
        """``tokens [b]`` -> next-token logits ``[b, vocab]``; lengths in ``cache`` already include the token."""
        decoder.plan(cache.cache_seqlens)  # one schedule for every layer of the step
        x = self.embed(tokens)[:, None]  # [b, 1, hidden]
        for i, (attn, norm) in enumerate(zip(self.attn, self.attn_norm)):
            h = norm(x)
            cache.write(i, attn.latent(h, step.positions), step.slots)
            o_latent, _ = decoder.run(attn.query(h, step.positions), cache.kv[i], cache.block_table)
            x = x + attn.output(o_latent)
            x = x + self.mlp[i](self.mlp_norm[i](x))
        return self.lm_head(self.norm(x))[:, -1].float()


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=64, help="decode steps (one token per request each)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=3, help="prompt tokens per request (fed one per step)")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--no-graph", action="store_true", help="eager on CUDA too")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("CUTEMLA_BACKEND", "reference")  # the CPU path; no fallback warning
    torch.manual_seed(0)
    dtype, vocab = torch.bfloat16, 256

    config = MLAConfig(hidden_size=args.hidden, num_heads=args.heads, q_lora_rank=None, qk_nope_head_dim=32,
                       v_head_dim=32)
    model = ToyMLAModel(config, args.layers, vocab).to(device=device, dtype=dtype).eval()
    pages_per_seq = -(-(args.steps + 1) // args.page_size)
    cache = PagedLatentCache(args.layers, num_blocks=args.batch * pages_per_seq, batch=args.batch,
                             max_blocks_per_seq=pages_per_seq, page_size=args.page_size, dtype=dtype,
                             device=device)
    decoder = MLADecoder(args.batch, 1, args.heads, 1, page_size=args.page_size, dtype=dtype, device=device,
                         max_blocks_per_seq=pages_per_seq, softmax_scale=config.scale)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt), device=device)

    # Static inputs of the step (what a CUDA graph reads; refilled in place before each replay).
    tokens = prompts[:, 0].clone()
    step = StepSlots(torch.zeros(args.batch, 1, dtype=torch.long, device=device),
                     torch.zeros(args.batch, 1, dtype=torch.long, device=device))
    use_graph = device.type == "cuda" and not args.no_graph
    graph, logits = None, None
    generated = []
    start = None
    with torch.no_grad():
        for t in range(args.steps):
            new = cache.reserve(1)  # host: page growth, block table and lengths updated in place
            step.positions.copy_(new.positions)
            step.slots.copy_(new.slots)
            if use_graph and graph is None:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # compile the kernels before capture
                    model.decode_step(tokens, step, cache, decoder)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = model.decode_step(tokens, step, cache, decoder)
            if graph is not None:
                graph.replay()  # the warmup/capture above wrote this step's cache rows; replay rewrites the same
            else:
                logits = model.decode_step(tokens, step, cache, decoder)
            sampled = logits.argmax(-1)
            generated.append(sampled)
            tokens.copy_(prompts[:, t + 1] if t + 1 < args.prompt else sampled)
            if t == 0:  # time steady-state steps (after compiles / capture)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    timed_steps = args.steps - 1
    tokens_per_s = timed_steps * args.batch / elapsed if timed_steps > 0 else float("nan")
    out = torch.stack(generated, 1)
    assert torch.isfinite(logits).all(), "non-finite logits"
    print(f"device={device} graph={use_graph} batch={args.batch} layers={args.layers} heads={args.heads} "
          f"steps={args.steps} final_len={cache.lengths[0]} pages/seq={len(cache._pages[0])}")
    print(f"request 0 tokens: {out[0].tolist()[:16]}")
    print(f"{tokens_per_s:.1f} tokens/s ({elapsed / max(timed_steps, 1) * 1e3:.2f} ms/step over {timed_steps} steps)")
    return tokens_per_s


if __name__ == "__main__":
    main()
