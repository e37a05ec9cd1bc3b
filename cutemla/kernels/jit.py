"""Compiling CuTe DSL kernels: arch pinning, fake tensors, and a two-level compile cache.

Every kernel in cutemla is compiled ahead of its first call with fake tensors (symbolic shapes), for
sm_90a, with TVM-FFI so the compiled function takes torch tensors directly and launches on torch's
current stream. Compiled functions are cached in memory and, as exported object files, on disk:
a new process loads a kernel in milliseconds instead of recompiling it for seconds.

The disk cache key holds a fingerprint of cutemla's own sources and the DSL/TVM-FFI versions, so an
edit to any kernel file invalidates it. Set ``CUTEMLA_CACHE_DIR`` to move it (default
``~/.cache/cutemla``) and ``CUTEMLA_DISK_CACHE=0`` to turn it off.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

# The DSL snapshots CUTE_DSL_ARCH at import time and, with no GPU, silently targets sm_100a.
# cutemla only builds for Hopper, so pin it before anything imports cutlass.
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

GPU_ARCH = "sm_90a"
COMPILE_OPTIONS = f"--gpu-arch {GPU_ARCH} --enable-tvm-ffi"

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def cutlass_modules():
    """Import and return (cutlass, cute) with the arch pinned. Import lazily: it takes seconds."""
    import cutlass
    import cutlass.cute as cute

    return cutlass, cute


def _versions() -> str:
    import cutlass

    try:
        import tvm_ffi

        tvm_version = getattr(tvm_ffi, "__version__", "?")
    except ImportError:  # pragma: no cover - tvm_ffi is a hard dependency
        tvm_version = "none"
    return f"cutlass={cutlass.__version__};tvm_ffi={tvm_version};arch={GPU_ARCH}"


_fingerprint_cache: str | None = None


def source_fingerprint() -> str:
    """sha256 over cutemla's Python sources and the toolchain versions."""
    global _fingerprint_cache
    if _fingerprint_cache is None:
        h = hashlib.sha256(_versions().encode())
        for path in sorted(_PACKAGE_ROOT.rglob("*.py")):
            h.update(str(path.relative_to(_PACKAGE_ROOT)).encode())
            h.update(path.read_bytes())
        _fingerprint_cache = h.hexdigest()[:16]
    return _fingerprint_cache


def cache_dir() -> Path | None:
    if os.environ.get("CUTEMLA_DISK_CACHE", "1") == "0":
        return None
    root = os.environ.get("CUTEMLA_CACHE_DIR") or os.path.join(Path.home(), ".cache", "cutemla")
    return Path(root) / source_fingerprint()


class CompileCache:
    """Compiled kernels by (name, key): memory first, then disk, then a fresh ``cute.compile``.

    ``build`` must return a TVM-FFI compiled function (``cute.compile(..., options=COMPILE_OPTIONS)``).
    ``cute.compile`` is not thread-safe, so compiles are serialised with a process-wide lock.
    """

    def __init__(self):
        self._memory: dict[tuple, Callable] = {}
        self._lock = threading.Lock()
        self.stats = {"memory_hits": 0, "disk_hits": 0, "compiles": 0}

    def get(self, name: str, key: tuple, build: Callable[[], Callable]) -> Callable:
        full_key = (name, *key)
        fn = self._memory.get(full_key)
        if fn is not None:
            self.stats["memory_hits"] += 1
            return fn
        with self._lock:
            fn = self._memory.get(full_key)
            if fn is None:
                fn = self._load_or_build(name, full_key, build)
                self._memory[full_key] = fn
        return fn

    def _load_or_build(self, name: str, full_key: tuple, build: Callable[[], Callable]) -> Callable:
        directory = cache_dir()
        if directory is None:
            self.stats["compiles"] += 1
            return build()
        digest = hashlib.sha256(repr(full_key).encode()).hexdigest()[:24]
        obj_path = directory / f"{name}-{digest}.o"
        directory.mkdir(parents=True, exist_ok=True)
        # One lock per object: concurrent processes never build the same kernel twice, and
        # different kernels still build in parallel.
        with open(obj_path.with_suffix(".lock"), "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                if obj_path.exists():
                    try:
                        fn = _load_object(obj_path)
                        self.stats["disk_hits"] += 1
                        return fn
                    except Exception:  # a corrupt or stale object: rebuild it
                        obj_path.unlink(missing_ok=True)
                compiled = build()
                self.stats["compiles"] += 1
                tmp = obj_path.with_suffix(f".tmp{os.getpid()}")
                try:
                    compiled.export_to_c(str(tmp), function_name="fn")
                    os.replace(tmp, obj_path)
                except Exception:
                    tmp.unlink(missing_ok=True)
                return compiled
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _load_object(path: Path) -> Callable:
    import cutlass.cute as cute

    return cute.runtime.load_module(str(path), enable_tvm_ffi=True).fn


compile_cache = CompileCache()


def fake_stream():
    """A compile-time stream that becomes torch's current stream at call time (TVM-FFI env stream)."""
    from cutlass.cute.runtime import make_fake_stream

    return make_fake_stream(use_tvm_ffi_env_stream=True)


def report_options(dump_dir: str) -> str:
    """Options for CI checks: keep the PTX and let ptxas print registers and spills (to stderr)."""
    return f"--gpu-arch {GPU_ARCH} --enable-tvm-ffi --keep-ptx --dump-dir={dump_dir} remarks{{ptx}}"
