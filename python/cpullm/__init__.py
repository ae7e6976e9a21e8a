"""cpullm: fast CPU inference for Llama-family language models."""

from __future__ import annotations

from .errors import (
    ContextOverflowError,
    CpullmError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from .chat import ChatSession
from .generation import GenerationStats
from .loader import load
from .model import Model
from .sampling import SamplingParams

__version__ = "0.1.0"


def _check_forced_isa() -> None:
    """CPULLM_ISA names a kernel path to use; one this CPU (or build) cannot run falls back to the best
    available, which is said here rather than silently."""
    import os
    import warnings

    from . import _C

    forced = os.environ.get("CPULLM_ISA")
    if forced and _C.get_isa() != forced:
        available = ", ".join(_C.cpu_features()["available_isas"])
        warnings.warn(f"CPULLM_ISA={forced!r} is not a kernel path this CPU can run (available: {available}); "
                      f"using {_C.get_isa()}", RuntimeWarning, stacklevel=3)


_check_forced_isa()

__all__ = [
    "ChatSession",
    "ContextOverflowError",
    "CpullmError",
    "GenerationStats",
    "Model",
    "ModelFormatError",
    "ModelNotFoundError",
    "SamplingParams",
    "UnsupportedModelError",
    "__version__",
    "load",
]
