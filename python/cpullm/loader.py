"""``cpullm.load``: finds out what a path holds and builds a ``Model`` from it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import _C
from .dtypes import DEFAULT_GROUP_SIZE, WEIGHT_DTYPES, check_fast_prefill, check_group_size, check_kv_cache_dtype
from .errors import ModelFormatError, ModelNotFoundError
from .hf import Checkpoint, canonical_tensors, read_json, resolve_tied_head
from .hub import resolve as resolve_name
from .model import Model
from .converted import is_converted, read_converted
from .gguf_io import is_gguf
from .spec import ModelSpec, spec_from_hf_config
from .threads import resolve_threads
from .tokenizer import Tokenizer

DEFAULT_DTYPE = "f32"  # for Hugging Face directories: exact parity with transformers


def _cap_context(spec: ModelSpec, context_length: int | None) -> ModelSpec:
    if context_length is None:
        return spec
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    return replace(spec, max_context=min(context_length, spec.max_context))


def _load_hf_directory(directory: Path, dtype: str, threads: int, context_length: int | None, group_size: int) -> Model:
    config = read_json(directory / "config.json")
    try:
        hf_spec = spec_from_hf_config(config)
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:  # a value of the wrong type
        raise ModelFormatError(f"{directory / 'config.json'}: malformed ({type(e).__name__}: {e})") from e
    checkpoint = Checkpoint(directory)
    spec = _cap_context(replace(resolve_tied_head(hf_spec, checkpoint), group_size=group_size), context_length)
    tensors = canonical_tensors(spec, checkpoint, dtype)
    return _assemble(directory, config, spec, tensors, dtype, threads)


def _load_converted(directory: Path, dtype: str | None, threads: int, context_length: int | None,
                    group_size: int | None) -> Model:
    marker, spec, stored_dtype, tensors = read_converted(directory)
    if dtype is not None and dtype != stored_dtype:
        raise ValueError(
            f"{directory} was converted to {stored_dtype}; load it with dtype={stored_dtype!r} (or None), "
            f"or convert the source again with --dtype {dtype}"
        )
    if group_size is not None and stored_dtype == "int8" and group_size != spec.group_size:
        raise ValueError(f"{directory} was converted with group_size {spec.group_size}; a converted model keeps its "
                         f"own (convert the source again with --group-size {group_size})")
    try:
        config = read_json(directory / "config.json")
    except FileNotFoundError:
        raise ModelFormatError(f"{directory}: config.json is missing (convert the model again)") from None
    return _assemble(directory, config, _cap_context(spec, context_length), tensors, stored_dtype, threads)


def _assemble(
    directory: Path, config: dict, spec: ModelSpec, tensors: dict, dtype: str, threads: int
) -> Model:
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
    kv_cache_dtype: str | None = None,
    fast_prefill: bool = False,
) -> Model:
    """Loads a model.

    ``path``: a directory made by ``cpullm convert`` (memory-mapped, no copy of the weights), or a
    Hugging Face directory (config.json + safetensors, one file or sharded; converted in memory), a
    GGUF file (any type the gguf package dequantizes), or a known model name ("smollm2-135m-instruct",
    the default model, fetched into the user cache on first use; see cpullm.hub).
    ``dtype``: "f32", "bf16" (half the bytes) or "int8" (group-wise symmetric int8; a quarter of the
    bytes, the fastest). Default: f32 for Hugging Face directories (exact parity with transformers),
    the stored dtype for converted directories.
    ``threads``: compute threads (default: the physical cores available to this process).
    ``context_length``: cap on positions per sequence (default: the model's max_position_embeddings).
    ``group_size``: inputs per int8 scale (default 32), a multiple of 32.
    ``kv_cache_dtype``: "f32" or "f16", the element type of every sequence's KV cache
    (``Model.kv_cache_dtype`` changes it for sequences started later). Default: f32 with f32 weights,
    f16 with int8 and bf16 weights. f16 halves the cache's memory and the bytes attention reads per
    cached position, at f16's rounding of keys and values (no measured loss next to int8 weights).
    ``fast_prefill``: with int8 weights, a prompt's tokens whose logits nobody reads (all but the last)
    take one int8 digit per activation instead of two: prompt processing about 1.5x faster, at a
    measured cost in accuracy (``Model.fast_prefill``; docs/int8.md). Off by default.
    """
    if kv_cache_dtype is not None:
        check_kv_cache_dtype(kv_cache_dtype)  # before any weight is read
    check_fast_prefill(fast_prefill)
    model = _load(path, dtype, threads, context_length, group_size)
    # What converting weights at load freed leaves the RSS too (SmolLM2's f32 directory as int8: -115 MiB).
    _C.trim_heap()
    if kv_cache_dtype is not None:
        model.kv_cache_dtype = kv_cache_dtype
    model.fast_prefill = fast_prefill
    return model


def _load(path: str | Path, dtype: str | None, threads: int | None, context_length: int | None,
          group_size: int | None) -> Model:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"cpullm.load: path must be a model directory, a .gguf file or a known model name such as "
                        f"'smollm2-135m-instruct', got {type(path).__name__}")
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    n_threads = resolve_threads(threads)
    group = check_group_size(DEFAULT_GROUP_SIZE if group_size is None else group_size)
    if not str(path):
        raise ModelNotFoundError("cpullm.load: the path is empty")
    # A group size given without a dtype asks for int8 where weights are quantized at load.
    quantizing_default = "int8" if group_size is not None else DEFAULT_DTYPE
    # A known model name -> its cached int8 conversion, fetched on first use (or the GGUF it came from).
    requantize = dtype not in (None, "int8") or group != DEFAULT_GROUP_SIZE
    source = Path(resolve_name(path, requantize=requantize))
    if not source.exists():
        raise ModelNotFoundError(f"{source}: no such file or directory")
    if source.is_dir():
        if is_converted(source):
            return _load_converted(source, dtype, n_threads, context_length, group_size)
        if (source / "config.json").exists():
            return _load_hf_directory(source, dtype or quantizing_default, n_threads, context_length, group)
        raise ModelFormatError(f"{source}: not a model directory (no config.json)")
    if source.suffix.lower() == ".gguf" or is_gguf(source):
        from .gguf_io import load_gguf

        return load_gguf(source, dtype or quantizing_default, n_threads, context_length, group)
    raise ModelFormatError(f"{source}: not a model directory or a known model file")
