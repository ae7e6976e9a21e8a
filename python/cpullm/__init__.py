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
