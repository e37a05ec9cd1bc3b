"""Static SASS instruction counts of a kernel's loops (CPU only: nvdisasm on a cubin kept at compile time).

    python -m perf.sass_loops cutemla.kernels.sparse_decode sparse_fp8 [--nvdisasm PATH] [--min 100]

compiles the config with ``--keep-cubin`` (no GPU needed), disassembles it and prints, for every loop (a
backward branch) of at least ``--min`` instructions, its address range, size and opcode histogram. Loops are
tagged HGMMA (consumer tile loops) or E4M3/HMUL2 (FP8 producer tile loops). Counts are static: each
instruction once, whether a branch skips it or not. Get nvdisasm from the ``nvidia-cuda-nvdisasm`` wheel
(``pip download nvidia-cuda-nvdisasm`` and unpack it) if the CUDA toolkit is absent.
"""
from __future__ import annotations

import argparse
import collections
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

KEEP = ("F2FP", "HADD2", "HMUL2", "LDG", "STS", "F2F", "PRMT", "I2F")


def parse(sass: str):
    """(instructions [(address, opcode, text)], labels {name: instruction index})."""
    insts, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(insts)
            continue
        m = re.match(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            text = m.group(2)
            op = re.sub(r"^@!?U?P[T0-9]\s+", "", text).split()[0]
            insts.append((int(m.group(1), 16), op, text))
    return insts, labels


def loops(insts, labels):
    """(first, last) instruction indices of every backward branch's range."""
    out = []
    for i, (_, op, text) in enumerate(insts):
        if op.startswith("BRA"):
            m = re.search(r"(\.L_x_\d+)", text)
            if m and labels.get(m.group(1), len(insts)) <= i:
                out.append((labels[m.group(1)], i))
    return out


def histogram(insts, lo, hi):
    counts = collections.Counter()
    for _, op, _ in insts[lo:hi + 1]:
        base = op.split(".")[0]
        counts[op if base in KEEP else base] += 1
    return counts


def report(sass: str, min_size: int = 100) -> list[dict]:
    insts, labels = parse(sass)
    rows = []
    for lo, hi in loops(insts, labels):
        if hi - lo + 1 < min_size:
            continue
        counts = histogram(insts, lo, hi)
        tags = [t for t in ("HGMMA", "E4M3", "HMUL2") if any(t in k for k in counts)]
        rows.append(dict(start=insts[lo][0], end=insts[hi][0], size=hi - lo + 1, tags=tags,
                         ops=dict(counts.most_common())))
    return rows


def compile_cubin(module_name: str, config: str, dump_dir: str) -> str:
    from cutemla.kernels.jit import GPU_ARCH

    os.environ["CUTEMLA_DISK_CACHE"] = "0"
    importlib.import_module(module_name).compile_configs()[config](
        f"--gpu-arch {GPU_ARCH} --enable-tvm-ffi --keep-cubin --dump-dir={dump_dir}")
    return glob.glob(os.path.join(dump_dir, "**", "*.cubin"), recursive=True)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module")
    parser.add_argument("config")
    parser.add_argument("--nvdisasm", default=shutil.which("nvdisasm") or "/tmp/nvd/x/nvidia/cu13/bin/nvdisasm")
    parser.add_argument("--min", type=int, default=100, help="smallest loop to print (instructions)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cutemla_sass_") as d:
        cubin = compile_cubin(args.module, args.config, d)
        sass = subprocess.run([args.nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    for row in report(sass, args.min):
        print(f"loop {row['start']:#06x}-{row['end']:#06x} {row['size']} instructions {row['tags']}")
        print("  " + " ".join(f"{k}:{v}" for k, v in row["ops"].items()))


if __name__ == "__main__":
    sys.exit(main())
