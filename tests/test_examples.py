"""examples/serve_decode.py runs end to end on CPU (a subprocess, as a user would run it)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_decode_cpu():
    env = dict(os.environ, CUTEMLA_BACKEND="reference")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "serve_decode.py"), "--device", "cpu",
                             "--steps", "4", "--page-size", "2"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "final_len=4 pages/seq=2" in result.stdout  # the cache grew into a second page
    match = re.search(r"([0-9.]+) tokens/s", result.stdout)
    assert match and float(match.group(1)) > 0


@pytest.mark.gpu
def test_serve_decode_cuda_graph_matches_eager():
    def run(*extra):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "serve_decode.py"), "--device", "cuda",
                                 "--steps", "80", "--batch", "8", *extra],
                                capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        return result.stdout

    graph, eager = run(), run("--no-graph")
    assert "graph=True" in graph and "pages/seq=2" in graph and "graph=False" in eager
    tokens = [re.search(r"request 0 tokens: (.*)", out).group(1) for out in (graph, eager)]
    assert tokens[0] == tokens[1]  # replays with in-place updated buffers give the eager tokens
