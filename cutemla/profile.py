"""Where the time of one MLA decode call goes, and the measurement helpers the perf tools share.

``profile_decode(inputs_or_case)`` (alias ``profile``) times one ``flash_mla_with_kvcache`` call and splits it
into stages (scheduler, decode, combine), with the achieved bandwidth and FLOP rate and which roofline bound
applies. On an sm90 GPU the stages are kernel times from ``torch.profiler`` and the call time comes from a
CUDA graph; elsewhere the call runs the PyTorch reference and the stages are host timings (scheduler, and the
reference as one "decode" stage that includes what the combine would do).

The helpers (device peaks, roofline, host / CUDA-event / CUDA-graph timers, kernel-to-stage attribution) are
used by ``perf/sweep.py`` too; they live here because ``perf/`` is not part of the installed package.
"""
from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
import warnings
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = [
    "DevicePeaks",
    "PEAKS",
    "ProfileReport",
    "Timing",
    "capture_cuda_graph",
    "classify_kernel",
    "device_peaks",
    "kernel_stage_times",
    "profile",
    "profile_decode",
    "roofline",
    "rotation_copies",
    "time_cuda_events",
    "time_cuda_graph",
    "time_host",
]

STAGES = ("scheduler", "decode", "combine", "other")


# ----------------------------------------------------------------------------------------------------------
# Device peaks and the roofline
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """Datasheet peaks: HBM bandwidth (bytes/s) and dense bf16/fp16 tensor-core rate (FLOP/s, no sparsity)."""

    label: str
    hbm_bytes_per_s: float
    flops_per_s: float

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity where the memory and compute roofs meet."""
        return self.flops_per_s / self.hbm_bytes_per_s

    def describe(self) -> str:
        return f"{self.label} ({self.hbm_bytes_per_s / 1e12:.2f} TB/s, {self.flops_per_s / 1e12:.0f} TFLOP/s bf16)"


# Checked in order: the first pattern found in the device name wins (so "H100 NVL" before "H100", "H200"
# before "H20"). Numbers are NVIDIA datasheet values for the dense (non-sparse) bf16 rate.
PEAKS: tuple[tuple[str, DevicePeaks], ...] = (
    (r"H100\s*NVL", DevicePeaks("H100 NVL", 3.9e12, 835e12)),
    (r"H100\s*PCIe", DevicePeaks("H100 PCIe", 2.0e12, 756e12)),
    (r"GH200", DevicePeaks("GH200", 4.0e12, 989.4e12)),
    (r"H100", DevicePeaks("H100 SXM", 3.35e12, 989.4e12)),
    (r"H200\s*NVL", DevicePeaks("H200 NVL", 4.8e12, 835e12)),
    (r"H200", DevicePeaks("H200 SXM", 4.8e12, 989.4e12)),
    (r"H800\s*PCIe", DevicePeaks("H800 PCIe", 2.0e12, 756e12)),
    (r"H800", DevicePeaks("H800 SXM", 3.35e12, 989.4e12)),
    (r"H20\b", DevicePeaks("H20", 4.0e12, 148e12)),
)
H100_SXM = dict(PEAKS)[r"H100"]


def device_peaks(device_name: str) -> DevicePeaks:
    """Peaks for a device name such as ``torch.cuda.get_device_name()``.

    Unknown devices (a CPU, another GPU) get the H100 SXM numbers labelled ``"assumed H100 SXM"`` so that
    roofline columns stay defined; the label says they were assumed.
    """
    for pattern, peaks in PEAKS:
        if re.search(pattern, device_name or "", flags=re.IGNORECASE):
            return peaks
    return dataclasses.replace(H100_SXM, label="assumed H100 SXM")


def roofline(flops: float, nbytes: float, seconds: float, peaks: DevicePeaks) -> dict:
    """Achieved rates and the roofline position of one call that does ``flops`` and moves ``nbytes``.

    ``t_roof`` is the lower bound ``max(nbytes / bandwidth, flops / flop_rate)``; ``roofline_frac`` is
    ``t_roof / seconds`` (1.0 = at the roof); ``bound`` is whichever term is larger.
    """
    t_mem = nbytes / peaks.hbm_bytes_per_s
    t_compute = flops / peaks.flops_per_s
    t_roof = max(t_mem, t_compute)
    valid = seconds is not None and math.isfinite(seconds) and seconds > 0
    return {
        "tflops": flops / seconds / 1e12 if valid else math.nan,
        "gbps": nbytes / seconds / 1e9 if valid else math.nan,
        "intensity": flops / nbytes if nbytes else math.nan,
        "bound": "memory" if t_mem >= t_compute else "compute",
        "t_roof_us": t_roof * 1e6,
        "roofline_frac": t_roof / seconds if valid else math.nan,
    }


# ----------------------------------------------------------------------------------------------------------
# Timers
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Per-call times in microseconds: each sample is the mean over ``replays`` back-to-back calls."""

    median_us: float
    min_us: float
    method: str  # "graph", "events" or "host"
    samples_us: list

    @classmethod
    def from_samples(cls, samples_us: Sequence[float], method: str) -> "Timing":
        samples = [float(s) for s in samples_us]
        return cls(statistics.median(samples), min(samples), method, samples)


def time_host(fn: Callable[[], object], trials: int = 5, replays: int = 3, warmup: int = 1,
              sync: Optional[Callable[[], None]] = None) -> Timing:
    """Wall-clock timing with ``time.perf_counter`` (CPU work, or anything not capturable)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(replays):
            fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e6 / replays)
    return Timing.from_samples(samples, "host")


def time_cuda_events(fns: Sequence[Callable[[], object]], trials: int = 10, replays: int = 20,
                     warmup: int = 2) -> Timing:
    """Eager launches timed with CUDA events; ``fns`` are rotated (one per input copy) to keep L2 cold."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            for fn in fns:
                fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays * len(fns)))
    return Timing.from_samples(samples, "events")


def capture_cuda_graph(fns: Sequence[Callable[[], object]]) -> "torch.cuda.CUDAGraph":
    """One CUDA graph of the calls, replayed once (the first replay uploads it). The calls first run on a
    side stream (compiling or loading kernels and settling allocations outside the capture), as torch's
    graph docs require."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def time_cuda_graph(fns: Sequence[Callable[[], object]], trials: int = 10, replays: int = 50) -> Timing:
    """One CUDA graph holding one call per input copy (`capture_cuda_graph`), replayed ``replays`` times per
    trial. Each sample is the replay time divided by the calls per replay, so host launch overhead is gone
    and what is left is GPU time including launch gaps.
    """
    graph = capture_cuda_graph(fns)
    samples = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays * len(fns)))
    del graph
    return Timing.from_samples(samples, "graph")


def rotation_copies(working_set_bytes: float, l2_bytes: float, factor: float = 3.0, max_copies: int = 16) -> int:
    """Input copies to cycle through so that each call finds its data evicted from L2.

    A call whose working set is already ``factor`` times the L2 streams it out by itself (1 copy); a smaller
    one is cycled through enough copies that ``factor * L2`` bytes pass between two uses of the same copy.
    """
    if working_set_bytes <= 0 or l2_bytes <= 0 or working_set_bytes >= factor * l2_bytes:
        return 1
    return int(min(max_copies, math.ceil(factor * l2_bytes / working_set_bytes)))


# ----------------------------------------------------------------------------------------------------------
# Kernel stage attribution
# ----------------------------------------------------------------------------------------------------------

# Lower-case substrings of kernel names, checked in order. The CuTe DSL names a kernel after its class
# (DecodingSchedMetaKernel, MlaDecode, MlaCombine); FlashMLA's names are get_mla_metadata_kernel,
# flash_fwd_splitkv_mla_kernel and flash_fwd_mla_combine_kernel.
_STAGE_PATTERNS = (
    ("scheduler", ("schedmeta", "sched_meta", "metadata")),
    ("combine", ("combine",)),
    ("decode", ("mladecode", "mla_decode", "splitkv", "decode", "mla", "attention", "fmha", "flash", "sdpa")),
)


def classify_kernel(name: str) -> str:
    """The stage ("scheduler", "decode", "combine" or "other") a GPU kernel name belongs to."""
    lowered = name.lower().replace(" ", "")
    for stage, needles in _STAGE_PATTERNS:
        if any(n in lowered for n in needles):
            return stage
    return "other"


def kernel_stage_times(fn: Callable[[], object], iters: int = 10) -> tuple[dict, dict]:
    """GPU kernel time per call of ``fn``, by stage and by kernel name (microseconds), via torch.profiler.

    ``fn`` runs eagerly (not in a graph) ``iters`` times after one warm-up. Returns ``(by_stage, by_kernel)``;
    ``by_stage`` has every stage of :data:`STAGES` plus ``"total"``.
    """
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    by_kernel: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        by_kernel[event.name] = by_kernel.get(event.name, 0.0) + event.time_range.elapsed_us() / iters
    by_stage = {stage: 0.0 for stage in STAGES}
    for name, us in by_kernel.items():
        by_stage[classify_kernel(name)] += us
    by_stage["total"] = sum(by_kernel.values())
    return by_stage, by_kernel


# ----------------------------------------------------------------------------------------------------------
# The one-call profile report
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProfileReport:
    """``table``: a DataFrame indexed by stage (scheduler, decode, combine, other, total) with ``time_us``,
    ``share`` and ``source``; ``summary``: the call's configuration, rates and roofline position."""

    table: "object"  # pandas.DataFrame (pandas is imported lazily)
    summary: dict

    def __str__(self) -> str:
        s = self.summary
        lines = [
            f"cutemla decode profile: {s['case']} on {s['device']} (backend: {s['backend']})",
            self.table.to_string(float_format=lambda v: f"{v:,.2f}"),
            f"call: {s['t_call_us']:,.2f} us ({s['timing']}); metadata reused: {s['t_reuse_us']:,.2f} us",
            f"work: {s['flops'] / 1e9:,.3f} GFLOP, {s['bytes'] / 1e6:,.3f} MB "
            f"(intensity {s['intensity']:.1f} FLOP/B; ridge {s['ridge']:.0f} FLOP/B)",
            f"achieved: {s['tflops']:,.3f} TFLOP/s, {s['gbps']:,.1f} GB/s -> {s['bound']}-bound, "
            f"{100 * s['roofline_frac']:.2f}% of the roofline bound ({s['peaks']})",
        ]
        return "\n".join(lines)

    def _repr_html_(self) -> str:  # notebooks
        return f"<pre>{self}</pre>"


def _as_inputs(inputs, device):
    from cutemla.testing import DecodeCase, DecodeInputs, make_decode_inputs

    if isinstance(inputs, DecodeCase):
        dev = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        return make_decode_inputs(inputs, dev, generate_on_device=dev.type == "cuda")
    if isinstance(inputs, DecodeInputs):
        return inputs if device is None else inputs.to(device)
    raise TypeError(f"inputs must be a cutemla.testing.DecodeCase or DecodeInputs, got {type(inputs).__name__}")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def profile_decode(inputs, *, device: Union[str, torch.device, None] = None, causal: Optional[bool] = None,
                   iters: int = 20, trials: int = 5, peaks: Optional[DevicePeaks] = None) -> ProfileReport:
    """Profile one ``flash_mla_with_kvcache`` call.

    Args:
        inputs: a ``cutemla.testing.DecodeCase`` (inputs are generated, on ``device``) or ``DecodeInputs``.
        device: where to run; default CUDA when available, else CPU. ``DecodeInputs`` are moved there.
        causal: default ``inputs.case.causal``.
        iters: calls per timing sample (and profiled calls for the kernel breakdown).
        trials: timing samples; the report uses their median.
        peaks: roofline peaks; default from the device name (:func:`device_peaks`).

    Returns a :class:`ProfileReport`; ``print(report)`` shows the table.
    """
    import pandas as pd

    from cutemla.interface import active_backend, flash_mla_with_kvcache, get_mla_metadata
    from cutemla.schedule import get_decoding_sched_meta
    from cutemla.testing import decode_bytes, decode_flops

    if iters < 1 or trials < 1:
        raise ValueError(f"iters and trials must be >= 1, got {iters} and {trials}")
    data = _as_inputs(inputs, device)
    case = data.case
    q, kcache, block_table, seqlens = data.q, data.kcache, data.block_table, data.cache_seqlens
    dev = q.device
    causal = case.causal if causal is None else bool(causal)
    b, s_q, h_q, d = q.shape
    h_kv = kcache.shape[2]
    backend = active_backend(dev)
    peaks = peaks or device_peaks(_device_name(dev))

    meta, num_splits = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv, h_q)

    def full_call():
        sched, _ = get_mla_metadata()
        return flash_mla_with_kvcache(q, kcache, block_table, seqlens, 512, sched, causal=causal)

    def reuse_call():
        return flash_mla_with_kvcache(q, kcache, block_table, seqlens, 512, meta, num_splits, causal=causal)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cutemla: CuTe DSL kernel unavailable")
        if backend == "kernel":
            full = time_cuda_graph([full_call], trials=trials, replays=iters)
            reuse = time_cuda_graph([reuse_call], trials=trials, replays=iters)
            by_stage, _ = kernel_stage_times(full_call, iters=iters)
            source = {stage: "kernel (torch.profiler)" for stage in by_stage}
        else:
            sync = torch.cuda.synchronize if dev.type == "cuda" else None
            host_seqlens = seqlens.cpu()
            sched = time_host(lambda: get_decoding_sched_meta(host_seqlens, s_q, h_q, h_kv),
                              trials=trials, replays=iters, sync=sync)
            reuse = time_host(reuse_call, trials=trials, replays=max(1, iters // 10), sync=sync)
            full = Timing.from_samples([reuse.median_us + sched.median_us], "host")
            by_stage = {"scheduler": sched.median_us, "decode": reuse.median_us, "combine": 0.0, "other": 0.0}
            by_stage["total"] = by_stage["scheduler"] + by_stage["decode"]
            source = {"scheduler": "host (perf_counter)", "decode": "host: reference (incl. combine)",
                      "combine": "in decode", "other": "-", "total": "host"}

    total = by_stage["total"] or math.nan
    table = pd.DataFrame(
        {
            "time_us": [by_stage[s] for s in (*STAGES, "total")],
            "share": [by_stage[s] / total for s in (*STAGES, "total")],
            "source": [source.get(s, "-") for s in (*STAGES, "total")],
        },
        index=pd.Index([*STAGES, "total"], name="stage"),
    )
    mean_sk = float(seqlens.double().mean())
    flops = decode_flops(b, s_q, h_q, h_kv, mean_sk, d=d)
    nbytes = decode_bytes(b, s_q, h_q, h_kv, mean_sk, d=d)
    roof = roofline(flops, nbytes, full.median_us * 1e-6, peaks)
    summary = {
        "case": str(case), "device": _device_name(dev), "backend": backend, "causal": causal,
        "t_call_us": full.median_us, "t_reuse_us": reuse.median_us, "timing": full.method,
        "num_sm_parts": int(meta.shape[0]), "total_splits": int(num_splits[-1]),
        "mean_sk": mean_sk, "flops": flops, "bytes": nbytes, "peaks": peaks.describe(),
        "ridge": peaks.ridge_flops_per_byte, **roof,
    }
    return ProfileReport(table, summary)


profile = profile_decode
