"""The sweep CSV: long format, one row per (provider, case). Columns, dtypes and meaning.

Times are microseconds per call. ``full`` = the whole call (scheduler metadata + decode + combine);
``reuse`` = metadata computed once outside the timed region and reused (as every layer of a serving step
does, and as perf/baselines/flashmla_h100.csv measured). ``*_med_us`` is the median, ``*_min_us`` the minimum,
over ``trials`` samples, each the mean of ``replays`` back-to-back calls (the baseline's ``us`` is the min
of 5 means of 50 replays, so compare it with ``t_reuse_min_us``). Rates and the roofline use
``t_reuse_min_us`` and the provider's own work (``flops``, ``bytes``).
"""
from __future__ import annotations

import math

import pandas as pd

__all__ = ["COLUMNS", "DTYPES", "DESCRIPTIONS", "read_results", "to_frame", "to_baseline_format", "BASELINE_FIELDS"]

# name: (dtype, description)
_SCHEMA = {
    # identity
    "provider": ("str", "cutemla | reference | sdpa | sdpa-latent | flashinfer | flashmla-baseline"),
    "backend": ("str", "what ran: kernel / reference for cutemla; torch SDPA; flashinfer; baseline-csv"),
    "status": ("str", "ok, skipped: <why>, oom, or error: <exception>"),
    "case": ("str", "canonical case spec as requested (perf/cases.py grammar)"),
    "preset": ("str", "preset the case came from, or 'custom'"),
    "dry_run": ("int64", "1 when the run shrank the case for a CPU dry run (config columns = what ran)"),
    "device": ("str", "torch.cuda.get_device_name, 'cpu', or the baseline's device"),
    "num_sms": ("int64", "SM count (0 on CPU)"),
    "sm_clock_mhz": ("float64", "SM clock read after the case ran (nvidia-smi / torch.cuda.clock_rate)"),
    "sm_clock_max_mhz": ("float64", "max SM clock"),
    "mem_clock_mhz": ("float64", "memory clock"),
    "torch_version": ("str", "torch.__version__"),
    "git_sha": ("str", "short commit of the checkout"),
    "timestamp": ("str", "UTC start time of the sweep, ISO 8601"),
    # configuration (what ran)
    "b": ("int64", "batch size"),
    "s_q": ("int64", "queries per request"),
    "s_k": ("int64", "KV length (mean when varlen); sparse: cache tokens the indices are drawn from"),
    "h_q": ("int64", "query heads"),
    "h_kv": ("int64", "KV heads"),
    "d": ("int64", "q/k head dim (576 or 512)"),
    "dv": ("int64", "v head dim (512)"),
    "dtype": ("str", "bf16 | fp16: q (and, unless kv_format says otherwise, the cache)"),
    "kv_format": ("str", "cache format: bf16 | fp16 | fp8 (656-byte FlashMLA tokens, bytes count 656 per token)"),
    "topk": ("int64", "sparse top-k slots per query (s_k = cache tokens drawn from); 0 = dense decode"),
    "causal": ("int64", "1 = bottom-right causal"),
    "varlen": ("int64", "1 = lengths ~ N(s_k, (s_k/2)^2)"),
    "zero_frac": ("float64", "fraction of zero-length requests"),
    "mean_sk": ("float64", "mean KV length actually generated; sparse: valid (not -1) top-k slots per query"),
    "num_sm_parts": ("float64", "cutemla scheduler partitions (NaN for other providers)"),
    "total_splits": ("float64", "cutemla split-KV pieces num_splits[b] (NaN for other providers)"),
    # method
    "timing_full": ("str", "graph | events | host | n/a"),
    "timing_reuse": ("str", "graph | events | host | baseline-csv | reported (a published rate) | n/a"),
    "l2": ("str", "cold: rotate<N> input copies / cold: working set > 3x L2 / host"),
    "trials": ("int64", "timing samples"),
    "replays": ("int64", "calls per sample"),
    # results
    "t_full_med_us": ("float64", "whole call, median"),
    "t_full_min_us": ("float64", "whole call, min"),
    "t_reuse_med_us": ("float64", "metadata reused, median"),
    "t_reuse_min_us": ("float64", "metadata reused, min (the baseline's statistic)"),
    "k_sched_us": ("float64", "scheduler kernel time per call (torch.profiler)"),
    "k_decode_us": ("float64", "decode kernel time per call"),
    "k_combine_us": ("float64", "combine kernel time per call"),
    "k_other_us": ("float64", "other kernels per call"),
    "k_total_us": ("float64", "sum of kernel times per call"),
    "flops": ("float64", "FLOPs of the provider's computation"),
    "bytes": ("float64", "minimum bytes the provider's computation moves"),
    "tflops": ("float64", "flops / t_reuse_min_us"),
    "gbps": ("float64", "bytes / t_reuse_min_us (GB/s)"),
    "intensity": ("float64", "flops / bytes"),
    "bound": ("str", "memory | compute: the larger roofline term"),
    "t_roof_us": ("float64", "max(bytes / peak bandwidth, flops / peak rate)"),
    "roofline_frac": ("float64", "t_roof_us / t_reuse_min_us"),
    "peak_tflops": ("float64", "peak dense bf16 TFLOP/s used"),
    "peak_gbps": ("float64", "peak HBM GB/s used"),
    "peak_source": ("str", "which device's datasheet peaks (assumed H100 SXM when unknown)"),
    "compile_s": ("float64", "cutemla: first call with empty caches (compiles scheduler, decode, combine)"),
    "cache_load_s": ("float64", "cutemla: first call with the on-disk cache warm (load only)"),
    "max_abs_err": ("float64", "max |out - reference| where the case is small enough to check"),
    "note": ("str", "free text"),
}

# Columns added after CSVs were written: how to fill them when reading an older file.
_LATER_COLUMNS = {
    "kv_format": lambda frame: frame["dtype"],  # before FP8 rows every cache had q's dtype
    "topk": lambda frame: 0,  # and every row was dense
}

COLUMNS = list(_SCHEMA)
DTYPES = {name: dtype for name, (dtype, _) in _SCHEMA.items()}
DESCRIPTIONS = {name: text for name, (_, text) in _SCHEMA.items()}

STRING_COLUMNS = [c for c, t in DTYPES.items() if t == "str"]


def _as_text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows (dicts; missing keys become NaN / '') to a DataFrame with exactly :data:`COLUMNS` and dtypes."""
    unknown = sorted({k for row in rows for k in row} - set(COLUMNS))
    if unknown:
        raise KeyError(f"rows have columns not in the schema: {unknown}")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column, dtype in DTYPES.items():
        if dtype == "str":
            frame[column] = frame[column].map(_as_text).astype(str)
        elif dtype == "int64":
            frame[column] = frame[column].fillna(0).astype("int64")
        else:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def read_results(path) -> pd.DataFrame:
    """Read a sweep CSV back with the schema's dtypes (empty strings stay '' rather than NaN)."""
    frame = pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS}, keep_default_na=False,
                        na_values={c: ["", "nan", "NaN"] for c in COLUMNS if DTYPES[c] != "str"})
    for column, fill in _LATER_COLUMNS.items():
        if column not in frame.columns and "dtype" in frame.columns:
            frame[column] = fill(frame)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a cutemla sweep CSV, missing columns {missing}")
    return to_frame(frame[COLUMNS].to_dict("records"))


BASELINE_FIELDS = ["impl", "b", "s_q", "s_k", "h_q", "causal", "varlen", "mean_sk", "us", "tflops", "gbps",
                   "max_abs_err"]


def to_baseline_format(frame: pd.DataFrame) -> pd.DataFrame:
    """Sweep rows in the columns of perf/baselines/flashmla_h100.csv (``us`` = ``t_reuse_min_us``)."""
    out = pd.DataFrame({
        "impl": frame["provider"],
        "b": frame["b"], "s_q": frame["s_q"], "s_k": frame["s_k"], "h_q": frame["h_q"],
        "causal": frame["causal"], "varlen": frame["varlen"],
        "mean_sk": frame["mean_sk"].round().astype("int64"),
        "us": frame["t_reuse_min_us"].round(2),
        "tflops": frame["tflops"].round(1),
        "gbps": frame["gbps"].round(0),
        "max_abs_err": frame["max_abs_err"],
    })
    return out[BASELINE_FIELDS]
