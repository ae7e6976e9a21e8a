"""``cpullm convert``: any supported source into the converted format, streamed tensor by tensor."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .converted import EXTRA_FILES, is_converted, write_converted
from .dtypes import DEFAULT_GROUP_SIZE, WEIGHT_DTYPES, check_group_size
from .errors import ModelFormatError, ModelNotFoundError
from .gguf_io import is_gguf
from .hf import Checkpoint, canonical_tensor_count, iter_canonical_tensors, read_json, resolve_tied_head
from .spec import spec_from_hf_config

DEFAULT_CONVERT_DTYPE = "int8"


def _with_progress(tensors: Iterator[tuple[str, np.ndarray]], total: int, show: bool) -> Iterator[tuple[str, np.ndarray]]:
    with tqdm(total=total, unit="tensor", desc="converting", disable=not show, leave=False) as bar:
        for name, array in tensors:
            yield name, array
            if not name.endswith(".scales"):
                bar.update(1)


def convert(
    src: str | Path,
    out: str | Path,
    dtype: str = DEFAULT_CONVERT_DTYPE,
    group_size: int = DEFAULT_GROUP_SIZE,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Converts a Hugging Face directory or a GGUF file into OUT (see cpullm.converted). Returns OUT."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    check_group_size(group_size)
    source, target = Path(src), Path(out)
    if not source.exists():
        raise ModelNotFoundError(f"{source}: no such file or directory")
    if source.resolve() == target.resolve():
        raise ValueError("the output directory must differ from the source")
    if target.resolve() in source.resolve().parents:
        raise ValueError(f"the output directory {target} contains the source {source}; choose another")
    if source.is_dir() and is_converted(source):
        raise ModelFormatError(f"{source}: already in the converted format")
    if source.is_file() and is_gguf(source):
        return _convert_gguf(source, target, dtype, group_size, force, progress)
    if not (source.is_dir() and (source / "config.json").exists()):
        raise ModelFormatError(f"{source}: not a Hugging Face model directory (no config.json) or a GGUF file")
    config = read_json(source / "config.json")
    try:
        hf_spec = spec_from_hf_config(config)
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:  # a value of the wrong type
        raise ModelFormatError(f"{source / 'config.json'}: malformed ({type(e).__name__}: {e})") from e
    checkpoint = Checkpoint(source)
    spec = replace(resolve_tied_head(hf_spec, checkpoint), group_size=group_size)
    tensors = _with_progress(iter_canonical_tensors(spec, checkpoint, dtype), canonical_tensor_count(spec, checkpoint),
                             progress)
    extras = {name: source / name for name in EXTRA_FILES if (source / name).is_file()}
    write_converted(target, config=config, spec=spec, dtype=dtype, tensors=tensors, extra_files=extras,
                    source=str(source), force=force)
    return target


def _convert_gguf(source: Path, target: Path, dtype: str, group_size: int, force: bool, progress: bool) -> Path:
    """A GGUF file: its metadata becomes config.json and the tokenizer files; Q8_0 tensors go to int8 with
    32-wide groups as they are stored."""
    from .gguf_io import read_gguf, write_side_files

    model = read_gguf(source)
    spec = replace(model.spec, group_size=group_size)
    tensors = _with_progress(iter_canonical_tensors(spec, model.source, dtype), canonical_tensor_count(spec, model.source),
                             progress)
    with tempfile.TemporaryDirectory() as side:
        extras = write_side_files(model, side)
        write_converted(target, config=model.config, spec=spec, dtype=dtype, tensors=tensors,
                        extra_files={n: p for n, p in extras.items() if n != "config.json"},
                        source=str(source), force=force)
    return target
