"""``cpullm.load``: finds out what a path holds and builds a ``Model`` from it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .dtypes import DEFAULT_GROUP_SIZE, WEIGHT_DTYPES, check_group_size
from .errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from .hf import Checkpoint, canonical_tensors, read_json
from .model import Model
from .spec import spec_from_hf_config
from .threads import resolve_threads
from .tokenizer import Tokenizer

DEFAULT_DTYPE = "f32"  # for Hugging Face directories: exact parity with transformers


def _load_hf_directory(directory: Path, dtype: str, threads: int, context_length: int | None, group_size: int) -> Model:
    config = read_json(directory / "config.json")
    spec = replace(spec_from_hf_config(config), group_size=group_size)
    if context_length is not None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
        spec = replace(spec, max_context=min(context_length, spec.max_context))
    tensors = canonical_tensors(spec, Checkpoint(directory), dtype)
    generation_path = directory / "generation_config.json"
    generation_config = read_json(generation_path) if generation_path.exists() else {}
    if not isinstance(generation_config, dict):
        raise ModelFormatError(f"{generation_path}: expected a JSON object")
    return Model(
        spec,
        tensors,
        tokenizer=Tokenizer.from_directory(directory),
        generation_config=generation_config,
        config=config,
        dtype=dtype,
        threads=threads,
        source=directory,
    )


def load(
    path: str | Path,
    dtype: str | None = None,
    threads: int | None = None,
    context_length: int | None = None,
    group_size: int | None = None,
) -> Model:
    """Loads a model.

    ``path``: a Hugging Face directory (config.json + safetensors, one file or sharded).
    ``dtype``: "f32" (default: exact parity with transformers), "bf16" (half the bytes) or "int8"
    (group-wise symmetric int8, quantized at load; a quarter of the bytes, the fastest).
    ``threads``: compute threads (default: the physical cores available to this process).
    ``context_length``: cap on positions per sequence (default: the model's max_position_embeddings).
    ``group_size``: inputs per int8 scale (default 32), a multiple of 32.
    """
    dtype = DEFAULT_DTYPE if dtype is None else dtype
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    n_threads = resolve_threads(threads)
    group = check_group_size(DEFAULT_GROUP_SIZE if group_size is None else group_size)
    source = Path(path)
    if not source.exists():
        raise ModelNotFoundError(f"{source}: no such file or directory")
    if source.is_dir():
        if (source / "config.json").exists():
            return _load_hf_directory(source, dtype, n_threads, context_length, group)
        raise ModelFormatError(f"{source}: not a model directory (no config.json)")
    if source.suffix == ".gguf":
        raise UnsupportedModelError(f"{source}: GGUF files are not supported yet")
    raise ModelFormatError(f"{source}: not a model directory or a known model file")
