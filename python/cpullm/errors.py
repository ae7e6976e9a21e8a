"""Exceptions cpullm raises for problems with models and inputs."""

from __future__ import annotations


class CpullmError(Exception):
    """Base class of every error cpullm raises on purpose."""


class ModelFormatError(CpullmError, ValueError):
    """A model file or directory is missing, truncated, corrupted or inconsistent."""


class UnsupportedModelError(CpullmError, ValueError):
    """A well-formed model whose architecture or feature cpullm does not run."""


class ModelNotFoundError(CpullmError, FileNotFoundError):
    """The path or model name does not exist."""


class ContextOverflowError(CpullmError, ValueError):
    """The tokens do not fit in the model's context window."""
