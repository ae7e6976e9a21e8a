"""A strict, memory-mapped reader of safetensors files.

The ``safetensors`` package's NumPy API copies each tensor and cannot return bf16 (NumPy has no such
type), so cpullm maps the file itself: every header field is checked against the file before a byte
of tensor data is touched, and tensors come back as read-only views into the map (bf16 as its raw
uint16 bits). Writing uses the ``safetensors`` package.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelFormatError

# safetensors dtype name -> NumPy dtype of the stored bits (bf16 kept as uint16).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int


class SafetensorsFile:
    """One ``.safetensors`` file, validated and memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise ModelFormatError(f"{self.path}: {size} bytes is too short for a safetensors file")
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > min(size - 8, _MAX_HEADER_BYTES):
                    raise ModelFormatError(
                        f"{self.path}: header length {header_len} runs past the end of the file ({size} bytes)"
                    )
                header_bytes = f.read(header_len)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as e:
            raise ModelFormatError(f"{self.path}: cannot read: {e}") from e
        self._data_start = 8 + header_len
        self._data_size = size - self._data_start
        self.metadata, self.tensors = self._parse_header(header_bytes)

    def _parse_header(self, raw: bytes) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{self.path}: header is not valid JSON: {e}") from e
        if not isinstance(header, dict):
            raise ModelFormatError(f"{self.path}: header must be a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ModelFormatError(f"{self.path}: __metadata__ must be an object")
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._check_entry(name, entry)
        spans = sorted((t.begin, t.end, n) for n, t in tensors.items() if t.end > t.begin)
        for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise ModelFormatError(f"{self.path}: tensors '{name_a}' and '{name_b}' overlap")
        return metadata, tensors

    def _check_entry(self, name: str, entry: object) -> TensorInfo:
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise ModelFormatError(f"{where}: entry must be an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFormatError(f"{where}: unsupported dtype {dtype!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelFormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise ModelFormatError(f"{where}: data_offsets must be two integers, got {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= self._data_size:
            raise ModelFormatError(
                f"{where}: data_offsets [{begin}, {end}] lie outside the data section ({self._data_size} bytes)"
            )
        count = 1
        for d in shape:
            count *= d
        if count * DTYPES[dtype].itemsize != end - begin:
            raise ModelFormatError(
                f"{where}: shape {shape} of {dtype} needs {count * DTYPES[dtype].itemsize} bytes "
                f"but data_offsets span {end - begin}"
            )
        return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor (a copy only when the file leaves it misaligned)."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: tensor '{name}' is missing")
        dtype = DTYPES[info.dtype]
        count = (info.end - info.begin) // dtype.itemsize
        if count == 0 or self._map is None:
            return np.zeros(info.shape, dtype=dtype)
        array = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._data_start + info.begin)
        array = array.reshape(info.shape)
        if not array.flags.aligned:
            array = array.copy()
            array.flags.writeable = False
        return array
