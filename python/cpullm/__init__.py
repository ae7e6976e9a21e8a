"""cpullm: fast CPU inference for Llama-family language models."""

from __future__ import annotations

from .errors import (
    ContextOverflowError,
    CpullmError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from .model import Model, load

__version__ = "0.1.0"

__all__ = [
    "ContextOverflowError",
    "CpullmError",
    "Model",
    "ModelFormatError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "__version__",
    "load",
]
