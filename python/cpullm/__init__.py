"""cpullm: fast CPU inference for Llama-family language models."""

from __future__ import annotations

from .errors import (
    ContextOverflowError,
    CpullmError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from .loader import load
from .model import Model

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
