"""Benchmark sweep: cutemla against other providers over named presets or custom cases, to a long CSV.

    python -m perf.sweep --preset flashmla                       # GPU: all providers, CSV + plots
    python -m perf.sweep --case "128x1x16k:h16 4x2x64k:h128,causal" --providers cutemla,flashinfer
    python -m perf.sweep --preset serving --dry-run              # CPU: tiny sizes, reference path, same schema
    python -m perf.sweep --preset fp8 --providers cutemla,reference,flashmla-baseline   # FP8 cache: sparse + dense
    python -m perf.sweep --list                                  # presets, providers, case grammar

Method (GPU). Inputs come from ``cutemla.testing.make_decode_inputs`` (FlashMLA's test data: randn/10
clamped, random page permutation, NaN past each length). Each provider's call is captured in one CUDA graph
holding one call per input copy: small cases cycle through enough copies of the cache that 3x the L2 passes
between two uses of a copy (``l2`` column), so every call reads HBM like the first layer of a step would.
Each of ``--trials`` samples is the mean of ``--replays`` graph replays; the CSV has the median and the min.
``full`` includes the scheduler (a fresh ``FlashMLASchedMeta`` per call); ``reuse`` reuses metadata as the
baseline did. Kernel times per stage come from ``torch.profiler`` over eager calls. Calls that cannot be
captured fall back to CUDA events (``timing_*`` columns). Columns: perf/schema.py.

FP8 cases (``fp8``, ``topk<N>``; preset ``fp8``): inputs, FLOPs and bytes (656 per cache token read) from
perf/sparse_fp8.py, so the rows match its standalone script; ``kv_format`` and ``topk`` say which kind ran.

``--dry-run`` (or ``--device cpu``): every case shrunk to b<=2, s_q<=2, s_k<=96, h_q<=16, topk<=64, the cutemla provider
runs the reference path, timing with ``time.perf_counter``; for CI and for the CSV schema, not for numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from cutemla.profile import kernel_stage_times, roofline, rotation_copies, time_cuda_events, time_cuda_graph, time_host

from .cases import PRESETS, SweepCase, expand_presets, parse_cases
from .device import DeviceInfo, git_sha, query_device, read_clocks
from .providers import PROVIDERS, Bench, Limits, get_provider
from .schema import COLUMNS, DESCRIPTIONS, to_frame

__all__ = ["SweepOptions", "run_sweep", "main", "DEFAULT_PROVIDERS"]

DEFAULT_PROVIDERS = ("cutemla", "reference", "sdpa", "sdpa-latent", "flashinfer", "flashmla-baseline")
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "perf" / "results"


@dataclasses.dataclass
class SweepOptions:
    device: str = "cuda"
    providers: Sequence[str] = DEFAULT_PROVIDERS
    trials: int = 10
    replays: int = 50
    dry_run: bool = False
    check: bool = True
    compile_timing: bool = True
    kernel_breakdown: bool = True
    l2_factor: float = 3.0
    reference_max_tokens: int = 1 << 17
    memory_budget_gib: Optional[float] = None  # default: min(16, 40% of free) on GPU, 0.25 on CPU
    progress: bool = True
    fail_fast: bool = False


# ----------------------------------------------------------------------------------------------------------
# Compile time and cache-load time (cutemla kernels, once per dtype and head dim)
# ----------------------------------------------------------------------------------------------------------


def measure_compile(case: SweepCase, device: torch.device) -> dict:
    """Wall time of the first whole call with empty caches (compiles scheduler, decode and combine) and of
    the first call with only the on-disk cache warm (loads the exported objects). Uses a fresh temporary
    ``CUTEMLA_CACHE_DIR`` and clears the in-memory cache; restores both afterwards."""
    from cutemla.interface import flash_mla_with_kvcache, get_mla_metadata
    from cutemla.kernels import jit
    from cutemla.testing import make_decode_inputs

    memory = getattr(jit.compile_cache, "_memory", None)
    if memory is None or os.environ.get("CUTEMLA_DISK_CACHE", "1") == "0":
        return {"compile_s": math.nan, "cache_load_s": math.nan}
    tiny = dataclasses.replace(case, b=1, s_q=1, s_k=256, h_q=16 if 16 % case.h_kv == 0 else case.h_kv,
                               varlen=False, zero_frac=0.0)
    data = make_decode_inputs(tiny.decode_case(), device)

    def first_call() -> float:
        memory.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        sched, _ = get_mla_metadata()
        flash_mla_with_kvcache(data.q, data.kcache, data.block_table, data.cache_seqlens, 512, sched)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    saved = dict(memory)
    old_dir = os.environ.get("CUTEMLA_CACHE_DIR")
    try:
        with tempfile.TemporaryDirectory(prefix="cutemla-compile-") as tmp:
            os.environ["CUTEMLA_CACHE_DIR"] = tmp
            compile_s = first_call()
            load_s = first_call()
    finally:
        if old_dir is None:
            os.environ.pop("CUTEMLA_CACHE_DIR", None)
        else:
            os.environ["CUTEMLA_CACHE_DIR"] = old_dir
        memory.clear()
        memory.update(saved)
    return {"compile_s": compile_s, "cache_load_s": load_s}


# ----------------------------------------------------------------------------------------------------------
# One (provider, case)
# ----------------------------------------------------------------------------------------------------------


def _time_calls(calls, capturable: bool, info: DeviceInfo, options: SweepOptions, slow: bool):
    trials, replays = options.trials, options.replays
    if not info.is_cuda:
        return time_host(calls[0], trials=trials, replays=replays)
    if slow:  # the reference: a Python loop with host syncs
        return time_cuda_events(calls[:1], trials=min(trials, 3), replays=1, warmup=1)
    if capturable:
        try:
            return time_cuda_graph(calls, trials=trials, replays=replays)
        except Exception as exc:  # capture failed: fall back to eager launches
            warnings.warn(f"CUDA graph capture failed ({exc!r}); timing eager launches with CUDA events")
            torch.cuda.synchronize()
    return time_cuda_events(calls, trials=trials, replays=max(1, replays // 5))


def _run_provider(provider, run_case: SweepCase, data, info: DeviceInfo, options: SweepOptions, limits: Limits,
                  reference_out, compile_times: dict) -> dict:
    row: dict = {}
    copies = rotation_copies(provider.working_set(data), info.l2_bytes, options.l2_factor) if info.is_cuda else 1
    bench: Bench = provider.build(data, copies)
    slow = provider.name == "reference"
    reuse = _time_calls(bench.reuse, bench.capturable, info, options, slow)
    row.update(timing_reuse=reuse.method, t_reuse_med_us=reuse.median_us, t_reuse_min_us=reuse.min_us)
    if bench.full is not None:
        full = _time_calls(bench.full, bench.capturable, info, options, slow)
        row.update(timing_full=full.method, t_full_med_us=full.median_us, t_full_min_us=full.min_us)
    elif bench.has_metadata:
        row.update(timing_full="n/a")
    else:  # no metadata step: the reused call is the whole call
        row.update(timing_full=reuse.method, t_full_med_us=reuse.median_us, t_full_min_us=reuse.min_us)
    if not info.is_cuda:
        row["l2"] = "host"
    elif slow:
        row["l2"] = "n/a (eager reference)"
    else:
        row["l2"] = f"cold: rotate{len(bench.reuse)}" if len(bench.reuse) > 1 else "cold: working set > 3x L2"
    row.update(backend=bench.backend, flops=bench.flops, bytes=bench.nbytes)
    row.update({k: v for k, v in bench.extra.items() if not k.startswith("_")})

    if info.is_cuda and options.kernel_breakdown:
        stages, _ = kernel_stage_times((bench.full or bench.reuse)[0], iters=1 if slow else 10)
        row.update(k_sched_us=stages["scheduler"], k_decode_us=stages["decode"], k_combine_us=stages["combine"],
                   k_other_us=stages["other"], k_total_us=stages["total"])
    if reference_out is not None and bench.output is not None:
        out = bench.output().float()
        row["max_abs_err"] = float((out - reference_out).abs().max())
    # measure_compile times the bf16 dense call; the FP8 kernels' first calls are not timed here.
    if provider.name == "cutemla" and bench.backend == "kernel" and options.compile_timing and not run_case.fp8:
        key = (run_case.dtype, run_case.d, run_case.h_kv)
        if key not in compile_times:
            compile_times[key] = measure_compile(run_case, data.q.device)
        row.update(compile_times[key])
    row.update(roofline(bench.flops, bench.nbytes, row["t_reuse_min_us"] * 1e-6, info.peaks))
    row["status"] = "ok"
    del bench
    return row


def _baseline_row(provider, case: SweepCase) -> dict:
    from cutemla.profile import device_peaks
    from cutemla.testing import decode_bytes, decode_flops

    if case.fp8:
        return _fp8_baseline_row(case)
    hit = provider.baseline_row(case)
    peaks = device_peaks(provider.device_name)
    row = dict(backend="baseline-csv", device=provider.device_name, num_sms=132, timing_full="n/a",
               timing_reuse="baseline-csv", l2="cold: working set > 3x L2 (FlashMLA method)", trials=5, replays=50,
               torch_version="2.11 (baseline)", git_sha="FlashMLA 9241ae3",
               b=case.b, s_q=case.s_q, s_k=case.s_k, h_q=case.h_q, h_kv=case.h_kv, d=case.d, dtype=case.dtype,
               kv_format=case.kv_format, topk=case.topk,
               causal=int(case.causal), varlen=int(case.varlen), zero_frac=case.zero_frac,
               peak_tflops=peaks.flops_per_s / 1e12, peak_gbps=peaks.hbm_bytes_per_s / 1e9, peak_source=peaks.label)
    if hit is None:
        row["status"] = "skipped: no baseline row for this config"
        return row
    mean_sk = float(hit["mean_sk"])
    flops = decode_flops(case.b, case.s_q, case.h_q, 1, mean_sk)
    nbytes = decode_bytes(case.b, case.s_q, case.h_q, 1, mean_sk)
    row.update(status="ok", mean_sk=mean_sk, t_reuse_min_us=float(hit["us"]), flops=flops, bytes=nbytes,
               max_abs_err=hit["max_abs_err"], note="FlashMLA on H100 (perf/baselines/README.md)")
    row.update(roofline(flops, nbytes, float(hit["us"]) * 1e-6, peaks))
    return row


def _fp8_baseline_row(case: SweepCase) -> dict:
    """FlashMLA's one published FP8 number: ~410 TFLOP/s on an H800 for its b128 s_q2 h128 topk2048 sparse case
    (design/flashmla.md §5). The time is derived from that rate; bytes use the expected distinct tokens of
    perf/sparse_fp8.py's index draw (no indices are drawn for this row)."""
    from cutemla.profile import device_peaks

    from .sparse_fp8 import INVALID_FRAC, expected_unique_tokens, flashmla_h800_tflops, fp8_bytes, sparse_flops

    tflops = flashmla_h800_tflops(case.b, case.s_q, case.h_q, case.topk) if case.topk else None
    peaks = device_peaks("NVIDIA H800")
    row = dict(backend="reported", device="NVIDIA H800", num_sms=132, timing_full="n/a", timing_reuse="reported",
               l2="n/a (reported rate)", git_sha="FlashMLA (design/flashmla.md §5)",
               b=case.b, s_q=case.s_q, s_k=case.s_k, h_q=case.h_q, h_kv=case.h_kv, d=case.d, dv=512,
               dtype=case.dtype, kv_format=case.kv_format, topk=case.topk, causal=int(case.causal),
               varlen=int(case.varlen), zero_frac=case.zero_frac,
               peak_tflops=peaks.flops_per_s / 1e12, peak_gbps=peaks.hbm_bytes_per_s / 1e9, peak_source=peaks.label)
    if tflops is None:
        row["status"] = "skipped: no FlashMLA number for this FP8 config"
        return row
    flops = sparse_flops(case.b, case.s_q, case.h_q, case.topk)
    tokens = case.s_k if case.s_k % 64 == 0 else -(-case.s_k // 64) * 64  # make_inputs rounds up to whole pages
    nbytes = fp8_bytes(case.b, case.s_q, case.h_q, expected_unique_tokens(case.b * case.s_q * case.topk, tokens))
    seconds = flops / (tflops * 1e12)
    row.update(status="ok", mean_sk=case.topk * (1 - INVALID_FRAC), t_reuse_min_us=seconds * 1e6, flops=flops,
               bytes=nbytes, note=f"FlashMLA reports ~{tflops:g} TFLOP/s on H800; time derived, not measured")
    row.update(roofline(flops, nbytes, seconds, peaks))
    return row


def _make_inputs(case: SweepCase, device: torch.device):
    """The case's tensors: FlashMLA-style test data, the FP8 cache packed from it, or sparse FP8 inputs."""
    on_device = device.type == "cuda"
    if case.topk:
        from .sparse_fp8 import make_sparse_inputs

        return make_sparse_inputs(case.b, case.s_q, case.h_q, case.topk, case.s_k, seed=case.seed, device=device,
                                  case=case)
    if case.fp8:
        from .sparse_fp8 import make_dense_fp8_inputs

        return make_dense_fp8_inputs(case.decode_case(), device, generate_on_device=on_device)
    from cutemla.testing import make_decode_inputs

    return make_decode_inputs(case.decode_case(), device, generate_on_device=on_device)


def _reference_output(case: SweepCase, data) -> torch.Tensor:
    """fp32 output of the reference matching the case's kind (bf16/fp16 dense, FP8 dense, FP8 sparse)."""
    if case.topk:
        from cutemla.reference_sparse import sparse_mla_decode_reference

        return sparse_mla_decode_reference(data.q, data.kcache, data.indices, attn_sink=data.attn_sink)[0].float()
    if case.fp8:
        from cutemla.reference_sparse import dense_fp8_mla_decode_reference

        return dense_fp8_mla_decode_reference(data.q, data.kcache, data.block_table, data.cache_seqlens, 512, None,
                                              case.causal)[0].float()
    from cutemla.reference import mla_decode_reference

    return mla_decode_reference(data.q, data.kcache, data.block_table, data.cache_seqlens, 512, None,
                                case.causal)[0].float()


def _memory_budget(info: DeviceInfo, options: SweepOptions) -> float:
    if options.memory_budget_gib is not None:
        return options.memory_budget_gib * 2**30
    if info.is_cuda:
        free, _ = torch.cuda.mem_get_info(info.device)
        return min(16 * 2**30, 0.4 * free)
    return 0.25 * 2**30


def _error_status(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    text = " ".join(str(exc).split())[:200]
    return f"error: {type(exc).__name__}: {text}"


def run_sweep(cases: Iterable, options: Optional[SweepOptions] = None) -> "object":
    """Run every provider on every case; return the long DataFrame (perf/schema.py columns).

    ``cases``: ``SweepCase`` objects or ``(preset_name, SweepCase)`` pairs.
    """
    options = options or SweepOptions()
    device = torch.device("cpu" if options.dry_run else options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available; use --dry-run (CPU) instead")
    labelled = [c if isinstance(c, tuple) else ("custom", c) for c in cases]
    providers = [get_provider(name) for name in options.providers]
    info = query_device(device)
    limits = Limits(options.reference_max_tokens, _memory_budget(info, options))
    common = dict(torch_version=torch.__version__, git_sha=git_sha(REPO_ROOT),
                  timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  trials=options.trials, replays=options.replays, dry_run=int(options.dry_run or device.type == "cpu"))
    compile_times: dict = {}
    rows: list[dict] = []

    from tqdm.auto import tqdm

    bar = tqdm(total=len(labelled) * len(providers), disable=not options.progress, unit="run", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cutemla: CuTe DSL kernel unavailable")
        try:
            for preset, case in labelled:
                run_case = case.shrunk() if common["dry_run"] else case
                data = reference_out = None
                case_rows = []
                for provider in providers:
                    bar.set_description(f"{case.spec} {provider.name}")
                    row = dict(common, provider=provider.name, case=case.spec, preset=preset)
                    if not provider.needs_inputs:
                        row.update(_baseline_row(provider, case))
                        rows.append(row)  # its own device: no clock columns
                        bar.update()
                        continue
                    row.update(device=info.name, num_sms=info.num_sms, b=run_case.b, s_q=run_case.s_q, s_k=run_case.s_k,
                               h_q=run_case.h_q, h_kv=run_case.h_kv, d=run_case.d, dv=512, dtype=run_case.dtype,
                               kv_format=run_case.kv_format, topk=run_case.topk,
                               causal=int(run_case.causal), varlen=int(run_case.varlen), zero_frac=run_case.zero_frac,
                               peak_tflops=info.peaks.flops_per_s / 1e12, peak_gbps=info.peaks.hbm_bytes_per_s / 1e9,
                               peak_source=info.peaks.label)
                    try:
                        reason = provider.skip_reason(run_case, limits)
                        if reason:
                            row["status"] = reason
                        else:
                            if data is None:
                                data = _make_inputs(run_case, device)
                                if options.check and run_case.reference_tokens <= options.reference_max_tokens:
                                    reference_out = _reference_output(run_case, data)
                            row["mean_sk"] = float(data.mean_seqlen)
                            row.update(_run_provider(provider, run_case, data, info, options, limits, reference_out,
                                                     compile_times))
                    except Exception as exc:
                        if options.fail_fast:
                            raise
                        row["status"] = _error_status(exc)
                        if info.is_cuda:
                            with contextlib.suppress(Exception):
                                torch.cuda.synchronize()
                    rows.append(row)
                    case_rows.append(row)
                    if info.is_cuda:  # free this provider's copies before the next one allocates
                        gc.collect()
                        torch.cuda.empty_cache()
                    bar.update()
                clocks = read_clocks(info)
                for row in case_rows:
                    row.update(clocks)
                del data, reference_out
                if info.is_cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (e.g. `timeout`): keep the finished cases
            rows = [row for row in rows if row["case"] != case.spec]  # drop the unfinished case
            print(f"sweep interrupted at {case.spec}; writing the {len(rows)} rows before it",
                  file=sys.stderr)
    bar.close()
    return to_frame(rows)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _describe() -> str:
    from .cases import __doc__ as grammar

    lines = ["Presets:"]
    lines += [f"  {name:14s} {len(fn())} cases: {text}" for name, (fn, text) in PRESETS.items()]
    lines += ["Providers: " + ", ".join(PROVIDERS), "", grammar.strip(), "", "CSV columns:"]
    lines += [f"  {c:18s} {DESCRIPTIONS[c]}" for c in COLUMNS]
    return "\n".join(lines)


def default_output(presets: Sequence[str], info: DeviceInfo, dry_run: bool) -> Path:
    date = _dt.date.today().isoformat()
    tag = "cpu-dryrun" if dry_run or not info.is_cuda else info.peaks.label.split()[0].lower()
    if info.peaks.label.startswith("assumed") and info.is_cuda:
        tag = "".join(ch for ch in info.name.lower().replace("nvidia", "") if ch.isalnum()) or "gpu"
    what = "-".join(presets) if presets else "custom"
    return RESULTS_DIR / f"{date}-{tag}-{what}.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf.sweep", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", default=[], choices=list(PRESETS), help="repeatable")
    parser.add_argument("--case", action="append", default=[], help="case string(s), e.g. '128x1x16k:h16'")
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help="comma-separated")
    parser.add_argument("--out", type=Path, help="CSV path (default perf/results/<date>-<gpu>-<presets>.csv)")
    parser.add_argument("--plots", type=Path, help="directory for PNGs (default: next to the CSV)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--baseline-format", type=Path, help="also write cutemla rows in the baseline CSV format")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, or cpu (cpu implies --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, reference path")
    parser.add_argument("--trials", type=int, help="timing samples (default 10 GPU, 3 dry run)")
    parser.add_argument("--replays", type=int, help="calls per sample (default 50 GPU, 2 dry run)")
    parser.add_argument("--l2-factor", type=float, default=3.0,
                        help="rotate input copies until this many L2s pass between uses of one (0: no rotation, "
                             "the baseline's method)")
    parser.add_argument("--no-check", action="store_true", help="skip max |out - reference|")
    parser.add_argument("--no-compile-timing", action="store_true")
    parser.add_argument("--no-kernel-breakdown", action="store_true")
    parser.add_argument("--reference-max-tokens", type=int, default=1 << 17, help="b*s_k limit for the reference")
    parser.add_argument("--memory-budget-gib", type=float, help="limit for the SDPA providers' dense K/V")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--fail-fast", action="store_true", help="raise instead of recording error rows")
    parser.add_argument("--list", action="store_true", help="show presets, providers, grammar, columns")
    return parser


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # `timeout` sends SIGTERM: stop after the current provider and still write the finished cases.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    if args.list:
        print(_describe())
        return 0
    dry_run = args.dry_run or args.device == "cpu"
    cases = [(p, c) for p in args.preset for c in expand_presets([p])]
    for text in args.case:
        cases += [("custom", c) for c in parse_cases(text)]
    if not cases:
        build_parser().error("give at least one --preset or --case (see --list)")
    seen, unique = set(), []
    for preset, case in cases:
        if case not in seen:
            seen.add(case)
            unique.append((preset, case))
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for name in providers:
        get_provider(name)
    options = SweepOptions(
        device=args.device, providers=providers, dry_run=dry_run,
        trials=args.trials or (3 if dry_run else 10), replays=args.replays or (2 if dry_run else 50),
        check=not args.no_check, compile_timing=not args.no_compile_timing,
        kernel_breakdown=not args.no_kernel_breakdown, reference_max_tokens=args.reference_max_tokens,
        memory_budget_gib=args.memory_budget_gib, l2_factor=args.l2_factor, progress=not args.no_progress, fail_fast=args.fail_fast)
    frame = run_sweep(unique, options)
    info = query_device("cpu" if dry_run else args.device)
    out = args.out or default_output(args.preset, info, dry_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.6g")
    print(f"wrote {len(frame)} rows to {out}", file=sys.stderr)
    if args.baseline_format:
        from .schema import to_baseline_format

        ours = frame[(frame.provider == "cutemla") & (frame.status == "ok")]
        to_baseline_format(ours).to_csv(args.baseline_format, index=False)
    if not args.no_plots:
        from .plots import plot_sweep

        for path in plot_sweep(frame, args.plots or out.parent, out.stem):
            print(f"wrote {path}", file=sys.stderr)
    summary = frame[["provider", "case", "status", "t_full_med_us", "t_reuse_min_us", "tflops", "gbps",
                     "roofline_frac", "bound"]]
    with _pd_display():
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


@contextlib.contextmanager
def _pd_display():
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        yield


if __name__ == "__main__":
    sys.exit(main())
