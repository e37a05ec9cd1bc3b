"""Plots of a sweep CSV (matplotlib, Agg): time and roofline fraction per case by provider, and a roofline."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["plot_sweep", "plot_time", "plot_roofline_fraction", "plot_roofline"]


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title_suffix(frame) -> str:
    devices = sorted(set(frame.loc[frame.provider != "flashmla-baseline", "device"]))
    dry = bool(frame["dry_run"].any())
    return f" ({', '.join(devices)}{'; CPU DRY RUN: not performance numbers' if dry else ''})"


def _grouped_bars(ax, frame, value: str, log: bool):
    ok = frame[frame.status == "ok"]
    cases = list(dict.fromkeys(frame["case"]))
    providers = list(dict.fromkeys(ok["provider"]))
    width = 0.8 / max(1, len(providers))
    x = np.arange(len(cases))
    for i, provider in enumerate(providers):
        sub = ok[ok.provider == provider].set_index("case")[value]
        heights = [float(sub.get(c, np.nan)) if c in sub.index else np.nan for c in cases]
        ax.bar(x + (i - (len(providers) - 1) / 2) * width, heights, width, label=provider)
    ax.set_xticks(x)
    ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot_time(frame, ax=None):
    """Per-call time with metadata reuse (min over trials), log scale, per case and provider."""
    plt = _pyplot()
    ax = ax or plt.subplots(figsize=(max(6, 0.45 * frame["case"].nunique() + 3), 4.5))[1]
    _grouped_bars(ax, frame, "t_reuse_min_us", log=True)
    ax.set_ylabel("us per call (metadata reused, min)")
    ax.set_title("MLA decode time" + _title_suffix(frame), fontsize=9)
    return ax


def plot_roofline_fraction(frame, ax=None):
    """Fraction of the roofline bound (t_roof / t) per case and provider."""
    plt = _pyplot()
    ax = ax or plt.subplots(figsize=(max(6, 0.45 * frame["case"].nunique() + 3), 4.5))[1]
    _grouped_bars(ax, frame, "roofline_frac", log=bool(frame["dry_run"].any()))
    ax.set_ylabel("fraction of roofline bound")
    ax.set_title("Roofline fraction" + _title_suffix(frame), fontsize=9)
    return ax


def plot_roofline(frame, peaks=None, ax=None):
    """Achieved TFLOP/s vs arithmetic intensity, with the memory and compute roofs of ``peaks``
    (default: the peaks recorded in the first row)."""
    plt = _pyplot()
    ax = ax or plt.subplots(figsize=(6.5, 4.5))[1]
    ok = frame[(frame.status == "ok") & frame["tflops"].notna()]
    if peaks is None:
        first = frame.iloc[0]
        bw, top, label = first["peak_gbps"] * 1e9, first["peak_tflops"] * 1e12, first["peak_source"]
    else:
        bw, top, label = peaks.hbm_bytes_per_s, peaks.flops_per_s, peaks.label
    intensities = ok["intensity"].to_numpy() if len(ok) else np.array([1.0, 1000.0])
    lo, hi = max(1e-1, np.nanmin(intensities) / 3), max(np.nanmax(intensities) * 3, 2 * top / bw)
    grid = np.logspace(np.log10(lo), np.log10(hi), 200)
    ax.plot(grid, np.minimum(grid * bw, top) / 1e12, "k-", lw=1.2, label=f"roof: {label}")
    for provider, sub in ok.groupby("provider", sort=False):
        ax.scatter(sub["intensity"], sub["tflops"], s=18, label=provider)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("Roofline" + _title_suffix(frame), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return ax


def plot_sweep(frame, out_dir, stem: str = "sweep", peaks: Optional[object] = None) -> list[Path]:
    """Write ``<stem>-time.png``, ``<stem>-roofline-frac.png`` and ``<stem>-roofline.png``; return the paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, draw in (("time", plot_time), ("roofline-frac", plot_roofline_fraction), ("roofline", plot_roofline)):
        ax = draw(frame) if draw is not plot_roofline else draw(frame, peaks)
        fig = ax.figure
        fig.tight_layout()
        path = out_dir / f"{stem}-{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
