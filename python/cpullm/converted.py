"""The converted format (DESIGN.md, "The converted format"): a directory that loads with zero copies.

    OUT/config.json            the source config, verbatim
    OUT/cpullm.json            format version, ModelSpec, dtype and group size, source, converter version
    OUT/model.safetensors      canonical tensors; int8 matrices with "<name>.scales" beside them
    OUT/tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json  (as found)

Tensors are written grouped by element size (4-byte, then 2-byte, then 1-byte), so every tensor of
the file is naturally aligned for a zero-copy memory map, while the file stays a plain safetensors file
(no gaps) that other tools read. Writing streams tensor by tensor through one temporary file per size
class: memory stays near one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import numpy as np

from .errors import ModelFormatError, UnsupportedModelError
from .safetensors_io import SafetensorsFile
from .spec import ModelSpec, spec_from_json, spec_to_json

FORMAT_NAME = "cpullm"
FORMAT_VERSION = 1
MARKER = "cpullm.json"
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
               "special_tokens_map.json")

# (NumPy dtype of the runtime array, safetensors dtype name) for each stored kind.
_STORED = {
    np.dtype(np.float32): "F32",
    np.dtype(np.uint16): "BF16",  # bf16 bits; only ever produced for bf16 weights
    np.dtype(np.int8): "I8",
}
# What each dtype's tensors may be stored as.
_ALLOWED = {"f32": {"F32"}, "bf16": {"F32", "BF16"}, "int8": {"F32", "I8"}}


class _SafetensorsStreamWriter:
    """Writes a safetensors file from tensors that arrive one at a time, in any order of sizes."""

    def __init__(self, directory: Path) -> None:
        self._parts: dict[int, BinaryIO] = {}
        self._entries: dict[int, list[tuple[str, str, tuple[int, ...], int]]] = {}
        self._dir = directory

    def add(self, name: str, array: np.ndarray) -> None:
        dtype_name = _STORED.get(array.dtype)
        if dtype_name is None:
            raise TypeError(f"tensor '{name}' has unsupported dtype {array.dtype}")
        size = array.dtype.itemsize
        if size not in self._parts:
            self._parts[size] = tempfile.TemporaryFile(dir=self._dir)
            self._entries[size] = []
        data = np.ascontiguousarray(array).tobytes()
        self._parts[size].write(data)
        self._entries[size].append((name, dtype_name, tuple(array.shape), len(data)))

    def finish(self, path: Path, metadata: Mapping[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        sizes = sorted(self._parts, reverse=True)
        for size in sizes:
            for name, dtype_name, shape, nbytes in self._entries[size]:
                header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 64)  # data starts 64-byte aligned
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for size in sizes:
                part = self._parts[size]
                part.seek(0)
                shutil.copyfileobj(part, out, 16 << 20)
        self.close()

    def close(self) -> None:
        for part in self._parts.values():
            part.close()
        self._parts.clear()


def write_converted(
    out: Path,
    *,
    config: Mapping[str, Any],
    spec: ModelSpec,
    dtype: str,
    tensors: Iterable[tuple[str, np.ndarray]],
    extra_files: Mapping[str, Path],
    source: str,
    force: bool = False,
) -> None:
    """Writes the converted directory. ``tensors`` is consumed lazily (one tensor in memory at a time).
    The directory is built beside OUT and moved into place at the end, so a failure leaves no half model."""
    from . import __version__

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (use --force to overwrite)")
        if not (out.is_dir() and is_converted(out)):
            # --force replaces an earlier conversion, never a directory or file of anything else (a slip
            # such as `cpullm convert model ~ --force` must not delete a home directory).
            raise FileExistsError(f"{out} exists and is not a cpullm-converted directory; --force only replaces "
                                  "one (choose a new or empty output directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    writer = _SafetensorsStreamWriter(staging)
    try:
        for name, array in tensors:
            writer.add(name, array)
        writer.finish(staging / "model.safetensors", {"format": "pt", "producer": f"cpullm {__version__}"})
        (staging / "config.json").write_text(json.dumps(dict(config), indent=2, ensure_ascii=False))
        marker = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "group_size": spec.group_size,
            "spec": spec_to_json(spec),
            "source": source,
            "converter": f"cpullm {__version__}",
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
        for name, path in extra_files.items():
            shutil.copyfile(path, staging / name)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_converted(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def read_converted(directory: Path) -> tuple[dict[str, Any], ModelSpec, str, dict[str, np.ndarray]]:
    """(marker, spec, dtype, tensors as zero-copy views) of a converted directory, all checked."""
    from .hf import read_json

    marker = read_json(directory / MARKER)
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{directory / MARKER}: not a cpullm marker file")
    version = marker.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsupportedModelError(
            f"{directory}: converted format version {version!r} is not supported by this cpullm "
            f"(it reads version {FORMAT_VERSION}); convert the model again"
        )
    dtype = marker.get("dtype")
    if not isinstance(dtype, str) or dtype not in _ALLOWED:
        raise ModelFormatError(f"{directory / MARKER}: unknown dtype {dtype!r}")
    try:
        spec = spec_from_json(marker.get("spec"))
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:  # a value of the wrong JSON type
        raise ModelFormatError(f"{directory / MARKER}: the model spec is malformed ({type(e).__name__}: {e})") from e
    if marker.get("group_size") != spec.group_size:
        raise ModelFormatError(f"{directory / MARKER}: group_size disagrees with the spec")
    file = SafetensorsFile(directory / "model.safetensors")
    tensors: dict[str, np.ndarray] = {}
    for name, info in file.tensors.items():
        if info.dtype not in _ALLOWED[dtype]:
            raise ModelFormatError(f"{directory}: tensor '{name}' is stored as {info.dtype}, unexpected for {dtype}")
        tensors[name] = file.get(name)
    return marker, spec, dtype, tensors
