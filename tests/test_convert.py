"""`cpullm convert` and the converted format: round trips, streaming layout, refusal of bad directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cpullm
from conftest import write_tokenizer
from cpullm.convert import convert
from cpullm.safetensors_io import SafetensorsFile

CONFIG = dict(hidden_size=144, num_attention_heads=6, num_key_value_heads=2, intermediate_size=173)


@pytest.fixture(scope="module")
def source(make_llama: Any) -> Path:
    directory, _ = make_llama(seed=21, **CONFIG)
    write_tokenizer(directory, chat_template="{{ messages[0]['content'] }}")
    return directory


@pytest.mark.parametrize("dtype,group_size", [("int8", 32), ("int8", 64), ("bf16", 32), ("f32", 32)])
def test_round_trip_gives_the_same_logits(source: Path, tmp_path: Path, dtype: str, group_size: int) -> None:
    out = convert(source, tmp_path / "out", dtype=dtype, group_size=group_size, progress=False)
    converted = cpullm.load(out)
    in_memory = cpullm.load(source, dtype=dtype, group_size=group_size)
    assert converted.dtype == dtype
    ids = np.arange(3, 40)
    np.testing.assert_array_equal(converted.logits(ids), in_memory.logits(ids))
    assert converted.tokenizer is not None and converted.tokenizer.chat_template is not None
    assert converted.tokenizer.encode("The capital") == in_memory.tokenizer.encode("The capital")


def test_converted_file_is_aligned_plain_safetensors_and_memory_mapped(source: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    out = convert(source, tmp_path / "out", dtype="int8", progress=False)
    file = SafetensorsFile(out / "model.safetensors")
    assert {file.tensors[n].dtype for n in file.keys()} == {"F32", "I8"}
    assert file.tensors["layers.0.wqkv"].shape == (6 * 24 + 2 * 2 * 24, 144)
    assert file.tensors["layers.0.wqkv.scales"].shape == (6 * 24 + 2 * 2 * 24, 144 // 32 + 1)
    for name in file.keys():
        array = file.get(name)
        assert array.flags.aligned and not array.flags.owndata and not array.flags.writeable, name
    # Another reader agrees on every tensor.
    ours = {n: np.asarray(file.get(n)) for n in file.keys()}
    theirs = load_file(str(out / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    marker = json.loads((out / "cpullm.json").read_text())
    assert marker["format_version"] == 1 and marker["dtype"] == "int8" and marker["group_size"] == 32
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())


def test_refuses_to_overwrite_without_force(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert(source, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only an earlier conversion: a directory of anything else stays as it was
    with pytest.raises(FileExistsError, match="not a cpullm-converted directory"):
        convert(source, out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    convert(source, out, progress=False)
    (out / "stale.txt").write_text("from the last conversion")
    convert(source, out, force=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "cpullm.json").exists()


def test_refuses_an_output_directory_that_contains_the_source(tmp_path: Path, source: Path) -> None:
    """`cpullm convert parent/model parent --force` must not delete the model (or its neighbours)."""
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(source, parent / "model")
    (parent / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(ValueError, match="contains the source"):
            convert(parent / "model", parent, force=force, progress=False)
    assert (parent / "notes.txt").read_text() == "mine" and (parent / "model" / "config.json").exists()


def test_failed_conversion_leaves_nothing(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cpullm.convert as convert_module

    def broken(*args: Any, **kwargs: Any) -> Any:
        yield "tok_embeddings", np.zeros((2, 2), np.float32)
        raise cpullm.ModelFormatError("boom")

    monkeypatch.setattr(convert_module, "iter_canonical_tensors", broken)
    with pytest.raises(cpullm.ModelFormatError, match="boom"):
        convert(source, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dtype_mismatch_and_group_size_on_converted(source: Path, tmp_path: Path) -> None:
    out = convert(source, tmp_path / "out", dtype="int8", progress=False)
    with pytest.raises(ValueError, match="converted to int8"):
        cpullm.load(out, dtype="f32")
    with pytest.raises(ValueError, match="group_size"):
        cpullm.load(out, group_size=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        convert(source, tmp_path / "other", group_size=48, progress=False)
    with pytest.raises(cpullm.ModelFormatError, match="already in the converted format"):
        convert(out, tmp_path / "again", progress=False)


def _corrupt_marker(out: Path, **changes: Any) -> None:
    marker = json.loads((out / "cpullm.json").read_text())
    marker.update(changes)
    (out / "cpullm.json").write_text(json.dumps(marker))


@pytest.fixture()
def converted(source: Path, tmp_path: Path) -> Path:
    return convert(source, tmp_path / "out", dtype="int8", progress=False)


def test_unknown_format_version(converted: Path) -> None:
    _corrupt_marker(converted, format_version=99)
    with pytest.raises(cpullm.UnsupportedModelError, match="format version 99"):
        cpullm.load(converted)


def test_spec_that_disagrees_with_tensors(converted: Path) -> None:
    marker = json.loads((converted / "cpullm.json").read_text())
    marker["spec"]["ffn_dim"] = 174
    (converted / "cpullm.json").write_text(json.dumps(marker))
    with pytest.raises(cpullm.ModelFormatError, match="'layers.0.w13' has shape"):
        cpullm.load(converted)


def test_bad_spec_values(converted: Path) -> None:
    marker = json.loads((converted / "cpullm.json").read_text())
    marker["spec"]["rope"]["inv_freq"] = [1.0, 2.0]
    (converted / "cpullm.json").write_text(json.dumps(marker))
    with pytest.raises(cpullm.ModelFormatError, match="inv_freq"):
        cpullm.load(converted)


def test_missing_and_misshapen_tensors(converted: Path) -> None:
    from safetensors.numpy import save_file

    file = SafetensorsFile(converted / "model.safetensors")
    tensors = {n: np.array(file.get(n)) for n in file.keys()}
    del file
    without_scales = {n: a for n, a in tensors.items() if n != "layers.1.w2.scales"}
    save_file(without_scales, str(converted / "model.safetensors"))
    with pytest.raises(cpullm.ModelFormatError, match="'layers.1.w2.scales' is missing"):
        cpullm.load(converted)
    tensors["layers.1.w2.scales"] = tensors["layers.1.w2.scales"][:, :2].copy()
    save_file(tensors, str(converted / "model.safetensors"))
    with pytest.raises(cpullm.ModelFormatError, match="'layers.1.w2.scales' has shape"):
        cpullm.load(converted)
    tensors["layers.1.w2.scales"] = tensors["layers.1.w2"].astype(np.float32)
    tensors["layers.1.w2"] = tensors["layers.1.w2"].astype(np.int16)
    save_file(tensors, str(converted / "model.safetensors"))
    with pytest.raises(cpullm.ModelFormatError, match="stored as I16"):
        cpullm.load(converted)


def test_truncated_converted_safetensors(converted: Path) -> None:
    path = converted / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(cpullm.ModelFormatError, match="outside the data section"):
        cpullm.load(converted)


def test_cli_convert_then_generate(source: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "cpullm", *a], capture_output=True, text=True, env=env, timeout=120)  # noqa: E731
    out = tmp_path / "out"
    result = run("convert", str(source), str(out), "--dtype", "int8", "-q")
    assert result.returncode == 0, result.stderr
    again = run("convert", str(source), str(out))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    expected = cpullm.load(out).generate("The capital", max_tokens=8)
    gen = run("generate", str(out), "-p", "The capital", "-n", "8")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == expected + "\n"
