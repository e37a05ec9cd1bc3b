"""Per-call reads of cutemla's environment variables at the cost of a dict lookup.

The eager decode path reads up to four variables per call (CUTEMLA_BACKEND, CUTEMLA_DEBUG,
CUTEMLA_DECODE_SCHEDULE, CUTEMLA_L2_PREFETCH), and ``os.environ.get`` encodes the name and goes through the
Mapping machinery each time (~1 us on the CPU machine, more on the H100 host). CPython's ``os.environ`` keeps
its encoded mapping in ``_data``, which every ``os.environ[...] = ...`` / ``del`` (``monkeypatch.setenv``
included) updates, so reading it directly sees exactly what ``os.environ.get`` would. Values are still read on
every call: tools such as perf/ab.py change them between calls.
"""
from __future__ import annotations

import os

_ENCODED_NAMES: dict = {}


def env_get(name: str) -> str | None:
    """``os.environ.get(name)``, without its per-call overhead when the variable is unset."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None:  # not CPython's os._Environ: the plain lookup
        return environ.get(name)
    key = _ENCODED_NAMES.get(name)
    if key is None:
        key = _ENCODED_NAMES[name] = environ.encodekey(name)
    raw = data.get(key)
    return None if raw is None else environ.decodevalue(raw)
