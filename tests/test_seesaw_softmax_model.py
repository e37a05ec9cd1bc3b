"""A CPU model of the seesaw's two-consumer online softmax, exact and lazy (kernels/seesaw.py), against softmax.

The model replays the kernel's per-pair steps in fp32 with bf16 P, vectorised over a tile's rows: consumer 0
scores tile n0 from the running max (m0, factor f0) and hands P0 over at m0, consumer 1 adds P0 V0_R to O_R
at m0, scores n1 from m0 (m1, f1) and rescales all of O_R by f1, and both halves of O take both P tiles. With a threshold (lazy rescaling) the reference max
moves only when a tile's max exceeds it by more than the threshold. It checks the algebra the GPU tests
cannot isolate: lazy and exact give the same softmax, P stays below 2^threshold, masked and empty rows work,
and after the first tiles the lazy factors are exactly 1 (the rescales the kernel then skips).
"""
import math

import pytest
import torch

D_V, BLOCK_N = 512, 64


def seesaw_model(scores, v, threshold=None):
    """scores [rows, n] in the scaled log2 domain (-inf = masked), v [n, 512] -> (out, lse2, stats)."""
    rows, n = scores.shape
    m = torch.full((rows,), -math.inf)
    l0 = torch.zeros(rows)
    l1 = torch.zeros(rows)
    o_left = torch.zeros(rows, D_V // 2)
    o_right = torch.zeros(rows, D_V // 2)
    stats = {"factors": 0, "ones": 0, "p_max": 0.0}

    def softmax_step(s, ref):
        """online_softmax_step: (new reference max, factor, probabilities) of tile scores s from max ref."""
        new = torch.maximum(ref, s.amax(dim=1))
        if threshold is not None:
            new = torch.where(new - ref <= threshold, ref, new)  # NaN (-inf - -inf) and +inf compare False
        shift = torch.where(new == -math.inf, torch.zeros_like(new), new)
        factor = torch.exp2(ref - shift)
        if threshold is not None:
            factor = torch.where(new == ref, torch.ones_like(factor), factor)
        p = torch.exp2(s - shift[:, None])
        stats["factors"] += factor.numel()
        stats["ones"] += int((factor == 1).sum())
        stats["p_max"] = max(stats["p_max"], float(p.max()))
        return new, factor, p

    def bf16(x):
        return x.to(torch.bfloat16).float()

    for n0 in range(0, n, 2 * BLOCK_N):
        s0 = scores[:, n0:n0 + BLOCK_N]
        v0 = v[n0:n0 + BLOCK_N]
        # consumer 0, step 1-2: m0 and f0; O_L += P0 V0_L
        m0, f0, p0 = softmax_step(s0, m)
        l0 = l0 * f0 + p0.sum(dim=1)
        o_left = o_left * f0[:, None] + bf16(p0) @ v0[:, :D_V // 2]
        # consumer 1, step 1: O_R to m0, += P0 V0_R (P0 at m0, from smem)
        l1 = l1 * f0
        o_right = o_right * f0[:, None] + bf16(p0) @ v0[:, D_V // 2:]
        # consumer 1, step 2-3: m1 from m0 (or none without an n1); O_R to m1, += P1 V1_R
        m1, f1 = m0, torch.ones(rows)
        has1 = n0 + BLOCK_N < n
        if has1:
            s1 = scores[:, n0 + BLOCK_N:n0 + 2 * BLOCK_N]
            v1 = v[n0 + BLOCK_N:n0 + 2 * BLOCK_N]
            m1, f1, p1 = softmax_step(s1, m0)
            l1 = l1 * f1 + p1.sum(dim=1)
        o_right = o_right * f1[:, None]
        if has1:
            o_right = o_right + bf16(p1) @ v1[:, D_V // 2:]
        # consumer 0, step 3-4: O_L (and its sum) to m1, += P1 V1_L
        l0 = l0 * f1
        o_left = o_left * f1[:, None]
        if has1:
            o_left = o_left + bf16(p1) @ v1[:, :D_V // 2]
        m = m1
    total = l0 + l1
    out = torch.cat([o_left, o_right], dim=1) / torch.where(total > 0, total, torch.ones_like(total))[:, None]
    out = torch.where((total > 0)[:, None], out, torch.zeros_like(out))
    lse2 = torch.where(total > 0, m + torch.log2(total), torch.full_like(m, -math.inf))
    return out, lse2, stats


def reference(scores, v):
    s = scores.double()
    lse2 = torch.logsumexp(s * math.log(2), dim=1) / math.log(2)
    p = torch.exp2(s - lse2[:, None])
    p = torch.nan_to_num(p)  # rows with every score masked
    return (p @ v.double()).float(), lse2.float()


def make_scores(kind, rows=64, n=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, n, generator=gen)
    if kind == "small":  # the GPU matrix's inputs: scores within a few hundredths
        scores = base * 0.01
    elif kind == "spiky":  # occasional tokens far above the rest, growing along the sequence
        scores = base * 3 + (torch.rand(rows, n, generator=gen) < 0.01) * torch.linspace(0, 60, n)
    elif kind == "rising":  # the max moves by a little, often, then by a lot
        scores = base + torch.linspace(0, 30, n)
    scores[: rows // 8, n // 2:] = -math.inf  # causal-style border
    scores[rows - 1] = -math.inf  # a row with nothing to attend
    return scores, torch.randn(n, D_V, generator=gen)


@pytest.mark.parametrize("kind", ["small", "spiky", "rising"])
@pytest.mark.parametrize("threshold", [None, 8.0])
def test_model_matches_softmax(kind, threshold):
    scores, v = make_scores(kind)
    out, lse2, stats = seesaw_model(scores, v, threshold)
    ref_out, ref_lse2 = reference(scores, v)
    assert torch.equal(torch.isinf(lse2), torch.isinf(ref_lse2))
    live = torch.isfinite(ref_lse2)
    torch.testing.assert_close(lse2[live], ref_lse2[live], rtol=1e-6, atol=1e-5)
    # bf16 P: relative error ~2^-9 per probability; compared against the scale of the averaged values.
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-2)
    assert torch.all(out[~live] == 0)
    if threshold is not None:
        assert stats["p_max"] <= 2 ** threshold


def test_lazy_factors_are_mostly_exactly_one():
    """The kernel skips a warp's O rescale when all its factors are 1: with lazy rescaling that is
    almost every factor after a request's first tiles, with exact rescaling far fewer."""
    scores, v = make_scores("small", n=4096)
    _, _, lazy = seesaw_model(scores, v, threshold=8.0)
    _, _, exact = seesaw_model(scores, v, threshold=None)
    assert lazy["ones"] / lazy["factors"] > 0.95
    assert exact["ones"] / exact["factors"] < lazy["ones"] / lazy["factors"]
