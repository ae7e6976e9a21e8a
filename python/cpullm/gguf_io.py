"""Reading GGUF files (llama.cpp's single-file format) into cpullm's canonical model.

A GGUF file is a little-endian header (magic, version, metadata key/values, a tensor table) followed by
aligned tensor data. The header is parsed here, strictly, instead of with ``gguf.GGUFReader``: every
length and count is checked against the file before it is used, so a truncated or hostile file gives a
``ModelFormatError`` instead of an IndexError, a huge allocation or a loop over 2**64 empty elements;
and the vocabulary (tens of thousands of strings) is read in a fraction of the reader's time. The
``gguf`` package still supplies the type tables and the dequantization of every block format.

The metadata is turned into the Hugging Face style config dict that ``spec_from_hf_config`` reads, and
:class:`GGUFTensorSource` serves the tensors under their Hugging Face names, so the rest of cpullm
(``hf.canonical_tensors``, the converter) handles a GGUF exactly like a safetensors checkpoint.

Conventions worth knowing:

- GGUF lists a tensor's dimensions fastest-moving first (``ne[0]`` is the row length); here shapes are
  given the NumPy / PyTorch way round, so a ``[576, 1536]`` GGUF matrix is ``(1536, 576)``.
- llama.cpp's converter permutes the rows of Llama's q and k projections (per head, from the
  rotate-half order transformers uses to interleaved pairs). :func:`unpermute_rows` undoes it, with
  ``n_heads`` for q and ``n_kv_heads`` for k.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ModelFormatError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 3  # arrays of arrays of ... in metadata

# GGUF metadata value types.
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32, _T_FLOAT32 = 0, 1, 2, 3, 4, 5, 6
_T_BOOL, _T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = 7, 8, 9, 10, 11, 12
_SCALAR_DTYPES: dict[int, np.dtype] = {
    _T_UINT8: np.dtype("u1"),
    _T_INT8: np.dtype("i1"),
    _T_UINT16: np.dtype("<u2"),
    _T_INT16: np.dtype("<i2"),
    _T_UINT32: np.dtype("<u4"),
    _T_INT32: np.dtype("<i4"),
    _T_FLOAT32: np.dtype("<f4"),
    _T_BOOL: np.dtype("u1"),
    _T_UINT64: np.dtype("<u8"),
    _T_INT64: np.dtype("<i8"),
    _T_FLOAT64: np.dtype("<f8"),
}

# Token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _ggml_types() -> tuple[dict[int, str], dict[int, tuple[int, int]]]:
    """ggml type id -> name, and -> (elements per block, bytes per block), from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    names = {int(t): t.name for t in GGMLQuantizationType}
    sizes = {int(t): (int(b), int(s)) for t, (b, s) in GGML_QUANT_SIZES.items()}
    return names, sizes


# ggml types whose values are stored plainly: served without dequantization, as safetensors dtype names.
_PLAIN_TYPES = {0: ("F32", np.dtype("<f4")), 1: ("F16", np.dtype("<f2")), 30: ("BF16", np.dtype("<u2"))}
GGML_Q8_0 = 8


def is_gguf(path: Path) -> bool:
    """Whether the file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int
    type_name: str
    shape: tuple[int, ...]  # NumPy order: slowest dimension first (GGUF's ne reversed)
    offset: int  # absolute offset of the data in the file
    nbytes: int
    block: tuple[int, int]  # (elements, bytes) of one storage block along the last (fastest) dimension


class _Cursor:
    """Reads the header from a buffer, refusing to read past its end."""

    def __init__(self, buf: Any, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelFormatError(
                f"{self.path}: truncated or corrupt GGUF header: {what} at offset {self.pos} needs {n} bytes, "
                f"but the file has {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        n = struct.calcsize(fmt)
        self.need(n, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def string(self, what: str) -> str:
        data = self.raw_string(what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelFormatError(f"{self.path}: {what} is not valid UTF-8: {e}") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_DTYPES:
            dtype = _SCALAR_DTYPES[vtype]
            self.need(dtype.itemsize, what)
            value = np.frombuffer(self.buf, dtype=dtype, count=1, offset=self.pos)[0].item()
            self.pos += dtype.itemsize
            return bool(value) if vtype == _T_BOOL else value
        if vtype == _T_STRING:
            return self.string(what)
        if vtype == _T_ARRAY:
            if depth >= _MAX_NESTING:
                raise ModelFormatError(f"{self.path}: {what}: arrays nested more than {_MAX_NESTING} deep")
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"length of {what}")
            if etype in _SCALAR_DTYPES:
                dtype = _SCALAR_DTYPES[etype]
                self.need(count * dtype.itemsize, what)
                array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return array.astype(bool) if etype == _T_BOOL else array
            if etype == _T_STRING:
                self.need(count * 8, what)  # every element has at least its 8-byte length
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if etype == _T_ARRAY:
                self.need(count * 12, what)
                return [self.value(_T_ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]
            raise ModelFormatError(f"{self.path}: {what}: unknown array element type {etype}")
        raise ModelFormatError(f"{self.path}: {what}: unknown metadata value type {vtype}")


class GGUFFile:
    """One GGUF file: its metadata, its tensor table, and its data memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise ModelFormatError(f"{self.path}: {size} bytes is too short for a GGUF file")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelFormatError(f"{self.path}: cannot read: {e}") from e
        self.size = size
        cur = _Cursor(self._map, size, self.path)
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise ModelFormatError(f"{self.path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        cur.pos = 4
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                raise UnsupportedModelError(f"{self.path}: big-endian GGUF files are not supported")
            raise UnsupportedModelError(
                f"{self.path}: GGUF version {version} is not supported "
                f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        self.version = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, int] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.u32(f"type of metadata '{key}'")
            value = cur.value(vtype, f"metadata '{key}'")
            if key in self.metadata:
                raise ModelFormatError(f"{self.path}: metadata key '{key}' appears twice")
            self.metadata[key] = value
            self.metadata_types[key] = vtype

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (self.metadata_types.get("general.alignment", _T_UINT32) != _T_UINT32 or alignment <= 0
                or alignment & (alignment - 1)):
            raise ModelFormatError(f"{self.path}: general.alignment must be a power of two (uint32), got {alignment!r}")
        self.alignment = alignment

        type_names, block_sizes = _ggml_types()
        table = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.u32(f"dimension count of tensor '{name}'")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelFormatError(f"{self.path}: tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            ne = cur.unpack(f"<{n_dims}Q", f"dimensions of tensor '{name}'")
            ggml_type, rel_offset = cur.unpack("<IQ", f"type and offset of tensor '{name}'")
            table.append((name, ne, ggml_type, rel_offset))
        header_end = cur.pos
        self.data_start = -(-header_end // alignment) * alignment
        data_size = size - self.data_start

        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, ggml_type, rel_offset in table:
            if name in self.tensors:
                raise ModelFormatError(f"{self.path}: tensor '{name}' appears twice")
            if ggml_type not in block_sizes:
                removed = _REMOVED_TYPES.get(ggml_type)
                raise UnsupportedModelError(
                    f"{self.path}: tensor '{name}' has "
                    + (f"ggml type {ggml_type} ({removed}, which llama.cpp no longer writes or reads; quantize the "
                       "model again)" if removed else f"an unknown ggml type {ggml_type}"))
            type_name = type_names.get(ggml_type, str(ggml_type))
            block_elems, block_bytes = block_sizes[ggml_type]
            if any(d < 1 or d > (1 << 40) for d in ne):
                raise ModelFormatError(f"{self.path}: tensor '{name}' has invalid dimensions {list(ne)}")
            if ne[0] % block_elems:
                raise ModelFormatError(
                    f"{self.path}: tensor '{name}' ({type_name}) has rows of {ne[0]} values, "
                    f"not a multiple of the block size {block_elems}"
                )
            n_elements = 1
            for d in ne:
                n_elements *= d
            nbytes = n_elements // block_elems * block_bytes
            if rel_offset % alignment:
                raise ModelFormatError(
                    f"{self.path}: tensor '{name}' data offset {rel_offset} is not a multiple of the alignment {alignment}"
                )
            if rel_offset + nbytes > data_size:
                raise ModelFormatError(
                    f"{self.path}: tensor '{name}' ({type_name}, shape {list(reversed(ne))}) runs past the end of the "
                    f"file: its data needs bytes {self.data_start + rel_offset} to {self.data_start + rel_offset + nbytes} "
                    f"but the file has {size} bytes (truncated download?)"
                )
            self.tensors[name] = GGUFTensorInfo(
                name=name,
                ggml_type=ggml_type,
                type_name=type_name,
                shape=tuple(int(d) for d in reversed(ne)),
                offset=self.data_start + rel_offset,
                nbytes=nbytes,
                block=(block_elems, block_bytes),
            )

    # --- metadata -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path}: metadata 'general.architecture' is missing")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    # --- tensors --------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The stored data, read-only and without a copy: values for F32/F16 (BF16 as uint16 bits), else
        uint8 blocks shaped ``(*shape[:-1], bytes per row)``."""
        info = self.tensors[name]
        plain = _PLAIN_TYPES.get(info.ggml_type)
        if plain is not None:
            dtype = plain[1]
            return np.frombuffer(self._map, dtype=dtype, count=info.nbytes // dtype.itemsize,
                                 offset=info.offset).reshape(info.shape)
        row_bytes = info.shape[-1] // info.block[0] * info.block[1]
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(
            *info.shape[:-1], row_bytes
        )

    def values(self, name: str) -> tuple[np.ndarray, str]:
        """The tensor's values: (array, safetensors dtype name). F32, F16 and BF16 come as stored (views
        into the file); every quantized type is dequantized to float32."""
        info = self.tensors[name]
        raw = self.raw(name)
        plain = _PLAIN_TYPES.get(info.ggml_type)
        if plain is not None:
            return raw, plain[0]
        if info.type_name == "F64":
            return np.ascontiguousarray(raw).view("<f8").reshape(info.shape).astype(np.float32), "F32"
        return dequantize(raw, info, self.path), "F32"

    def q8_0_blocks(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A Q8_0 tensor as stored: int8 values shaped like the tensor and float16 scales with one column
        per 32 values (value = scale * q). For carrying Q8_0 over to int8 without a pass through f32."""
        info = self.tensors[name]
        if info.ggml_type != GGML_Q8_0:
            raise ValueError(f"tensor '{name}' is {info.type_name}, not Q8_0")
        blocks = self.raw(name).reshape(-1, 34)
        scales = blocks[:, :2].copy().view("<f2").reshape(*info.shape[:-1], info.shape[-1] // 32)
        qs = blocks[:, 2:].copy().view(np.int8).reshape(info.shape)
        return qs, scales

    def close(self) -> None:
        """Drops this object's reference to the map; it is unmapped once no array refers to it."""
        self._map = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {self.metadata.get('general.architecture')}, {len(self.tensors)} tensors)"


# Integer tensors: valid GGUF, but no model weights are stored so.
_NOT_WEIGHT_TYPES = {"I8", "I16", "I32", "I64"}
# Type ids that llama.cpp once wrote (2024) and has since removed: named, so that an old file says why.
_REMOVED_TYPES = {31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8"}


def dequantize(raw: np.ndarray, info: GGUFTensorInfo, path: Path | str = "") -> np.ndarray:
    """float32 values of a quantized tensor's blocks, with the tensor's shape."""
    if info.type_name in _NOT_WEIGHT_TYPES:
        raise UnsupportedModelError(f"{path}: tensor '{info.name}' is stored as {info.type_name}, which is not a "
                                    "weight type (F32, F16, BF16, F64 or a ggml quantized type)")
    from gguf.constants import GGMLQuantizationType

    try:
        from gguf.quants import dequantize as _dequantize
    except ImportError:  # gguf releases before NumPy dequantization
        raise UnsupportedModelError(
            f"{path}: tensor '{info.name}' is {info.type_name}; reading quantized GGUF tensors needs a newer "
            f"gguf package (pip install -U gguf)"
        ) from None
    try:
        values = _dequantize(raw, GGMLQuantizationType(info.ggml_type))
    except NotImplementedError:
        raise UnsupportedModelError(
            f"{path}: tensor '{info.name}' is stored as {info.type_name}, which the installed gguf package "
            f"cannot dequantize (try a newer gguf, or a file quantized differently)"
        ) from None
    return np.asarray(values, dtype=np.float32).reshape(info.shape)


# --- Llama's q/k row permutation ----------------------------------------------------------------------


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: per head, rows [x0..x(d/2-1), y0..y(d/2-1)] become
    interleaved [x0, y0, x1, y1, ...]. (Used by tests to write GGUF files as llama.cpp does.)"""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_rows`: back to the rotate-half order of transformers."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ModelFormatError(f"a q/k tensor of {rows} rows cannot be split into {n_heads} heads of even size")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- architectures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    model_type: str  # the transformers model_type whose config we produce
    permute_qk: bool  # llama.cpp permutes q/k rows for this architecture
    tensors: dict[str, str]  # GGUF leaf name in blk.N -> Hugging Face name in model.layers.N


_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# GGUF general.architecture -> how to read it. phi3 is mapped but refused in _check_arch (see there).
ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("llama", True, _LLAMA_LAYER),  # also Llama 2/3, SmolLM, Mistral 7B, TinyLlama
    "qwen2": _Arch("qwen2", False, _LLAMA_LAYER),
    "phi3": _Arch("phi3", False, {**_LLAMA_LAYER, "ffn_up": "mlp.gate_up_proj"}),
}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors that carry nothing the runtime needs (or that are handled elsewhere).
_IGNORED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def _check_arch(gguf: GGUFFile) -> _Arch:
    arch = gguf.architecture
    spec = ARCHITECTURES.get(arch)
    if spec is None:
        raise UnsupportedModelError(
            f"{gguf.path}: GGUF architecture '{arch}' is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    if arch == "phi3":
        # llama.cpp keeps Phi-3's sliding window and longrope factors in metadata and tensors this reader
        # does not map yet; running without them would silently change the model.
        raise UnsupportedModelError(
            f"{gguf.path}: Phi-3 GGUF files are not supported yet (sliding window and longrope factors are not "
            "read); load or convert the Hugging Face checkpoint instead"
        )
    experts = gguf.get(f"{arch}.expert_count", 0)
    if experts or any("_exps." in n or ".ffn_gate_inp." in n for n in gguf.tensors):
        raise UnsupportedModelError(f"{gguf.path}: mixture-of-experts GGUF models ({arch}, {experts} experts) are not supported yet")
    return spec


def hf_name_map(gguf: GGUFFile) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name, for every tensor the model uses."""
    arch = _check_arch(gguf)
    names: dict[str, str] = {}
    for gguf_name in gguf.tensors:
        if gguf_name in _IGNORED_TENSORS:
            continue
        parts = gguf_name.split(".")
        if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
            names[f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"] = gguf_name
        elif len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in arch.tensors:
            names[f"model.layers.{int(parts[1])}.{arch.tensors[parts[2]]}.{parts[3]}"] = gguf_name
        # anything else (an extra tensor a newer writer adds) is not read
    return names


def _meta_int(gguf: GGUFFile, key: str, default: Any = None, required: bool = True) -> Any:
    value = gguf.get(key, default)
    if value is None:
        if required:
            raise ModelFormatError(f"{gguf.path}: metadata '{key}' is missing")
        return None
    if isinstance(value, np.ndarray):
        # Some writers store a per-layer list (e.g. head_count_kv); one shared value is all we run.
        distinct = set(value.tolist())
        if len(distinct) != 1:
            raise UnsupportedModelError(f"{gguf.path}: '{key}' differs between layers ({sorted(distinct)}): not supported")
        value = distinct.pop()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(f"{gguf.path}: metadata '{key}' must be an integer, got {value!r}")
    return value


def _meta_float(gguf: GGUFFile, key: str, default: Any = None) -> Any:
    value = gguf.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFormatError(f"{gguf.path}: metadata '{key}' must be a number, got {value!r}")
    return float(value)


def hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The metadata as a transformers-style config dict (what ``spec_from_hf_config`` reads)."""
    arch_spec = _check_arch(gguf)
    a = gguf.architecture
    dim = _meta_int(gguf, f"{a}.embedding_length")
    n_heads = _meta_int(gguf, f"{a}.attention.head_count")
    config: dict[str, Any] = {
        "model_type": arch_spec.model_type,
        "hidden_size": dim,
        "intermediate_size": _meta_int(gguf, f"{a}.feed_forward_length"),
        "num_hidden_layers": _meta_int(gguf, f"{a}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _meta_int(gguf, f"{a}.attention.head_count_kv", n_heads),
        "max_position_embeddings": _meta_int(gguf, f"{a}.context_length"),
        "rms_norm_eps": _meta_float(gguf, f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _meta_float(gguf, f"{a}.rope.freq_base", 10000.0),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    head_dim = _meta_int(gguf, f"{a}.attention.key_length", required=False)
    if head_dim is not None:
        config["head_dim"] = head_dim
    else:
        head_dim = dim // n_heads if n_heads else 0
    value_dim = _meta_int(gguf, f"{a}.attention.value_length", required=False)
    if value_dim is not None and value_dim != head_dim:
        raise UnsupportedModelError(f"{gguf.path}: key length {head_dim} != value length {value_dim} is not supported")
    rotary = _meta_int(gguf, f"{a}.rope.dimension_count", required=False)
    if rotary is not None and head_dim and rotary != head_dim:
        from .spec import PARTIAL_ROTARY_FAMILIES

        if arch_spec.model_type not in PARTIAL_ROTARY_FAMILIES:
            # llama.cpp would rotate only those dims; transformers' classes for these families rotate
            # every one. No such file is known: refused rather than following either.
            raise UnsupportedModelError(f"{gguf.path}: rope over {rotary} of {head_dim} head dims is not supported "
                                        f"for '{gguf.architecture}'")
        config["partial_rotary_factor"] = rotary / head_dim

    vocab = _meta_int(gguf, f"{a}.vocab_size", required=False)
    if vocab is None:
        tokens = gguf.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list):
            vocab = len(tokens)
        elif "token_embd.weight" in gguf.tensors:
            vocab = gguf.tensors["token_embd.weight"].shape[0]
    config["vocab_size"] = vocab

    scaling = _rope_scaling(gguf, a)
    if scaling is not None:
        config["rope_scaling"] = scaling
    for key, meta in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        token_id = meta_token_id(gguf, f"tokenizer.ggml.{meta}", vocab)
        if token_id is not None:
            config[key] = token_id
    return {k: v for k, v in config.items() if v is not None}


def meta_token_id(gguf: GGUFFile, key: str, n_tokens: int | None) -> int | None:
    """A special token's id from the metadata, or None where there is none or it lies outside the
    n_tokens ids (when known): some converters write -1 / 0xFFFFFFFF for "none"."""
    value = _meta_int(gguf, key, required=False)
    if value is None or (n_tokens is not None and not 0 <= value < n_tokens):
        return None
    return value


def _rope_scaling(gguf: GGUFFile, a: str) -> dict[str, Any] | None:
    kind = gguf.get(f"{a}.rope.scaling.type")
    factor = _meta_float(gguf, f"{a}.rope.scaling.factor")
    if kind is None and gguf.get(f"{a}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", _meta_float(gguf, f"{a}.rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and factor == 1.0):
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind)}
    if factor is not None:
        scaling["factor"] = factor
    original = _meta_int(gguf, f"{a}.rope.scaling.original_context_length", required=False)
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


class GGUFTensorSource:
    """The tensors of a GGUF file under their Hugging Face names (the ``hf.TensorSource`` protocol):
    quantized types dequantized to float32, F32/F16/BF16 as stored, q/k rows back in transformers' order."""

    def __init__(self, gguf: GGUFFile, config: dict[str, Any] | None = None) -> None:
        self.gguf = gguf
        self.description = str(gguf.path)
        self.arch = _check_arch(gguf)
        self.names = hf_name_map(gguf)
        config = hf_config(gguf) if config is None else config
        self.n_heads = config["num_attention_heads"]
        self.n_kv_heads = config.get("num_key_value_heads", self.n_heads)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def ggml_type(self, name: str) -> str:
        """The GGUF storage type name ("Q8_0", "Q4_K", "F16", ...) of a Hugging Face-named tensor."""
        return self.gguf.tensors[self.names[name]].type_name

    def _heads(self, name: str) -> int | None:
        """How many heads to unpermute this tensor's rows by, or None."""
        if not self.arch.permute_qk:
            return None
        if ".self_attn.q_proj." in name:
            return self.n_heads
        if ".self_attn.k_proj." in name:
            return self.n_kv_heads
        return None

    def get(self, name: str) -> tuple[np.ndarray, str]:
        array, stored = self.gguf.values(self.names[name])
        heads = self._heads(name)
        if heads is not None:
            array = unpermute_rows(array, heads)
        return array, stored

    def get_q8_0(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """For a tensor stored as Q8_0: (int8 values [rows, cols], float16 scales [rows, cols // 32]) in the
        same row order as :meth:`get`; None for any other storage type."""
        info = self.gguf.tensors[self.names[name]]
        if info.ggml_type != GGML_Q8_0:
            return None
        qs, scales = self.gguf.q8_0_blocks(info.name)
        heads = self._heads(name)
        if heads is not None:
            qs, scales = unpermute_rows(qs, heads), unpermute_rows(scales, heads)
        return qs, scales


def apply_rope_freqs(spec: Any, gguf: GGUFFile) -> Any:
    """llama.cpp stores Llama 3.1-style frequency scaling as a ``rope_freqs.weight`` tensor of per-frequency
    divisors instead of metadata; fold it into the spec's inverse frequencies."""
    if "rope_freqs.weight" not in gguf.tensors:
        return spec
    factors, stored = gguf.values("rope_freqs.weight")
    factors = np.asarray(factors, dtype=np.float32).reshape(-1)
    inv_freq = spec.rope.inv_freq
    if factors.shape != inv_freq.shape:
        raise ModelFormatError(
            f"{gguf.path}: rope_freqs.weight has {factors.size} values, expected {inv_freq.size} (rotary dims / 2)"
        )
    if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise ModelFormatError(f"{gguf.path}: rope_freqs.weight must hold finite positive factors")
    rope = replace(spec.rope, inv_freq=(inv_freq / factors).astype(np.float32))
    return replace(spec, rope=rope)


# --- the whole model ------------------------------------------------------------------------------


@dataclass
class GGUFModel:
    """Everything cpullm reads from a GGUF file, before weights are put in the runtime's layout."""

    file: GGUFFile
    config: dict[str, Any]  # transformers-style
    spec: Any  # ModelSpec
    source: GGUFTensorSource  # tensors by Hugging Face name
    tokenizer: Any  # cpullm.tokenizer.Tokenizer or None
    generation_config: dict[str, Any]


def _check_biases(gguf: GGUFFile, source: GGUFTensorSource, spec: Any) -> None:
    """llama.cpp applies every bias tensor a file holds (on q, k, v, the output and the FFN projections);
    the canonical model carries q / k / v biases for the families that have them and no others, so a file
    with any other bias is refused rather than run without it."""
    allowed = (".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias") if spec.qkv_bias else ()
    extra = sorted(source.names[name] for name in source.names if name.endswith(".bias") and not name.endswith(allowed))
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise UnsupportedModelError(f"{gguf.path}: bias tensors are not supported for '{gguf.architecture}' ({shown})")


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Parses and validates a GGUF file: config, spec, tokenizer; tensors are read lazily from ``source``."""
    from .gguf_tokenizer import build_tokenizer, eos_token_ids
    from .spec import spec_from_hf_config

    gguf = GGUFFile(path)
    config = hf_config(gguf)
    spec = apply_rope_freqs(spec_from_hf_config(config), gguf)
    source = GGUFTensorSource(gguf, config)
    _check_biases(gguf, source, spec)
    _check_shapes(gguf, source, spec)
    tokenizer = build_tokenizer(gguf)
    generation_config: dict[str, Any] = {}
    eos = eos_token_ids(gguf)
    if eos:
        generation_config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
        config["eos_token_id"] = generation_config["eos_token_id"]
    if "bos_token_id" in config:
        generation_config["bos_token_id"] = config["bos_token_id"]
    return GGUFModel(gguf, config, spec, source, tokenizer, generation_config)


def write_side_files(model: GGUFModel, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Writes what a Hugging Face directory would hold beside the weights, from the GGUF's metadata:
    config.json, generation_config.json, tokenizer.json and tokenizer_config.json (with the chat template).
    For converting a GGUF into a directory (``cpullm convert``, the model cache). Returns name -> path."""
    import json

    out = Path(directory)
    files: dict[str, Any] = {"config.json": model.config, "generation_config.json": model.generation_config}
    written: dict[str, Path] = {}
    if model.tokenizer is not None:
        (out / "tokenizer.json").write_text(model.tokenizer._tok.to_str(), encoding="utf-8")
        written["tokenizer.json"] = out / "tokenizer.json"
        files["tokenizer_config.json"] = {"tokenizer_class": "PreTrainedTokenizerFast", **model.tokenizer.config}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written[name] = out / name
    return written


def _check_shapes(gguf: GGUFFile, source: GGUFTensorSource, spec: Any) -> None:
    """Every tensor the runtime reads has the shape the metadata implies (checked before dequantizing)."""
    q_rows, kv_rows = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    expected = {
        "model.embed_tokens.weight": (spec.vocab_size, spec.dim),
        "model.norm.weight": (spec.dim,),
        "lm_head.weight": (spec.vocab_size, spec.dim),
    }
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (spec.dim,),
            p + "post_attention_layernorm.weight": (spec.dim,),
            p + "self_attn.q_proj.weight": (q_rows, spec.dim),
            p + "self_attn.k_proj.weight": (kv_rows, spec.dim),
            p + "self_attn.v_proj.weight": (kv_rows, spec.dim),
            p + "self_attn.o_proj.weight": (spec.dim, q_rows),
            p + "mlp.gate_proj.weight": (spec.ffn_dim, spec.dim),
            p + "mlp.up_proj.weight": (spec.ffn_dim, spec.dim),
            p + "mlp.down_proj.weight": (spec.dim, spec.ffn_dim),
        })
    for name, shape in expected.items():
        if name in source.names:
            info = gguf.tensors[source.names[name]]
            if info.shape != shape:
                raise ModelFormatError(
                    f"{gguf.path}: tensor '{info.name}' has shape {list(info.shape)}, expected {list(shape)} "
                    f"from the metadata"
                )
    for i in range(spec.n_layers):
        if not any(n.startswith(f"model.layers.{i}.") for n in source.names):
            raise ModelFormatError(f"{gguf.path}: the metadata says {spec.n_layers} blocks but blk.{i}.* is missing")


def load_gguf(path: str | os.PathLike[str], dtype: str, threads: int, context_length: int | None = None,
              group_size: int | None = None) -> Any:
    """A ``Model`` from a GGUF file (what ``cpullm.load("file.gguf")`` calls)."""
    from .hf import canonical_tensors
    from .model import Model

    m = read_gguf(path)
    spec = m.spec if group_size is None else replace(m.spec, group_size=group_size)
    if context_length is not None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
        spec = replace(spec, max_context=min(context_length, spec.max_context))
    tensors = canonical_tensors(spec, m.source, dtype)
    return Model(
        spec,
        tensors,
        tokenizer=m.tokenizer,
        generation_config=m.generation_config,
        config=m.config,
        dtype=dtype,
        threads=threads,
        source=Path(path),
    )
