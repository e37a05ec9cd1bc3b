"""The FlashMLA-compatible API: both call styles, lazy metadata, backend choice, README and CI script."""
import os
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

import cutemla
from cutemla import interface, kernels
from cutemla.interface import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from cutemla.reference import mla_decode_reference
from cutemla.schedule import DEFAULT_NUM_SMS, get_decoding_sched_meta, num_sm_parts
from cutemla.testing import (
    LSE_TOL,
    OUT_TOL,
    DecodeCase,
    assert_close_flashmla,
    dense_attention_oracle,
    make_decode_inputs,
)

REPO = Path(__file__).resolve().parent.parent
FALLBACK_WARNING = "cutemla. CuTe DSL kernel unavailable"

pytestmark = pytest.mark.filterwarnings(f"ignore:{FALLBACK_WARNING}")


@pytest.fixture(autouse=True)
def _clean_state(clean_api_state):
    yield


CASES = [
    DecodeCase(b=2, s_q=1, s_k=100, h_q=4, h_kv=1),
    DecodeCase(b=3, s_q=2, s_k=150, h_q=4, h_kv=2, varlen=True, causal=True, seed=1),
    DecodeCase(b=4, s_q=1, s_k=70, h_q=8, h_kv=1, d=512, zero_frac=0.5, dtype=torch.float16, seed=2),
    DecodeCase(b=2, s_q=3, s_k=2, h_q=2, h_kv=1, causal=True, seed=3),  # s_k < s_q: fully masked causal rows
]


def _check(out, lse, expected_out, expected_lse):
    assert_close_flashmla("out", out, expected_out, **OUT_TOL)
    assert_close_flashmla("lse", lse, expected_lse, **LSE_TOL)


def _reference(inputs, causal, softmax_scale=None):
    return mla_decode_reference(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512,
                                softmax_scale, causal)


# ----------------------------------------------------------------------------------------------------------
# Package surface


def test_exports():
    for name in ("get_mla_metadata", "flash_mla_with_kvcache", "FlashMLASchedMeta", "mla_decode_reference",
                 "set_debug", "__version__"):
        assert hasattr(cutemla, name), name
    assert cutemla.mla_decode_reference is mla_decode_reference


def test_version_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert cutemla.__version__ == project["version"]


def test_import_does_not_load_cutlass():
    code = "import sys, cutemla; bad = [m for m in sys.modules if m.split('.')[0] in ('cutlass', 'tvm_ffi')]; print(bad)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout


# ----------------------------------------------------------------------------------------------------------
# Both call styles against the reference


@pytest.mark.parametrize("case", CASES, ids=str)
def test_new_style_matches_reference(case):
    inputs = make_decode_inputs(case)
    sched_meta, none = get_mla_metadata()
    assert isinstance(sched_meta, FlashMLASchedMeta) and none is None
    out, lse = flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512,
                                      sched_meta, causal=case.causal)
    assert out.shape == (case.b, case.s_q, case.h_q, 512) and out.dtype == case.dtype
    assert lse.shape == (case.b, case.h_q, case.s_q) and lse.dtype == torch.float32
    _check(out, lse, *_reference(inputs, case.causal))
    # And against the independent float64 oracle, with FlashMLA's kernel tolerances.
    _check(out, lse, *dense_attention_oracle(inputs, causal=case.causal))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_old_style_matches_reference(case):
    inputs = make_decode_inputs(case)
    meta, num_splits = get_mla_metadata(inputs.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
    out, lse = flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512,
                                      meta, num_splits, causal=case.causal)
    _check(out, lse, *_reference(inputs, case.causal))


def test_zero_length_rows_give_zero_and_inf():
    case = DecodeCase(b=4, s_q=1, s_k=70, h_q=4, h_kv=1, zero_frac=0.5)
    inputs = make_decode_inputs(case)
    empty = inputs.cache_seqlens == 0
    assert 0 < int(empty.sum()) < case.b
    out, lse = flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512,
                                      get_mla_metadata()[0])
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("inf"))
    assert torch.isfinite(lse[~empty]).all() and not torch.isnan(out).any()


def test_softmax_scale_default_and_override():
    inputs = make_decode_inputs(DecodeCase(b=2, s_q=1, s_k=90, h_q=4, h_kv=1, d=512))
    args = (inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512)
    out, lse = flash_mla_with_kvcache(*args, get_mla_metadata()[0])
    _check(out, lse, *_reference(inputs, False, softmax_scale=512 ** -0.5))
    out2, lse2 = flash_mla_with_kvcache(*args, get_mla_metadata()[0], softmax_scale=0.3)
    _check(out2, lse2, *_reference(inputs, False, softmax_scale=0.3))
    assert not torch.allclose(lse, lse2)


def test_causal_with_s_q_1_is_off():
    inputs = make_decode_inputs(DecodeCase(b=2, s_q=1, s_k=90, h_q=4, h_kv=1))
    sched_meta, _ = get_mla_metadata()
    flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512, sched_meta,
                           causal=True)
    assert sched_meta.config.causal is False
    # So the same sched_meta serves causal=False calls too.
    flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512, sched_meta,
                           causal=False)


# ----------------------------------------------------------------------------------------------------------
# Metadata


def test_lazy_metadata_filled_on_first_use_and_reused():
    case = DecodeCase(b=3, s_q=2, s_k=150, h_q=4, h_kv=2, varlen=True, causal=True, seed=1)
    inputs = make_decode_inputs(case)
    sched_meta, _ = get_mla_metadata()
    assert not sched_meta.have_initialized and sched_meta.tile_scheduler_metadata is None
    args = (inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512, sched_meta)
    out, lse = flash_mla_with_kvcache(*args, causal=True)

    assert sched_meta.have_initialized
    assert sched_meta.config == FlashMLASchedMeta.Config(b=3, s_q=2, h_q=4, page_block_size=64, h_k=2, causal=True,
                                                         is_fp8_kvcache=False, topk=None)
    expected_meta, expected_splits = get_decoding_sched_meta(inputs.cache_seqlens, 2, 4, 2)
    assert sched_meta.tile_scheduler_metadata.dtype == torch.int32
    assert sched_meta.tile_scheduler_metadata.shape == (num_sm_parts(DEFAULT_NUM_SMS, 2, 4, 2), 8)
    assert torch.equal(sched_meta.tile_scheduler_metadata, expected_meta)
    assert torch.equal(sched_meta.num_splits, expected_splits)
    assert sched_meta.num_splits.shape == (case.b + 1,) and sched_meta.num_splits.dtype == torch.int32

    # Another layer: new q and cache values, same shapes and lengths -> the metadata is reused, not recomputed.
    meta_before, splits_before = sched_meta.tile_scheduler_metadata, sched_meta.num_splits
    q2, kcache2 = inputs.q.flip(-1).contiguous(), inputs.kcache * -0.5
    out2, lse2 = flash_mla_with_kvcache(q2, kcache2, inputs.block_table, inputs.cache_seqlens, 512, sched_meta,
                                        causal=True)
    assert sched_meta.tile_scheduler_metadata is meta_before and sched_meta.num_splits is splits_before
    _check(out2, lse2, *mla_decode_reference(q2, kcache2, inputs.block_table, inputs.cache_seqlens, 512, None, True))
    assert not torch.allclose(out2.float(), out.float())


MISMATCHES = [
    ("b", lambda i: dict(q=i.q[:2], block_table=i.block_table[:2], cache_seqlens=i.cache_seqlens[:2]), {}),
    ("s_q", lambda i: dict(q=i.q[:, :1]), {}),
    ("h_q", lambda i: dict(q=i.q[:, :, :2]), {}),
    ("h_k", lambda i: dict(kcache=i.kcache[:, :, :1]), {}),
    ("page_block_size", lambda i: dict(kcache=i.kcache.reshape(-1, 32, *i.kcache.shape[2:]),
                                       block_table=(i.block_table.long()[:, :, None] * 2 + torch.arange(2))
                                       .reshape(i.block_table.shape[0], -1).clamp(max=2**31 - 1).to(torch.int32)),
     {}),
    ("causal", lambda i: {}, dict(causal=False)),
]


@pytest.mark.parametrize("field,change,kwargs", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_lazy_metadata_reuse_with_other_config_raises(field, change, kwargs):
    inputs = make_decode_inputs(DecodeCase(b=3, s_q=2, s_k=100, h_q=4, h_kv=2, causal=True))
    sched_meta, _ = get_mla_metadata()
    flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512, sched_meta,
                           causal=True)
    args = dict(q=inputs.q, kcache=inputs.kcache, block_table=inputs.block_table, cache_seqlens=inputs.cache_seqlens)
    args.update(change(inputs))
    call_kwargs = dict(causal=True, **kwargs) if "causal" not in kwargs else kwargs
    with pytest.raises(ValueError) as info:
        flash_mla_with_kvcache(args["q"], args["kcache"], args["block_table"], args["cache_seqlens"], 512,
                               sched_meta, **call_kwargs)
    assert f"sched_meta.config.{field}" in str(info.value)
    assert "inconsistent with sched_meta" in str(info.value)


@pytest.mark.parametrize("s_q,h_q,h_kv,pass_heads_q", [(1, 16, 1, False), (2, 8, 2, True), (2, 128, 1, True)])
def test_old_style_metadata_tensors(s_q, h_q, h_kv, pass_heads_q):
    seqlens = torch.tensor([0, 5, 300, 4096, 64], dtype=torch.int32)
    extra = (h_q,) if pass_heads_q else ()
    meta, num_splits = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv, *extra)
    parts = num_sm_parts(DEFAULT_NUM_SMS, s_q, h_q, h_kv)
    assert meta.shape == (parts, 8) and meta.dtype == torch.int32 and meta.device == seqlens.device
    assert num_splits.shape == (seqlens.shape[0] + 1,) and num_splits.dtype == torch.int32
    expected_meta, expected_splits = get_decoding_sched_meta(seqlens, s_q, h_q, h_kv)
    assert torch.equal(meta, expected_meta) and torch.equal(num_splits, expected_splits)
    # Keyword form, as FlashMLA's Sep-2025 signature names them.
    meta_kw, splits_kw = get_mla_metadata(cache_seqlens=seqlens, num_q_tokens_per_head_k=s_q * h_q // h_kv,
                                          num_heads_k=h_kv, num_heads_q=h_q, is_fp8_kvcache=False, topk=None)
    assert torch.equal(meta_kw, meta) and torch.equal(splits_kw, num_splits)


def test_new_style_ignores_non_tensor_arguments():
    for args, kwargs in [((), {}), ((None, 128, 1), {}), ((), {"num_heads_q": 128, "is_fp8_kvcache": False})]:
        sched_meta, none = get_mla_metadata(*args, **kwargs)
        assert isinstance(sched_meta, FlashMLASchedMeta) and none is None and not sched_meta.have_initialized


# ----------------------------------------------------------------------------------------------------------
# Unsupported FlashMLA features

UNSUPPORTED = [
    ("is_fp8_kvcache", True),
    ("indices", torch.zeros(2, 1, 64, dtype=torch.int32)),
    ("attn_sink", torch.zeros(4)),
    ("extra_k_cache", torch.zeros(1, 64, 1, 576)),
    ("extra_indices_in_kvcache", torch.zeros(2, 1, 64, dtype=torch.int32)),
    ("topk_length", torch.zeros(2, dtype=torch.int32)),
    ("extra_topk_length", torch.zeros(2, dtype=torch.int32)),
]


@pytest.mark.parametrize("name,value", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_fp8_and_sparse_arguments_not_implemented(name, value):
    inputs = make_decode_inputs(DecodeCase(b=2, s_q=1, s_k=10, h_q=4, h_kv=1))
    with pytest.raises(NotImplementedError) as info:
        flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512,
                               get_mla_metadata()[0], **{name: value})
    assert name in str(info.value)


def test_sparse_call_without_block_table_is_not_implemented():
    """FlashMLA's sparse calls pass block_table=None: the unsupported feature is reported, not the None."""
    q = torch.zeros(2, 1, 64, 576, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="indices"):
        flash_mla_with_kvcache(q, torch.zeros(1, 64, 1, 656, dtype=torch.uint8), None, None, 512,
                               get_mla_metadata()[0], is_fp8_kvcache=False,
                               indices=torch.zeros(2, 1, 64, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------------------
# Backend choice


def _small_call(**kwargs):
    inputs = make_decode_inputs(DecodeCase(b=2, s_q=1, s_k=10, h_q=4, h_kv=1))
    return flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512,
                                  get_mla_metadata()[0], **kwargs)


def _fallback_warnings(records):
    return [r for r in records if re.search(FALLBACK_WARNING, str(r.message))]


def test_fallback_warns_once_per_process():
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for _ in range(3):
            _small_call()
        meta, splits = get_mla_metadata(torch.tensor([3, 4], dtype=torch.int32), 4, 1)
    found = _fallback_warnings(records)
    assert len(found) == 1, [str(r.message) for r in records]
    message = str(found[0].message)
    assert "unavailable on cpu" in message and "using the PyTorch reference path" in message
    assert issubclass(found[0].category, RuntimeWarning)
    assert found[0].filename == __file__  # points at the caller, not at cutemla's internals


def test_reference_backend_does_not_warn(monkeypatch):
    monkeypatch.setenv("CUTEMLA_BACKEND", "reference")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        _small_call()
    assert not _fallback_warnings(records)
    assert interface.active_backend("cpu") == "reference"


def test_kernel_backend_raises_when_unavailable(monkeypatch):
    monkeypatch.setenv("CUTEMLA_BACKEND", "kernel")
    with pytest.raises(RuntimeError) as info:
        _small_call()
    message = str(info.value)
    assert "CUTEMLA_BACKEND=kernel" in message and "unavailable on cpu" in message


def test_bad_backend_value(monkeypatch):
    monkeypatch.setenv("CUTEMLA_BACKEND", "fast")
    with pytest.raises(ValueError, match="CUTEMLA_BACKEND must be one of auto, reference, kernel"):
        _small_call()


def test_kernel_load_failure_falls_back_off_hopper_but_raises_on_sm90(monkeypatch):
    def broken(device):
        raise ImportError("no libcuda")

    monkeypatch.setattr(kernels, "kernels_available", broken)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        _small_call()
    assert "no libcuda" in str(_fallback_warnings(records)[0].message)

    interface._reset_backend_state()
    monkeypatch.setattr(interface, "_is_sm90", lambda device: True)
    with pytest.raises(RuntimeError, match="failed to load.*no libcuda"):
        _small_call()


def test_kernel_path_dispatch(monkeypatch):
    """With a kernel available, the call goes to run_dense_decode with the schedule, scale and causal flag."""
    calls = []

    def run_dense_decode(q, kcache, block_table, cache_seqlens, meta, num_splits, softmax_scale, causal):
        calls.append((meta, num_splits, softmax_scale, causal))
        return "out", "lse"

    monkeypatch.setattr(kernels, "kernels_available", lambda device: True)
    monkeypatch.setattr(kernels, "run_dense_decode", run_dense_decode)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        inputs = make_decode_inputs(DecodeCase(b=3, s_q=1, s_k=200, h_q=8, h_kv=1, varlen=True))
        sched_meta, _ = get_mla_metadata()
        result = flash_mla_with_kvcache(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512,
                                        sched_meta, causal=True)
    assert not _fallback_warnings(records)
    assert result == ("out", "lse") and len(calls) == 1
    meta, num_splits, scale, causal = calls[0]
    assert meta is sched_meta.tile_scheduler_metadata and num_splits is sched_meta.num_splits
    expected_meta, expected_splits = get_decoding_sched_meta(inputs.cache_seqlens, 1, 8, 1)
    assert torch.equal(meta, expected_meta) and torch.equal(num_splits, expected_splits)
    assert scale == pytest.approx(576 ** -0.5) and causal is False  # s_q == 1 turns causal off
    assert interface.active_backend("cpu") == "kernel"


# ----------------------------------------------------------------------------------------------------------
# README and CI script


def _fenced_blocks(language):
    text = (REPO / "README.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_usage_runs():
    blocks = _fenced_blocks("python")
    assert blocks, "README.md has no ```python block"
    namespace = {"__name__": "readme"}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out, lse = namespace["out"], namespace["lse"]
    assert out.shape == (2, 1, 16, 512) and lse.shape == (2, 16, 1)
    expected = mla_decode_reference(namespace["q"], namespace["kcache"], namespace["block_table"],
                                     namespace["cache_seqlens"], 512, None, True)
    _check(out, lse, *expected)


def test_ci_runs_exactly_the_readme_commands():
    blocks = _fenced_blocks("bash")
    assert blocks, "README.md has no ```bash block"
    readme_commands = [line.strip() for line in blocks[0].splitlines() if line.strip()]
    assert readme_commands == ['pip install -e ".[dev]"', "python -m pytest -q"]
    script = REPO / ".ci" / "run"
    assert os.access(script, os.X_OK), ".ci/run must be executable"
    lines = [line.strip() for line in script.read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert commands[0] == "#!/usr/bin/env bash" or lines[0].startswith("#!")
    assert "set -euo pipefail" in commands
    assert "export CUTE_DSL_ARCH=sm_90a" in commands
    runs = [c for c in commands if not c.startswith(("set ", "export ", "cd "))]
    assert runs == readme_commands, runs
    assert commands.index("export CUTE_DSL_ARCH=sm_90a") < commands.index(readme_commands[0])


# ----------------------------------------------------------------------------------------------------------
# GPU (sm90): end to end on CUDA against the reference computed on the CPU

GPU_CASES = [
    DecodeCase(b=4, s_q=1, s_k=300, h_q=16, h_kv=1, varlen=True),
    DecodeCase(b=3, s_q=2, s_k=500, h_q=64, h_kv=1, varlen=True, causal=True, seed=1),
    DecodeCase(b=6, s_q=1, s_k=140, h_q=8, h_kv=2, d=512, zero_frac=0.5, dtype=torch.float16, seed=2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("style", ["new", "old"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_cpu_reference(case, style):
    cpu = make_decode_inputs(case)
    gpu = cpu.to("cuda")
    if style == "new":
        meta, num_splits = get_mla_metadata()
    else:
        meta, num_splits = get_mla_metadata(gpu.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
        assert meta.is_cuda and num_splits.is_cuda
    out, lse = flash_mla_with_kvcache(gpu.q, gpu.kcache, gpu.block_table, gpu.cache_seqlens, 512, meta, num_splits,
                                      causal=case.causal)
    assert out.is_cuda and lse.is_cuda
    _check(out.cpu(), lse.cpu(), *_reference(cpu, case.causal))


@pytest.mark.gpu
def test_gpu_sched_meta_shared_across_layers():
    case = DecodeCase(b=4, s_q=2, s_k=700, h_q=32, h_kv=1, varlen=True, causal=True)
    base = make_decode_inputs(case)
    sched_meta, _ = get_mla_metadata()
    for layer in range(3):
        q, kcache = base.q * (layer + 1), base.kcache * (-0.5) ** layer  # same shapes and lengths per layer
        gpu_q, gpu_k = q.cuda(), kcache.cuda()
        out, lse = flash_mla_with_kvcache(gpu_q, gpu_k, base.block_table.cuda(), base.cache_seqlens.cuda(), 512,
                                          sched_meta, causal=True)
        assert sched_meta.tile_scheduler_metadata.is_cuda
        _check(out.cpu(), lse.cpu(), *mla_decode_reference(q, kcache, base.block_table, base.cache_seqlens, 512,
                                                           None, True))
    expected_meta, expected_splits = get_decoding_sched_meta(base.cache_seqlens, 2, 32, 1,
                                                             num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
    assert torch.equal(sched_meta.tile_scheduler_metadata.cpu()[:, :7], expected_meta[:, :7])
    assert torch.equal(sched_meta.num_splits.cpu(), expected_splits)


@pytest.mark.gpu
def test_gpu_kernel_backend(monkeypatch):
    device = torch.device("cuda", torch.cuda.current_device())
    if not kernels.kernels_available(device):
        pytest.skip("cutemla.kernels.kernels_available() is False on this GPU (kernel not wired in yet)")
    monkeypatch.setenv("CUTEMLA_BACKEND", "kernel")
    assert interface.active_backend(device) == "kernel"
    case = DecodeCase(b=8, s_q=1, s_k=1000, h_q=128, h_kv=1, varlen=True)
    cpu = make_decode_inputs(case)
    gpu = cpu.to(device)
    out, lse = flash_mla_with_kvcache(gpu.q, gpu.kcache, gpu.block_table, gpu.cache_seqlens, 512,
                                      get_mla_metadata()[0])
    _check(out.cpu(), lse.cpu(), *_reference(cpu, False))
