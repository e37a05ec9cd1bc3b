"""The compile cache: a new process loads an exported kernel object instead of recompiling it.

Runs on the CPU: compiling and exporting need no GPU, and loading a TVM-FFI object only links it.
The combine kernel is used because it compiles in about a second.
"""
import json
import os
import subprocess
import sys

SCRIPT = """
import json, time
from cutemla.kernels import jit
from cutemla.kernels.combine import compile_combine
t0 = time.perf_counter()
fn = compile_combine("bf16")
print(json.dumps(dict(jit.compile_cache.stats, seconds=time.perf_counter() - t0,
                      fingerprint=jit.source_fingerprint(), callable=callable(fn))))
"""


def run_child(cache_dir):
    env = dict(os.environ, CUTEMLA_CACHE_DIR=str(cache_dir), CUTE_DSL_ARCH="sm_90a")
    env.pop("CUTEMLA_DISK_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_disk(tmp_path):
    first = run_child(tmp_path)
    assert first["compiles"] == 1 and first["disk_hits"] == 0 and first["callable"]
    objects = list((tmp_path / first["fingerprint"]).glob("combine-*.o"))
    assert len(objects) == 1 and objects[0].stat().st_size > 0

    second = run_child(tmp_path)
    assert second["compiles"] == 0 and second["disk_hits"] == 1 and second["callable"]
    assert second["seconds"] < first["seconds"]


def test_corrupt_object_is_rebuilt(tmp_path):
    first = run_child(tmp_path)
    (obj,) = (tmp_path / first["fingerprint"]).glob("combine-*.o")
    obj.write_bytes(b"not an object file")
    again = run_child(tmp_path)
    assert again["compiles"] == 1 and again["disk_hits"] == 0
    assert obj.stat().st_size > 100


def test_fingerprint_tracks_sources(tmp_path, monkeypatch):
    from cutemla.kernels import jit

    monkeypatch.setattr(jit, "_fingerprint_cache", None)
    before = jit.source_fingerprint()
    monkeypatch.setattr(jit, "_fingerprint_cache", None)
    fake_root = tmp_path / "pkg"
    fake_root.mkdir()
    (fake_root / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(jit, "_PACKAGE_ROOT", fake_root)
    one = jit.source_fingerprint()
    monkeypatch.setattr(jit, "_fingerprint_cache", None)
    (fake_root / "a.py").write_text("x = 2\n")
    two = jit.source_fingerprint()
    assert len({before, one, two}) == 3



def test_decode_variant_defaults_and_overrides(monkeypatch):
    from cutemla.kernels import DEFAULT_L2_PREFETCH, decode_variant

    monkeypatch.delenv("CUTEMLA_DECODE_SCHEDULE", raising=False)
    monkeypatch.delenv("CUTEMLA_L2_PREFETCH", raising=False)
    assert decode_variant(576, 128) == ("seesaw", 0)  # no L2 prefetch at any batch (measured slower)
    assert decode_variant(512, 128) == ("pipelined", DEFAULT_L2_PREFETCH)  # the seesaw needs d = 576
    assert decode_variant(512, 64) == ("pipelined", 0)
    monkeypatch.setenv("CUTEMLA_L2_PREFETCH", "2")
    assert decode_variant(576, 128) == ("seesaw", 2)
    monkeypatch.setenv("CUTEMLA_DECODE_SCHEDULE", "split_s")
    assert decode_variant(576, 64) == ("split_s", 2)
