"""Mistral, Qwen2, Phi-3 and Mixtral (and the yarn / longrope RoPE variants) against transformers, on
tiny random models built from configs: f32 prefill, token-by-token decode, past the sliding window and
the longrope switch-over, greedy generation, int8 bounds, and `cpullm convert` from sharded bf16."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import cpullm
from conftest import dequantized_copy, fast_prefill_case, hf_logits, median_row_err, rel_err
from test_llama_parity import F32_TOL, INT8_VS_DEQUANTIZED_TOL, INT8_VS_F32_TOL, hf_logits_f16_cache

COMMON: dict[str, Any] = dict(
    vocab_size=320, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
SWITCH = 32  # Phi-3's original_max_position_embeddings here: the longrope switch-over length
WINDOW = 12

# name -> (transformers class name, config overrides)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    # q/k/v biases; transformers' default: no sliding window
    "qwen2": ("Qwen2", dict()),
    # Qwen2 with its window switched on for the layers from max_window_layers on (here layer 1 only)
    "qwen2-window-yarn": ("Qwen2", dict(
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    )),
    # sliding window on every layer, explicit head_dim
    "mistral": ("Mistral", dict(sliding_window=WINDOW, head_dim=24, rope_theta=5000.0)),
    # fused qkv_proj / gate_up_proj, half the head rotated, longrope short/long factors
    "phi3-longrope": ("Phi3", dict(
        partial_rotary_factor=0.5, original_max_position_embeddings=SWITCH, max_position_embeddings=256,
        rope_scaling=dict(
            type="longrope",
            short_factor=[1.0, 1.1, 1.5, 2.0],
            long_factor=[1.0, 2.5, 4.0, 8.0],
        ),
    )),
    # 4 experts, top 2
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
}


def build(name: str, seed: int = 0, **extra: Any) -> Any:
    import torch
    import transformers

    family, overrides = ARCHS[name]
    config = getattr(transformers, f"{family}Config")(**{**COMMON, **overrides, **extra})
    torch.manual_seed(seed)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any]]:
    cache: dict[str, tuple[Path, Any]] = {}

    def get(name: str) -> tuple[Path, Any]:
        if name not in cache:
            model = build(name, seed=len(name))
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            cache[name] = directory, model
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request: pytest.FixtureRequest, saved: Callable[[str], tuple[Path, Any]]) -> tuple[str, Any, Any]:
    directory, hf_model = saved(request.param)
    return request.param, cpullm.load(directory, threads=2), hf_model


def _ids(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def test_spec_reads_each_architecture(arch: tuple[str, Any, Any]) -> None:
    name, model, _ = arch
    spec = model.spec
    assert spec.qkv_bias == name.startswith("qwen2")
    assert spec.layer_windows == {"mistral": (WINDOW, WINDOW), "qwen2-window-yarn": (0, WINDOW)}.get(name, ())
    assert (spec.n_experts, spec.n_experts_used) == ((4, 2) if name == "mixtral" else (0, 0))
    assert spec.rotary_dim == (8 if name == "phi3-longrope" else spec.head_dim)
    assert spec.rope.rope_type == {"phi3-longrope": "longrope", "qwen2-window-yarn": "yarn"}.get(name, "default")


@pytest.mark.parametrize("n", [23, 70])  # 70: past the window (12) and the longrope switch (32)
def test_prefill_logits_match_transformers(arch: tuple[str, Any, Any], n: int, isa: str) -> None:
    _, model, hf_model = arch
    ids = _ids(model.spec.vocab_size, n)
    assert rel_err(model.logits(ids), hf_logits(hf_model, ids)) < F32_TOL


def test_f16_kv_cache_matches_transformers_with_rounded_cache(arch: tuple[str, Any, Any]) -> None:
    """As the Llama test of the f16 cache (test_llama_parity): against transformers whose cache rounds
    keys and values to f16, past the window and the longrope switch (where Phi-3 re-encodes the cache),
    with the same bound."""
    _, model, hf_model = arch
    ids = _ids(model.spec.vocab_size, 70, seed=3)
    model.kv_cache_dtype = "f16"
    try:
        ours = model.logits(ids)
    finally:
        model.kv_cache_dtype = "f32"
    reference = hf_logits_f16_cache(hf_model, ids)
    rounding = rel_err(reference, hf_logits(hf_model, ids))
    assert rounding > 1e-5  # the rounding reaches the logits
    assert rel_err(ours, reference) < 0.3 * rounding


def test_f16_cache_gives_the_same_bits_however_a_prompt_is_split(arch: tuple[str, Any, Any]) -> None:
    """On one thread every query sums its positions in one order, so with an f16 cache a prompt split
    into pieces (single tokens among them) gives one pass's bits, past the window and the longrope
    switch (Phi-3's logits before the switch were computed with the short factors, so its comparison
    starts at the piece that crosses it and re-encodes the cache)."""
    name, model, _ = arch
    ids = _ids(model.spec.vocab_size, 70, seed=4).astype(np.int32)
    whole = cpullm._C.Sequence(model._model(), "f16").forward(ids, True, 1)
    sequence = cpullm._C.Sequence(model._model(), "f16")
    pieces = [sequence.forward(ids[a:b], True, 1) for a, b in ((0, 9), (9, 30), (30, 31), (31, 44), (44, 70))]
    start = 31 if name.startswith("phi3") else 0
    assert SWITCH == 32
    np.testing.assert_array_equal(np.concatenate(pieces)[start:], whole[start:])


def test_token_by_token_decode_matches_transformers(arch: tuple[str, Any, Any]) -> None:
    """Prefill 5, then one token at a time to 45: past the window and across the longrope switch. Each
    step's logits equal transformers' last row over the whole prefix (what its generate computes: Phi-3
    there re-encodes the cache at the switch, as cpullm does)."""
    _, model, hf_model = arch
    n = 45
    ids = _ids(model.spec.vocab_size, n, seed=1).astype(np.int32)
    sequence = cpullm._C.Sequence(model._model())
    first = sequence.forward(ids[:5], True, 2)
    assert rel_err(first, hf_logits(hf_model, ids[:5])) < F32_TOL
    for i in range(5, n):
        step = sequence.forward(ids[i:i + 1], True, 2)[0]
        assert rel_err(step, hf_logits(hf_model, ids[:i + 1])[-1]) < F32_TOL, i
    assert sequence.n_past == n


def test_chunked_decode_equals_one_pass(arch: tuple[str, Any, Any]) -> None:
    _, model, _ = arch
    ids = _ids(model.spec.vocab_size, 60, seed=2).astype(np.int32)
    full = model.logits(ids)
    sequence = cpullm._C.Sequence(model._model())
    # A chunk that crosses the window and one that crosses the longrope switch (which re-encodes).
    for chunk in (ids[:9], ids[9:20], ids[20:21], ids[21:40]):
        sequence.forward(chunk, True, 2)
    last = [sequence.forward(ids[i:i + 1], True, 2)[0] for i in range(40, 60)]
    assert rel_err(np.stack(last), full[40:]) < F32_TOL
    # Cut back below the switch and go on: the same as one pass again.
    sequence.truncate(25)
    again = sequence.forward(ids[25:30], True, 2)
    assert rel_err(again[-1], model.logits(ids[:30])[-1]) < F32_TOL


def test_greedy_generation_matches_transformers(arch: tuple[str, Any, Any]) -> None:
    import torch

    _, model, hf_model = arch
    prompt = _ids(model.spec.vocab_size, 8, seed=4)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(prompt)[None], do_sample=False, max_new_tokens=40, min_new_tokens=40,
            eos_token_id=None, pad_token_id=0,
        )
    expected = out[0, len(prompt):].tolist()
    ours = list(model.generate_tokens(prompt, max_tokens=40, stop_token_ids=()))
    assert ours == expected


def test_int8_logits_stay_within_documented_bound(arch: tuple[str, Any, Any]) -> None:
    name, f32_model, hf_model = arch
    model = cpullm.load(f32_model.source, dtype="int8", threads=2)
    ids = _ids(model.spec.vocab_size, 70, seed=7)
    int8_logits = model.logits(ids)
    # The router stays f32 (hf.py); every other matrix is quantized, experts one by one.
    dequantized = dequantized_copy(hf_model)
    # The reference rounds keys and values as the int8 model's f16 cache does: that rounding alone was
    # 5e-4 to 1e-3 here (qwen2-window-yarn), the activations' digits leave 2e-4 to 4e-4.
    assert model.kv_cache_dtype == "f16"
    assert rel_err(int8_logits, hf_logits_f16_cache(dequantized, ids)) < INT8_VS_DEQUANTIZED_TOL
    # Against f32: the bound holds wherever the rounded weights route every token as f32 does. A token
    # whose top-k experts change (a near-tie in the router, common in random models) gets a different
    # FFN altogether; transformers itself does the same on the rounded weights (checked just above).
    rows = np.arange(len(ids))
    if name == "mixtral":
        same = np.all([(a == b).all(axis=1) for a, b in zip(_route_rows(hf_model, ids), _route_rows(dequantized, ids))],
                      axis=0)
        assert same.mean() > 0.8
        rows = rows[same]
    assert rel_err(int8_logits[rows], hf_logits(hf_model, ids)[rows]) < INT8_VS_F32_TOL


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_convert_sharded_bf16_source(name: str, saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    import torch

    from cpullm.convert import convert

    _, hf_model = saved(name)
    half = type(hf_model)(hf_model.config).eval()
    half.load_state_dict(hf_model.state_dict())
    half = half.to(torch.bfloat16)
    source = tmp_path / "src"
    half.save_pretrained(source, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").exists()
    reference = type(hf_model)(hf_model.config).eval()
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    ids = _ids(hf_model.config.vocab_size, 50, seed=3)
    for dtype in ("f32", "bf16", "int8"):
        out = convert(source, tmp_path / dtype, dtype=dtype, progress=False)
        converted = cpullm.load(out, threads=2)
        in_memory = cpullm.load(source, dtype=dtype, threads=2)
        assert _same_spec(converted.spec, in_memory.spec)
        np.testing.assert_array_equal(converted.logits(ids), in_memory.logits(ids))
        if dtype in ("f32", "bf16"):  # bf16 weights of a bf16 source are exact (with an f32 cache)
            converted.kv_cache_dtype = "f32"
            assert rel_err(converted.logits(ids), hf_logits(reference, ids)) < F32_TOL


def _same_spec(a: Any, b: Any) -> bool:
    from cpullm.spec import spec_to_json

    return spec_to_json(a) == spec_to_json(b)


def _route(hf_model: Any, ids: np.ndarray) -> list[set[int]]:
    """The experts transformers' router picks in each layer for these tokens."""
    import torch

    chosen: list[set[int]] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: chosen.append(set(o[2].flatten().tolist())))
             for layer in hf_model.model.layers]
    try:
        hf_logits(hf_model, ids)
    finally:
        for h in hooks:
            h.remove()
    return chosen


def _route_rows(hf_model: Any, ids: np.ndarray) -> list[np.ndarray]:
    """Per layer, each token's chosen experts, sorted ([T, k])."""
    chosen: list[np.ndarray] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: chosen.append(np.sort(o[2].numpy(), axis=1)))
             for layer in hf_model.model.layers]
    try:
        hf_logits(hf_model, ids)
    finally:
        for h in hooks:
            h.remove()
    return chosen


@pytest.mark.parametrize("n_tokens", [1, 3])
def test_mixtral_reads_only_routed_experts(n_tokens: int, tmp_path: Path) -> None:
    """Experts no token is routed to are never read: poisoning them with NaN changes nothing (decode:
    one token reads its k experts; prefill: each expert runs only over the tokens routed to it)."""
    from cpullm.hf import Checkpoint, canonical_tensors
    from cpullm.spec import spec_from_hf_config

    hf_model = build("mixtral", seed=11, num_local_experts=8, num_hidden_layers=1)
    hf_model.save_pretrained(tmp_path)
    spec = spec_from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    ids = _ids(spec.vocab_size, n_tokens, seed=5).astype(np.int32)
    routed = _route(hf_model, ids)[0]
    assert len(routed) < 8
    for dtype in ("f32", "int8"):
        tensors = canonical_tensors(spec, Checkpoint(tmp_path), dtype)
        clean = cpullm._C.Sequence(cpullm._C.Transformer(spec.to_native(), tensors)).forward(ids, True, 2)
        for e in set(range(8)) - routed:
            for part in ("w13", "w2"):
                name = f"layers.0.experts.{e}.{part}"
                if dtype == "int8":
                    tensors[name + ".scales"] = np.full_like(tensors[name + ".scales"], np.nan)
                else:
                    tensors[name] = np.full_like(tensors[name], np.nan)
        poisoned = cpullm._C.Sequence(cpullm._C.Transformer(spec.to_native(), tensors)).forward(ids, True, 2)
        np.testing.assert_array_equal(poisoned, clean)
        if dtype == "f32":
            assert rel_err(clean, hf_logits(hf_model, ids)) < F32_TOL


def test_unsupported_rope_type_is_refused_by_name(tmp_path: Path) -> None:
    from cpullm.errors import UnsupportedModelError
    from cpullm.spec import spec_from_hf_config

    config = dict(model_type="mistral", hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
                  intermediate_size=64, vocab_size=100, rope_scaling={"type": "mrope", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="mrope"):
        spec_from_hf_config(config)
    with pytest.raises(UnsupportedModelError, match="gemma"):
        spec_from_hf_config({**config, "model_type": "gemma", "rope_scaling": None})


def test_phi3_su_rope_type_reads_as_longrope() -> None:
    """Older Phi-3 configs say "su" (or "yarn") for longrope; transformers reads both as longrope."""
    from cpullm.spec import spec_from_hf_config

    base = dict(model_type="phi3", hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                intermediate_size=64, vocab_size=100, max_position_embeddings=128,
                original_max_position_embeddings=32)
    specs = [spec_from_hf_config({**base, "rope_scaling": dict(type=t, short_factor=[1.0] * 8,
                                                                 long_factor=[2.0] * 8)})
             for t in ("su", "yarn", "longrope")]
    for spec in specs:
        assert spec.rope.rope_type == "longrope" and spec.rope.switch == 32
        np.testing.assert_array_equal(spec.rope.inv_freq_long, specs[-1].rope.inv_freq_long)
        assert spec.rope.attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(32)))


def test_qwen2_gguf_matches_transformers(tmp_path: Path) -> None:
    """Qwen2 GGUFs (q/k/v biases, rows not permuted) load like the Hugging Face checkpoint; Phi-3 GGUFs
    are refused by name until their window and longrope factors are read."""
    from gguf_util import f32_state, write_gguf

    hf_model = build("qwen2", seed=13)
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, hf_model.config, f32_state(hf_model), None, arch="qwen2", permute=False)
    model = cpullm.load(path, threads=2)
    assert model.spec.qkv_bias and model.spec.model_type == "qwen2"
    ids = _ids(model.spec.vocab_size, 30, seed=6)
    assert rel_err(model.logits(ids), hf_logits(hf_model, ids)) < F32_TOL

    phi3 = build("phi3-longrope", seed=13)
    path = tmp_path / "phi3.gguf"
    state = {k: v for k, v in f32_state(phi3).items() if "qkv_proj" not in k and "gate_up_proj" not in k}
    write_gguf(path, phi3.config, state, None, arch="phi3", permute=False)
    from cpullm.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="Phi-3 GGUF"):
        cpullm.load(path)


def test_results_do_not_depend_on_thread_count(arch: tuple[str, Any, Any]) -> None:
    _, model, _ = arch
    ids = _ids(model.spec.vocab_size, 40, seed=9).astype(np.int32)
    outputs = [cpullm._C.Sequence(model._model()).forward(ids, True, threads) for threads in (1, 3)]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_dynamic_rope_within_the_context_matches_transformers(tmp_path: Path) -> None:
    """transformers' dynamic NTK scaling only departs from the default table beyond
    max_position_embeddings, which is cpullm's context limit: over the whole context the two agree."""
    hf_model = build("mistral", seed=17, max_position_embeddings=64, rope_scaling={"type": "dynamic", "factor": 2.0})
    hf_model.save_pretrained(tmp_path)
    model = cpullm.load(tmp_path, threads=2)
    assert model.spec.rope.rope_type == "dynamic" and model.spec.max_context == 64
    ids = _ids(model.spec.vocab_size, 64, seed=8)
    expected = hf_logits(hf_model, ids)
    assert rel_err(model.logits(ids), expected) < F32_TOL
    sequence = cpullm._C.Sequence(model._model())
    sequence.forward(ids[:60].astype(np.int32), False, 2)
    steps = [sequence.forward(ids[i:i + 1].astype(np.int32), True, 2)[0] for i in range(60, 64)]
    assert rel_err(np.stack(steps), expected[60:]) < F32_TOL


def test_fast_prefill_matches_one_digit_reference(arch: tuple[str, Any, Any]) -> None:
    # As tests/test_llama_parity.py's test of the same name, on every architecture: a 40-token prompt
    # (past the sliding windows and Phi-3's longrope switch, so decoding never re-encodes the cache)
    # with fast prefill, then 12 decoded tokens, against transformers on the same int8 weights with the
    # prompt's rows but the last quantized with one digit in torch. Mixtral's router stays f32 and its
    # experts keep two digits (their inputs are gathered rows), which the reference leaves at f32: the
    # two-digit rounding, 1e-4 of the logits, is below the bounds. A routing near-tie that the two
    # sides' rounding noise decides differently changes a row's FFN altogether (as in the int8 test
    # above), so with experts only the median row is held to the bound. Measured with the one-digit
    # rows' power-of-two group scales: their effect (median rows) 7.7e-3 (Mixtral) to 1.6e-2, cpullm's
    # distance from the reference 0.75e-4-1.2e-4 in the median row, 5.8e-4 for Mixtral (0.075 of its
    # effect; with each group's own scale, before, 2.2e-4 against 3.5e-3).
    name, f32_model, hf_model = arch
    model = cpullm.load(f32_model.source, dtype="int8", threads=2, kv_cache_dtype="f32", fast_prefill=True)
    ids = _ids(model.spec.vocab_size, 52, seed=17).astype(np.int32)
    got, fast_ref, exact_ref = fast_prefill_case(model, hf_model, ids, prompt=40,
                                                 keep=lambda layer: layer.endswith("mlp.gate"))
    effect = rel_err(fast_ref, exact_ref)
    assert effect > 1.5e-3  # one digit matters here: three times the median bound below
    assert median_row_err(got, fast_ref) < 1e-3
    assert median_row_err(got, fast_ref) < 0.5 * median_row_err(got, exact_ref)  # cpullm really took one digit
    if name != "mixtral":
        assert rel_err(got, fast_ref) < 0.4 * effect


def test_reference_cases_tool_records_and_checks(tmp_path: Path) -> None:
    """tools/reference_cases.py, the check for machines without torch (an Arm machine, an emulator):
    what it records here passes on every kernel path here, and a reference moved by a little more than
    the f32 bound fails it."""
    import subprocess
    import sys

    tool = Path(__file__).resolve().parents[1] / "tools" / "reference_cases.py"
    run = lambda *args: subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True,
                                       timeout=600)
    recorded = run("record", str(tmp_path), "--cases", "mistral", "phi3-longrope")
    assert recorded.returncode == 0, recorded.stderr
    checked = run("check", str(tmp_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert len(lines) == 2 * 3 * len(cpullm._C.cpu_features()["available_isas"])
    assert all(line.startswith("ok") for line in lines)
    reference = dict(np.load(tmp_path / "mistral" / "reference.npz"))
    reference["f32"] = reference["f32"] * (1 + 5e-5)
    np.savez(tmp_path / "mistral" / "reference.npz", **reference)
    failed = run("check", str(tmp_path), "--isas", "scalar")
    assert failed.returncode == 1
    assert [" ".join(line.split()[1:5]) for line in failed.stdout.splitlines() if line.startswith("FAIL")] == [
        "mistral scalar f32 prefill", "mistral scalar f32 decode"]
    assert run("record", str(tmp_path), "--cases", "no-such-model").returncode != 0


def _llama(seed: int, **extra: Any) -> Any:
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, **extra})).eval()


def _edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _stray_qkv_biases(directory: Path) -> None:
    """q/k/v biases added to a checkpoint whose config has none (attention_bias: false)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(directory / "model.safetensors")
    for name in [n for n in state if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
        state[name.replace(".weight", ".bias")] = torch.randn(state[name].shape[0])
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


# Configs and checkpoints that say more than the family's transformers class reads: cpullm must read
# them as transformers does (the reference then loads the saved directory itself). Each was once read
# differently, with every logit off by several units and no error.
QUIRKS: dict[str, tuple[Callable[[], Any], Callable[[Path], None]]] = {
    # Llama ignores sliding_window (a Mistral-derived checkpoint relabelled as llama)
    "llama-sliding-window-key": (lambda: _llama(1), lambda d: _edit_config(d, sliding_window=WINDOW)),
    # only Phi-3 rotates part of each head; Mistral and Llama rotate all of it whatever the key says
    "mistral-partial-rotary-key": (lambda: build("mistral", seed=2),
                                   lambda d: _edit_config(d, partial_rotary_factor=0.5)),
    "llama-partial-rotary-key": (lambda: _llama(3), lambda d: _edit_config(d, partial_rotary_factor=0.5)),
    # a transformers 5 config (rope_parameters) with rope_scaling added by hand: rope_scaling wins whole
    "rope-scaling-beside-rope-parameters": (lambda: _llama(4, rope_theta=1000.0), lambda d: _edit_config(
        d, rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64))),
    # tied in the config, but the checkpoint's lm_head differs from the embeddings: both are kept
    "tied-config-with-distinct-head": (lambda: _llama(5, tie_word_embeddings=False),
                                       lambda d: _edit_config(d, tie_word_embeddings=True)),
    # q/k/v biases in a Llama checkpoint without attention_bias: dropped as unexpected keys
    "llama-stray-qkv-biases": (lambda: _llama(6), _stray_qkv_biases),
    # Mistral has no attention_bias / mlp_bias; "swish" is SiLU
    "mistral-bias-flags-and-swish": (lambda: build("mistral", seed=7),
                                     lambda d: _edit_config(d, attention_bias=True, mlp_bias=True, hidden_act="swish")),
}


@pytest.mark.parametrize("quirk", sorted(QUIRKS))
def test_configs_are_read_as_transformers_reads_them(quirk: str, tmp_path: Path) -> None:
    import transformers

    make, edit = QUIRKS[quirk]
    make().save_pretrained(tmp_path)
    edit(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(COMMON["vocab_size"], 40, seed=11)
    expected = hf_logits(reference, ids)
    assert rel_err(cpullm.load(tmp_path, threads=2).logits(ids), expected) < F32_TOL
    from cpullm.convert import convert

    converted = convert(tmp_path, tmp_path / "converted", dtype="f32")
    assert rel_err(cpullm.load(converted, threads=2).logits(ids), expected) < F32_TOL


def test_partial_rotary_with_a_scaled_rope_outside_phi3_is_refused() -> None:
    """transformers' Llama fails on such a config (its scaled table covers part of a head it rotates
    whole): refused by name rather than run one way or the other."""
    from cpullm.errors import UnsupportedModelError
    from cpullm.spec import spec_from_hf_config

    config = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                  intermediate_size=64, vocab_size=100, partial_rotary_factor=0.5)
    assert spec_from_hf_config(config).rotary_dim == 16  # the default rope: the whole head, as transformers
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor 0.5 with rope type 'linear'"):
        spec_from_hf_config({**config, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_gguf_with_biases_the_model_does_not_apply_is_refused(tmp_path: Path) -> None:
    """llama.cpp applies any bias a Llama-architecture GGUF holds (output and FFN projections too); the
    canonical model has none there, so such a file is refused by name rather than run without them."""
    from gguf_util import f32_state, write_gguf

    from cpullm.errors import UnsupportedModelError

    for flag in ("attention_bias", "mlp_bias"):
        hf_model = _llama(8, **{flag: True})
        path = tmp_path / f"{flag}.gguf"
        write_gguf(path, hf_model.config, f32_state(hf_model), None)
        with pytest.raises(UnsupportedModelError, match="bias tensors are not supported"):
            cpullm.load(path)
