"""What the sweep records about the machine: device name, SM count, L2 size, clocks, roofline peaks."""
from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess

import torch

from cutemla.profile import DevicePeaks, device_peaks

__all__ = ["DeviceInfo", "query_device", "read_clocks", "git_sha"]


@dataclasses.dataclass
class DeviceInfo:
    device: torch.device
    name: str  # torch.cuda.get_device_name, or "cpu"
    num_sms: int  # 0 on CPU
    l2_bytes: int  # 0 on CPU
    peaks: DevicePeaks

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def query_device(device) -> DeviceInfo:
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceInfo(device, "cpu", 0, 0, device_peaks("cpu"))
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    name = torch.cuda.get_device_name(device)
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)  # H100: 50 MiB
    return DeviceInfo(device, name, props.multi_processor_count, l2, device_peaks(name))


def read_clocks(info: DeviceInfo) -> dict:
    """Current and maximum SM clock and the memory clock in MHz (NaN where unknown, always on CPU).

    nvidia-smi first (its index is the CUDA index unless CUDA_VISIBLE_DEVICES reorders devices, in which
    case the PCI bus id picks the right one), then ``torch.cuda.clock_rate`` (needs pynvml) for the SM clock.
    """
    clocks = {"sm_clock_mhz": math.nan, "sm_clock_max_mhz": math.nan, "mem_clock_mhz": math.nan}
    if not info.is_cuda:
        return clocks
    if shutil.which("nvidia-smi"):
        try:
            props = torch.cuda.get_device_properties(info.device)
            bus = f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            target = ["--id", bus] if hasattr(props, "pci_bus_id") else ["-i", str(info.device.index or 0)]
        except Exception:  # older torch: no PCI ids
            target = ["-i", str(info.device.index or 0)]
        try:
            out = subprocess.run(
                ["nvidia-smi", *target, "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem",
                 "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True).stdout.strip().splitlines()[0]
            values = [float(v) if v.strip().replace(".", "").isdigit() else math.nan for v in out.split(",")]
            clocks.update(zip(("sm_clock_mhz", "sm_clock_max_mhz", "mem_clock_mhz"), values))
            return clocks
        except Exception:
            pass
    try:
        clocks["sm_clock_mhz"] = float(torch.cuda.clock_rate(info.device))
    except Exception:
        pass
    return clocks


def git_sha(root=None) -> str:
    """Short commit of the checkout (read-only ``git rev-parse``), or "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip() or "unknown"
    except Exception:
        return "unknown"
