"""Ways a caller can get it wrong that tests/test_validation.py does not already cover, and what happens.

Already covered elsewhere (not repeated here):

* tests/test_validation.py ``BAD_INPUTS``: non-tensors, q fp32, k_cache of another dtype / uint8 (FP8),
  int64 block_table and cache_seqlens, wrong ranks, other devices, b / s_q / h_q == 0, d not in {512, 576},
  k_cache head dim mismatch, head_dim_v != 512, h_q not a multiple of h_kv, batch mismatches, non-contiguous
  last dimensions, bad softmax_scale / causal, and every old-style metadata tensor mistake;
  ``OLD_STYLE_BAD``: get_mla_metadata arguments; the kernel-only limits (page size 64, 16-byte aligned cache
  and strides); ``DEBUG_BAD``: negative lengths, lengths past the table, page ids out of range, a bad
  num_splits, and lazy metadata reused after cache_seqlens changed (all in debug mode).
* tests/test_api.py ``MISMATCHES``: lazy metadata reused with another b, s_q, h_q, h_kv, page size or causal.

Here: a few more dtypes and shapes; what happens to bad *values* when debug mode is off (the reference path
still refuses them; the kernel path does not look, see below); the debug check's page-count boundary; stale
old-style metadata; and NaN / inf in q or in a live cache row, which is not an error but must stay confined.

Non-debug behaviour on the kernel path (documented, not testable without a GPU fault): negative lengths,
lengths past the block table and page ids out of range are not checked, because that needs a host sync; the
kernel then reads whatever the ids point at (wrong results or an illegal-address fault). Set
``CUTEMLA_DEBUG=1`` / ``cutemla.set_debug(True)`` to get a ValueError naming the entry instead.
"""
import math

import pytest
import torch

import cutemla
from cutemla import validation
from cutemla.interface import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from cutemla.reference import mla_decode_reference
from cutemla.testing import DecodeCase, make_decode_inputs

B, H_Q, H_KV, D, PAGE = 2, 4, 1, 576, 64


@pytest.fixture(autouse=True)
def _reference_backend(reference_backend):
    yield


def _args(seqlens=(100, 37), s_q=1, h_q=H_Q, h_kv=H_KV):
    gen = torch.Generator().manual_seed(0)
    num_blocks = 4
    return dict(
        q=(torch.randn(B, s_q, h_q, D, generator=gen) / 10).to(torch.bfloat16),
        k_cache=(torch.randn(num_blocks, PAGE, h_kv, D, generator=gen) / 10).to(torch.bfloat16),
        block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        head_dim_v=512,
        tile_scheduler_metadata=FlashMLASchedMeta(),
    )


def _call(args):
    return flash_mla_with_kvcache(**args)


# ----------------------------------------------------------------------------------------------------------
# Structural mistakes not in test_validation.BAD_INPUTS: always a TypeError / ValueError naming the argument

MORE_BAD = [
    ("q-int8", dict(q=lambda t: t.to(torch.int8)), TypeError, ["q must have dtype", "bfloat16"]),
    ("q-fp8", dict(q=lambda t: t.to(torch.float8_e4m3fn), k_cache=lambda t: t.to(torch.float8_e4m3fn)),
     TypeError, ["q must have dtype"]),
    ("q-and-cache-fp32", dict(q=lambda t: t.float(), k_cache=lambda t: t.float()), TypeError, ["q must have dtype"]),
    ("cache-fp16-q-bf16", dict(k_cache=lambda t: t.half()), TypeError, ["k_cache", "same dtype as q"]),
    ("block_table-int16", dict(block_table=lambda t: t.short()), TypeError, ["block_table", "int32"]),
    ("block_table-float", dict(block_table=lambda t: t.float()), TypeError, ["block_table", "int32"]),
    ("cache_seqlens-float", dict(cache_seqlens=lambda t: t.float()), TypeError, ["cache_seqlens", "int32"]),
    ("cache_seqlens-0d", dict(cache_seqlens=lambda t: t[0]), ValueError, ["cache_seqlens must be 1-D"]),
    ("q-5d", dict(q=lambda t: t[None]), ValueError, ["q must be 4-D"]),
    ("d-512-q-576-cache", dict(q=lambda t: t[..., :512]), ValueError, ["k_cache.shape[-1]", "512"]),
    ("h_q-1-h_kv-2", dict(q=lambda t: t[:, :, :1], k_cache=lambda t: torch.cat([t, t], 2)), ValueError,
     ["h_q = 1", "h_kv = 2"]),
    ("block_table-3-rows", dict(block_table=lambda t: torch.cat([t, t[:1]])), ValueError, ["block_table.shape[0]"]),
]


@pytest.mark.parametrize("edits,exc,needles", [c[1:] for c in MORE_BAD], ids=[c[0] for c in MORE_BAD])
def test_more_structural_mistakes(edits, exc, needles):
    args = _args()
    for name, fn in edits.items():
        args[name] = fn(args[name])
    with pytest.raises(exc) as info:
        _call(args)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


def test_head_dim_v_bool_and_numpy_int():
    np = pytest.importorskip("numpy")
    args = _args()
    with pytest.raises(TypeError, match="head_dim_v must be an int"):
        _call({**args, "head_dim_v": True})
    out, _ = _call({**_args(), "head_dim_v": np.int64(512)})  # any integer type is fine
    assert out.shape[-1] == 512


def test_zero_width_block_table():
    """A table with no columns is only valid if every length is 0; otherwise the length exceeds its capacity."""
    args = _args(seqlens=(0, 0))
    args["block_table"] = args["block_table"][:, :0]
    out, lse = _call(args)
    assert torch.all(out == 0) and torch.all(lse == math.inf)
    args = _args()
    args["block_table"] = args["block_table"][:, :0]
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 100"):
        _call(args)


# ----------------------------------------------------------------------------------------------------------
# Bad values with debug mode OFF: the reference path (CPU) still refuses them, naming the entry


VALUE_BAD = [
    # Without debug mode the scheduler (which runs first on the new-style path) names the argument, not the entry.
    ("negative-seqlen", dict(cache_seqlens=torch.tensor([100, -1], dtype=torch.int32)), ["cache_seqlens", "negative"]),
    ("seqlen-past-table", dict(cache_seqlens=torch.tensor([129, 3], dtype=torch.int32)),
     ["cache_seqlens[0] = 129", "128"]),
    ("page-id-too-big", dict(block_table=torch.tensor([[0, 4], [2, 3]], dtype=torch.int32)), ["block_table[0, 1] = 4"]),
    ("page-id-negative", dict(block_table=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32)),
     ["block_table[1, 0] = -1"]),
]


@pytest.mark.parametrize("changes,needles", [c[1:] for c in VALUE_BAD], ids=[c[0] for c in VALUE_BAD])
def test_reference_path_refuses_bad_values_without_debug(changes, needles):
    assert not validation.debug_enabled()
    args = {**_args(), **changes}
    with pytest.raises(ValueError) as info:
        _call(args)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("pages", [1, 2])
def test_debug_page_count_boundary(pages):
    """Debug mode checks exactly ceil(len / page) entries: len = k * page needs k, len = k * page + 1 needs k + 1."""
    cutemla.set_debug(True)
    table = torch.tensor([[0, 1, 2147480000], [2, 3, 2147480000]], dtype=torch.int32)
    k_cache = torch.zeros(4, PAGE, H_KV, D, dtype=torch.bfloat16)
    base = {**_args(), "k_cache": k_cache, "block_table": table}
    exact = torch.tensor([pages * PAGE, 0], dtype=torch.int32)
    _call({**base, "cache_seqlens": exact, "block_table": _garbage_from(table, pages)})
    one_more = torch.tensor([pages * PAGE + 1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"block_table\[0, {pages}\] = 2147480000"):
        _call({**base, "cache_seqlens": one_more, "block_table": _garbage_from(table, pages),
               "tile_scheduler_metadata": FlashMLASchedMeta()})


def _garbage_from(table, column):
    table = table.clone()
    table[:, column:] = 2147480000
    return table


# ----------------------------------------------------------------------------------------------------------
# Stale old-style metadata (computed for other lengths)


def _stale_old_style():
    args = _args(seqlens=(100, 37))
    meta, splits = get_mla_metadata(torch.tensor([20, 37], dtype=torch.int32), H_Q, H_KV)  # request 0: 1 page
    return {**args, "tile_scheduler_metadata": meta, "num_splits": splits}


def test_debug_checks_catch_stale_old_style_metadata():
    """validation.debug_checks validates old-style metadata against the current lengths when given it."""
    args = _stale_old_style()
    with pytest.raises(ValueError, match="do not fit the current cache_seqlens") as info:
        validation.debug_checks(args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"],
                                num_splits=args["num_splits"], tile_scheduler_metadata=args["tile_scheduler_metadata"])
    assert "request 0" in str(info.value)
    # Fresh metadata passes.
    meta, splits = get_mla_metadata(args["cache_seqlens"], H_Q, H_KV)
    validation.debug_checks(args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"],
                            num_splits=splits, tile_scheduler_metadata=meta)


def test_debug_mode_catches_stale_old_style_metadata_end_to_end():
    cutemla.set_debug(True)
    with pytest.raises(ValueError, match="do not fit the current cache_seqlens"):
        _call(_stale_old_style())


# ----------------------------------------------------------------------------------------------------------
# NaN / inf in the data: not checked (not even in debug mode), but confined to the rows it belongs to


def _case_inputs():
    return make_decode_inputs(DecodeCase(b=3, s_q=2, s_k=150, h_q=8, h_kv=2, causal=True, varlen=True, seed=5))


def _ref(inputs, q=None, kcache=None):
    return mla_decode_reference(inputs.q if q is None else q, inputs.kcache if kcache is None else kcache,
                                inputs.block_table, inputs.cache_seqlens, causal=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_q_poisons_only_its_own_row(value):
    inputs = _case_inputs()
    clean_out, clean_lse = _ref(inputs)
    q = inputs.q.clone()
    q[1, 0, 5, 17] = value  # request 1, query 0, head 5
    out, lse = _ref(inputs, q=q)
    assert not torch.isfinite(out[1, 0, 5].float()).any()  # NaN (or +-inf where a V column sums that way)
    # The reference reports such a row's lse as +inf (it cannot tell it from an empty row); a kernel may give
    # NaN. Either way it is not finite.
    assert not math.isfinite(float(lse[1, 5, 0]))
    untouched = torch.ones_like(out, dtype=torch.bool)
    untouched[1, 0, 5] = False
    assert torch.equal(out[untouched], clean_out[untouched]) and torch.isfinite(out[untouched].float()).all()
    untouched_lse = torch.ones_like(lse, dtype=torch.bool)
    untouched_lse[1, 5, 0] = False
    assert torch.equal(lse[untouched_lse], clean_lse[untouched_lse])


def test_nan_in_a_live_cache_row_stays_in_its_request_and_kv_head():
    inputs = _case_inputs()
    clean_out, _ = _ref(inputs)
    n = int(inputs.cache_seqlens[2])
    token = n - 1  # the last token: with causal s_q = 2 only query 1 attends to it
    kcache = inputs.kcache.clone()
    page = int(inputs.block_table[2, token // 64])
    kcache[page, token % 64, 1, 3] = math.nan  # a V column of kv head 1 = query heads 4..7
    out, _ = _ref(inputs, kcache=kcache)
    # Query 0 is poisoned too although the mask hides the token from it: its weight is 0 and 0 * NaN = NaN in
    # P @ V (as in any attention that multiplies masked tiles). The damage stays in (request 2, kv head 1).
    poisoned = torch.zeros_like(out, dtype=torch.bool)
    poisoned[2, :, 4:8] = True
    assert torch.isnan(out[2, 1, 4:8]).all()  # query 1 sees the token: its scores are NaN
    assert torch.isnan(out[2, 0, 4:8, 3]).all()  # query 0: only the poisoned V column
    assert torch.equal(out[~poisoned], clean_out[~poisoned])


def test_debug_mode_does_not_scan_data_for_nan():
    """Documented scope of debug mode: lengths, page ids and metadata only; NaN data is passed through."""
    cutemla.set_debug(True)
    args = _args()
    args["q"] = args["q"].clone()
    args["q"][0, 0, 0, 0] = math.nan
    out, _ = _call(args)
    assert torch.isnan(out[0, 0, 0]).all() and torch.isfinite(out[1].float()).all()


# ----------------------------------------------------------------------------------------------------------
# GPU-only mistakes


@pytest.mark.gpu
def test_sched_meta_filled_on_cpu_reused_on_gpu(monkeypatch):
    monkeypatch.delenv("CUTEMLA_BACKEND")
    args = _args()
    _call(args)  # fills the FlashMLASchedMeta on the CPU
    gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(ValueError, match="sched_meta was filled on cpu"):
        _call(gpu)


@pytest.mark.gpu
def test_gpu_inputs_with_cpu_cache_seqlens(monkeypatch):
    monkeypatch.delenv("CUTEMLA_BACKEND")
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) and k != "cache_seqlens" else v) for k, v in _args().items()}
    with pytest.raises(ValueError, match="cache_seqlens must be on the same device as q"):
        _call(args)


@pytest.mark.gpu
@pytest.mark.parametrize("changes,needles", [c[1:] for c in VALUE_BAD], ids=[c[0] for c in VALUE_BAD])
def test_kernel_path_debug_mode_catches_bad_values(changes, needles, monkeypatch):
    monkeypatch.setenv("CUTEMLA_BACKEND", "kernel")
    cutemla.set_debug(True)
    args = {**_args(), **changes}
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(ValueError) as info:
        _call(args)
    for needle in needles:
        assert needle in str(info.value)
