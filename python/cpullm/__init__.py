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


def _check_kernel_path() -> None:
    """Says at import what start-up chose differently from what one would expect, rather than silently:
    a kernel path passed over because its self-check failed (its matmuls disagreed with the scalar
    path's on a small problem: a bug for this CPU, worth a report), or a CPULLM_ISA this CPU (or build)
    cannot run."""
    import os

    from . import _C

    _warn_self_check_failures(_C.self_check_failures(), _C.get_isa())
    forced = os.environ.get("CPULLM_ISA")
    if forced and _C.get_isa() != forced:
        import warnings

        available = ", ".join(_C.cpu_features()["available_isas"])
        warnings.warn(f"CPULLM_ISA={forced!r} is not a kernel path this CPU can run (available: {available}); "
                      f"using {_C.get_isa()}", RuntimeWarning, stacklevel=3)


def _warn_self_check_failures(failures: list[tuple[str, str]], chosen: str) -> None:
    import warnings

    for isa, why in failures:
        warnings.warn(f"cpullm's {isa} kernels failed their start-up self-check ({why}); using {chosen} "
                      "instead, which is slower. Please report it, with the output of `python -c \"import "
                      "cpullm._C as c; print(c.cpu_features())\"`.", RuntimeWarning, stacklevel=4)


_check_kernel_path()

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
