"""CPU tests of the perf tools: case grammar, presets, the dry-run sweep's CSV schema, plots, the profile report."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cutemla.profile import (
    ProfileReport,
    classify_kernel,
    device_peaks,
    profile_decode,
    roofline,
    rotation_copies,
    time_host,
)
from cutemla.testing import DecodeCase, decode_bytes, decode_flops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # perf/ is not installed; works under bare `pytest`
from perf import bench_flashmla, host_overhead, profile as perf_profile, sparse_fp8, sweep
from perf.cases import FLASHMLA_CONFIGS, PRESETS, SweepCase, expand_presets, parse_case, parse_cases
from perf.providers import BASELINE_CSV
from perf.schema import BASELINE_FIELDS, COLUMNS, DTYPES, read_results, to_frame

# ----------------------------------------------------------------------------------------------------------
# Case grammar


@pytest.mark.parametrize("text, expected", [
    ("128x1x16k:h16", SweepCase(128, 1, 16384, 16)),
    ("128x1x16k", SweepCase(128, 1, 16384, 128)),
    ("4x2x128K:h=128,causal,fp16", SweepCase(4, 2, 131072, 128, causal=True, dtype="fp16")),
    ("2x1x1m:h64,kv2,varlen,d512,z0.25,seed3",
     SweepCase(2, 1, 1 << 20, 64, h_kv=2, varlen=True, d=512, zero_frac=0.25, seed=3)),
    (" 7x3x100:fixed,bf16,kv=1 ", SweepCase(7, 3, 100, 128)),
    ("128x2x32k:h128,fp8,topk2048", SweepCase(128, 2, 32768, 128, fp8=True, topk=2048)),
    ("128x2x32k:topk=2048", SweepCase(128, 2, 32768, 128, fp8=True, topk=2048)),  # topk implies fp8
    ("128x1x16k:h16,varlen,fp8", SweepCase(128, 1, 16384, 16, varlen=True, fp8=True)),
])
def test_case_grammar_parses(text, expected):
    case = parse_case(text)
    assert case == expected
    assert parse_case(case.spec) == case  # canonical form round-trips


def test_case_spec_is_canonical():
    assert parse_case("128x1x16384:varlen,h16").spec == "128x1x16k:h16,varlen"
    assert SweepCase(1, 1, 100, 16, causal=True, dtype="fp16").spec == "1x1x100:h16,causal,fp16"
    assert parse_case("2x2x32k:topk2048,h64").spec == "2x2x32k:h64,fp8,topk2048"
    sparse = parse_case("128x2x32k:h128,topk2048")
    assert sparse.kv_format == "fp8" and sparse.reference_tokens == 128 * 2 * 2048
    assert sparse.shrunk() == SweepCase(2, 2, 96, 16, fp8=True, topk=64)
    assert SweepCase(1, 1, 100, 16).kv_format == "bf16" and SweepCase(1, 1, 100, 16).reference_tokens == 100


@pytest.mark.parametrize("text, message", [
    ("", "non-empty"),
    ("128x1", "BxSQxSK"),
    ("128x1x16k x2", "BxSQxSK"),
    ("0x1x16k", "batch size B"),
    ("ax1x16k", "batch size B"),
    ("1x1x16q", "KV length SK"),
    ("1x1x16k:h0", "h_q must be a positive integer"),
    ("1x1x16k:h16,kv3", "multiple of h_kv"),
    ("1x1x16k:foo", "unknown option 'foo'"),
    ("1x1x16k:h16,h32", "conflicts"),
    ("1x1x16k:fixed,varlen", "conflicts"),
    ("1x1x16k:bf16,fp16", "conflicts"),
    ("1x1x16k:d128", "d must be 512 or 576"),
    ("1x1x16k:z1.5", "zero fraction"),
    ("1x1x16k:h1.5", "needs a number"),
    ("1x1x16k:", "empty option"),
    ("1x1x16k:h16,,causal", "empty option"),
    ("1x1x16k:fp8,fp16", "fp8 cache needs bf16"),
    ("1x1x16k:h16,kv2,fp8", "fp8 cache needs bf16, d576 and kv1"),
    ("1x1x16k:fp8,fp8", "conflicts"),
    ("1x2x16k:topk64,causal", "takes no causal"),
    ("1x1x16k:topk64,varlen", "takes no causal, varlen"),
])
def test_case_grammar_rejects_bad_strings(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_case(text)
    if text:
        assert repr(text.strip()) in str(info.value) or "h_q" in str(info.value) or "zero" in str(info.value)


def test_parse_cases_splits_on_space_and_semicolon():
    cases = parse_cases("1x1x64:h16; 2x1x128:h32  3x2x1k:h16,causal")
    assert [c.b for c in cases] == [1, 2, 3]
    with pytest.raises(ValueError, match="no case"):
        parse_cases("  ")


# ----------------------------------------------------------------------------------------------------------
# Presets


def test_flashmla_preset_is_the_baseline_csv():
    baseline = pd.read_csv(BASELINE_CSV)
    keys = [tuple(r) for r in baseline[["b", "s_q", "s_k", "h_q", "causal", "varlen"]].itertuples(index=False)]
    assert [c.baseline_key for c in expand_presets(["flashmla"])] == keys == [tuple(c) for c in FLASHMLA_CONFIGS]


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_expand(name):
    cases = expand_presets([name])
    assert cases and len(cases) == len(set(cases))
    for case in cases:
        assert parse_case(case.spec) == case
        case.decode_case()  # a valid cutemla.testing.DecodeCase


def test_preset_contents():
    long = expand_presets(["long-context"])
    assert {c.b for c in long} <= set(range(1, 17)) and max(c.s_k for c in long) == 128 * 1024
    assert all(c.h_q * c.s_q <= 64 for c in expand_presets(["memory-bound"]))
    assert all(c.h_q == 128 for c in expand_presets(["compute-bound"]))
    serving = expand_presets(["serving"])
    assert any(c.zero_frac for c in serving) and all(c.varlen for c in serving)
    fp8 = expand_presets(["fp8"])
    sparse = [(c.b, c.s_q, c.h_q, c.topk, c.s_k) for c in fp8 if c.topk]
    assert sparse[:8] == sparse_fp8.PRESETS["flashmla"]  # FlashMLA's V3.2 cases, then TP ranks
    assert {c.h_q for c in fp8 if c.topk} == {16, 32, 64, 128}
    dense = [c for c in fp8 if not c.topk]
    assert dense and all(c.fp8 and c.h_kv == 1 and c.dtype == "bf16" for c in dense)
    both = expand_presets(["flashmla", "flashmla"])
    assert len(both) == 28
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        expand_presets(["nope"])


# ----------------------------------------------------------------------------------------------------------
# Roofline, peaks, timers


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H800", "H800 SXM"),
    ("NVIDIA H20", "H20"),
    ("cpu", "assumed H100 SXM"),
    ("NVIDIA A100-SXM4-80GB", "assumed H100 SXM"),
])
def test_device_peaks(name, label):
    assert device_peaks(name).label == label


def test_roofline_matches_baseline_formulas():
    h100 = device_peaks("NVIDIA H100 80GB HBM3")
    assert (h100.hbm_bytes_per_s, h100.flops_per_s) == (3.35e12, 989.4e12)
    # Baseline row: flashmla,32,1,2048,16,0,0,2048,36.17,63.1,2118
    flops, nbytes = decode_flops(32, 1, 16, 1, 2048), decode_bytes(32, 1, 16, 1, 2048)
    r = roofline(flops, nbytes, 36.17e-6, h100)
    assert r["tflops"] == pytest.approx(63.1, abs=0.05) and r["gbps"] == pytest.approx(2118, abs=1)
    assert r["bound"] == "memory"
    assert r["roofline_frac"] == pytest.approx(nbytes / 3.35e12 / 36.17e-6)
    # 128 heads, s_q 2: intensity ~ 1.9 * 256 > ridge 295 -> compute-bound
    big = roofline(decode_flops(128, 2, 128, 1, 8234), decode_bytes(128, 2, 128, 1, 8234), 821.56e-6, h100)
    assert big["bound"] == "compute" and big["intensity"] > h100.ridge_flops_per_byte
    assert math.isnan(roofline(1.0, 1.0, 0.0, h100)["tflops"])


def test_classify_kernel_and_rotation():
    assert classify_kernel("kernel_cutlass_kernel_cutemlaschedule_DecodingSchedMetaKernel_object") == "scheduler"
    assert classify_kernel("kernel_cutlass_kernel_cutemla_kernels_decode_MlaDecode_object_1") == "decode"
    assert classify_kernel("kernel_cutlass_kernel_cutemla_kernels_combine_MlaCombine_object") == "combine"
    assert classify_kernel("void flash::flash_fwd_splitkv_mla_kernel<...>") == "decode"
    assert classify_kernel("void flash::flash_fwd_mla_combine_kernel<...>") == "combine"
    assert classify_kernel("void at::native::vectorized_elementwise_kernel<4>") == "other"
    assert rotation_copies(10 * 2**20, 50 * 2**20) == 15
    assert rotation_copies(1 * 2**20, 50 * 2**20) == 16  # capped
    assert rotation_copies(400 * 2**20, 50 * 2**20) == 1


def test_time_host_reports_median_and_min():
    calls = []
    timing = time_host(lambda: calls.append(1), trials=4, replays=3, warmup=2)
    assert len(calls) == 2 + 4 * 3 and len(timing.samples_us) == 4
    assert timing.min_us <= timing.median_us and timing.method == "host"


# ----------------------------------------------------------------------------------------------------------
# Dry-run sweep: CSV schema, rows, plots


CASES = "32x1x2k:h16 3x2x200:h8,kv2,causal,varlen,fp16"
PROVIDERS = ["cutemla", "reference", "sdpa", "sdpa-latent", "flashinfer", "flashmla-baseline"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sweep")
    out = out_dir / "dry.csv"
    base = out_dir / "base.csv"
    rc = sweep.main(["--case", CASES, "--dry-run", "--out", str(out), "--no-progress", "--trials", "2",
                     "--replays", "1", "--baseline-format", str(base)])
    assert rc == 0
    return out, base


def test_dry_run_csv_schema(dry_run):
    out, _ = dry_run
    raw = pd.read_csv(out)
    assert list(raw.columns) == COLUMNS
    frame = read_results(out)
    for column, dtype in DTYPES.items():
        if dtype == "str":
            assert pd.api.types.is_string_dtype(frame[column]), column
        else:
            assert str(frame[column].dtype) == dtype, (column, frame[column].dtype)
    cases = [c.spec for c in parse_cases(CASES)]
    assert len(frame) == len(cases) * len(PROVIDERS)
    pairs = set(zip(frame.provider, frame.case))
    assert pairs == {(p, c) for p in PROVIDERS for c in cases}


def test_dry_run_rows(dry_run):
    frame = read_results(dry_run[0]).set_index(["provider", "case"])
    fixed, varlen = (c.spec for c in parse_cases(CASES))
    for provider in ("cutemla", "reference", "sdpa", "sdpa-latent"):
        for case in (fixed, varlen):
            row = frame.loc[(provider, case)]
            assert row.status == "ok", (provider, case, row.status)
            assert row.device == "cpu" and row.dry_run == 1 and math.isnan(row.sm_clock_mhz)
            assert row.t_reuse_min_us > 0 and row.t_full_min_us > 0 and row.timing_reuse == "host"
            assert row.tflops > 0 and row.gbps > 0 and 0 < row.roofline_frac < 1
            assert row.peak_source == "assumed H100 SXM" and row.bound in ("memory", "compute")
            assert row.b <= 2 and row.h_q <= 16 and row.s_k <= 96  # shrunk
    ours = frame.loc[("cutemla", fixed)]
    assert ours.backend == "reference" and ours.max_abs_err == 0.0
    # CPU plans for 132 SMs (H100): 16 heads = one 64-row block -> 132 partitions; lengths 96 -> split pieces.
    from cutemla.schedule import get_decoding_sched_meta

    meta, splits = get_decoding_sched_meta(torch.full((2,), 96, dtype=torch.int32), 1, 16, 1)
    assert ours.num_sm_parts == meta.shape[0] == 132 and ours.total_splits == int(splits[-1]) > 2
    assert frame.loc[("sdpa-latent", fixed)].max_abs_err < 1e-3  # same math, real cache
    assert frame.loc[("cutemla", varlen)].h_kv == 2 and frame.loc[("cutemla", varlen)]["dtype"] == "fp16"
    assert frame.loc[("flashinfer", fixed)].status.startswith("skipped") or frame.loc[("flashinfer", fixed)].status == "ok"
    baseline = frame.loc[("flashmla-baseline", fixed)]
    assert baseline.status == "ok" and baseline.t_reuse_min_us == pytest.approx(36.17)
    assert baseline.tflops == pytest.approx(63.1, abs=0.05) and baseline.gbps == pytest.approx(2118, abs=1)
    assert baseline.device.startswith("NVIDIA H100") and baseline.b == 32 and baseline.dry_run == 1
    assert frame.loc[("flashmla-baseline", varlen)].status.startswith("skipped: no baseline row")


def test_dry_run_plots_and_baseline_format(dry_run):
    out, base = dry_run
    for suffix in ("time", "roofline-frac", "roofline"):
        png = out.parent / f"{out.stem}-{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = pd.read_csv(base)
    assert list(table.columns) == BASELINE_FIELDS and set(table.impl) == {"cutemla"} and len(table) == 2


def test_example_results_csv_follows_schema():
    from perf.sweep import RESULTS_DIR

    path = RESULTS_DIR / "example-cpu-dryrun-flashmla.csv"
    frame = read_results(path)
    assert frame["dry_run"].all() and set(frame.provider) == set(PROVIDERS) and frame.case.nunique() == 28
    # Written before the FP8 columns: read_results fills them (cache = q's dtype, dense).
    assert "kv_format" not in pd.read_csv(path, nrows=1).columns
    assert (frame.kv_format == frame["dtype"]).all() and (frame.topk == 0).all()


# ----------------------------------------------------------------------------------------------------------
# FP8 rows: formulas (perf/sparse_fp8.py) and the dry run of the fp8 preset


def test_fp8_formulas():
    # FlashMLA's V3.2 case: b128, s_q 2, h_q 128, topk 2048 over 32k tokens.
    assert sparse_fp8.sparse_flops(128, 2, 128, 2048) == 146_028_888_064  # 2*b*s_q*h_q*topk*(576+512)
    assert sparse_fp8.fp8_bytes(128, 2, 128, 32768) == 71_303_168 + 32768 * 656  # q + out, 656 B per token
    indices = torch.tensor([[[0, 5, 5, -1], [7, 0, -1, -1]]], dtype=torch.int32)  # b1 s_q2 topk4: {0, 5, 7}
    flop, nbytes = sparse_fp8.metrics(1, 2, 16, 4, indices)
    assert flop == 2 * 1 * 2 * 16 * 4 * 1088 and nbytes == 2 * 1 * 2 * 16 * 1088 + 3 * 656
    seqlens = torch.tensor([100, 0, 28], dtype=torch.int32)  # dense FP8: every token of every request
    flop, nbytes = sparse_fp8.dense_fp8_metrics(3, 2, 16, seqlens)
    assert flop == decode_flops(3, 2, 16, 1, 128 / 3) == pytest.approx(2 * 2 * 16 * 128 * 1088)
    assert nbytes == 2 * 3 * 2 * 16 * 1088 + 128 * 656
    assert nbytes < decode_bytes(3, 2, 16, 1, 128 / 3)  # 656 < 1152 bytes per token
    # 1000 draws from 32k tokens: E[distinct] = s_kv * (1 - (1 - 1/s_kv)^(0.99 * 1000)) ~ 975
    assert sparse_fp8.expected_unique_tokens(1000, 32768) == pytest.approx(975.2, abs=0.1)
    assert sparse_fp8.flashmla_h800_tflops(128, 2, 128, 2048) == 410.0
    assert sparse_fp8.flashmla_h800_tflops(64, 2, 128, 2048) is None


FP8_PROVIDERS = ["cutemla", "reference", "sdpa-latent", "flashmla-baseline"]


@pytest.fixture(scope="module")
def fp8_dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-fp8") / "fp8.csv"
    rc = sweep.main(["--preset", "fp8", "--dry-run", "--out", str(out), "--no-progress", "--no-plots",
                     "--trials", "1", "--replays", "1", "--providers", ",".join(FP8_PROVIDERS)])
    assert rc == 0
    return read_results(out)


def test_fp8_dry_run_schema(fp8_dry_run):
    frame = fp8_dry_run
    assert list(frame.columns) == COLUMNS
    cases = [c.spec for c in expand_presets(["fp8"])]
    assert set(zip(frame.provider, frame.case)) == {(p, c) for p in FP8_PROVIDERS for c in cases}
    assert len(frame) == len(cases) * len(FP8_PROVIDERS) and (frame.kv_format == "fp8").all()
    assert (frame[frame.provider == "sdpa-latent"].status == "skipped: no FP8 cache in this provider").all()


def test_fp8_dry_run_rows(fp8_dry_run):
    frame = fp8_dry_run.set_index(["provider", "case"])
    for case in expand_presets(["fp8"]):
        small = case.shrunk()
        for provider in ("cutemla", "reference"):
            row = frame.loc[(provider, case.spec)]
            assert row.status == "ok", (provider, case.spec, row.status)
            assert row.dry_run == 1 and row.t_reuse_min_us > 0 and row.tflops > 0 and row.gbps > 0
            assert (row.b, row.s_q, row.s_k, row.h_q, row.topk) == (small.b, small.s_q, small.s_k, small.h_q,
                                                                     small.topk)
            q_out = 2.0 * small.b * small.s_q * small.h_q * 1088  # the CSV keeps 6 significant digits
            if case.topk:  # every slot counted; bytes = q + out + 656 per distinct token of the 2-page pool
                assert row.flops == pytest.approx(2.0 * small.b * small.s_q * small.h_q * small.topk * 1088, rel=1e-5)
                tokens = (row.bytes - q_out) / 656
                assert tokens == pytest.approx(round(tokens), abs=0.01) and 1 <= tokens <= 128
                assert 0.9 * small.topk <= row.mean_sk <= small.topk  # ~1% of the slots are -1
            else:  # every token of every request, 656 bytes each
                tokens = row.mean_sk * small.b
                assert row.flops == pytest.approx(2.0 * small.s_q * small.h_q * tokens * 1088, rel=1e-5)
                assert row.bytes == pytest.approx(q_out + tokens * 656, rel=1e-5)
        ours = frame.loc[("cutemla", case.spec)]
        assert ours.backend == "reference" and ours.max_abs_err == 0.0  # the reference path on the CPU
        assert math.isnan(ours.num_sm_parts) == bool(case.topk)  # dense FP8 has the split-KV schedule
    h800 = frame.loc[("flashmla-baseline", "128x2x32k:h128,fp8,topk2048")]
    assert h800.status == "ok" and h800.device == "NVIDIA H800" and h800.tflops == pytest.approx(410.0)
    assert h800.flops == pytest.approx(146_028_888_064, rel=1e-5)
    assert h800.t_reuse_min_us == pytest.approx(146_028_888_064 / 410e6, rel=1e-5)
    assert h800.bytes == pytest.approx(71_303_168 + 656 * 32768, rel=1e-3)  # ~all 32k tokens are hit
    assert h800.topk == 2048 and h800.h_q == 128 and h800.bound == "compute"
    others = frame.xs("flashmla-baseline", level="provider").drop(index="128x2x32k:h128,fp8,topk2048")
    assert others.status.str.startswith("skipped").all()


def test_to_frame_rejects_unknown_columns():
    with pytest.raises(KeyError, match="not in the schema"):
        to_frame([{"provider": "x", "bogus": 1}])


def test_sweep_cli_list_and_errors(capsys):
    assert sweep.main(["--list"]) == 0
    text = capsys.readouterr().out
    assert "flashmla" in text and "t_reuse_min_us" in text and "h16" in text
    with pytest.raises(SystemExit):
        sweep.main(["--dry-run"])  # no cases
    with pytest.raises(ValueError, match="unknown provider"):
        sweep.main(["--case", "1x1x64:h16", "--dry-run", "--providers", "nope"])


def test_bench_flashmla_alias(tmp_path):
    out = tmp_path / "bench.csv"
    rc = bench_flashmla.main(["--dry-run", "--cases", "small", "--out", str(out)])
    table = pd.read_csv(out)
    assert rc == 0 and list(table.columns) == BASELINE_FIELDS and (table.us > 0).all()
    assert len(table) == sum(1 for c in FLASHMLA_CONFIGS if c[0] * c[2] <= 2**19)


# ----------------------------------------------------------------------------------------------------------
# Profile report


def test_profile_report_on_cpu():
    report = profile_decode(DecodeCase(b=2, s_q=2, s_k=150, h_q=16, h_kv=1, causal=True), device="cpu",
                            iters=2, trials=2)
    assert isinstance(report, ProfileReport)
    table = report.table
    assert list(table.index) == ["scheduler", "decode", "combine", "other", "total"]
    assert table.loc["total", "time_us"] == pytest.approx(table.loc["scheduler", "time_us"] + table.loc["decode", "time_us"])
    assert table.loc["scheduler", "time_us"] > 0 and table.loc["decode", "time_us"] > 0
    assert table["share"].iloc[:4].sum() == pytest.approx(1.0)
    s = report.summary
    assert s["backend"] == "reference" and s["device"] == "cpu" and s["bound"] in ("memory", "compute")
    assert s["flops"] == pytest.approx(decode_flops(2, 2, 16, 1, s["mean_sk"]))
    assert s["tflops"] > 0 and s["gbps"] > 0 and 0 < s["roofline_frac"] < 1
    text = str(report)
    assert "scheduler" in text and "bound" in text and "assumed H100 SXM" in text


def test_profile_cli(capsys, tmp_path):
    csv = tmp_path / "stages.csv"
    assert perf_profile.main(["2x1x100:h16", "--device", "cpu", "--iters", "1", "--trials", "1", "--csv", str(csv)]) == 0
    assert "cutemla decode profile" in capsys.readouterr().out
    assert list(pd.read_csv(csv)["stage"]) == ["scheduler", "decode", "combine", "other", "total"]


def test_profile_rejects_bad_input():
    with pytest.raises(TypeError, match="DecodeCase or DecodeInputs"):
        profile_decode("2x1x100:h16")
    with pytest.raises(ValueError, match="iters and trials"):
        profile_decode(DecodeCase(b=1, s_q=1, s_k=64, h_q=16, h_kv=1), device="cpu", iters=0)


# ----------------------------------------------------------------------------------------------------------
# GPU (sm90): the real path


@pytest.mark.gpu
def test_gpu_sweep_and_profile(tmp_path):
    out = tmp_path / "gpu.csv"
    assert sweep.main(["--case", "32x1x2k:h16 4x2x4k:h128,causal,varlen", "--out", str(out), "--no-progress",
                       "--trials", "3", "--replays", "10", "--providers", "cutemla,reference,sdpa-latent,flashmla-baseline"]) == 0
    frame = read_results(out).set_index(["provider", "case"])
    ours = frame.loc[("cutemla", "32x1x2k:h16")]
    assert ours.status == "ok" and ours.backend == "kernel" and ours.timing_reuse == "graph"
    assert ours.max_abs_err < 1e-2 and ours.k_decode_us > 0 and ours.k_total_us > 0
    assert ours.t_full_min_us >= ours.t_reuse_min_us * 0.8 and ours.sm_clock_mhz > 0
    assert ours.compile_s > 0 and ours.cache_load_s > 0
    report = profile_decode(DecodeCase(b=8, s_q=1, s_k=4096, h_q=128, h_kv=1), device="cuda", iters=5, trials=2)
    assert report.summary["backend"] == "kernel" and report.table.loc["decode", "time_us"] > 0


@pytest.mark.filterwarnings("ignore:cutemla. CuTe DSL kernel unavailable")
def test_top_level_profile_decode_is_lazy_and_works_on_cpu():
    import cutemla
    from cutemla.testing import DecodeCase

    report = cutemla.profile_decode(DecodeCase(b=1, s_q=1, s_k=64, h_q=4, h_kv=1), device="cpu",
                                    iters=1, trials=1)
    assert {"scheduler", "decode", "total"} <= set(report.table.index)
    assert report.table.loc["total", "time_us"] > 0


def test_ab_scheduler_settings_parse_and_reject():
    from perf.ab import parse_scheduler_settings

    assert parse_scheduler_settings([]) == (None, None)
    assert parse_scheduler_settings(["sms=66", "o=3"]) == (66, 3)
    with pytest.raises(ValueError, match="sms=N or o=N"):
        parse_scheduler_settings(["parts=4"])


def test_ab_warm_up_replays_every_graph_before_timing():
    """perf.ab.warm_up: whole rounds of every graph until the time is up (none for 0 s), synchronising each."""
    from perf.ab import warm_up

    class Graph:
        def __init__(self):
            self.replays = 0

        def replay(self):
            self.replays += 1

    graphs = {"a": Graph(), "b": Graph()}
    syncs = []
    assert warm_up(graphs, 0.0, replays=3, synchronize=lambda: syncs.append(1)) == 0
    assert graphs["a"].replays == 0 and not syncs
    rounds = warm_up(graphs, 0.05, replays=3, synchronize=lambda: syncs.append(1))
    assert rounds >= 1 and len(syncs) == rounds
    assert graphs["a"].replays == graphs["b"].replays == 3 * rounds


def test_ab_case_specs():
    from perf.ab import FOCUS_CASES, parse_case

    assert parse_case("128x1x16384:h16") == FOCUS_CASES[0]  # a focus case keeps its varlen flag
    assert parse_case("16x1x8192:h16,varlen") == (16, 1, 8192, 16, True)
    assert parse_case("4x2x32768:h64") == (4, 2, 32768, 64, False)
    assert parse_case("16x1x8k:h16,varlen") == (16, 1, 8192, 16, True)  # perf.cases' grammar
    for bad in ("16x8192:h16", "16x1x8192:16", "16x1x8192:h16,causal", "16x1x8192:h16,kv2", "16x1x8192:h16,fp16"):
        with pytest.raises(SystemExit, match="--cases"):
            parse_case(bad)


# ----------------------------------------------------------------------------------------------------------
# Host overhead (CPU mode: everything but the compiled kernels runs)


def test_host_overhead_cpu_table(clean_api_state):
    from cutemla import kernels

    before = dict(kernels._compiled_launches)
    results = host_overhead.measure(iters=20, loops=1)
    names = list(results)
    assert len(names) == 7 and all(us > 0 for us in results.values())
    assert names[0].startswith("MLADecoder.run") and host_overhead.OLD_STYLE in names
    assert kernels._compiled_launches == before  # the stubs do not outlive the measurement


def test_ncu_waits_names_the_seesaw_barriers(tmp_path):
    """perf.ncu_waits: a try-wait's offset names its barrier and role; the retry branch's samples count."""
    import gzip

    from cutemla.kernels import seesaw
    from perf.ncu_waits import HANDOFFS, NUM_SUBTILES, barrier_names, read_source_page, wait_table

    # The tool's layout is the kernel's SharedStorage order.
    assert NUM_SUBTILES == seesaw.NUM_SUBTILES and len(HANDOFFS) == seesaw.NUM_HANDOFF
    assert HANDOFFS.index("SCALE1") == seesaw.HANDOFF_SCALE1
    assert HANDOFFS.index("P1_READY") == seesaw.HANDOFF_P1_READY
    names = barrier_names()
    assert names[0x68] == ("full stage 1 sub-tile 4", "consumer")
    assert names[0x90] == ("empty stage 0 half L", "producer")
    assert names[0xc8] == ("hand-off SCALE1", "consumer")
    header = '"Address","Source","Warp Stall Sampling (All Samples)"'
    rows = [
        '"0x0","      SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR33+0x68], R6","5"',
        '"0x10","@!P0  BRA 0x100","70"',
        '"0x20","HGMMA.64x64x16.F32.BF16 R152, gdesc[UR20], R152","10"',
        '"0x30","WARPGROUP.DEPBAR.LE gsb0, 0x0","15"',
        '"0x40","SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR33], R4","0"',
    ]
    path = tmp_path / "sass.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write('"Kernel Name","kernel_seesaw"\n' + "\n".join([header] + rows) + "\n")
    table = wait_table(read_source_page(str(path))).set_index("wait")
    assert table.loc["full stage 1 sub-tile 4", "samples"] == 75
    assert table.loc["full stage 1 sub-tile 4", "percent"] == 75.0
    assert table.loc["full stage 0 sub-tile 0", "samples"] == 0
    assert table.loc["WGMMA wait (WARPGROUP.DEPBAR)", "samples"] == 15
    assert table.loc["WGMMA issue (HGMMA)", "samples"] == 10


def _fake_tree(root, name):
    pkg = root / name / "cutemla"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    return str(root / name)


def test_ab_trees_runs_each_tree_from_its_own_directory(tmp_path):
    """The pitfall perf.ab_trees exists for: `python -m` (and -c) put the working directory ahead of PYTHONPATH,
    so a tree given only on PYTHONPATH is ignored; run from the tree's directory, its cutemla is found."""
    import subprocess

    from perf.ab_trees import REPO_ROOT, child_command

    tree = _fake_tree(tmp_path, "old")
    probe = [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('cutemla').origin)"]
    env = dict(os.environ, PYTHONPATH=tree)
    from_repo = subprocess.run(probe, cwd=REPO_ROOT, env=env, capture_output=True, text=True).stdout.strip()
    assert os.path.dirname(os.path.dirname(from_repo)) == REPO_ROOT  # the old tree was ignored
    cmd, child_env, cwd = child_command(tree, ["--cases", "1x1x64:h16"], "x.csv")
    assert cwd == tree and cmd[1:4] == ["-m", "perf.ab", "--cases"]
    assert child_env["PYTHONPATH"].split(os.pathsep)[0] == REPO_ROOT  # perf imports from the repository
    from_tree = subprocess.run(probe, cwd=cwd, env=child_env, capture_output=True, text=True).stdout.strip()
    assert from_tree == os.path.join(tree, "cutemla", "__init__.py")


def test_ab_trees_alternates_trees_and_rejects_a_foreign_cutemla(tmp_path, monkeypatch):
    import subprocess

    from perf import ab_trees

    new, old = _fake_tree(tmp_path, "new"), _fake_tree(tmp_path, "old")
    calls = []

    def fake_run(cmd, env, cwd, capture_output, text, timeout, lie=False):
        calls.append(cwd)
        out = cmd[cmd.index("--out") + 1]
        pd.DataFrame({"case": ["c"], "variant": ["seesaw:auto"], "us": [1.0],
                      "us_median_capture": [2.0 if cwd == new else 3.0]}).to_csv(out, index=False)
        ran = os.path.join(new if lie else cwd, "cutemla")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr=f"cutemla from {ran}\n")

    monkeypatch.setattr(ab_trees.subprocess, "run", fake_run)
    out = str(tmp_path / "ab.csv")
    args = ["--tree", f"new={new}", "--tree", f"old={old}", "--rounds", "2", "--cases", "1x1x64:h16", "--out", out]
    assert ab_trees.main(args) == 0
    assert calls == [new, old, new, old]
    frame = pd.read_csv(out)
    assert list(zip(frame["build"], frame["round"])) == [("new", 1), ("old", 1), ("new", 2), ("old", 2)]
    assert list(frame["us_median_capture"]) == [2.0, 3.0, 2.0, 3.0]
    monkeypatch.setattr(ab_trees.subprocess, "run", lambda *a, **k: fake_run(*a, **k, lie=True))
    with pytest.raises(RuntimeError, match="not the tree's own cutemla"):
        ab_trees.main(args)
    with pytest.raises(ValueError, match="no cutemla package"):
        ab_trees.parse_tree(f"x={tmp_path}")
    with pytest.raises(ValueError, match="expected name=path"):
        ab_trees.parse_tree("nopath")


def test_graph_stages_rows_and_combine_share(monkeypatch):
    """perf.graph_stages: one row per case, combine_share = 1 - decode / call, NaN for a missing combine graph
    (nothing split); the GPU parts (inputs, graphs, timing) are stubbed."""
    from perf import graph_stages

    timings = iter([{"call": 100.0, "decode": 90.0, "combine": 12.0}, {"call": 50.0, "decode": 50.0}])
    monkeypatch.setattr(graph_stages, "make_decode_inputs", lambda case, **kw: case)
    monkeypatch.setattr(graph_stages, "stage_graphs", lambda data, s_q, h_q, schedule=None: {})
    monkeypatch.setattr(graph_stages, "time_interleaved", lambda graphs, trials, replays, warmup_s: next(timings))
    monkeypatch.setattr(graph_stages.torch.cuda, "get_device_name", lambda: "fake")
    monkeypatch.setattr(graph_stages.torch.cuda, "empty_cache", lambda: None)
    frame = graph_stages.run([(128, 2, 4096, 128, True), (1, 1, 64, 16, False)])
    assert list(frame["case"]) == ["128x2x4096:h128,varlen", "1x1x64:h16"]
    assert frame["combine_share"].tolist() == [0.1, 0.0]
    assert frame["combine_us"].iloc[0] == 12.0 and math.isnan(frame["combine_us"].iloc[1])
    with pytest.raises(SystemExit):
        graph_stages.main(["--cases", "not-a-case"])


def test_ab_case_label_reads_back():
    """perf.ab's `case` column (shared by perf.graph_stages) parses back to the same case through --cases."""
    from perf.ab import case_label, parse_case

    for case in [(128, 2, 4096, 128, True), (1, 1, 65536, 128, False), (32, 1, 2048, 16, False)]:
        assert parse_case(case_label(*case)) == case
    assert case_label(128, 2, 4096, 128, True) == "128x2x4096:h128,varlen"
