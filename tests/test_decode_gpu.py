"""The CuTe DSL decode kernel (split-KV + combine) against the fp32 reference, on an sm90 GPU.

The matrix is FlashMLA's dense-decoding test grid: b {1,2,6,64} x s_q {1,2,4} x s_k {20,140,4096} x
h_q {1,3,9,63,64,126,128} x h_kv {1,2,3,8} (h_q % h_kv == 0) x varlen x causal (s_q > 1 only: with
s_q == 1 causal is off by definition), plus FlashMLA's corner case (b=128, s_q=2, ~50% zero lengths),
in bf16 and fp16. Pages past each length are NaN and unused block-table entries hold 2147480000, so a
kernel that reads them fails. Tolerances are FlashMLA's (cutemla.testing.OUT_TOL / LSE_TOL).
"""
import itertools
import os

import pytest
import torch

from cutemla.reference import mla_decode_reference
from cutemla.testing import LSE_TOL, OUT_TOL, DecodeCase, assert_close_flashmla, make_decode_inputs

pytestmark = pytest.mark.gpu


def with_env_schedule(schedules):
    """The schedules named, plus CUTEMLA_DECODE_SCHEDULE (an experiment's variant) when it is set: tests that
    name their schedules would otherwise never run the one being tried."""
    extra = os.environ.get("CUTEMLA_DECODE_SCHEDULE")
    return schedules + [extra] if extra and extra not in schedules else schedules


def flashmla_matrix(dtype):
    cases = []
    for b, s_q, s_k, h_q, h_kv, varlen, causal in itertools.product(
            (1, 2, 6, 64), (1, 2, 4), (20, 140, 4096), (1, 3, 9, 63, 64, 126, 128), (1, 2, 3, 8),
            (False, True), (False, True)):
        if h_q % h_kv or (causal and s_q == 1):
            continue
        cases.append(DecodeCase(b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=h_kv, varlen=varlen,
                                causal=causal, dtype=dtype, seed=b * 7 + s_k + h_q))
    for h_q, h_kv, causal in itertools.product((16, 64, 128), (1, 2), (False, True)):
        cases.append(DecodeCase(b=128, s_q=2, s_k=4096, h_q=h_q, h_kv=h_kv, varlen=True,
                                causal=causal, zero_frac=0.5, dtype=dtype, seed=h_q))
    return cases


# A fast subset that still crosses every mechanism: tails, splits, folding, h_kv > 1, causal, zeros.
SMOKE = [
    DecodeCase(b=1, s_q=1, s_k=64, h_q=64, h_kv=1),
    DecodeCase(b=1, s_q=1, s_k=4096, h_q=64, h_kv=1),
    DecodeCase(b=2, s_q=1, s_k=20, h_q=16, h_kv=1),
    DecodeCase(b=6, s_q=1, s_k=140, h_q=128, h_kv=1, varlen=True),
    DecodeCase(b=64, s_q=1, s_k=4096, h_q=16, h_kv=1, varlen=True),
    DecodeCase(b=2, s_q=2, s_k=140, h_q=9, h_kv=3, causal=True),
    DecodeCase(b=6, s_q=4, s_k=4096, h_q=126, h_kv=2, varlen=True, causal=True),
    DecodeCase(b=64, s_q=2, s_k=140, h_q=128, h_kv=8, varlen=True, causal=True, zero_frac=0.3),
    DecodeCase(b=4, s_q=1, s_k=4096, h_q=63, h_kv=1, dtype=torch.float16),
    DecodeCase(b=8, s_q=1, s_k=1000, h_q=16, h_kv=1, d=512),
    # The seesaw pairs tiles: one, two and three blocks, several requests per CTA, two M tiles.
    DecodeCase(b=3, s_q=1, s_k=1, h_q=128, h_kv=1),
    DecodeCase(b=3, s_q=1, s_k=128, h_q=128, h_kv=1),
    DecodeCase(b=3, s_q=1, s_k=130, h_q=128, h_kv=1, dtype=torch.float16),
    DecodeCase(b=128, s_q=2, s_k=700, h_q=128, h_kv=1, varlen=True, causal=True),
]


def run_kernel(inputs, causal, schedule=None):
    from cutemla.kernels import run_dense_decode
    from cutemla.schedule import get_decoding_sched_meta

    case = inputs.case
    meta, num_splits = get_decoding_sched_meta(inputs.cache_seqlens, case.s_q, case.h_q, case.h_kv)
    return run_dense_decode(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens,
                            meta, num_splits, case.d ** -0.5, causal, schedule)


def check_case(case: DecodeCase, schedule=None):
    inputs = make_decode_inputs(case, device="cuda", generate_on_device=True)
    out, lse = run_kernel(inputs, case.causal, schedule)
    ref_out, ref_lse = mla_decode_reference(inputs.q, inputs.kcache, inputs.block_table,
                                            inputs.cache_seqlens, causal=case.causal)
    torch.cuda.synchronize()
    assert out.shape == ref_out.shape and out.dtype == inputs.q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_close_flashmla("out", out.float(), ref_out.float(), **OUT_TOL)
    assert_close_flashmla("lse", lse, ref_lse, **LSE_TOL)


@pytest.mark.parametrize("schedule", with_env_schedule(["pipelined", "split_s", "seesaw"]))
@pytest.mark.parametrize("case", SMOKE, ids=str)
def test_decode_smoke(case, schedule):
    check_case(case, schedule)


# The whole matrix runs on the default schedule (CUTEMLA_DECODE_SCHEDULE selects another).
@pytest.mark.parametrize("case", flashmla_matrix(torch.bfloat16), ids=str)
def test_decode_flashmla_matrix_bf16(case):
    check_case(case)


@pytest.mark.parametrize("case", flashmla_matrix(torch.float16), ids=str)
def test_decode_flashmla_matrix_fp16(case):
    check_case(case)


def test_zero_lengths_give_zero_and_inf():
    case = DecodeCase(b=5, s_q=2, s_k=300, h_q=16, h_kv=1, causal=True, zero_frac=0.4, seed=3)
    inputs = make_decode_inputs(case, device="cuda", generate_on_device=True)
    out, lse = run_kernel(inputs, True)
    empty = inputs.cache_seqlens == 0
    assert empty.any()
    assert torch.all(out[empty] == 0)
    assert torch.all(torch.isinf(lse[empty]) & (lse[empty] > 0))


def test_repeatable_bitwise():
    case = DecodeCase(b=16, s_q=1, s_k=3000, h_q=64, h_kv=1, varlen=True, seed=11)
    inputs = make_decode_inputs(case, device="cuda", generate_on_device=True)
    first = run_kernel(inputs, False)
    for _ in range(5):
        again = run_kernel(inputs, False)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# Scores of the matrix's inputs (randn / 10) span a few hundredths, so a row's running max settles in its
# first tile. Here q is scaled up and each cache token by a log-normal factor, so rows keep meeting new
# maxima far above (and near) the old ones: the online-softmax rescales, and the seesaw's lazy ones
# (skipped below the threshold 2^8, taken above it), all run many times per row. The cache is made non-negative so that V
# does not cancel: with signed V the few dominant tokens leave small outputs whose bf16-P rounding error
# exceeds FlashMLA's relative tolerance on every schedule (3.3% on ~0.02% of elements, cos diff 4e-9).
@pytest.mark.parametrize("schedule", with_env_schedule(["pipelined", "seesaw", "seesaw_exact"]))
@pytest.mark.parametrize("case", [
    DecodeCase(b=4, s_q=2, s_k=3000, h_q=128, h_kv=1, varlen=True, causal=True, seed=21),
    DecodeCase(b=2, s_q=1, s_k=5000, h_q=16, h_kv=1, seed=22, dtype=torch.float16),
], ids=str)
def test_spiky_scores(case, schedule):
    inputs = make_decode_inputs(case, device="cuda", generate_on_device=True)
    gen = torch.Generator(device="cuda").manual_seed(case.seed)
    inputs.q.mul_(100.0)
    inputs.kcache.abs_()
    token_scale = torch.exp(1.2 * torch.randn(inputs.kcache.shape[:2] + (1, 1), generator=gen, device="cuda"))
    inputs.kcache.mul_(token_scale.to(inputs.kcache.dtype))
    out, lse = run_kernel(inputs, case.causal, schedule)
    ref_out, ref_lse = mla_decode_reference(inputs.q, inputs.kcache, inputs.block_table,
                                            inputs.cache_seqlens, causal=case.causal)
    finite = ref_lse[torch.isfinite(ref_lse)]
    assert (finite.amax() - finite.amin()).item() > 20  # the inputs do spread the scores
    assert_close_flashmla("out", out.float(), ref_out.float(), **OUT_TOL)
    assert_close_flashmla("lse", lse, ref_lse, **LSE_TOL)
