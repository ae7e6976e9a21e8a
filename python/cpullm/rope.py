"""RoPE parameters from a config, and the inverse-frequency table computed as transformers computes it.

Configs in the wild carry RoPE settings in three shapes: ``rope_theta`` + ``rope_scaling`` with a
``type`` key (older), the same with ``rope_type`` (transformers 4.4x), and ``rope_parameters`` (what
transformers 5 writes). :func:`rope_parameters` folds all of them into one dict.

The tables are computed in float32 like transformers' own code, so cos/sin agree to the last bit or
two; the C++ side forms ``position * inv_freq`` in float32 as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import ModelFormatError, UnsupportedModelError

DEFAULT_ROPE_THETA = 10000.0
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Rope:
    inv_freq: np.ndarray  # float32 [rotary_dim // 2]
    attention_factor: float  # multiplies cos and sin
    rope_type: str


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's RoPE settings as one flat dict with at least ``rope_type`` and ``rope_theta``."""
    params: dict[str, Any] = {}
    new_style = config.get("rope_parameters")
    old_style = config.get("rope_scaling")
    for source in (old_style, new_style):
        if source is None:
            continue
        if not isinstance(source, Mapping):
            raise ModelFormatError(f"config: rope settings must be an object, got {source!r}")
        params.update(source)
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = config.get("rope_theta", DEFAULT_ROPE_THETA)
    if "partial_rotary_factor" not in params and config.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = config["partial_rotary_factor"]
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        # Phi-3 keeps the pre-training length outside the rope dict; transformers prefers that value.
        if config.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return params


def _number(params: Mapping[str, Any], key: str) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelFormatError(f"config: rope parameter '{key}' must be a finite number, got {value!r}")
    return float(value)


def compute_rope(params: Mapping[str, Any], rotary_dim: int) -> Rope:
    """inv_freq and the cos/sin scale for ``rotary_dim`` rotated dimensions per head."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    base = _number(params, "rope_theta")
    if base <= 1.0:
        raise ModelFormatError(f"config: rope_theta must be > 1, got {base}")
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponents, dtype=np.float32)).astype(np.float32)

    if rope_type == "linear":
        factor = _number(params, "factor")
        if factor <= 0:
            raise ModelFormatError(f"config: linear rope factor must be > 0, got {factor}")
        inv_freq = (inv_freq / np.float32(factor)).astype(np.float32)
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, params)
    return Rope(inv_freq=np.ascontiguousarray(inv_freq, dtype=np.float32), attention_factor=1.0, rope_type=rope_type)


def _llama3(inv_freq: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, the band between
    interpolated smoothly."""
    factor = np.float32(_number(params, "factor"))
    low = _number(params, "low_freq_factor")
    high = _number(params, "high_freq_factor")
    old_len = _number(params, "original_max_position_embeddings")
    if factor <= 0 or low <= 0 or high <= low or old_len <= 0:
        raise ModelFormatError(f"config: inconsistent llama3 rope parameters {dict(params)!r}")
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
