"""The canonical description of a model (DESIGN.md, "One canonical model"), derived from a Hugging Face
config with the defaults transformers uses for each family."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import ModelFormatError, UnsupportedModelError
from .rope import Rope, compute_rope, rope_parameters

# model_type -> the defaults transformers' config class of that family applies to absent keys.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILY_DEFAULTS))


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    max_context: int
    norm_eps: float
    rotary_dim: int
    rope: Rope = field(repr=False)
    attn_scale: float
    qkv_bias: bool
    tie_embeddings: bool
    group_size: int = 32  # inputs per scale of int8 matrices

    def to_native(self) -> dict[str, Any]:
        """The fields the C++ side reads (csrc/model/transformer.h, ModelSpec)."""
        return {
            "n_layers": self.n_layers,
            "dim": self.dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "ffn_dim": self.ffn_dim,
            "vocab_size": self.vocab_size,
            "max_context": self.max_context,
            "rotary_dim": self.rotary_dim,
            "norm_eps": self.norm_eps,
            "attn_scale": self.attn_scale,
            "rope_attn_factor": self.rope.attention_factor,
            "group_size": self.group_size,
            "inv_freq": self.rope.inv_freq.tolist(),
        }


# No supported model comes near this; larger values are hostile or corrupt, and refusing them here keeps
# every later size computation far from overflow.
_MAX_DIM = 1 << 24


def _int(cfg: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _MAX_DIM:
        raise ModelFormatError(f"config: '{key}' must be an integer in [{minimum}, {_MAX_DIM}], got {value!r}")
    return value


def spec_from_hf_config(config: Mapping[str, Any]) -> ModelSpec:
    """Reads a transformers ``config.json`` dict; raises ModelFormatError / UnsupportedModelError."""
    if not isinstance(config, Mapping):
        raise ModelFormatError("config: expected a JSON object")
    model_type = config.get("model_type")
    if model_type not in _FAMILY_DEFAULTS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    cfg = {**_FAMILY_DEFAULTS[model_type], **{k: v for k, v in config.items() if v is not None}}

    act = cfg.get("hidden_act")
    if act != "silu":
        raise UnsupportedModelError(f"activation {act!r} is not supported (only 'silu')")
    for flag in ("mlp_bias",):
        if cfg.get(flag):
            raise UnsupportedModelError(f"config: '{flag}: true' is not supported")
    if cfg.get("attention_bias"):
        # Llama's attention_bias also puts a bias on o_proj, which the canonical layout does not carry.
        raise UnsupportedModelError("config: 'attention_bias: true' (biases on q, k, v and o) is not supported")

    dim = _int(cfg, "hidden_size")
    n_heads = _int(cfg, "num_attention_heads")
    n_kv_heads = _int(cfg, "num_key_value_heads") if "num_key_value_heads" in cfg else n_heads
    head_dim = _int(cfg, "head_dim") if "head_dim" in cfg else dim // n_heads
    if head_dim <= 0:
        raise ModelFormatError(f"config: hidden_size {dim} is smaller than num_attention_heads {n_heads}")
    if n_heads % n_kv_heads:
        raise ModelFormatError(
            f"config: num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv_heads})"
        )
    eps = cfg.get("rms_norm_eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ModelFormatError(f"config: 'rms_norm_eps' must be a finite number >= 0, got {eps!r}")

    params = rope_parameters(cfg)
    partial = params.get("partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ModelFormatError(f"config: partial_rotary_factor {partial!r} gives an unusable rotary dim {rotary_dim}")
    rope = compute_rope(params, rotary_dim)

    return ModelSpec(
        model_type=model_type,
        n_layers=_int(cfg, "num_hidden_layers"),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=_int(cfg, "intermediate_size"),
        vocab_size=_int(cfg, "vocab_size"),
        max_context=_int(cfg, "max_position_embeddings"),
        norm_eps=float(eps),
        rotary_dim=rotary_dim,
        rope=rope,
        attn_scale=float(np.float32(1.0 / math.sqrt(head_dim))),
        qkv_bias=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings")),
    )


_INT_FIELDS = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "max_context",
               "rotary_dim", "group_size")
_BOOL_FIELDS = ("qkv_bias", "tie_embeddings")


def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    """The spec as plain JSON values (for cpullm.json); spec_from_json reads it back exactly."""
    data: dict[str, Any] = {name: getattr(spec, name) for name in (*_INT_FIELDS, *_BOOL_FIELDS)}
    data.update(
        model_type=spec.model_type,
        norm_eps=spec.norm_eps,
        attn_scale=spec.attn_scale,
        rope={
            "rope_type": spec.rope.rope_type,
            "attention_factor": spec.rope.attention_factor,
            "inv_freq": [float(f) for f in spec.rope.inv_freq],
        },
    )
    return data


def spec_from_json(data: Mapping[str, Any]) -> ModelSpec:
    if not isinstance(data, Mapping):
        raise ModelFormatError("cpullm.json: 'spec' must be an object")
    values: dict[str, Any] = {name: _int(data, name) for name in _INT_FIELDS}
    for name in _BOOL_FIELDS:
        if not isinstance(data.get(name), bool):
            raise ModelFormatError(f"cpullm.json: spec '{name}' must be true or false")
        values[name] = data[name]
    for name in ("norm_eps", "attn_scale"):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ModelFormatError(f"cpullm.json: spec '{name}' must be a finite number >= 0, got {value!r}")
        values[name] = float(value)
    rope = data.get("rope")
    if not isinstance(rope, Mapping) or not isinstance(rope.get("inv_freq"), list):
        raise ModelFormatError("cpullm.json: spec 'rope' must hold an 'inv_freq' list")
    try:
        inv_freq = np.asarray(rope["inv_freq"], dtype=np.float32)
        factor = float(rope.get("attention_factor", 1.0))
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"cpullm.json: bad rope values: {e}") from e
    if inv_freq.ndim != 1 or inv_freq.size * 2 != values["rotary_dim"] or not np.isfinite(inv_freq).all():
        raise ModelFormatError("cpullm.json: rope inv_freq must hold rotary_dim / 2 finite numbers")
    model_type = data.get("model_type")
    if model_type not in _FAMILY_DEFAULTS:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported")
    return ModelSpec(
        model_type=model_type,
        rope=Rope(inv_freq=inv_freq, attention_factor=factor, rope_type=str(rope.get("rope_type", "default"))),
        **values,
    )
