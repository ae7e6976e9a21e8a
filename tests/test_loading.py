"""Configs and files as found in the wild: old and new RoPE keys, chat templates in either place,
the tokenizer, and the `cpullm generate` command."""

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
from conftest import hf_logits, rel_err, write_tokenizer
from cpullm.rope import compute_rope, rope_parameters

CHATML = (
    "{% for message in messages %}{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 128},
    ],
)
@pytest.mark.parametrize("head_dim,partial", [(64, 1.0), (40, 1.0), (64, 0.5)])
def test_inv_freq_matches_transformers(rope_scaling: Any, head_dim: int, partial: float) -> None:
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_theta=123456.0,
                         rope_scaling=rope_scaling, max_position_embeddings=1024)
    config.standardize_rope_params()
    params = dict(config.rope_parameters)
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
        config.rope_parameters["partial_rotary_factor"] = partial
    rope_type = params["rope_type"]
    if rope_type == "default":  # the expression of LlamaRotaryEmbedding.compute_default_rope_parameters
        dim = int(head_dim * partial)
        expected, factor = 1.0 / (123456.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    ours = compute_rope(rope_parameters(config.to_dict()), int(head_dim * partial))
    np.testing.assert_allclose(ours.inv_freq, expected.numpy(), rtol=2e-7, atol=0)
    assert ours.attention_factor == pytest.approx(factor)


def test_old_and_new_config_styles_agree(make_llama: Any) -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    directory, hf_model = make_llama(seed=3, rope_theta=20000.0, rope_scaling=rope)
    written = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" in written  # transformers 5 writes the new form
    ids = np.random.default_rng(0).integers(0, 320, 150)
    expected = hf_logits(hf_model, ids)
    assert rel_err(cpullm.load(directory).logits(ids), expected) < 2e-5

    # The same model described the way older checkpoints are: rope_theta + rope_scaling{type}, no head_dim.
    old = {k: v for k, v in written.items() if k not in ("rope_parameters", "head_dim")}
    old["rope_theta"] = 20000.0
    old["rope_scaling"] = {"type": "llama3", **{k: v for k, v in rope.items() if k != "rope_type"}}
    (directory / "config.json").write_text(json.dumps(old))
    try:
        assert rel_err(cpullm.load(directory).logits(ids), expected) < 2e-5
    finally:
        (directory / "config.json").write_text(json.dumps(written))


@pytest.mark.parametrize("template_file", [False, True])
def test_chat_template_from_either_file_matches_transformers(tmp_path: Path, make_llama: Any, template_file: bool) -> None:
    from transformers import AutoTokenizer

    directory, _ = make_llama(seed=1)
    write_tokenizer(directory, chat_template=CHATML, template_file=template_file)
    model = cpullm.load(directory)
    reference = AutoTokenizer.from_pretrained(directory)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? 🙂"},
    ]
    expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert model.tokenizer.apply_chat_template(messages) == list(expected)
    text = "The capital of Italy is Rome. 東京 🚀"
    assert model.tokenizer.encode(text) == reference(text)["input_ids"]
    assert model.tokenizer.decode(model.tokenizer.encode(text), skip_special_tokens=True) == text


def test_model_without_template_refuses_chat_clearly(make_llama: Any) -> None:
    directory, _ = make_llama(seed=2)
    write_tokenizer(directory)
    model = cpullm.load(directory)
    with pytest.raises(cpullm.CpullmError, match="no chat template"):
        model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_generate_text_matches_token_path(make_llama: Any) -> None:
    directory, _ = make_llama(seed=4)
    write_tokenizer(directory)
    model = cpullm.load(directory)
    ids = model.tokenizer.encode("The capital of")
    tokens = list(model.generate_tokens(ids, max_tokens=12, stop_token_ids=()))
    pieces = list(model.stream("The capital of", max_tokens=12))
    assert "".join(pieces) == model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert model.generate("The capital of", max_tokens=12) == "".join(pieces)


def test_eos_from_generation_config_stops_generation(make_llama: Any) -> None:
    directory, _ = make_llama(seed=4)
    write_tokenizer(directory)
    model = cpullm.load(directory)
    ids = model.tokenizer.encode("The capital of")
    free = list(model.generate_tokens(ids, max_tokens=10, stop_token_ids=()))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [299, free[3]]}))
    stopped = list(cpullm.load(directory).generate_tokens(ids, max_tokens=10))
    assert stopped == free[: free.index(free[3])]


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "cpullm", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_generate(make_llama: Any) -> None:
    directory, _ = make_llama(seed=4)
    write_tokenizer(directory)
    expected = cpullm.load(directory).generate("The capital of", max_tokens=10)
    result = _cli("generate", str(directory), "-p", "The capital of", "-n", "10", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    from_stdin = _cli("generate", str(directory), "-n", "10", stdin="The capital of")
    assert from_stdin.stdout == expected + "\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "/no/such/model", "-p", "x"], "no such file"),
        (["generate", "{dir}", "-p", "x", "--threads", "0"], "expected an integer >= 1"),
        (["generate", "{dir}", "-p", "x", "-n", "-3"], "expected an integer >= 0"),
        (["generate", "{dir}", "-p", ""], "prompt is empty"),
        (["generate", "{dir}", "--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_cli_bad_arguments_give_one_clear_line(make_llama: Any, args: list[str], message: str) -> None:
    directory, _ = make_llama(seed=4)
    write_tokenizer(directory)
    result = _cli(*[a.replace("{dir}", str(directory)) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_default_thread_count_follows_omp_num_threads_and_cpu_quotas(monkeypatch: pytest.MonkeyPatch) -> None:
    from cpullm import threads

    monkeypatch.setattr(threads, "physical_cores", lambda: 8)
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.default_threads() == 8
    for value, expected in [("3", 3), ("2,1", 2), ("16", 8), ("0", 8), ("many", 8), ("", 8)]:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert threads.default_threads() == expected, value
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: 2)
    assert threads.default_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    if threads._has_openmp():
        assert threads.resolve_threads(None) == 2 and threads.resolve_threads(5) == 5


def test_cgroup_cpu_quotas_are_read_along_the_process_path(tmp_path: Path) -> None:
    """cgroup v2 (cpu.max) and v1 (cpu.cfs_quota_us / cpu.cfs_period_us) quotas, at the process's own
    cgroup or above it (a systemd slice), rounded up to whole CPUs; "max" or -1 means none."""
    from cpullm.threads import _cgroup_cpu_limit

    def tree(files: dict[str, str], membership: str) -> int | None:
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        (root / "fs").mkdir(parents=True)
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        (root / "membership").write_text(membership)
        return _cgroup_cpu_limit(root / "fs", root / "membership")

    assert tree({}, "0::/\n") is None
    assert tree({"fs/cpu.max": "max 100000\n"}, "0::/\n") is None
    assert tree({"fs/cpu.max": "150000 100000\n"}, "0::/\n") == 2  # a container's --cpus 1.5
    assert tree({"fs/system.slice/cpu.max": "300000 100000\n", "fs/system.slice/app.service/cpu.max": "max 100000\n"},
                "0::/system.slice/app.service\n") == 3  # the slice above the service
    assert tree({"fs/cpu,cpuacct/docker/x/cpu.cfs_quota_us": "200000\n", "fs/cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"},
                "3:cpu,cpuacct:/docker/x\n2:memory:/docker/x\n") == 2  # v1
    assert tree({"fs/cpu/cpu.cfs_quota_us": "-1\n", "fs/cpu/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n") is None


def test_a_group_size_means_int8(make_llama: Any, tmp_path: Path) -> None:
    """group_size alone asks for int8 (it was f32 weights, quietly); with another dtype it is unused; a
    converted int8 directory takes its own group size, and refuses another."""
    from cpullm.convert import convert

    directory, _ = make_llama(seed=12)
    model = cpullm.load(directory, group_size=64)
    assert model.dtype == "int8" and model.spec.group_size == 64
    assert cpullm.load(directory, dtype="bf16", group_size=64).dtype == "bf16"
    converted = convert(directory, tmp_path / "int8", dtype="int8", progress=False)
    assert cpullm.load(converted, group_size=32).spec.group_size == 32
    with pytest.raises(ValueError, match="converted with group_size 32"):
        cpullm.load(converted, group_size=64)


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None
                    or "libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="malloc_trim is glibc's (AddressSanitizer's allocator replaces it: tools/sanitize.sh)")
def test_trim_heap_gives_freed_heap_pages_back() -> None:
    # What a Tokenizer's construction and cpullm.load call last: blocks below glibc's mmap threshold live on the heap, and freeing
    # all but the topmost leaves ~100 MB of free pages that free() itself never returns (it only trims
    # the heap's top), as a tokenizer's parsed JSON does at load.
    blocks = [np.ones(100_000 // 8) for _ in range(1000)]
    top = blocks[-1]
    del blocks
    before = _rss_kib()
    assert cpullm._C.trim_heap() is True
    assert before - _rss_kib() > 50_000
    assert top.sum() == top.size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("source", ["hf", "converted"])
def test_an_int8_model_keeps_no_view_of_its_file(make_llama: Any, tmp_path: Path, source: str) -> None:
    # Every tensor of an int8 model is copied (matrices packed, norms and biases as they are), so the
    # file map goes once loading ends. A norm read in place from the map cost its page-cache folio:
    # with Linux 6.x's large folios one fault mapped ~1.4 MiB of neighbouring scales, 46 MiB of file
    # pages resident after the 1B shape's first forward pass.
    from cpullm.convert import convert

    directory, _ = make_llama(seed=5)
    if source == "converted":
        directory = convert(directory, tmp_path / "int8", dtype="int8", progress=False)
    model = cpullm.load(directory, dtype="int8", threads=1)
    model.logits(np.arange(1, 40, dtype=np.int32))
    weights = str(Path(directory).resolve() / "model.safetensors")
    with open("/proc/self/maps") as maps:
        assert not [line for line in maps if line.rstrip().endswith(weights)]


@pytest.mark.parametrize("dtype", ["int8", "bf16", "f32"])
def test_a_converting_load_releases_each_source_once_converted(make_llama: Any, monkeypatch: pytest.MonkeyPatch,
                                                               dtype: str) -> None:
    # Converting at load (f32 files to int8 or bf16) reads every source tensor from the file map; once
    # converted, its pages are only RSS (SmolLM2's f32 directory as int8 peaked at 830 MiB with them all
    # resident). Sources used in place (f32 as f32, and the norms) must stay mapped.
    import cpullm.hf as hf
    from cpullm.spec import spec_from_hf_config

    directory, _ = make_llama(seed=2)
    released: list[int] = []
    monkeypatch.setattr(hf, "release_file_pages", lambda array: released.append(array.__array_interface__["data"][0]))
    config = json.loads((Path(directory) / "config.json").read_text())
    spec = spec_from_hf_config(config)
    checkpoint = hf.Checkpoint(Path(directory))
    tensors = hf.canonical_tensors(spec, checkpoint, dtype)
    matrices = [n for n in tensors if n.endswith(("wqkv", "wo", "w13", "w2", "tok_embeddings", "lm_head"))]
    assert matrices
    # One release per source part (q, k, v fuse into wqkv, gate and up into w13): for f32 only where a
    # fusion made a copy, since single f32 tensors are used in place, and never for the norms.
    parts = {"wqkv": 3, "w13": 2}
    short = [n.rsplit(".", 1)[-1] for n in matrices]
    expected = sum(parts[n] for n in short if n in parts) if dtype == "f32" else sum(parts.get(n, 1) for n in short)
    assert len(released) == expected
