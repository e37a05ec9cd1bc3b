"""Where the seesaw decode's warps wait, from an ncu profile's SASS source page (CPU only).

    ncu --set full -k regex:Seesaw --launch-skip 3 -c 1 -o prof python -m perf.profile 128x2x8k:h128 --iters 2
    ncu -i prof.ncu-rep --page source --csv --print-source sass > sass.csv      # (on the GPU host)
    python -m perf.ncu_waits sass.csv[.gz] [--top 20]

Every mbarrier wait in the SASS is a ``SYNCS.PHASECHK`` try-wait on ``[base + offset]`` followed by a branch
that retries it; the warp-stall samples of both are the time spent waiting there. The offset names the
barrier: the seesaw's ``SharedStorage`` starts with 18 K sub-tile "full" barriers (stage, sub-tile), 4
stage-half "empty" barriers, Q's full and empty, then the consumers' hand-offs (kernels/seesaw.py). Full,
Q-full and hand-off barriers are waited on by the consumer warpgroups, empty and Q-empty ones by the producer
warps, so a producer's idle time (waiting for a stage to be freed) is listed apart from a consumer's stall.
Also printed: the samples at WGMMA waits (``WARPGROUP.DEPBAR``) and at WGMMA issue (``HGMMA``).

The 2026-11-26 profile of 128x2x8k h128 (perf/results/2026-11-26-h100-ncu-waits.md) is how the seesaw's
refill waits were found.
"""
from __future__ import annotations

import argparse
import gzip
import io
import re

import pandas as pd

# The seesaw's mbarrier words, in SharedStorage order (kernels/seesaw.py): 8 bytes each.
NUM_SUBTILES = 9
HANDOFFS = ("SCALE0", "SCALE1", "P1_READY", "ROW_SUM")
_WAIT = re.compile(r"SYNCS\.PHASECHK\S*\s+P\d+,\s*\[U?R\d+(?:\+(0x[0-9a-f]+))?\]")


def barrier_names() -> dict[int, tuple[str, str]]:
    """Byte offset -> (barrier, the role that waits on it)."""
    names = [(f"full stage {i // NUM_SUBTILES} sub-tile {i % NUM_SUBTILES}", "consumer")
             for i in range(2 * NUM_SUBTILES)]
    names += [(f"empty stage {s} half {h}", "producer") for s in (0, 1) for h in "LR"]
    names += [("Q full", "consumer"), ("Q empty", "producer")]
    names += [(f"hand-off {h}", "consumer") for h in HANDOFFS]
    return {8 * i: n for i, n in enumerate(names)}


def read_source_page(path: str) -> pd.DataFrame:
    """The instruction table of ``ncu --page source --csv --print-source sass`` (first kernel; the line
    before the header names it)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    frame = pd.read_csv(io.StringIO("\n".join(lines[start:])))
    frame["samples"] = pd.to_numeric(frame["Warp Stall Sampling (All Samples)"], errors="coerce").fillna(0)
    frame["Source"] = frame["Source"].astype(str).str.strip()
    return frame


def wait_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of all warp-stall samples per barrier wait (try-wait + its retry branch), WGMMA wait and issue."""
    total = frame["samples"].sum()
    names = barrier_names()
    rows = {}
    src, samples = frame["Source"].tolist(), frame["samples"].tolist()
    for i, text in enumerate(src):
        m = _WAIT.search(text)
        if not m:
            continue
        offset = int(m.group(1), 16) if m.group(1) else 0
        name, role = names.get(offset, (f"mbarrier +{offset:#x}", "?"))
        waited = samples[i] + (samples[i + 1] if i + 1 < len(samples) else 0)
        rows[(name, role)] = rows.get((name, role), 0.0) + waited
    rows[("WGMMA wait (WARPGROUP.DEPBAR)", "consumer")] = sum(
        s for t, s in zip(src, samples) if t.startswith("WARPGROUP.DEPBAR"))
    rows[("WGMMA issue (HGMMA)", "consumer")] = sum(s for t, s in zip(src, samples) if "HGMMA" in t)
    table = pd.DataFrame([(n, r, s) for (n, r), s in rows.items()], columns=["wait", "role", "samples"])
    table["percent"] = (100.0 * table["samples"] / total).round(1) if total else 0.0
    return table.sort_values("samples", ascending=False, ignore_index=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.ncu_waits", description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output (.csv or .csv.gz)")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    frame = read_source_page(args.csv)
    print(f"{int(frame['samples'].sum())} warp-stall samples over {len(frame)} instructions")
    print(wait_table(frame).head(args.top).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
