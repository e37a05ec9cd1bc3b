"""Compile one kernel config for sm_90a on any machine (no GPU needed) and report on its PTX and ptxas.

Every kernel module lists its configs in ``compile_configs() -> {name: compile(options)}``.
ptxas prints its register and spill report to this process's stderr, so the check runs the compile
in a child process and reads that stream:

    python -m cutemla.kernels.ptx_report cutemla.kernels.combine bf16

prints one JSON line: registers, spill bytes, ptxas warnings, and counts of the PTX instructions
that prove the kernel is the Hopper design (wgmma, TMA bulk tensor copies, setmaxnreg...).
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

from .jit import report_options

PTX_MARKERS = {
    "wgmma": r"wgmma\.mma_async",
    "wgmma_m64n32k16": r"wgmma\.mma_async\.sync\.aligned\.m64n32k16",
    "wgmma_m64n64k16": r"wgmma\.mma_async\.sync\.aligned\.m64n64k16",
    "wgmma_m64n256k16": r"wgmma\.mma_async\.sync\.aligned\.m64n256k16",
    "tma_load": r"cp\.async\.bulk\.tensor\.\dd\.shared::(?:cta|cluster)\.global",
    "tma_prefetch": r"cp\.async\.bulk\.prefetch\.tensor",
    "bulk_store": r"cp\.async\.bulk\.global\.shared::cta",  # non-tensor bulk copies, smem -> global
    "st_global": r"\bst\.global\b",
    "setmaxnreg": r"setmaxnreg",
    "griddepcontrol": r"griddepcontrol",
    "bar_aligned": r"\bbar\.(?:sync|arrive)\b",
    "barrier_unaligned": r"\bbarrier\.(?:cta\.)?(?:sync|arrive)(?!\.aligned)\b",
    "local_memory": r"\.local\b",
    "target_sm90a": r"\.target sm_90a",
}


def compile_config(module_name: str, config: str, dump_dir: str) -> None:
    module = importlib.import_module(module_name)
    configs = module.compile_configs()
    configs[config](report_options(dump_dir))


def run_report(module_name: str, config: str, timeout: float = 600) -> dict:
    """Compile `config` of `module_name` in a child process; return the parsed report."""
    with tempfile.TemporaryDirectory(prefix="cutemla_ptx_") as dump_dir:
        env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTEMLA_DISK_CACHE="0")
        proc = subprocess.run(
            [sys.executable, "-c",
             "import sys; from cutemla.kernels.ptx_report import compile_config; "
             "compile_config(sys.argv[1], sys.argv[2], sys.argv[3])",
             module_name, config, dump_dir],
            capture_output=True, text=True, env=env, timeout=timeout,
        )
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"compile of {module_name}:{config} failed:\n{log[-6000:]}")
        ptx_files = glob.glob(os.path.join(dump_dir, "**", "*.ptx"), recursive=True)
        ptx = "\n".join(open(p).read() for p in ptx_files)
    return parse_report(log, ptx)


def parse_report(log: str, ptx: str) -> dict:
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    stack = [int(x) for x in re.findall(r"(\d+) bytes stack frame", log)]
    registers = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    warnings = sorted(set(re.findall(r"\b(C\d{4})\b", log)))
    return {
        "kernels": len(registers),
        "registers": registers,
        "spill_bytes": sum(spills),
        "stack_bytes": sum(stack),
        "ptxas_warnings": warnings,
        "ptx_bytes": len(ptx),
        "ptx": {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_MARKERS.items()},
    }


if __name__ == "__main__":
    print(json.dumps(run_report(sys.argv[1], sys.argv[2])))
