"""cutemla: Multi-head Latent Attention (MLA) decode for NVIDIA Hopper in CuTe DSL, a drop-in for FlashMLA.

``get_mla_metadata`` and ``flash_mla_with_kvcache`` mirror deepseek-ai/FlashMLA's dense decode API;
``mla_decode_reference`` is the PyTorch reference the kernels are checked against.

Importing cutemla is cheap: the CuTe DSL (cutlass) is imported only when a kernel is first needed.
"""
__version__ = "0.1.0"

from cutemla.interface import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from cutemla.reference import mla_decode_reference
from cutemla.validation import set_debug


def profile_decode(*args, **kwargs):
    """Where one decode call's time goes (scheduler, decode, combine) and its roofline fraction.

    See ``cutemla.profile.profile_decode``; imported lazily so ``import cutemla`` stays cheap.
    """
    from cutemla.profile import profile_decode as _profile_decode

    return _profile_decode(*args, **kwargs)

__all__ = [
    "FlashMLASchedMeta",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "mla_decode_reference",
    "profile_decode",
    "set_debug",
    "__version__",
]
