"""A/B of whole source trees (two builds of cutemla) at the steady clock, each run from its own directory.

    python -m perf.ab_trees --tree new=. --tree old=dump/ab_old --rounds 2 --cases 256x1x1k:h128 --out ab.csv

Each (round, tree) runs ``perf.ab`` in a child process whose working directory is that tree, so its ``cutemla``
is the one imported: ``python -m`` puts the working directory ahead of ``PYTHONPATH`` on ``sys.path``, and an
old tree given only on ``PYTHONPATH`` from the main checkout's directory is silently ignored (the second
2026-11-26 session's "steady-clock" comparison ran main's code in both columns that way). This repository's
root goes on the child's ``PYTHONPATH`` so ``perf`` imports from a tree that holds only ``cutemla`` (``git
archive <sha> cutemla``); each child prints which ``cutemla`` it runs, and a child running another tree's is an
error. Trees alternate round by round (new, old, new, old), each with perf.ab's warm-up, so clock drift reaches
both alike. A tree's kernel cache is ``<tree>/.cute_cache`` unless CUTEMLA_CACHE_DIR is set for it beforehand
(warm it on the CPU: ``CUTEMLA_CACHE_DIR=<tree>/.cute_cache PYTHONPATH=<tree> python -m
cutemla.kernels.warmup --dtypes bf16 --head-dims 576``, from the tree's directory).

The output CSV is perf.ab's rows with ``build`` and ``round`` columns; the printout is the median-capture time
by case, build and round.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pandas as pd

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUNS_FROM = re.compile(r"^cutemla from (.+)$", re.MULTILINE)


def parse_tree(spec: str) -> tuple[str, str]:
    """``name=path`` -> (name, absolute path); the path must hold a ``cutemla`` package."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--tree {spec!r}: expected name=path")
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "cutemla", "__init__.py")):
        raise ValueError(f"--tree {spec!r}: {path} has no cutemla package")
    return name, path


def child_command(tree: str, ab_args: list[str], out_csv: str) -> tuple[list[str], dict, str]:
    """(argv, env, cwd) of one perf.ab run of `tree`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("CUTEMLA_CACHE_DIR", os.path.join(tree, ".cute_cache"))
    return [sys.executable, "-m", "perf.ab", *ab_args, "--out", out_csv], env, tree


def check_runs_from(log: str, tree: str) -> str:
    """The cutemla directory a child reported; raise if it is not `tree`'s own."""
    match = _RUNS_FROM.search(log)
    if not match:
        raise RuntimeError(f"perf.ab in {tree} did not report which cutemla it ran:\n{log[-2000:]}")
    ran = os.path.realpath(match.group(1))
    if ran != os.path.realpath(os.path.join(tree, "cutemla")):
        raise RuntimeError(f"perf.ab in {tree} ran {ran}, not the tree's own cutemla")
    return ran


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.ab_trees", description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="a source tree holding cutemla/ (at least two; run in the order given)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["seesaw:auto"])
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--captures", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per perf.ab run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    trees = [parse_tree(spec) for spec in args.tree]
    if len(trees) < 2 or len({name for name, _ in trees}) != len(trees):
        parser.error("give at least two --tree with distinct names")
    ab_args = ["--variants", *args.variants, "--captures", str(args.captures), "--cases", *args.cases]
    frames = []
    for round_ in range(1, args.rounds + 1):
        for name, tree in trees:
            out_csv = f"{args.out}.{name}.{round_}.csv"
            cmd, env, cwd = child_command(tree, ab_args, out_csv)
            proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=args.timeout)
            log = proc.stdout + proc.stderr
            if proc.returncode != 0:
                raise RuntimeError(f"perf.ab in {tree} failed ({proc.returncode}):\n{log[-4000:]}")
            ran = check_runs_from(log, tree)
            print(f"round {round_} {name}: {ran}", file=sys.stderr, flush=True)
            frame = pd.read_csv(out_csv)
            frame["build"], frame["round"] = name, round_
            frames.append(frame)
            os.remove(out_csv)
    result = pd.concat(frames, ignore_index=True)
    result.to_csv(args.out, index=False)
    print(result.pivot_table(index="case", columns=["build", "round"], values="us_median_capture").round(1)
          .to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
