"""Bad input gets a clear Python exception that says what is wrong, never a crash."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cpullm
from cpullm.safetensors_io import SafetensorsFile


@pytest.fixture()
def model_dir(make_llama: Any, tmp_path: Path) -> Path:
    source, _ = make_llama(seed=11)
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def _write_safetensors(path: Path, header: dict[str, Any], data: bytes, header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def _rewrite_tensor(directory: Path, name: str, array: np.ndarray | None) -> None:
    """Rewrites model.safetensors with one tensor replaced (or removed when array is None)."""
    from safetensors.numpy import save_file

    file = SafetensorsFile(directory / "model.safetensors")
    tensors = {k: np.array(file.get(k)) for k in file.keys() if k != name}
    if array is not None:
        tensors[name] = array
    del file
    save_file(tensors, str(directory / "model.safetensors"))


def _config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def _set_config(directory: Path, **changes: Any) -> None:
    config = _config(directory)
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_path() -> None:
    with pytest.raises(cpullm.ModelNotFoundError, match="no such file"):
        cpullm.load("/definitely/not/here")


@pytest.mark.parametrize("path", [None, 3, ["model"]])
def test_path_of_the_wrong_type(path: object) -> None:
    with pytest.raises(TypeError, match="path must be a model directory"):
        cpullm.load(path)  # type: ignore[arg-type]


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(cpullm.ModelFormatError, match="no config.json"):
        cpullm.load(tmp_path)


def test_missing_weights(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(cpullm.ModelFormatError, match="no \\*.safetensors"):
        cpullm.load(model_dir)


@pytest.mark.parametrize("model_type", ["gpt2", "bert", None])
def test_unsupported_model_type(model_dir: Path, model_type: Any) -> None:
    _set_config(model_dir, model_type=model_type)
    with pytest.raises(cpullm.UnsupportedModelError, match=f"model_type {model_type!r} is not supported"):
        cpullm.load(model_dir)


def test_unsupported_rope_type(model_dir: Path) -> None:
    _set_config(model_dir, rope_parameters={"rope_type": "mrope", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(cpullm.UnsupportedModelError, match="rope type 'mrope'"):
        cpullm.load(model_dir)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"hidden_size": -4}, "'hidden_size' must be an integer"),
        ({"num_hidden_layers": "two"}, "'num_hidden_layers' must be an integer"),
        ({"num_key_value_heads": 4}, "not a multiple of num_key_value_heads"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ],
)
def test_bad_config_values(model_dir: Path, changes: dict[str, Any], message: str) -> None:
    _set_config(model_dir, **changes)
    with pytest.raises(cpullm.CpullmError, match=message):
        cpullm.load(model_dir)


def test_config_not_json(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(cpullm.ModelFormatError, match="not readable JSON"):
        cpullm.load(model_dir)


def test_hostile_dimensions_are_refused_before_any_allocation(model_dir: Path) -> None:
    _set_config(model_dir, vocab_size=2**40, max_position_embeddings=2**40)
    with pytest.raises(cpullm.ModelFormatError):
        cpullm.load(model_dir)


def test_tensor_with_wrong_shape(model_dir: Path) -> None:
    _rewrite_tensor(model_dir, "model.layers.1.self_attn.o_proj.weight", np.zeros((96, 95), np.float32))
    with pytest.raises(cpullm.ModelFormatError, match=r"'layers.1.wo' has shape \[96, 95\], expected \[96, 96\]"):
        cpullm.load(model_dir)


def test_fused_parts_with_mismatched_shapes(model_dir: Path) -> None:
    _rewrite_tensor(model_dir, "model.layers.0.mlp.up_proj.weight", np.zeros((200, 7), np.float32))
    with pytest.raises(cpullm.ModelFormatError, match="mismatched shapes"):
        cpullm.load(model_dir)


def test_missing_tensor(model_dir: Path) -> None:
    _rewrite_tensor(model_dir, "model.layers.0.mlp.down_proj.weight", None)
    with pytest.raises(cpullm.ModelFormatError, match="'model.layers.0.mlp.down_proj.weight' is missing"):
        cpullm.load(model_dir)


def test_integer_tensor_used_as_weights(model_dir: Path) -> None:
    _rewrite_tensor(model_dir, "model.norm.weight", np.ones(96, np.int32))
    with pytest.raises(cpullm.ModelFormatError, match="cannot use a I32 tensor"):
        cpullm.load(model_dir)


def test_truncated_safetensors(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(cpullm.ModelFormatError, match="outside the data section"):
        cpullm.load(model_dir)
    path.write_bytes(data[:5])
    with pytest.raises(cpullm.ModelFormatError, match="too short"):
        cpullm.load(model_dir)


@pytest.mark.parametrize(
    "header,data,header_len,message",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside the data section"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, None, "needs 16 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 16, None, "outside the data section"),
        ({"a": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, b"\0" * 16, None, "non-negative"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16, None, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 16, None, "overlap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**60, "runs past the end"),
        ({"a": "nonsense"}, b"", None, "must be an object"),
    ],
)
def test_safetensors_header_that_lies(tmp_path: Path, header: Any, data: bytes, header_len: Any, message: str) -> None:
    path = tmp_path / "x.safetensors"
    _write_safetensors(path, header, data, header_len)
    with pytest.raises(cpullm.ModelFormatError, match=message):
        SafetensorsFile(path)


def test_header_not_json(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 6) + b"\xff{abc}")
    with pytest.raises(cpullm.ModelFormatError, match="not valid JSON"):
        SafetensorsFile(path)


def test_index_naming_a_file_outside_the_directory(model_dir: Path) -> None:
    index = {"weight_map": {"model.norm.weight": "../model.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(cpullm.ModelFormatError, match="not a plain file name"):
        cpullm.load(model_dir)


def test_bad_load_arguments(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        cpullm.load(model_dir, dtype="f8")
    with pytest.raises(ValueError, match="threads must be"):
        cpullm.load(model_dir, threads=0)
    with pytest.raises(ValueError, match="context_length"):
        cpullm.load(model_dir, context_length=-1)


def test_bad_token_ids_and_context_overflow(model_dir: Path) -> None:
    model = cpullm.load(model_dir, context_length=16)
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.logits([1, 2, 320])
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.logits([-1])
    with pytest.raises(ValueError, match="non-empty"):
        model.logits([])
    with pytest.raises(ValueError, match="integers"):
        model.logits([1.5, 2.0])
    with pytest.raises(cpullm.ContextOverflowError, match="exceed the context length 16"):
        model.logits(list(range(17)))
    with pytest.raises(ValueError, match="max_tokens"):
        list(model.generate_tokens([1, 2], max_tokens=-1))
    # Generation stops when the context is full instead of writing past the cache.
    generated = list(model.generate_tokens(list(range(10)), max_tokens=100, stop_token_ids=()))
    assert len(generated) == 16 - 10  # prompt and reply fill the context, as transformers counts max_length


def test_native_layer_checks_what_it_is_handed(model_dir: Path) -> None:
    model = cpullm.load(model_dir, context_length=8)
    sequence = cpullm._C.Sequence(model._model())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sequence.forward(np.array([5, 100000], np.int32), True, 1)
    with pytest.raises(ValueError, match="thread count"):
        sequence.forward(np.array([5], np.int32), True, 0)
    # ids are integers that fit: floats are not cast, wide ids do not wrap into the vocabulary
    for bad, message in [(np.array([1.5]), "must be integers"), (np.array([2**32 + 1], np.int64), "outside the vocabulary"),
                         (np.array([2**63], np.uint64), "outside the vocabulary"), (np.array([[1]], np.int32), "1-D")]:
        with pytest.raises(ValueError, match=message):
            sequence.forward(bad, True, 1)
        with pytest.raises(ValueError, match=message):
            sequence.feed(bad, 1)
    np.testing.assert_array_equal(cpullm._C.Sequence(model._model()).forward(np.array([3, 4], np.uint16), True, 1),
                                  cpullm._C.Sequence(model._model()).forward(np.array([3, 4], np.int32), True, 1))
    with pytest.raises(ValueError, match="got None"):
        cpullm._C.Sequence(None, "f32")
    np.testing.assert_array_equal(cpullm._C.Sequence(model._model()).forward([3, 4], True, 1),  # lists too
                                  cpullm._C.Sequence(model._model()).forward(np.array([3, 4], np.int32), True, 1))
    with pytest.raises(ValueError, match="must be integers"):
        cpullm._C.Sequence(model._model()).forward([3.0], True, 1)
    sequence.forward(np.arange(8, dtype=np.int32), False, 1)
    with pytest.raises(ValueError, match="exceed the context length 8"):
        sequence.forward(np.array([1], np.int32), False, 1)
    spec = model.spec.to_native()
    with pytest.raises(ValueError, match="out of range"):
        cpullm._C.Transformer({**spec, "vocab_size": 2**40}, {})
    with pytest.raises(ValueError, match="inv_freq has"):
        cpullm._C.Transformer({**spec, "inv_freq": [1.0]}, {})
    with pytest.raises(ValueError, match="'tok_embeddings' is missing"):
        cpullm._C.Transformer(spec, {})
    with pytest.raises(ValueError, match="dtype"):
        cpullm._C.Transformer(spec, {"tok_embeddings": np.zeros((320, 96), np.float64)})


def test_closed_model_refuses_work(model_dir: Path) -> None:
    with cpullm.load(model_dir) as model:
        model.logits([1, 2, 3])
    with pytest.raises(cpullm.CpullmError, match="closed"):
        model.logits([1, 2, 3])


def test_files_beside_the_weights_that_are_not_what_they_should_be(make_llama: Any, tmp_path: Path) -> None:
    """tokenizer_config.json that is no object, a chat template that is not UTF-8, and a converted
    directory without its config.json each raise ModelFormatError naming the file; an eos_token_id that
    holds no id falls back to the next source instead of never stopping."""
    from chat_util import make_word_chat_model

    from cpullm.convert import convert

    source = make_word_chat_model(make_llama, seed=3)
    for name, content, message in [("tokenizer_config.json", b"[1, 2]", "expected a JSON object"),
                                   ("chat_template.jinja", b"{{ '\xff' }}", "not a readable UTF-8 template")]:
        directory = tmp_path / name
        shutil.copytree(source, directory)
        (directory / name).write_bytes(content)
        with pytest.raises(cpullm.ModelFormatError, match=message):
            cpullm.load(directory)
    converted = convert(source, tmp_path / "converted", dtype="f32", progress=False)
    (converted / "config.json").unlink()
    with pytest.raises(cpullm.ModelFormatError, match="config.json is missing"):
        cpullm.load(converted)
    fallback = tmp_path / "eos"
    shutil.copytree(source, fallback)
    (fallback / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    assert json.loads((source / "config.json").read_text()).get("eos_token_id") is None  # so: the tokenizer's
    model = cpullm.load(fallback)
    assert model.eos_token_ids == (model.tokenizer.eos_token_id,) != ()


def test_generation_options_of_other_types(make_llama: Any) -> None:
    """NumPy integers count as integers; a single stop id is one id; bytes are not stop strings."""
    from chat_util import make_word_chat_model

    model = cpullm.load(make_word_chat_model(make_llama, seed=3), threads=1)
    assert model.generate("the", np.int64(3)) == model.generate("the", 3)
    assert model.chat(max_tokens=np.int32(2)).send("hi") == model.chat(max_tokens=2).send("hi")
    first = model.tokenizer.encode(model.generate("the", 1), add_special_tokens=False)[0]
    assert list(model.generate_tokens(model.tokenizer.encode("the"), 5, stop_token_ids=first)) == []
    assert list(model.generate_tokens(model.tokenizer.encode("the"), 5, stop_token_ids=np.int64(first))) == []
    for bad, message in [(dict(stop_token_ids="5"), "must be integers"), (dict(stop_token_ids=1.5), "token ids"),
                         (dict(stop=b"a"), "got bytes")]:
        with pytest.raises(ValueError, match=message):
            model.generate("the", 3, **bad)
