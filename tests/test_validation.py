"""Every input check of the public API: the exception type, and a message naming the argument."""
import pytest
import torch

import cutemla
from cutemla import interface, kernels, validation
from cutemla.interface import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata

pytestmark = pytest.mark.filterwarnings("ignore:cutemla. CuTe DSL kernel unavailable")

B, S_Q, H_Q, H_KV, D, PAGE, NUM_BLOCKS, MAX_BLOCKS = 2, 1, 4, 1, 576, 64, 4, 2


@pytest.fixture(autouse=True)
def _clean_state(clean_api_state):
    yield


def _valid_args():
    gen = torch.Generator().manual_seed(0)
    return dict(
        q=(torch.randn(B, S_Q, H_Q, D, generator=gen) / 10).to(torch.bfloat16),
        k_cache=(torch.randn(NUM_BLOCKS, PAGE, H_KV, D, generator=gen) / 10).to(torch.bfloat16),
        block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        cache_seqlens=torch.tensor([100, 37], dtype=torch.int32),
        head_dim_v=512,
        tile_scheduler_metadata=FlashMLASchedMeta(),
    )


def _old_style(args):
    meta, splits = get_mla_metadata(args["cache_seqlens"], S_Q * H_Q // H_KV, H_KV)
    args["tile_scheduler_metadata"] = meta
    args["num_splits"] = splits
    return args


def _set(**changes):
    def edit(args):
        args.update(changes)
        return args
    return edit


def _apply(name, fn):
    def edit(args):
        args[name] = fn(args[name])
        return args
    return edit


def _then(*edits):
    def edit(args):
        for e in edits:
            args = e(args)
        return args
    return edit


# (id, edit of the valid arguments, exception type, substrings the message must contain)
BAD_INPUTS = [
    ("q-not-tensor", _apply("q", lambda t: t.tolist()), TypeError, ["q must be a torch.Tensor"]),
    ("k_cache-none", _set(k_cache=None), TypeError, ["k_cache must be a torch.Tensor"]),
    ("block_table-list", _apply("block_table", lambda t: t.tolist()), TypeError, ["block_table must be a torch.Tensor"]),
    ("cache_seqlens-list", _set(cache_seqlens=[100, 37]), TypeError, ["cache_seqlens must be a torch.Tensor"]),
    ("q-fp32", _apply("q", lambda t: t.float()), TypeError, ["q must have dtype", "bfloat16", "float16"]),
    ("k_cache-other-dtype", _apply("k_cache", lambda t: t.half()), TypeError, ["k_cache", "same dtype as q"]),
    ("k_cache-uint8", _apply("k_cache", lambda t: t.view(torch.uint8)), TypeError, ["k_cache", "FP8"]),
    ("block_table-int64", _apply("block_table", lambda t: t.long()), TypeError, ["block_table", "int32 is required"]),
    ("cache_seqlens-int64", _apply("cache_seqlens", lambda t: t.long()), TypeError,
     ["cache_seqlens", "int32 is required"]),
    ("q-3d", _apply("q", lambda t: t[0]), ValueError, ["q must be 4-D"]),
    ("k_cache-3d", _apply("k_cache", lambda t: t[:, :, 0]), ValueError, ["k_cache must be 4-D"]),
    ("block_table-1d", _apply("block_table", lambda t: t.flatten()), ValueError, ["block_table must be 2-D"]),
    ("cache_seqlens-2d", _apply("cache_seqlens", lambda t: t[:, None]), ValueError, ["cache_seqlens must be 1-D"]),
    ("block_table-other-device", _apply("block_table", lambda t: t.to("meta")), ValueError,
     ["block_table must be on the same device as q"]),
    ("k_cache-other-device", _apply("k_cache", lambda t: t.to("meta")), ValueError,
     ["k_cache must be on the same device as q"]),
    ("cache_seqlens-other-device", _apply("cache_seqlens", lambda t: t.to("meta")), ValueError,
     ["cache_seqlens must be on the same device as q"]),
    ("batch-0", _then(_apply("q", lambda t: t[:0]), _apply("block_table", lambda t: t[:0]),
                      _apply("cache_seqlens", lambda t: t[:0])), ValueError, ["q.shape[0]", "> 0"]),
    ("s_q-0", _apply("q", lambda t: t[:, :0]), ValueError, ["q.shape[1]", "s_q"]),
    ("h_q-0", _apply("q", lambda t: t[:, :, :0]), ValueError, ["q.shape[2]", "h_q"]),
    ("d-128", _then(_apply("q", lambda t: t[..., :128]), _apply("k_cache", lambda t: t[..., :128])), ValueError,
     ["q.shape[-1]", "512 or 576"]),
    ("d-mismatch", _apply("k_cache", lambda t: t[..., :512]), ValueError, ["k_cache.shape[-1]", "576"]),
    ("head_dim_v-576", _set(head_dim_v=576), ValueError, ["head_dim_v must be 512"]),
    ("head_dim_v-str", _set(head_dim_v="512"), TypeError, ["head_dim_v must be an int"]),
    ("num_blocks-0", _apply("k_cache", lambda t: t[:0]), ValueError, ["k_cache.shape[0]", "num_blocks"]),
    ("page-0", _apply("k_cache", lambda t: t[:, :0]), ValueError, ["k_cache.shape[1]", "page_block_size"]),
    ("h_q-not-multiple", _then(_apply("q", lambda t: t[:, :, :3]),
                               _apply("k_cache", lambda t: torch.cat([t, t], dim=2))), ValueError,
     ["h_q = 3", "h_kv = 2", "multiple"]),
    ("block_table-batch", _apply("block_table", lambda t: t[:1]), ValueError, ["block_table.shape[0]", "b = q.shape[0]"]),
    ("cache_seqlens-batch", _apply("cache_seqlens", lambda t: torch.cat([t, t])), ValueError, ["cache_seqlens", "[2]"]),
    ("q-last-dim-strided", _apply("q", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     ["q.stride(-1) == 1"]),
    ("k_cache-last-dim-strided", _apply("k_cache", lambda t: t.transpose(1, 3).contiguous().transpose(1, 3)),
     ValueError, ["k_cache.stride(-1) == 1"]),
    ("block_table-last-dim-strided", _apply("block_table", lambda t: t.t().contiguous().t()), ValueError,
     ["block_table.stride(-1) == 1"]),
    ("cache_seqlens-strided", _apply("cache_seqlens", lambda t: torch.stack([t, t], 1)[:, 0]), ValueError,
     ["cache_seqlens must be contiguous"]),
    ("softmax_scale-str", _set(softmax_scale="0.1"), TypeError, ["softmax_scale"]),
    ("softmax_scale-nan", _set(softmax_scale=float("nan")), ValueError, ["softmax_scale must be finite"]),
    ("causal-str", _set(causal="yes"), TypeError, ["causal must be a bool"]),
    ("sched-meta-none", _set(tile_scheduler_metadata=None), TypeError, ["tile_scheduler_metadata must be"]),
    ("num_splits-with-sched-meta", _set(num_splits=torch.zeros(B + 1, dtype=torch.int32)), ValueError,
     ["num_splits must be None"]),
    ("old-style-without-num_splits", _then(_old_style, _set(num_splits=None)), ValueError,
     ["num_splits is required"]),
    ("old-style-meta-int64", _then(_old_style, _apply("tile_scheduler_metadata", lambda t: t.long())), TypeError,
     ["tile_scheduler_metadata must have dtype torch.int32"]),
    ("old-style-meta-shape", _then(_old_style, _apply("tile_scheduler_metadata", lambda t: t[:, :7].contiguous())),
     ValueError, ["tile_scheduler_metadata must have shape", "8"]),
    ("old-style-meta-not-contiguous", _then(_old_style, _apply("tile_scheduler_metadata", lambda t: t[::2])),
     ValueError, ["tile_scheduler_metadata must be contiguous"]),
    ("old-style-meta-other-device", _then(_old_style, _apply("tile_scheduler_metadata", lambda t: t.to("meta"))),
     ValueError, ["tile_scheduler_metadata must be on the same device as q"]),
    ("old-style-num_splits-shape", _then(_old_style, _apply("num_splits", lambda t: t[:-1])), ValueError,
     ["num_splits must have shape [b + 1]"]),
    ("old-style-num_splits-int64", _then(_old_style, _apply("num_splits", lambda t: t.long())), TypeError,
     ["num_splits must have dtype torch.int32"]),
]


@pytest.mark.parametrize("edit,exc,needles", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(edit, exc, needles):
    args = edit(_valid_args())
    with pytest.raises(exc) as info:
        flash_mla_with_kvcache(**args)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_valid_args_pass():
    """The base of the table above is itself valid (so each row fails for its own reason)."""
    out, lse = flash_mla_with_kvcache(**_valid_args())
    assert out.shape == (B, S_Q, H_Q, 512) and lse.shape == (B, H_Q, S_Q)
    old = _old_style(_valid_args())
    out_old, _ = flash_mla_with_kvcache(**old)
    assert torch.equal(out, out_old)


def test_structural_checks_are_cached():
    validation._check_decode_structure.cache_clear()
    args = _valid_args()
    shape = validation.validate_decode_inputs(
        args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"], 512)
    assert shape == validation.DecodeShape(B, S_Q, H_Q, D, NUM_BLOCKS, PAGE, H_KV, MAX_BLOCKS)
    for _ in range(3):
        validation.validate_decode_inputs(args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"], 512)
    info = validation._check_decode_structure.cache_info()
    assert info.misses == 1 and info.hits == 3
    # A failing key is not cached: it raises every time.
    for _ in range(2):
        with pytest.raises(ValueError, match="head_dim_v"):
            validation.validate_decode_inputs(
                args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"], 576)


# ----------------------------------------------------------------------------------------------------------
# Old-style get_mla_metadata arguments

OLD_STYLE_BAD = [
    ("seqlens-int64", lambda s: ((s.long(), 4, 1), {}), TypeError, ["cache_seqlens", "int32 is required"]),
    ("seqlens-2d", lambda s: ((s[:, None], 4, 1), {}), ValueError, ["cache_seqlens must be 1-D"]),
    ("seqlens-empty", lambda s: ((s[:0], 4, 1), {}), ValueError, ["cache_seqlens", "b > 0"]),
    ("seqlens-strided", lambda s: ((torch.stack([s, s], 1)[:, 0], 4, 1), {}), ValueError,
     ["cache_seqlens must be contiguous"]),
    ("tokens-0", lambda s: ((s, 0, 1), {}), ValueError, ["num_q_tokens_per_head_k"]),
    ("tokens-float", lambda s: ((s, 4.0, 1), {}), TypeError, ["num_q_tokens_per_head_k must be an int"]),
    ("heads_k-0", lambda s: ((s, 4, 0), {}), ValueError, ["num_heads_k must be a positive int"]),
    ("heads_k-bool", lambda s: ((s, 4, True), {}), TypeError, ["num_heads_k must be an int"]),
    ("heads_q-not-multiple", lambda s: ((s, 4, 2, 3), {}), ValueError, ["num_heads_q", "multiple of num_heads_k"]),
    ("tokens-not-s_q-multiple", lambda s: ((s, 6, 1), {"num_heads_q": 4}), ValueError,
     ["num_q_tokens_per_head_k (6)"]),
    ("missing-heads_k", lambda s: ((s, 4), {}), TypeError, ["num_heads_k"]),
    ("fp8", lambda s: ((s, 4, 1), {"is_fp8_kvcache": True}), NotImplementedError, ["is_fp8_kvcache"]),
    ("topk", lambda s: ((s, 4, 1), {"topk": 64}), NotImplementedError, ["topk"]),
]


@pytest.mark.parametrize("make,exc,needles", [c[1:] for c in OLD_STYLE_BAD], ids=[c[0] for c in OLD_STYLE_BAD])
def test_old_style_metadata_bad_args(make, exc, needles):
    args, kwargs = make(torch.tensor([100, 37], dtype=torch.int32))
    with pytest.raises(exc) as info:
        get_mla_metadata(*args, **kwargs)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


# ----------------------------------------------------------------------------------------------------------
# Kernel-path limits (checked only when the kernel would run)


@pytest.fixture
def fake_kernel(monkeypatch):
    """Pretend the kernel is available; record the calls instead of running it."""
    calls = []

    def run_dense_decode(q, kcache, block_table, cache_seqlens, meta, num_splits, softmax_scale, causal):
        calls.append(dict(meta=meta, num_splits=num_splits, softmax_scale=softmax_scale, causal=causal))
        return cutemla.mla_decode_reference(q, kcache, block_table, cache_seqlens, 512, softmax_scale, causal)

    monkeypatch.setattr(kernels, "kernels_available", lambda device: True)
    monkeypatch.setattr(kernels, "run_dense_decode", run_dense_decode)
    interface._reset_backend_state()
    return calls


def _repage(args, page):
    """Same tokens, a cache with `page`-token pages."""
    k = args["k_cache"]
    num_tokens = k.shape[0] * k.shape[1]
    args["k_cache"] = k.reshape(num_tokens // page, page, *k.shape[2:])
    ratio = PAGE // page
    table = args["block_table"].long()
    args["block_table"] = (table[:, :, None] * ratio + torch.arange(ratio)).reshape(B, -1).to(torch.int32)
    return args


def test_kernel_path_requires_page_64(fake_kernel):
    args = _repage(_valid_args(), 32)
    with pytest.raises(ValueError) as info:
        flash_mla_with_kvcache(**args)
    assert "page_block_size" in str(info.value) and "64" in str(info.value)
    assert not fake_kernel


def test_reference_path_accepts_any_page_size(monkeypatch):
    monkeypatch.setenv("CUTEMLA_BACKEND", "reference")
    base = _valid_args()
    expected, expected_lse = flash_mla_with_kvcache(**base)
    for page in (1, 16, 32):
        out, lse = flash_mla_with_kvcache(**_repage(_valid_args(), page))
        assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


def test_kernel_path_requires_16_byte_cache_strides(fake_kernel):
    args = _valid_args()
    padded = torch.zeros(NUM_BLOCKS, PAGE, H_KV, D + 1, dtype=torch.bfloat16)
    padded[..., :D] = args["k_cache"]
    args["k_cache"] = padded[..., :D]  # token stride 577 elements: not a multiple of 16 bytes
    with pytest.raises(ValueError) as info:
        flash_mla_with_kvcache(**args)
    assert "k_cache strides" in str(info.value) and "16 bytes" in str(info.value)
    assert not fake_kernel


def test_kernel_path_requires_16_byte_aligned_cache(fake_kernel):
    args = _valid_args()
    flat = torch.zeros(args["k_cache"].numel() + 1, dtype=torch.bfloat16)
    args["k_cache"] = flat[1:].view(args["k_cache"].shape)  # base 2 bytes past an aligned address
    with pytest.raises(ValueError) as info:
        flash_mla_with_kvcache(**args)
    assert "k_cache must start at a 16-byte aligned address" in str(info.value)
    assert not fake_kernel


def test_kernel_path_accepts_strided_q(fake_kernel):
    """A q view with odd strides is the launcher's job (it copies q), not an error."""
    args = _valid_args()
    padded = torch.zeros(B, S_Q, H_Q, D + 1, dtype=torch.bfloat16)
    padded[..., :D] = args["q"]
    expected = flash_mla_with_kvcache(**{**args, "tile_scheduler_metadata": FlashMLASchedMeta()})
    args["q"] = padded[..., :D]
    out, lse = flash_mla_with_kvcache(**args)
    assert len(fake_kernel) == 2
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


# ----------------------------------------------------------------------------------------------------------
# Debug-mode value checks


DEBUG_BAD = [
    ("negative-seqlen", lambda a: _apply("cache_seqlens", lambda t: torch.tensor([100, -1], dtype=torch.int32))(a),
     ["cache_seqlens[1] = -1", "negative"]),
    ("seqlen-past-capacity", _apply("cache_seqlens", lambda t: torch.tensor([129, 3], dtype=torch.int32)),
     ["cache_seqlens[0] = 129", "capacity", "128"]),
    ("page-id-out-of-range", _apply("block_table", lambda t: torch.tensor([[0, 9], [2, 3]], dtype=torch.int32)),
     ["block_table[0, 1] = 9", "num_blocks = 4"]),
    ("page-id-negative", _apply("block_table", lambda t: torch.tensor([[0, 1], [-5, 3]], dtype=torch.int32)),
     ["block_table[1, 0] = -5"]),
    ("old-style-num_splits-bad", _then(_old_style, _apply("num_splits", lambda t: torch.zeros_like(t))),
     ["num_splits must start at 0 and increase"]),
]


@pytest.mark.parametrize("edit,needles", [c[1:] for c in DEBUG_BAD], ids=[c[0] for c in DEBUG_BAD])
@pytest.mark.parametrize("enable", ["env", "set_debug"])
def test_debug_checks(edit, needles, enable, monkeypatch):
    if enable == "env":
        monkeypatch.setenv("CUTEMLA_DEBUG", "1")
    else:
        cutemla.set_debug(True)
    args = edit(_valid_args())
    with pytest.raises(ValueError) as info:
        flash_mla_with_kvcache(**args)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


def test_debug_ignores_garbage_past_needed_pages():
    cutemla.set_debug(True)
    args = _valid_args()
    args["block_table"] = torch.tensor([[0, 1], [2, 2147480000]], dtype=torch.int32)  # request 1 needs 1 page
    flash_mla_with_kvcache(**args)


def test_debug_checks_off_by_default(monkeypatch):
    calls = []
    monkeypatch.setattr(interface, "debug_checks", lambda *a, **k: calls.append(1))
    flash_mla_with_kvcache(**_valid_args())
    assert calls == []
    monkeypatch.setenv("CUTEMLA_DEBUG", "1")
    flash_mla_with_kvcache(**_valid_args())
    assert calls == [1]
    cutemla.set_debug(False)  # overrides the env var
    flash_mla_with_kvcache(**_valid_args())
    assert calls == [1]


def test_debug_catches_sched_meta_reuse_after_seqlens_change():
    cutemla.set_debug(True)
    args = _valid_args()
    flash_mla_with_kvcache(**args)
    args["cache_seqlens"] = torch.tensor([100, 38], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens values changed"):
        flash_mla_with_kvcache(**args)
