"""Weight storage types and conversions between them, in NumPy (no torch)."""

from __future__ import annotations

import numpy as np

from .errors import ModelFormatError

WEIGHT_DTYPES = ("f32", "bf16", "int8")
# Element types of a sequence's KV cache (f16: half the bytes attention reads per position).
KV_CACHE_DTYPES = ("f32", "f16")
# Inputs per int8 scale. 32 is llama.cpp's Q8_0 block; docs/int8.md records why it is the default.
DEFAULT_GROUP_SIZE = 32
Q8_BLOCK = 32  # the kernels consume int8 in blocks of 32: group sizes are multiples of it
Q8_MAX_GROUP = 512  # larger groups could overflow the kernels' int32 sums


def default_kv_cache_dtype(weight_dtype: str) -> str:
    """f32 weights (exact parity work) keep an f32 cache; int8 and bf16 weights get f16, which measured no
    loss of accuracy next to them (docs/int8.md) and halves the bytes attention reads per position."""
    return "f32" if weight_dtype == "f32" else "f16"


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    return kv_cache_dtype


def check_fast_prefill(fast_prefill: object) -> bool:
    if not isinstance(fast_prefill, (bool, np.bool_)):
        raise ValueError(f"fast_prefill must be True or False, got {fast_prefill!r}")
    return bool(fast_prefill)


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


def check_group_size(group_size: int) -> int:
    if (isinstance(group_size, bool) or not isinstance(group_size, int) or not 0 < group_size <= Q8_MAX_GROUP
            or group_size % Q8_BLOCK):
        raise ValueError(f"group_size must be a multiple of {Q8_BLOCK} from {Q8_BLOCK} to {Q8_MAX_GROUP}, "
                         f"got {group_size!r}")
    return group_size


def quantize_q8(weights: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Group-wise symmetric int8 of a [N, K] matrix: (q int8 [N, K], scales float32 [N, ceil(K / group)])
    with weights ~= q * scale. scale = max|w| / 127 per group (a shorter last group when K is not a
    multiple), q = round-half-even(w / scale): the same arithmetic the kernels apply to activations."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_q8 expects a 2-D matrix, got shape {w.shape}")
    n, k = w.shape
    groups = -(-k // group_size)
    q = np.empty((n, k), dtype=np.int8)
    scales = np.empty((n, groups), dtype=np.float32)
    # Rows a few MiB at a time: NumPy's temporaries are f32 copies of what they work on, and over a whole
    # embedding matrix (SmolLM2's 113 MB) they were most of an in-memory conversion's peak.
    rows = max(1, (1 << 20) // (groups * group_size))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        padded = np.zeros((r1 - r0, groups * group_size), dtype=np.float32)
        padded[:, :k] = w[r0:r1]
        blocks = padded.reshape(r1 - r0, groups, group_size)
        chunk_scales = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float32)
        safe = np.where(chunk_scales > 0, chunk_scales, np.float32(1))[:, :, None]
        q[r0:r1] = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).reshape(r1 - r0, -1)[:, :k]
        scales[r0:r1] = chunk_scales
    return q, scales


def dequantize_q8(q: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    k = q.shape[1]
    return (q.astype(np.float32) * np.repeat(scales, group_size, axis=1)[:, :k]).astype(np.float32)


def to_weight(array: np.ndarray, stored: str, dtype: str) -> np.ndarray:
    """The tensor in the runtime's storage for ``dtype`` (f32 or bf16; int8 goes through quantize_q8)."""
    if dtype == "f32":
        return to_f32(array, stored)
    if dtype == "bf16":
        return array if stored == "BF16" else f32_to_bf16_bits(to_f32(array, stored))
    raise ValueError(f"unknown weight dtype {dtype!r} (expected f32 or bf16)")
