import pytest


def pytest_configure(config):
    # The CPU suite runs many small torch ops on a 2-core machine, where torch's intra-op thread pool
    # makes them several times slower than one thread. GPU runs are unaffected.
    import torch

    torch.set_num_threads(1)


def _cuda_sm90() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def pytest_collection_modifyitems(config, items):
    if _cuda_sm90():
        return
    skip = pytest.mark.skip(reason="needs an sm90 CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def clean_api_state(monkeypatch):
    """No backend/debug env vars, and the API's cached backend choice and debug flag reset."""
    import cutemla
    from cutemla import interface

    monkeypatch.delenv("CUTEMLA_BACKEND", raising=False)
    monkeypatch.delenv("CUTEMLA_DEBUG", raising=False)
    interface._reset_backend_state()
    cutemla.set_debug(None)
    yield
    cutemla.set_debug(None)
    interface._reset_backend_state()


@pytest.fixture
def reference_backend(clean_api_state, monkeypatch):
    """clean_api_state, with the API pinned to the PyTorch reference (no fallback warning on CPU)."""
    monkeypatch.setenv("CUTEMLA_BACKEND", "reference")
