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
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "sliding_window": 4096,
    },
    "mixtral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "sliding_window": None,
        "rope_theta": 1e6,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "phi3": {
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "sliding_window": None,
    },
}
# Families whose q, k and v projections always carry biases (and o_proj none).
_QKV_BIAS = {"qwen2"}
# Families whose transformers class reads attention_bias / mlp_bias (the others build their projections
# without biases and ignore both keys, dropping any bias tensors a checkpoint holds as unexpected).
_BIAS_FLAGS = {"llama"}
# Families whose transformers class applies sliding_window (Llama ignores the key).
_SLIDING_WINDOW = {"mistral", "mixtral", "phi3", "qwen2"}
# Families whose transformers class rotates partial_rotary_factor of each head (the others rotate the
# whole head with the default rope, whatever the key says).
PARTIAL_ROTARY_FAMILIES = {"phi3"}
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
    # Sliding-window attention per layer (0 = full causal attention); () = every layer full.
    layer_windows: tuple[int, ...] = ()
    # Mixture of experts: 0 = a dense FFN; else experts of ffn_dim each, n_experts_used per token.
    n_experts: int = 0
    n_experts_used: int = 0

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
            "inv_freq_long": [] if self.rope.inv_freq_long is None else self.rope.inv_freq_long.tolist(),
            "rope_switch": self.rope.switch,
            "layer_windows": list(self.layer_windows),
            "n_experts": self.n_experts,
            "n_experts_used": self.n_experts_used,
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
    if model_type == "phi3" and isinstance(config.get("rope_scaling"), Mapping):
        # transformers reads Phi-3's older "su" and "yarn" rope types as longrope.
        scaling = dict(config["rope_scaling"])
        if scaling.get("type", scaling.get("rope_type")) in ("su", "yarn"):
            scaling.pop("type", None)
            scaling["rope_type"] = "longrope"
            cfg["rope_scaling"] = scaling

    act = cfg.get("hidden_act")
    if act not in ("silu", "swish"):  # transformers' ACT2FN maps both to SiLU
        raise UnsupportedModelError(f"activation {act!r} is not supported (only 'silu' / 'swish')")
    if model_type in _BIAS_FLAGS:
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("config: 'mlp_bias: true' is not supported")
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
    if model_type not in PARTIAL_ROTARY_FAMILIES:
        partial = params.pop("partial_rotary_factor", None)
        if partial not in (None, 1) and params["rope_type"] != "default":
            # transformers' scaled tables would then cover part of a head its attention rotates whole
            # (it fails on the shapes): nothing to follow.
            raise UnsupportedModelError(f"config: partial_rotary_factor {partial!r} with rope type "
                                        f"'{params['rope_type']}' is not supported for {model_type}")
    partial = params.get("partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ModelFormatError(f"config: partial_rotary_factor {partial!r} gives an unusable rotary dim {rotary_dim}")
    rope = compute_rope(params, rotary_dim)
    n_layers = _int(cfg, "num_hidden_layers")
    n_experts = n_used = 0
    if model_type == "mixtral":
        n_experts = _int(cfg, "num_local_experts")
        n_used = _int(cfg, "num_experts_per_tok")
        if n_used > n_experts:
            raise ModelFormatError(f"config: num_experts_per_tok {n_used} exceeds num_local_experts {n_experts}")

    return ModelSpec(
        model_type=model_type,
        n_layers=n_layers,
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
        qkv_bias=model_type in _QKV_BIAS,
        tie_embeddings=bool(cfg.get("tie_word_embeddings")),
        layer_windows=_layer_windows(model_type, config, cfg, n_layers),
        n_experts=n_experts,
        n_experts_used=n_used,
    )


def _layer_windows(model_type: str, config: Mapping[str, Any], cfg: Mapping[str, Any], n_layers: int) -> tuple[int, ...]:
    """Sliding windows per layer as transformers applies them (0 = full attention), () if none.

    Mistral, Mixtral and Phi-3 apply ``sliding_window`` (null = none) to every layer, Llama never.
    Qwen2 applies it only with ``use_sliding_window: true``, and then to the layers ``layer_types``
    marks "sliding_attention" (by default those from ``max_window_layers`` on)."""
    # An explicit null means "no window", so read the raw config rather than the defaults-merged one.
    window = config["sliding_window"] if "sliding_window" in config else _FAMILY_DEFAULTS[model_type].get("sliding_window")
    if model_type not in _SLIDING_WINDOW or (model_type == "qwen2" and not cfg.get("use_sliding_window")):
        window = None
    if window is None:
        return ()
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= _MAX_DIM:
        raise ModelFormatError(f"config: 'sliding_window' must be null or an integer in [1, {_MAX_DIM}], got {window!r}")
    if model_type != "qwen2":
        return (window,) * n_layers
    layer_types = config.get("layer_types")
    if layer_types is None:
        first = cfg.get("max_window_layers")
        if isinstance(first, bool) or not isinstance(first, int):
            raise ModelFormatError(f"config: 'max_window_layers' must be an integer, got {first!r}")
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or not all(
        t in ("sliding_attention", "full_attention") for t in layer_types
    ):
        raise ModelFormatError(
            f"config: 'layer_types' must list 'full_attention' or 'sliding_attention' for each of {n_layers} layers"
        )
    windows = tuple(window if t == "sliding_attention" else 0 for t in layer_types)
    return windows if any(windows) else ()


_INT_FIELDS = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "max_context",
               "rotary_dim", "group_size")
_BOOL_FIELDS = ("qkv_bias", "tie_embeddings")
# Written only when set, and read as absent = off: FORMAT_VERSION 1 directories of earlier releases load
# unchanged, and earlier releases refuse the new families by model_type rather than misreading them.
_OPTIONAL_INT_FIELDS = ("n_experts", "n_experts_used")


def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    """The spec as plain JSON values (for cpullm.json); spec_from_json reads it back exactly."""
    data: dict[str, Any] = {name: getattr(spec, name) for name in (*_INT_FIELDS, *_BOOL_FIELDS)}
    rope: dict[str, Any] = {
        "rope_type": spec.rope.rope_type,
        "attention_factor": spec.rope.attention_factor,
        "inv_freq": [float(f) for f in spec.rope.inv_freq],
    }
    if spec.rope.inv_freq_long is not None:
        rope.update(inv_freq_long=[float(f) for f in spec.rope.inv_freq_long], switch=spec.rope.switch)
    data.update(model_type=spec.model_type, norm_eps=spec.norm_eps, attn_scale=spec.attn_scale, rope=rope)
    if spec.layer_windows:
        data["layer_windows"] = list(spec.layer_windows)
    for name in _OPTIONAL_INT_FIELDS:
        if getattr(spec, name):
            data[name] = getattr(spec, name)
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
    inv_freq_long, switch = None, 0
    if "inv_freq_long" in rope:
        try:
            inv_freq_long = np.asarray(rope["inv_freq_long"], dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ModelFormatError(f"cpullm.json: bad rope values: {e}") from e
        if inv_freq_long.shape != inv_freq.shape or not np.isfinite(inv_freq_long).all():
            raise ModelFormatError("cpullm.json: rope inv_freq_long must hold rotary_dim / 2 finite numbers")
        switch = _int(rope, "switch")
    for name in _OPTIONAL_INT_FIELDS:
        values[name] = _int(data, name) if name in data else 0
    windows = data.get("layer_windows", [])
    if not isinstance(windows, list) or (windows and len(windows) != values["n_layers"]) or not all(
        isinstance(w, int) and not isinstance(w, bool) and 0 <= w <= _MAX_DIM for w in windows
    ):
        raise ModelFormatError("cpullm.json: spec 'layer_windows' must list a window >= 0 for each layer")
    values["layer_windows"] = tuple(windows)
    model_type = data.get("model_type")
    if model_type not in _FAMILY_DEFAULTS:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported")
    return ModelSpec(
        model_type=model_type,
        rope=Rope(inv_freq=inv_freq, attention_factor=factor, rope_type=str(rope.get("rope_type", "default")),
                  inv_freq_long=inv_freq_long, switch=switch),
        **values,
    )
