"""Writing small GGUF files for tests, the way llama.cpp's converter writes Llama models: q/k rows
permuted into interleaved-pair order, norms in F32, matrices in the requested ggml types."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from cpullm.gguf_io import permute_rows

TOKENIZER_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
    "Zürich, São Paulo, Kraków — 東京 and 北京; emoji 🙂🚀 too.",
    "Hello world, hello there! It's 2024 and we're here. I'LL see 12345 items.",
] * 20

# Strings that stress tokenizers: emoji (multi-codepoint too), CJK, code, whitespace runs, special
# tokens inside text, byte-fallback characters, leading/trailing spaces.
AWKWARD = [
    "Hello world",
    " Hello",
    "  Hello   world  ",
    "",
    " ",
    "\n",
    "\n\n\n",
    "\t\tindented\n\t  mixed",
    "Zürich, São Paulo, Kraków — 東京 and 北京",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 🙂🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "def f(x):\n    return {'a': [x**2, x//3]}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "it's I'M we'LL they'd 'quoted'",
    "café naïve ﬁ Å Å ẞ",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "3.14159 and 2024-01-01, 1,000,000",
    "<s>hi</s> <unk> [INST] <tool>x",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>tail",
    "trailing spaces    ",
    "a" * 50 + " " + "b" * 30,
    "URL https://example.com/path?q=1&x=y#frag",
    "math: ∑ x² ≤ ∞ → ∀ε>0",
    "\x00\x01control\x7f chars",
]


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def spm_vocab(user_defined: Iterable[str] = ("<tool>",), control: Iterable[str] = ("[INST]",),
              size: int = 400) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style BPE vocabulary as llama.cpp stores one: <unk>, <s>, </s>, the 256 byte
    tokens, learned pieces with decreasing scores, then added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.train_from_iterator(TOKENIZER_CORPUS, trainers.BpeTrainer(vocab_size=size, show_progress=False))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for i, piece in enumerate(sorted(vocab, key=vocab.get)):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))
    for text in user_defined:
        tokens.append(text)
        types.append(4)
        scores.append(0.0)
    for text in control:
        tokens.append(text)
        types.append(3)
        scores.append(0.0)
    return tokens, scores, types


def bpe_vocab(specials: Iterable[str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
              size: int = 420) -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary (tokens, merges, token types) with control tokens first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = list(specials)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=_byte_level_alphabet())
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return tokens, merges, types


def spm_tokenizer(**meta: Any) -> dict[str, Any]:
    tokens, scores, types = spm_vocab()
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types, "bos": 1, "eos": 2, "unk": 0,
            **meta}


def bpe_tokenizer(pre: str = "smollm", **meta: Any) -> dict[str, Any]:
    tokens, merges, types = bpe_vocab()
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges, "types": types, "bos": 1, "eos": 2,
            **meta}


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    assert parts[:2] == ["model", "layers"], hf_name
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_GGUF_LAYER_NAMES[module]}.{parts[-1]}"


def all_f32(name: str, array: np.ndarray) -> str:
    return "F32"


def matrices(qtype: str) -> Callable[[str, np.ndarray], str]:
    """Every 2-D tensor in ``qtype``, vectors in F32 (llama.cpp's choice)."""
    return lambda name, array: qtype if array.ndim == 2 else "F32"


def _encode(array: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(what to hand GGUFWriter, the values a reader gets back as float32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == "F32":
        return array, array
    if qtype == "F16":
        half = array.astype(np.float16)
        return half, half.astype(np.float32)
    if qtype == "F64":  # the values are float32's, so they come back exactly
        return array.astype(np.float64), array
    t = GGMLQuantizationType[qtype]
    if qtype in ("Q4_K", "Q6_K"):
        blocks = random_k_blocks(array.shape, qtype, seed=int(abs(array.sum()) * 1000) % (2**31))
    else:
        blocks = quantize(array, t)
    return blocks, dequantize(blocks, t).astype(np.float32)


def random_k_blocks(shape: tuple[int, ...], qtype: str, seed: int) -> np.ndarray:
    """Random K-quant blocks with small, finite scales (gguf cannot quantize to K types itself)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    assert cols % 256 == 0
    if qtype == "Q4_K":  # d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
        blocks[..., 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        blocks[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    else:  # Q6_K: ql[128], qh[64], int8 scales[16], d (f16)
        blocks = rng.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
        blocks[..., 208:210] = np.frombuffer(np.float16(0.0005).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(
    path: Path,
    config: Any,
    state: Mapping[str, np.ndarray],
    tokenizer: Mapping[str, Any] | None,
    qtypes: Callable[[str, np.ndarray], str] = all_f32,
    *,
    arch: str = "llama",
    permute: bool = True,
    chat_template: str | None = None,
    drop: Iterable[str] = (),
    extra: Callable[[Any], None] | None = None,
    rope_freqs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Writes a Llama GGUF from a transformers config and float32 state dict (HF names). Returns the
    state dict a faithful reader must reproduce (quantization applied, q/k back in HF order)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("cpullm test model")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    w.add_rope_freq_base(float(theta))
    w.add_vocab_size(config.vocab_size)
    if tokenizer is not None:
        w.add_tokenizer_model(tokenizer["model"])
        if "pre" in tokenizer:
            w.add_tokenizer_pre(tokenizer["pre"])
        w.add_token_list(tokenizer["tokens"])
        if "scores" in tokenizer:
            w.add_token_scores(tokenizer["scores"])
        w.add_token_types(tokenizer["types"])
        if "merges" in tokenizer:
            w.add_token_merges(tokenizer["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                         ("pad", w.add_pad_token_id), ("eot", w.add_eot_token_id)):
            if key in tokenizer:
                add(tokenizer[key])
        if "add_bos" in tokenizer:
            w.add_add_bos_token(tokenizer["add_bos"])
        if "add_space_prefix" in tokenizer:
            w.add_add_space_prefix(tokenizer["add_space_prefix"])
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if extra is not None:
        extra(w)

    drop = set(drop)
    expected: dict[str, np.ndarray] = {}
    for name, array in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        qtype = qtypes(name, array)
        stored = array
        if permute and name.endswith("self_attn.q_proj.weight"):
            stored = permute_rows(array, config.num_attention_heads)
        elif permute and name.endswith("self_attn.k_proj.weight"):
            stored = permute_rows(array, config.num_key_value_heads)
        blocks, values = _encode(stored, qtype)
        if permute and name.endswith("self_attn.q_proj.weight"):
            values = _unpermute(values, config.num_attention_heads)
        elif permute and name.endswith("self_attn.k_proj.weight"):
            values = _unpermute(values, config.num_key_value_heads)
        expected[name] = values
        if gguf_name(name) in drop:
            continue
        raw_dtype = None if qtype in ("F32", "F16", "F64") else gguf.GGMLQuantizationType[qtype]
        w.add_tensor(gguf_name(name), blocks, raw_dtype=raw_dtype)
    if config.tie_word_embeddings:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    from cpullm.gguf_io import unpermute_rows

    return unpermute_rows(w, n_heads)


def f32_state(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def load_state(model: Any, state: Mapping[str, np.ndarray]) -> Any:
    """Copies float32 arrays into a transformers model (in place) and returns it."""
    import torch

    with torch.no_grad():
        params = model.state_dict()
        for name, array in state.items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
    return model


# --- raw GGUF bytes, for hostile headers ------------------------------------------------------------


def raw_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def raw_kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return raw_string(key) + struct.pack("<I", vtype) + payload


def raw_gguf(kvs: list[bytes], tensors: list[tuple[str, list[int], int, int]] = (), data: bytes = b"",
             version: int = 3, magic: bytes = b"GGUF", n_kv: int | None = None, n_tensors: int | None = None,
             alignment: int = 32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = b"".join(kvs)
    for name, dims, ggml_type, offset in tensors:
        body += raw_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        body += struct.pack("<IQ", ggml_type, offset)
    out = head + body
    out += b"\0" * (-len(out) % alignment)
    return out + data


def arch_kv(arch: str = "llama") -> bytes:
    return raw_kv("general.architecture", 8, raw_string(arch))
