"""Reading a Hugging Face checkpoint directory (config.json + one or many safetensors files) into the
canonical tensors: q/k/v and gate/up fused, names independent of the family."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from .dtypes import quantize_q8, to_f32, to_weight
from .errors import ModelFormatError
from .filemap import release_file_pages
from .safetensors_io import SafetensorsFile
from .spec import ModelSpec

# Canonical tensor -> alternative sources; each alternative is a list of checkpoint tensors
# concatenated along the output dimension (rows). The first alternative found wins.
_LAYER_SOURCES: dict[str, list[list[str]]] = {
    "attn_norm": [["input_layernorm.weight"]],
    "wqkv": [["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
             ["self_attn.qkv_proj.weight"]],
    "bqkv": [["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]],
    "wo": [["self_attn.o_proj.weight"]],
    "ffn_norm": [["post_attention_layernorm.weight"]],
    "w13": [["mlp.gate_proj.weight", "mlp.up_proj.weight"], ["mlp.gate_up_proj.weight"]],
    "w2": [["mlp.down_proj.weight"]],
}
# Mixture-of-experts layers (spec.n_experts > 0) replace w13 / w2 with a router and experts (Mixtral's names).
_MOE_ROUTER = [["block_sparse_moe.gate.weight"]]
_EXPERT_SOURCES: dict[str, list[list[str]]] = {
    "w13": [["block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"]],
    "w2": [["block_sparse_moe.experts.{e}.w2.weight"]],
}
_VECTORS = {"attn_norm", "ffn_norm", "bqkv", "norm"}
# Matrices kept in float32 whatever the dtype: the router is tiny, and rounding it could change which
# experts a token goes to.
_F32_MATRICES = {"router"}
_OPTIONAL = {"lm_head"}


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not readable JSON: {e}") from e


class TensorSource(Protocol):
    """Where canonical_tensors reads checkpoint tensors from, by their Hugging Face names."""

    description: str  # names the source in error messages

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> tuple[np.ndarray, str]:
        """The tensor and its stored dtype as a safetensors dtype name ("F32", "BF16", ...)."""
        ...


class Checkpoint:
    """The safetensors files of one directory, with a name -> file index."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.description = str(directory)
        index_path = directory / "model.safetensors.index.json"
        if index_path.exists():
            index = read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise ModelFormatError(f"{index_path}: no 'weight_map' object")
            names = sorted(set(weight_map.values()))
        else:
            weight_map = None
            names = sorted(p.name for p in directory.glob("*.safetensors"))
        if not names:
            hint = " (PyTorch .bin checkpoints are not read: save with safe_serialization=True)" if any(
                directory.glob("*.bin")
            ) else ""
            raise ModelFormatError(f"{directory}: no *.safetensors weights found{hint}")
        self.files: dict[str, SafetensorsFile] = {}
        for name in names:
            if not isinstance(name, str) or Path(name).name != name:
                raise ModelFormatError(f"{index_path}: shard name {name!r} is not a plain file name")
            path = directory / name
            if not path.is_file():
                raise ModelFormatError(f"{path}: shard listed in the index is missing")
            self.files[name] = SafetensorsFile(path)
        self.location: dict[str, SafetensorsFile] = {}
        for file in self.files.values():
            for tensor in file.keys():
                self.location[tensor] = file
        if weight_map is not None:
            for tensor, shard in weight_map.items():
                if self.location.get(tensor) is not self.files[shard]:
                    raise ModelFormatError(f"{index_path}: tensor '{tensor}' is not in {shard} as the index says")

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def get(self, name: str) -> tuple[np.ndarray, str]:
        file = self.location[name]
        return file.get(name), file.tensors[name].dtype


def _sources(spec: ModelSpec) -> Iterator[tuple[str, list[list[str]]]]:
    # A tied model whose checkpoint holds only the head: transformers ties the embeddings to it.
    yield "tok_embeddings", [["model.embed_tokens.weight"]] + ([["lm_head.weight"]] if spec.tie_embeddings else [])
    for i in range(spec.n_layers):
        for name, alternatives in _LAYER_SOURCES.items():
            if (spec.n_experts and name in _EXPERT_SOURCES) or (name == "bqkv" and not spec.qkv_bias):
                continue  # biases of a family without them: transformers drops them as unexpected keys
            yield f"layers.{i}.{name}", [[f"model.layers.{i}.{part}" for part in alt] for alt in alternatives]
        if spec.n_experts:
            yield f"layers.{i}.router", [[f"model.layers.{i}.{part}" for part in alt] for alt in _MOE_ROUTER]
            for e in range(spec.n_experts):
                for name, alternatives in _EXPERT_SOURCES.items():
                    yield f"layers.{i}.experts.{e}.{name}", [
                        [f"model.layers.{i}.{part.format(e=e)}" for part in alt] for alt in alternatives
                    ]
    yield "norm", [["model.norm.weight"]]
    if not spec.tie_embeddings:
        yield "lm_head", [["lm_head.weight"]]


def _gather(checkpoint: TensorSource, parts: Sequence[str], dtype: str, vector: bool,
            sources: list[np.ndarray] | None = None) -> np.ndarray:
    """The parts in ``dtype``, fused along rows; ``sources`` collects the arrays they were read from."""
    arrays = []
    for part in parts:
        array, stored = checkpoint.get(part)
        if sources is not None:
            sources.append(array)
        arrays.append(to_f32(array, stored) if vector else to_weight(array, stored, dtype))
    if len(arrays) == 1:
        return arrays[0]
    if len({a.ndim for a in arrays}) != 1 or len({a.shape[1:] for a in arrays}) != 1:
        shapes = ", ".join(f"{p} {a.shape}" for p, a in zip(parts, arrays))
        raise ModelFormatError(f"tensors to fuse have mismatched shapes: {shapes}")
    return np.concatenate(arrays, axis=0)


def _q8_0_parts(checkpoint: TensorSource, parts: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Q8_0 blocks (32 int8 + one f16 scale) are cpullm's int8 with 32-wide groups already: when a source
    stores every part so, its integers and scales are taken as they are, with no round trip through f32.
    Rows whose length is not a multiple of 32 cannot be Q8_0, so the group layouts always agree."""
    get_q8_0 = getattr(checkpoint, "get_q8_0", None)
    if get_q8_0 is None:
        return None
    blocks = [get_q8_0(part) for part in parts]
    if any(b is None for b in blocks):
        return None
    q = np.ascontiguousarray(np.concatenate([b[0] for b in blocks], axis=0), dtype=np.int8)
    scales = np.ascontiguousarray(np.concatenate([b[1] for b in blocks], axis=0), dtype=np.float32)
    return q, scales


def resolve_tied_head(spec: ModelSpec, checkpoint: TensorSource) -> ModelSpec:
    """The spec with the head untied when the config says tied but the checkpoint holds an lm_head that
    differs from the embeddings (a fine-tune saved untied): transformers then keeps both, with a warning."""
    if not spec.tie_embeddings or "lm_head.weight" not in checkpoint or "model.embed_tokens.weight" not in checkpoint:
        return spec
    head, _ = checkpoint.get("lm_head.weight")
    embeddings, _ = checkpoint.get("model.embed_tokens.weight")
    return spec if np.array_equal(head, embeddings) else replace(spec, tie_embeddings=False)


def canonical_tensor_count(spec: ModelSpec, checkpoint: TensorSource) -> int:
    """How many canonical tensors (not counting int8 scales) iter_canonical_tensors will yield from
    ``checkpoint``: optional ones it lacks are not counted."""
    return sum(1 for _, alternatives in _sources(spec) if any(all(p in checkpoint for p in alt) for alt in alternatives))


def iter_canonical_tensors(spec: ModelSpec, checkpoint: TensorSource, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """(canonical name, array) one at a time, so a converter holds one tensor in memory at once.
    Matrices come as float32, uint16 bf16 bits, or for int8 as int8 followed by "<name>.scales";
    vectors (norms, biases) always as float32."""
    for name, alternatives in _sources(spec):
        short = name.rsplit(".", 1)[-1]
        found = next((alt for alt in alternatives if all(p in checkpoint for p in alt)), None)
        if found is None:
            if short in _OPTIONAL:
                continue
            raise ModelFormatError(f"{checkpoint.description}: tensor '{alternatives[0][0]}' is missing")
        vector = short in _VECTORS or short in _F32_MATRICES
        carried = _q8_0_parts(checkpoint, found) if dtype == "int8" and spec.group_size == 32 and not vector else None
        if carried is not None:
            yield name, carried[0]
            yield name + ".scales", carried[1]
        elif dtype == "int8" and not vector:
            sources: list[np.ndarray] = []
            fused = _gather(checkpoint, found, "f32", vector, sources)
            if fused.ndim != 2:
                raise ModelFormatError(f"{checkpoint.description}: tensor '{found[0]}' is not a matrix")
            q, scales = quantize_q8(fused, spec.group_size)
            _release(sources)
            yield name, q
            yield name + ".scales", scales
        else:
            sources = []
            tensor = np.ascontiguousarray(_gather(checkpoint, found, dtype, vector, sources))
            if not any(np.may_share_memory(tensor, source) for source in sources):
                _release(sources)
            yield name, tensor


def _release(sources: list[np.ndarray]) -> None:
    # Converted, a source tensor's file pages are only RSS: SmolLM2's f32 directory loaded as int8 peaked
    # at 830 MiB with all 540 MB of them resident at once.
    for source in sources:
        release_file_pages(source)


def canonical_tensors(spec: ModelSpec, checkpoint: TensorSource, dtype: str) -> dict[str, np.ndarray]:
    """Canonical name -> array, all at once (see iter_canonical_tensors)."""
    return dict(iter_canonical_tensors(spec, checkpoint, dtype))
