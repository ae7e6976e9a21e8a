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
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# "dynamic" (NTK): transformers starts from the default table and recomputes it only for sequences longer
# than max_position_embeddings, which is also cpullm's context limit, so within every sequence cpullm
# runs the table is the default one.


@dataclass(frozen=True)
class Rope:
    inv_freq: np.ndarray  # float32 [rotary_dim // 2]
    attention_factor: float  # multiplies cos and sin
    rope_type: str
    # longrope: the table for sequences longer than ``switch`` positions (None for every other type).
    # transformers picks the table by the current sequence length; cpullm does the same, re-encoding a
    # sequence's cache when it crosses the switch (csrc/model/transformer.cpp, Sequence::forward).
    inv_freq_long: np.ndarray | None = None
    switch: int = 0


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's RoPE settings as one flat dict with at least ``rope_type`` and ``rope_theta``."""
    new_style = config.get("rope_parameters")
    old_style = config.get("rope_scaling")
    for source in (old_style, new_style):
        if source is not None and not isinstance(source, Mapping):
            raise ModelFormatError(f"config: rope settings must be an object, got {source!r}")
    # Both present (a transformers 5 config with rope_scaling added by hand, as model cards suggest for
    # YaRN): transformers takes rope_scaling whole and drops rope_parameters (theta included).
    params: dict[str, Any] = dict(old_style or new_style or {})
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = config.get("rope_theta", DEFAULT_ROPE_THETA)
    if "partial_rotary_factor" not in params and config.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = config["partial_rotary_factor"]
    if config.get("max_position_embeddings") is not None:
        params["max_position_embeddings"] = config["max_position_embeddings"]
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
    elif rope_type == "dynamic":
        if _number(params, "factor") <= 0:
            raise ModelFormatError(f"config: dynamic rope factor must be > 0, got {params['factor']}")
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, params)
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn(params, base, rotary_dim)
        return Rope(inv_freq=inv_freq, attention_factor=attention_factor, rope_type=rope_type)
    elif rope_type == "longrope":
        return _longrope(params, base, rotary_dim)
    return Rope(inv_freq=np.ascontiguousarray(inv_freq, dtype=np.float32), attention_factor=1.0, rope_type=rope_type)


def _pos_freqs(base: float, rotary_dim: int) -> np.ndarray:
    """base ** (2i / rotary_dim) in float32, as torch forms ``base ** tensor``."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    return np.power(np.float32(base), exponents, dtype=np.float32)


def _yarn(params: Mapping[str, Any], base: float, rotary_dim: int) -> tuple[np.ndarray, float]:
    """YaRN: frequencies blended between kept and divided by ``factor`` along a linear ramp over the
    dimensions, and cos/sin scaled by ``attention_factor`` (0.1 ln(factor) + 1 unless given)."""
    old_len = _number(params, "original_max_position_embeddings")
    factor = params.get("factor")
    factor = _number(params, "max_position_embeddings") / old_len if factor is None else _number(params, "factor")
    if factor <= 0 or old_len <= 0:
        raise ModelFormatError(f"config: inconsistent yarn rope parameters {dict(params)!r}")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    else:
        attention_factor = _number(params, "attention_factor")
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (rotary_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    pos = _pos_freqs(base, rotary_dim)
    extrapolation = (np.float32(1.0) / pos).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(factor) * pos)).astype(np.float32)
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (np.float32(1.0) - ramp.astype(np.float32)).astype(np.float32)
    inv_freq = (interpolation * (np.float32(1.0) - keep) + extrapolation * keep).astype(np.float32)
    return np.ascontiguousarray(inv_freq), float(attention_factor)


def _longrope(params: Mapping[str, Any], base: float, rotary_dim: int) -> Rope:
    """LongRoPE (Phi-3 "su"): per-dimension divisors, ``short_factor`` up to the pre-training length and
    ``long_factor`` beyond it; cos/sin scaled by sqrt(1 + ln(factor) / ln(original length)) unless the
    config gives ``attention_factor``, with factor = max_position_embeddings / original length unless
    given."""
    old_len = _number(params, "original_max_position_embeddings")
    if old_len < 1 or old_len != int(old_len):
        raise ModelFormatError(f"config: original_max_position_embeddings must be a positive integer, got {old_len}")
    factor = params.get("factor")
    factor = _number(params, "max_position_embeddings") / old_len if factor is None else _number(params, "factor")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    else:
        attention_factor = _number(params, "attention_factor")
    pos = _pos_freqs(base, rotary_dim)
    tables = []
    for key in ("short_factor", "long_factor"):
        values = params.get(key)
        if not isinstance(values, (list, tuple)) or len(values) != rotary_dim // 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
        ):
            raise ModelFormatError(f"config: longrope '{key}' must be {rotary_dim // 2} positive numbers")
        ext = np.asarray(values, dtype=np.float32)
        tables.append(np.ascontiguousarray((np.float32(1.0) / (ext * pos)).astype(np.float32)))
    return Rope(inv_freq=tables[0], attention_factor=float(attention_factor), rope_type="longrope",
                inv_freq_long=tables[1], switch=int(old_len))


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
