"""Weight storage types and conversions between them, in NumPy (no torch)."""

from __future__ import annotations

import numpy as np

from .errors import ModelFormatError

WEIGHT_DTYPES = ("f32", "bf16")


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's ``.to(torch.bfloat16)`` does; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def to_f32(array: np.ndarray, stored: str) -> np.ndarray:
    """A float32 array of a tensor stored as ``stored`` (safetensors dtype name); no copy if already f32."""
    if stored == "F32":
        return array
    if stored == "BF16":
        return bf16_bits_to_f32(array)
    if stored in ("F16", "F64"):
        return array.astype(np.float32)
    raise ModelFormatError(f"cannot use a {stored} tensor as floating-point weights")


def to_weight(array: np.ndarray, stored: str, dtype: str) -> np.ndarray:
    """The tensor in the runtime's storage for ``dtype``: float32, or uint16 bf16 bits."""
    if dtype == "f32":
        return to_f32(array, stored)
    if dtype == "bf16":
        return array if stored == "BF16" else f32_to_bf16_bits(to_f32(array, stored))
    raise ValueError(f"unknown weight dtype {dtype!r} (expected one of {', '.join(WEIGHT_DTYPES)})")
