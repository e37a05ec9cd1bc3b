"""Randomised differential tests: the public API (CPU) and the kernel (GPU) against independent references.

Cases come from ``tests/random_inputs.py``: random b, s_q, h_q, h_kv, d, dtype, causal, lengths from the edge
set {0, 1, page-1, page, page+1} or skewed varlen, permuted sparse page pools, garbage past the end of every
block-table row, NaN in every non-token cache row, and q / k_cache / block_table passed as slices of bigger
NaN-filled tensors. Each case is seeded on its own (``case_rng(base_seed, index)``) and a failure prints its
spec, so it can be replayed alone.

* CPU: ``cutemla.flash_mla_with_kvcache`` (reference backend) vs ``cutemla.testing.dense_attention_oracle``
  (float64, de-paged, shares no code with the reference), with FlashMLA's tolerances; both metadata styles.
* GPU (``-m gpu``): ``cutemla.kernels.run_dense_decode`` + ``get_decoding_sched_meta`` vs the reference on the
  GPU, ``CUTEMLA_RANDOM_CASES`` cases (default 2000) from ``CUTEMLA_RANDOM_SEED`` (default 0).
"""
import os
import time

import pytest
import torch

import cutemla
from cutemla.reference import mla_decode_reference
from cutemla.testing import LSE_TOL, OUT_TOL, assert_close_flashmla, dense_attention_oracle
from random_inputs import build_inputs, case_rng, draw_spec

CPU_CASES = 200
CPU_SEED = 20261125


@pytest.fixture
def reference_backend(clean_api_state, monkeypatch):
    monkeypatch.setenv("CUTEMLA_BACKEND", "reference")
    yield


def _api_call(inputs, spec, style):
    if style == "new":
        meta, num_splits = cutemla.get_mla_metadata()
    else:
        meta, num_splits = cutemla.get_mla_metadata(
            inputs.cache_seqlens, spec.s_q * spec.h_q // spec.h_kv, spec.h_kv, spec.h_q)
    return cutemla.flash_mla_with_kvcache(
        inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits,
        softmax_scale=spec.softmax_scale, causal=spec.causal)


def _check(out, lse, expected_out, expected_lse, spec, inputs):
    assert out.shape == (spec.b, spec.s_q, spec.h_q, 512) and out.dtype == spec.dtype
    assert lse.shape == (spec.b, spec.h_q, spec.s_q) and lse.dtype == torch.float32
    assert_close_flashmla("out", out.float(), expected_out.float(), **OUT_TOL)
    assert_close_flashmla("lse", lse, expected_lse, **LSE_TOL)
    # Rows with nothing to attend: exactly 0 and +inf (the tolerance check above only matches inf positions).
    empty = expected_lse == float("inf")
    assert torch.all(out.float().permute(0, 2, 1, 3)[empty] == 0)


@pytest.mark.parametrize("chunk", range(4))
def test_api_matches_oracle_on_random_cases(chunk, reference_backend):
    per_chunk = CPU_CASES // 4
    for index in range(chunk * per_chunk, (chunk + 1) * per_chunk):
        spec = draw_spec(case_rng(CPU_SEED, index), kernel=False, max_b=6, max_len=600)
        inputs = build_inputs(spec)
        try:
            out, lse = _api_call(inputs, spec, "new" if index % 2 else "old")
            expected_out, expected_lse = dense_attention_oracle(inputs, spec.softmax_scale, spec.causal)
            _check(out, lse, expected_out, expected_lse, spec, inputs)
        except Exception as exc:
            raise AssertionError(f"case {index}: {spec.short()}: {exc}") from exc


def test_random_specs_cover_the_edges():
    """The generator really produces the corners the tests above rely on (so they can fail there)."""
    specs = [draw_spec(case_rng(CPU_SEED, i), kernel=False, max_b=6, max_len=600) for i in range(CPU_CASES)]
    lengths = {n for s in specs for n in s.seqlens}
    for page in (64,):
        assert {0, 1, page - 1, page, page + 1} <= lengths
    assert {s.q_view for s in specs} >= {"padded_d", "head_slice", "batch_slice", "transposed", "misaligned"}
    assert {s.cache_view for s in specs} >= {"pool_offset", "padded_d", "head_slice", "padded_odd", "misaligned"}
    assert {s.garbage for s in specs} == {"unused_id", "negative", "random", "alias"}
    assert any(s.causal and s.s_q > 1 for s in specs) and any(s.h_kv > 1 for s in specs)
    assert any(s.spare_pages for s in specs) and {s.dtype for s in specs} == {torch.bfloat16, torch.float16}
    assert any(s.d == 512 for s in specs) and any(s.table_view == "row_slice" for s in specs)
    # Garbage is really there, and views are really non-contiguous.
    spec = next(s for s in specs if s.extra_columns and s.garbage == "unused_id" and s.q_view == "head_slice")
    inputs = build_inputs(spec)
    assert (inputs.block_table == 2147480000).any() and not inputs.q.is_contiguous()
    assert torch.isnan(inputs.kcache).any()


def test_kernel_specs_respect_kernel_limits():
    from cutemla.validation import validate_decode_inputs, validate_kernel_inputs

    for i in range(200):
        spec = draw_spec(case_rng(1, i), kernel=True, max_b=4, max_len=200)
        assert spec.page_size == 64 and spec.cache_view not in ("padded_odd", "misaligned")
        inputs = build_inputs(spec)
        shape = validate_decode_inputs(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512)
        validate_kernel_inputs(shape, inputs.q, inputs.kcache)


# ----------------------------------------------------------------------------------------------------------
# GPU: the kernel path


def _gpu_cases():
    return int(os.environ.get("CUTEMLA_RANDOM_CASES", "2000")), int(os.environ.get("CUTEMLA_RANDOM_SEED", "0"))


def run_differential(count, base_seed, device, decode_fn, sync=lambda: None):
    """``count`` random kernel-compatible cases through ``decode_fn`` (run_dense_decode's signature) vs the
    reference on ``device``. Returns (cases, cases with a split request)."""
    from cutemla.schedule import get_decoding_sched_meta, validate_metadata

    splits_seen = 0
    for index in range(count):
        # Every 50th case is big (long skewed requests and a large batch) so the split path runs often.
        big = index % 50 == 49
        spec = draw_spec(case_rng(base_seed, index), kernel=True,
                         max_b=64 if big else 12, max_len=9000 if big else 2500)
        inputs = build_inputs(spec, device)
        try:
            meta, num_splits = get_decoding_sched_meta(inputs.cache_seqlens, spec.s_q, spec.h_q, spec.h_kv)
            if index % 100 == 0:
                validate_metadata(meta, num_splits, inputs.cache_seqlens)
            scale = spec.softmax_scale if spec.softmax_scale is not None else spec.d ** -0.5
            causal = spec.causal and spec.s_q > 1
            out, lse = decode_fn(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens,
                                 meta, num_splits, scale, causal)
            ref_out, ref_lse = mla_decode_reference(inputs.q, inputs.kcache, inputs.block_table,
                                                    inputs.cache_seqlens, 512, scale, causal)
            sync()
            _check(out, lse, ref_out, ref_lse, spec, inputs)
            splits_seen += int(num_splits[-1]) > spec.b
        except Exception as exc:
            raise AssertionError(f"case {index} of seed {base_seed}: {spec.short()}: {exc}") from exc
    return count, splits_seen


def _reference_as_kernel(q, kcache, block_table, cache_seqlens, meta, num_splits, scale, causal):
    return mla_decode_reference(q, kcache, block_table, cache_seqlens, 512, scale, causal)


def test_gpu_harness_runs_on_cpu():
    """The GPU test's harness, with the reference standing in for the kernel: catches harness bugs without a GPU."""
    count, splits = run_differential(20, 3, "cpu", _reference_as_kernel)
    assert count == 20 and splits > 0


@pytest.mark.gpu
def test_kernel_matches_reference_on_random_cases():
    from cutemla.kernels import run_dense_decode

    count, base_seed = _gpu_cases()
    start = time.perf_counter()
    count, splits_seen = run_differential(count, base_seed, "cuda", run_dense_decode, torch.cuda.synchronize)
    elapsed = time.perf_counter() - start
    print(f"\nrandom differential: {count} kernel cases passed (seed {base_seed}, {splits_seen} with split "
          f"requests) in {elapsed:.1f} s")
    assert splits_seen > 0
