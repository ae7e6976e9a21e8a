"""GGUF files: tiny models written here with the gguf package (every common tensor type, both tokenizer
kinds) against their source weights and against transformers; the real SmolLM2 GGUF against
transformers loading the same file; hostile and broken files."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import cpullm
from conftest import hf_logits, rel_err, tiny_llama_config
from cpullm.dtypes import quantize_q8
from cpullm.gguf_io import GGUFFile, GGUFTensorSource, read_gguf
from cpullm.gguf_tokenizer import build_tokenizer
from gguf_util import (
    AWKWARD,
    CHATML,
    all_f32,
    arch_kv,
    bpe_tokenizer,
    f32_state,
    load_state,
    matrices,
    raw_gguf,
    raw_kv,
    spm_tokenizer,
    write_gguf,
)

F32_TOL = 2e-5  # as in test_llama_parity: both sides f32, summing in different orders
IDS = np.array([1, 5, 77, 300, 12, 9, 200, 41, 3, 150, 260, 7], dtype=np.int64)


def _tiny(seed: int = 0, **overrides: Any) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    if overrides.get("hidden_size", 96) % 6:  # the conftest default of 6 heads does not divide it
        overrides.setdefault("num_attention_heads", 4)
        overrides.setdefault("num_key_value_heads", 2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


# --- tiny models: every tensor type, read back exactly -----------------------------------------------

_VARIANTS: dict[str, tuple[Callable[[str, np.ndarray], str], dict[str, Any]]] = {
    # dims are multiples of 32 (the Q block) unless the type is F32/F16
    "f32-tied": (all_f32, dict(hidden_size=96, intermediate_size=200, tie_word_embeddings=True)),
    "f16": (matrices("F16"), dict(hidden_size=96, intermediate_size=200)),
    "bf16": (matrices("BF16"), dict(hidden_size=96, intermediate_size=224)),
    "q8_0": (matrices("Q8_0"), dict(hidden_size=128, intermediate_size=224)),
    "q4_0-tied": (matrices("Q4_0"), dict(hidden_size=128, intermediate_size=224, tie_word_embeddings=True)),
    "q4_1": (matrices("Q4_1"), dict(hidden_size=128, intermediate_size=224)),
    "mixed": (
        lambda name, a: "F32" if a.ndim == 1 else (
            "Q8_0" if "embed" in name or "lm_head" in name else "Q4_0" if "attn" in name
            else "F16" if "down" in name else "Q5_0" if "up" in name else "Q4_1"),
        dict(hidden_size=128, intermediate_size=224, num_attention_heads=4, num_key_value_heads=1),
    ),
    # F64 tensors (valid GGUF, rare): read as float32
    "f64": (lambda name, a: "F64" if a.ndim == 1 or "down" in name else "F32", dict()),
    "k-quants": (
        lambda name, a: "F32" if a.ndim == 1 else "Q6_K" if ("down" in name or "embed" in name) else "Q4_K",
        dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),
    ),
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_tiny_gguf_matches_source_weights(variant: str, tmp_path: Path) -> None:
    """The file's values (quantized as written, q/k permuted as llama.cpp writes them) come back in
    transformers' layout: logits equal a transformers model holding the same values."""
    qtypes, overrides = _VARIANTS[variant]
    tok = bpe_tokenizer(pre="smollm")
    model = _tiny(seed=3, vocab_size=len(tok["tokens"]), **overrides)
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path, model.config, f32_state(model), tok, qtypes, chat_template=CHATML)
    reference = load_state(model, expected)

    gguf = GGUFFile(path)
    source = GGUFTensorSource(gguf)
    for name, values in expected.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            assert name not in source
            continue
        array, stored = source.get(name)
        got = array.astype(np.float32) if stored != "BF16" else (array.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(got, values, err_msg=name)

    with cpullm.load(path) as m:
        assert m.spec.tie_embeddings == bool(model.config.tie_word_embeddings)
        err = rel_err(m.logits(IDS), hf_logits(reference, IDS))
    assert err < F32_TOL, f"{variant}: relative error {err:.2e}"


def test_tiny_gguf_spm_tokenizer_and_permutation_against_transformers(tmp_path: Path) -> None:
    """transformers reading the same GGUF (dequantizing, undoing the permutation itself) agrees."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = spm_tokenizer()
    model = _tiny(seed=5, vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0)
    path = tmp_path / "spm.gguf"
    write_gguf(path, model.config, f32_state(model), tok, matrices("Q8_0"))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with cpullm.load(path) as m:
        ids = m.tokenizer.encode("The capital of Italy is Rome, 🙂")
        assert ids[0] == 1  # SentencePiece files add BOS
        err = rel_err(m.logits(ids), hf_logits(ref, np.array(ids)))
    assert err < F32_TOL, err


def test_q8_0_blocks_carry_over(tmp_path: Path) -> None:
    """Q8_0 tensors are available as stored int8 + f16 scales (for int8 without a round trip), in the same
    row order as the dequantized values."""
    tok = bpe_tokenizer()
    model = _tiny(seed=2, vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224)
    path = tmp_path / "q8.gguf"
    write_gguf(path, model.config, f32_state(model), tok, matrices("Q8_0"))
    source = GGUFTensorSource(GGUFFile(path))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        assert source.ggml_type(name) == "Q8_0"
        qs, scales = source.get_q8_0(name)
        values, _ = source.get(name)
        assert qs.dtype == np.int8 and scales.dtype == np.float16 and scales.shape[1] * 32 == qs.shape[1]
        np.testing.assert_array_equal(qs * np.repeat(scales.astype(np.float32), 32, axis=1), values)
        # int8 with 32-wide groups re-quantizes the dequantized values to exactly the stored blocks
        q8, s8 = quantize_q8(values, 32)
        np.testing.assert_array_equal(q8, qs)
        np.testing.assert_array_equal(s8, scales.astype(np.float32))
    assert source.get_q8_0("model.norm.weight") is None


def test_rope_freqs_tensor(tmp_path: Path) -> None:
    """Llama 3.1 GGUFs carry llama3 rope scaling as a rope_freqs tensor of divisors, not as metadata."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    tok = bpe_tokenizer(pre="llama-bpe")
    model = _tiny(seed=4, vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224,
                  num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, rope_scaling=scaling)
    head_dim = 64
    # what llama.cpp's converter computes from rope_scaling
    freqs = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < 64 / 4.0:
            factors.append(1.0)
        elif wavelen > 64 / 1.0:
            factors.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    path = tmp_path / "rope.gguf"
    expected = write_gguf(path, model.config, f32_state(model), tok, all_f32, rope_freqs=np.array(factors))
    ids = np.arange(0, 200, 5)  # past the original context, where the bands differ most
    with cpullm.load(path) as m:
        err = rel_err(m.logits(ids), hf_logits(load_state(model, expected), ids))
    assert err < F32_TOL, err


def test_metadata_to_config_and_generation(tmp_path: Path) -> None:
    tok = bpe_tokenizer(eot=2, pad=0)
    model = _tiny(seed=6, vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224,
                  rms_norm_eps=1e-5, max_position_embeddings=96)
    path = tmp_path / "meta.gguf"
    write_gguf(path, model.config, f32_state(model), tok, matrices("Q8_0"), chat_template=CHATML)
    m = read_gguf(path)
    assert m.config["model_type"] == "llama" and m.config["max_position_embeddings"] == 96
    assert m.spec.n_heads == 4 and m.spec.n_kv_heads == 2 and m.spec.head_dim == 32
    assert m.spec.norm_eps == pytest.approx(1e-5, rel=1e-6)
    assert m.tokenizer.chat_template == CHATML
    eos = m.generation_config["eos_token_id"]
    assert eos[0] == 2 and 0 in eos  # <|im_end|>, and <|endoftext|> as llama.cpp also stops there
    none = tmp_path / "none.gguf"  # ids written as 0xFFFFFFFF mean "none" (some converters): not config ids
    write_gguf(none, model.config, f32_state(model), {**tok, "bos": 0xFFFFFFFF, "pad": 0xFFFFFFFF}, matrices("Q8_0"))
    assert "bos_token_id" not in read_gguf(none).config and "pad_token_id" not in read_gguf(none).config
    with cpullm.load(path, context_length=40) as loaded:
        assert loaded.spec.max_context == 40
        assert 2 in loaded.eos_token_ids
        ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hello world"}])
        assert ids[0] == 1  # <|im_start|> from the template, no BOS added for byte-level vocabularies
        out = list(loaded.generate_tokens(ids, max_tokens=5))
        assert len(out) <= 5


# --- tokenizers against transformers' GGUF tokenizer -------------------------------------------------


def _transformers_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _assert_same_tokenization(ours: Any, ref: Any, texts: list[str]) -> None:
    for text in texts:
        for special in (True, False):
            expected = ref(text, add_special_tokens=special)["input_ids"]
            got = ours.encode(text, add_special_tokens=special)
            assert got == expected, f"{text!r} (add_special_tokens={special}): {got} != {expected}"
        for skip in (False, True):
            assert ours.decode(expected, skip_special_tokens=skip) == ref.decode(expected, skip_special_tokens=skip), text


def _vocab_only_gguf(path: Path, tok: dict[str, Any]) -> Path:
    config = tiny_llama_config(vocab_size=len(tok["tokens"]), hidden_size=32, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    state = {"model.embed_tokens.weight": np.zeros((config.vocab_size, 32), np.float32)}
    write_gguf(path, config, state, tok, chat_template=CHATML)
    return path


# Byte-level pre-tokenizers differ on "whitespace run then digit" for smollm only (see below).
_NO_SPACE_DIGIT = [t for t in AWKWARD if not any(a.isspace() and b.isdigit() for a, b in zip(t, t[1:]))]


@pytest.mark.parametrize("kind", ["spm", "spm-no-bos", "bpe-smollm", "bpe-llama-bpe", "bpe-qwen2",
                                  "bpe-default"])
def test_tokenizer_matches_transformers(kind: str, tmp_path: Path) -> None:
    if kind == "spm":
        tok = spm_tokenizer()
    elif kind == "spm-no-bos":
        tok = spm_tokenizer(add_bos=False, eos=2)
    else:
        tok = bpe_tokenizer(pre=kind.split("-", 1)[1])
    path = _vocab_only_gguf(tmp_path / f"{kind}.gguf", tok)
    ours = build_tokenizer(GGUFFile(path))
    ref = _transformers_tokenizer(path)
    texts = _NO_SPACE_DIGIT if kind == "bpe-smollm" else AWKWARD
    _assert_same_tokenization(ours, ref, texts)
    assert ours.special_tokens.get("bos_token") == ref.bos_token
    assert ours.special_tokens.get("eos_token") == ref.eos_token


def test_smollm_pretokenizer_splits_digits(tmp_path: Path) -> None:
    """`smollm` vocabularies were trained with every digit split off (the model's tokenizer.json:
    Digits + ByteLevel; llama.cpp: \\p{N} then GPT-2's regex). transformers' GGUF loader uses GPT-2's
    regex alone, which differs on a whitespace run before a digit; cpullm follows the model."""
    path = _vocab_only_gguf(tmp_path / "smollm.gguf", bpe_tokenizer(pre="smollm"))
    ours = build_tokenizer(GGUFFile(path))
    ids = ours.encode("x  1")
    assert [ours.id_to_token(i) for i in ids] == ["x", "\u0120\u0120", "1"]
    assert ours.decode(ids) == "x  1"


def test_spm_without_space_prefix(tmp_path: Path) -> None:
    """tokenizer.ggml.add_space_prefix = false is honoured (as llama.cpp does; transformers' GGUF loader
    ignores the flag and always prepends the space)."""
    path = _vocab_only_gguf(tmp_path / "spm.gguf", spm_tokenizer(add_space_prefix=False))
    ours = build_tokenizer(GGUFFile(path))
    ids = ours.encode("Hello world", add_special_tokens=False)
    assert not ours.id_to_token(ids[0]).startswith("\u2581")
    assert ours.decode(ids) == "Hello world"
    assert ours.decode(ours.encode(" Hello")) == "<s> Hello"


def test_spm_merges_rebuilt_from_scores(tmp_path: Path) -> None:
    """Files without merges: merges come from the scores, so the best-scored piece wins."""
    path = _vocab_only_gguf(tmp_path / "spm.gguf", spm_tokenizer())
    ours = build_tokenizer(GGUFFile(path))
    ids = ours.encode("The capital of France", add_special_tokens=False)
    assert "".join(ours.id_to_token(i) for i in ids) == "\u2581The\u2581capital\u2581of\u2581France"
    assert len(ids) < 8
    # byte fallback: a character the vocabulary lacks becomes its UTF-8 bytes <0xC3> <0xA6>
    assert ours.encode("\u00e6", add_special_tokens=False) == [ours.token_to_id("\u2581"), 3 + 0xC3, 3 + 0xA6]


# --- the real model: SmolLM2-135M-Instruct, against transformers loading the same GGUF ----------------

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LONG_CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Callable[[str, Callable[[Any, Any], Any]], Any]:
    """Results of transformers on the SmolLM2 GGUF, computed once and kept in pytest's cache (keyed by
    the file and the transformers/torch versions): transformers takes tens of seconds to read this GGUF,
    so the suite stays fast after the first run (`pytest --cache-clear` recomputes)."""
    import hashlib

    import torch
    import transformers

    key = f"smollm2-{smollm2_gguf.stat().st_size}-tf{transformers.__version__}-torch{torch.__version__}"
    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir(f"cpullm_reference_{hashlib.sha1(key.encode()).hexdigest()[:12]}")) if cache else \
        tmp_path_factory.mktemp("reference")
    loaded: dict[str, Any] = {}

    def hf() -> tuple[Any, Any]:
        if not loaded:
            from transformers import AutoModelForCausalLM

            loaded["tok"] = _transformers_tokenizer(smollm2_gguf)
            loaded["model"] = AutoModelForCausalLM.from_pretrained(
                smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
        return loaded["model"], loaded["tok"]

    def get(name: str, compute: Callable[[Any, Any], Any]) -> Any:
        path = folder / f"{name}.pkl"
        if path.exists():
            with open(path, "rb") as f:
                return pickle.load(f)
        value = compute(*hf())
        with open(path, "wb") as f:
            pickle.dump(value, f)
        return value

    return get


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Any:
    with cpullm.load(smollm2_gguf, dtype="f32") as m:
        yield m


def _hf_chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_smollm2_spec(smollm2: Any) -> None:
    s = smollm2.spec
    assert (s.n_layers, s.dim, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_dim, s.vocab_size) == \
        (30, 576, 9, 3, 64, 1536, 49152)
    assert s.tie_embeddings and s.max_context == 8192
    assert smollm2.tokenizer.special_tokens["bos_token"] == "<|im_start|>"
    assert 2 in smollm2.eos_token_ids


def test_smollm2_chat_template_and_tokenizer(smollm2: Any, reference: Any) -> None:
    ref = reference("tokenizer", lambda model, tok: {
        "chat": _hf_chat_ids(tok, CHAT),
        "texts": {t: (tok(t)["input_ids"], tok.decode(tok(t)["input_ids"], skip_special_tokens=True))
                  for t in AWKWARD},
    })
    assert smollm2.tokenizer.apply_chat_template(CHAT) == ref["chat"]
    for text, (ids, decoded) in ref["texts"].items():
        if text in _NO_SPACE_DIGIT:
            assert smollm2.tokenizer.encode(text) == ids, text
        assert smollm2.tokenizer.decode(ids, skip_special_tokens=True) == decoded, text


def test_smollm2_logits_match_transformers(smollm2: Any, reference: Any) -> None:
    ids = smollm2.tokenizer.apply_chat_template(CHAT)

    def compute(model: Any, tok: Any) -> np.ndarray:
        return hf_logits(model, np.array(ids))

    expected = reference("chat_logits", compute)
    err = rel_err(smollm2.logits(ids), expected)
    assert err < F32_TOL, f"relative error {err:.2e}"  # measured about 2e-6


def test_smollm2_greedy_chat_reply_matches_transformers(smollm2: Any, reference: Any) -> None:
    import torch

    def greedy(messages: list[dict[str, str]]) -> Callable[[Any, Any], list[int]]:
        def compute(model: Any, tok: Any) -> list[int]:
            ids = _hf_chat_ids(tok, messages)
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
            return out[0, len(ids):].tolist()
        return compute

    for name, messages in (("greedy_capital", CHAT), ("greedy_story", LONG_CHAT)):
        expected = reference(name, greedy(messages))
        ids = smollm2.tokenizer.apply_chat_template(messages)
        got = list(smollm2.generate_tokens(ids, max_tokens=64))
        if expected and expected[-1] in smollm2.eos_token_ids:
            expected = expected[:-1]  # transformers returns the EOS it stopped at; cpullm does not yield it
        assert got == expected, name
        if name == "greedy_capital":
            assert smollm2.tokenizer.decode(got) == "The capital of France is Paris."
        else:
            assert len(got) == 64


# --- broken and hostile files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tok = bpe_tokenizer()
    model = _tiny(seed=8, vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224)
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    write_gguf(path, model.config, f32_state(model), tok, matrices("Q8_0"))
    return path.read_bytes()


def _write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_truncated_files(good_gguf: bytes, tmp_path: Path) -> None:
    gguf = GGUFFile(_write(tmp_path, good_gguf, "good.gguf"))
    first_tensor = min(t.offset for t in gguf.tensors.values())
    data_end = max(t.offset + t.nbytes for t in gguf.tensors.values())  # the file may pad after it
    cuts = [0, 3, 10, 23, 30, 100, 1000, 5000, gguf.data_start - 1, first_tensor + 100, data_end - 1]
    for cut in cuts:
        path = _write(tmp_path, good_gguf[:cut])
        with pytest.raises(cpullm.ModelFormatError) as info:
            cpullm.load(path)
        message = str(info.value)
        assert str(path) in message
        assert any(s in message for s in ("truncated", "runs past the end", "too short")), (cut, message)


def test_tensor_data_past_end_of_file(tmp_path: Path) -> None:
    kvs = [arch_kv()]
    data = b"\0" * 64
    path = _write(tmp_path, raw_gguf(kvs, [("token_embd.weight", [4, 4], 0, 0), ("output_norm.weight", [16], 0, 64)],
                                     data))
    with pytest.raises(cpullm.ModelFormatError, match="output_norm.weight.*runs past the end of the file"):
        GGUFFile(path)
    huge = _write(tmp_path, raw_gguf(kvs, [("token_embd.weight", [1 << 40, 1 << 30], 0, 0)], data), "huge.gguf")
    with pytest.raises(cpullm.ModelFormatError, match="runs past the end of the file"):
        GGUFFile(huge)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "mamba"])
def test_unsupported_architecture(arch: str, tmp_path: Path) -> None:
    tok = bpe_tokenizer()
    model = _tiny(seed=8, vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, model.config, f32_state(model), tok, arch=arch)
    with pytest.raises(cpullm.UnsupportedModelError, match=f"architecture '{arch}' is not supported"):
        cpullm.load(path)


def test_hostile_headers(tmp_path: Path) -> None:
    cases: dict[str, tuple[bytes, type, str]] = {
        "bad magic": (raw_gguf([arch_kv()], magic=b"GGML"), cpullm.ModelFormatError, "not a GGUF file"),
        "version 1": (raw_gguf([arch_kv()], version=1), cpullm.UnsupportedModelError, "version 1"),
        "big endian": (raw_gguf([arch_kv()], version=3 << 24), cpullm.UnsupportedModelError, "big-endian"),
        "huge string array": (
            raw_gguf([arch_kv(), raw_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 62))]),
            cpullm.ModelFormatError, "truncated"),
        "huge int array": (
            raw_gguf([arch_kv(), raw_kv("x.y", 9, struct.pack("<IQ", 4, 1 << 61))]),
            cpullm.ModelFormatError, "truncated"),
        "huge kv count": (raw_gguf([arch_kv()], n_kv=1 << 60, alignment=1), cpullm.ModelFormatError, "truncated"),
        "huge string": (raw_gguf([struct.pack("<Q", 1 << 62) + b"key"]), cpullm.ModelFormatError, "truncated"),
        "unknown value type": (raw_gguf([arch_kv(), raw_kv("x", 99, b"")]), cpullm.ModelFormatError,
                               "unknown metadata value type"),
        "invalid utf-8 key": (raw_gguf([arch_kv(), raw_kv(b"\xff\xfe", 4, b"\0\0\0\0")]), cpullm.ModelFormatError,
                              "UTF-8"),
        "duplicate key": (raw_gguf([arch_kv(), arch_kv()]), cpullm.ModelFormatError, "appears twice"),
        "too many dims": (raw_gguf([arch_kv()], [("t", [1, 1, 1, 1, 1], 0, 0)]), cpullm.ModelFormatError,
                          "dimensions"),
        "zero dim": (raw_gguf([arch_kv()], [("t", [0, 4], 0, 0)]), cpullm.ModelFormatError, "invalid dimensions"),
        "unknown ggml type": (raw_gguf([arch_kv()], [("t", [32], 77, 0)], b"\0" * 64), cpullm.UnsupportedModelError,
                              "unknown ggml type"),
        "removed ggml type": (raw_gguf([arch_kv()], [("t", [32], 31, 0)], b"\0" * 64), cpullm.UnsupportedModelError,
                              r"type 31 \(Q4_0_4_4, which llama.cpp no longer"),
        "row not whole blocks": (raw_gguf([arch_kv()], [("t", [30, 2], 8, 0)], b"\0" * 128), cpullm.ModelFormatError,
                                 "block size"),
        "misaligned tensor": (raw_gguf([arch_kv()], [("t", [4], 0, 4)], b"\0" * 64), cpullm.ModelFormatError,
                              "alignment"),
        "duplicate tensor": (raw_gguf([arch_kv()], [("t", [4], 0, 0), ("t", [4], 0, 32)], b"\0" * 64),
                             cpullm.ModelFormatError, "appears twice"),
        "bad alignment": (raw_gguf([arch_kv(), raw_kv("general.alignment", 4, struct.pack("<I", 3))]),
                          cpullm.ModelFormatError, "power of two"),
    }
    for name, (data, error, message) in cases.items():
        path = _write(tmp_path, data, f"{name.replace(' ', '_')}.gguf")
        with pytest.raises(error, match=message):
            cpullm.load(path)


def test_inconsistent_models(tmp_path: Path) -> None:
    tok = bpe_tokenizer()
    model = _tiny(seed=9, vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224)
    state = f32_state(model)

    path = tmp_path / "missing.gguf"
    write_gguf(path, model.config, state, tok, matrices("Q8_0"), drop={"blk.1.ffn_down.weight"})
    with pytest.raises(cpullm.ModelFormatError, match="mlp.down_proj.weight' is missing"):
        cpullm.load(path)

    path = tmp_path / "moe.gguf"
    write_gguf(path, model.config, state, tok, extra=lambda w: w.add_expert_count(8))
    with pytest.raises(cpullm.UnsupportedModelError, match="mixture-of-experts"):
        cpullm.load(path)

    path = tmp_path / "shape.gguf"
    wrong = tiny_llama_config(vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=256,
                              num_attention_heads=4, num_key_value_heads=2)
    write_gguf(path, wrong, state, tok)  # metadata says 256, tensors hold 224
    with pytest.raises(cpullm.ModelFormatError, match=r"ffn_gate.weight' has shape \[224, 128\], expected \[256, 128\]"):
        cpullm.load(path)

    path = tmp_path / "no-kv-heads.gguf"
    write_gguf(path, model.config, state, tok)
    # head_count_kv absent means as many kv heads as heads, which the k/v shapes refute
    path.write_bytes(path.read_bytes().replace(b"llama.attention.head_count_kv", b"llama.attention.head_count_xx"))
    with pytest.raises(cpullm.ModelFormatError, match=r"attn_k.weight' has shape \[64, 128\], expected \[128, 128\]"):
        cpullm.load(path)


def test_side_files_for_conversion(tmp_path: Path) -> None:
    """config.json, generation_config.json and the tokenizer files written from a GGUF (what a converted
    directory keeps) load back into the same tokenizer, template and stop ids."""
    from cpullm.gguf_io import write_side_files
    from cpullm.hf import read_json
    from cpullm.spec import spec_from_hf_config
    from cpullm.tokenizer import Tokenizer

    tok = spm_tokenizer()
    model = _tiny(seed=10, vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224)
    path = tmp_path / "m.gguf"
    write_gguf(path, model.config, f32_state(model), tok, matrices("Q4_0"), chat_template=CHATML)
    m = read_gguf(path)
    out = tmp_path / "side"
    out.mkdir()
    written = write_side_files(m, out)
    assert sorted(written) == ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    again_spec = spec_from_hf_config(read_json(out / "config.json"))
    assert again_spec.to_native() == m.spec.to_native()
    assert read_json(out / "generation_config.json")["eos_token_id"] == 2
    again = Tokenizer.from_directory(out)
    assert again.chat_template == CHATML and again.special_tokens == m.tokenizer.special_tokens
    for text in AWKWARD:
        assert again.encode(text) == m.tokenizer.encode(text), text


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_convert_gguf_round_trip(tmp_path: Path, qtype: str) -> None:
    """`cpullm convert file.gguf OUT`: the converted int8 directory computes what loading the GGUF with
    dtype int8 computes, keeps its tokenizer and chat template, and takes Q8_0 integers as stored."""
    from cpullm.convert import convert
    from cpullm.safetensors_io import SafetensorsFile

    tok = bpe_tokenizer()
    model = _tiny(seed=5, vocab_size=len(tok["tokens"]), hidden_size=128, intermediate_size=224)
    path = tmp_path / "m.gguf"
    write_gguf(path, model.config, f32_state(model), tok, matrices(qtype))
    out = convert(path, tmp_path / "out", dtype="int8", progress=False)
    converted, direct = cpullm.load(out), cpullm.load(path, dtype="int8")
    ids = np.arange(5, 40)
    np.testing.assert_array_equal(converted.logits(ids), direct.logits(ids))
    text = "Hello <|im_start|> world 🙂"
    assert converted.tokenizer.encode(text) == direct.tokenizer.encode(text)
    assert converted.eos_token_ids == direct.eos_token_ids
    if qtype == "Q8_0":
        stored = GGUFTensorSource(GGUFFile(path)).get_q8_0("model.layers.1.mlp.down_proj.weight")
        written = SafetensorsFile(out / "model.safetensors")
        np.testing.assert_array_equal(written.get("layers.1.w2"), stored[0])
        np.testing.assert_array_equal(written.get("layers.1.w2.scales"), stored[1].astype(np.float32))
