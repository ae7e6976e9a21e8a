"""A random-weight model shaped like Llama-3.2-1B, and the files bench_peers.py feeds its engines from it.

- :func:`build_hf_directory`: transformers builds the model from :data:`LLAMA_1B_SHAPE` under a fixed seed
  (its default init: normal, std ``initializer_range``) and saves it as an f32 Hugging Face directory,
  with a byte-level BPE tokenizer of exactly ``vocab_size`` ids (valid, not meaningful: the benchmark feeds
  token ids).
- :func:`write_llama_gguf`: the same weights as a llama.cpp GGUF (F16 or Q8_0), laid out as llama.cpp's
  ``convert_hf_to_gguf.py`` writes Llama: q/k rows permuted to interleaved rotary pairs, tied embeddings
  stored once, Llama 3 rope scaling as a ``rope_freqs.weight`` tensor of per-frequency divisors (llama.cpp
  reads no metadata for it), and the tokenizer as ``gpt2`` (byte-level BPE) metadata.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np

LLAMA_1B_SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
SEED = 0
INIT_STD = 0.02  # transformers' default initializer_range

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
N_SPECIAL = 256  # as in Llama 3: the last 256 ids are special tokens


# --- tokenizer ---------------------------------------------------------------------------------------

def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with exactly ``vocab_size`` ids: the 256 byte symbols, then two- and
    three-symbol merges, then ``N_SPECIAL`` special tokens (bos, eos, reserved). The special tokens are in
    the model's vocabulary too, so ``get_vocab_size(with_added_tokens=False)`` is ``vocab_size`` (what
    CTranslate2's converter reads)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    n_regular = vocab_size - N_SPECIAL
    vocab: dict[str, int] = {symbol: i for i, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []

    def add(left: str, right: str) -> bool:
        if len(vocab) >= n_regular:
            return False
        vocab[left + right] = len(vocab)
        merges.append((left, right))
        return True

    pairs = [a + b for a in alphabet for b in alphabet]
    for pair in pairs:
        if not add(pair[0], pair[1]):
            break
    for pair in pairs:
        if not all(add(pair, c) for c in alphabet):
            break
    if len(vocab) != n_regular:
        raise ValueError(f"cannot fill {n_regular} regular ids from a 256-symbol alphabet")
    specials = [BOS, EOS] + [f"<|reserved_special_token_{i}|>" for i in range(N_SPECIAL - 2)]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError("tokenizer size mismatch")
    return tokenizer


# --- the Hugging Face directory ------------------------------------------------------------------------

def build_hf_directory(target: Path, shape: dict[str, Any] = LLAMA_1B_SHAPE, seed: int = SEED,
                       init_std: float = INIT_STD) -> None:
    """The random model as an f32 Hugging Face directory (safetensors, config, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**shape, initializer_range=init_std)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(target)
    del model
    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(shape["vocab_size"]), bos_token=BOS,
                                   eos_token=EOS)
    fast.save_pretrained(target)


# --- GGUF ----------------------------------------------------------------------------------------------

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers Llama tensor."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")  # model.layers.<i>.<module...>.weight
    if parts[:2] != ["model", "layers"] or parts[-1] != "weight":
        raise ValueError(f"unexpected tensor {hf_name}")
    return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:-1])]}.weight"


def _iter_safetensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def llama3_rope_freqs(config: dict[str, Any]) -> np.ndarray | None:
    """The per-frequency divisors llama.cpp's converter stores as ``rope_freqs.weight`` for Llama 3 rope
    scaling (None when the config has none)."""
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    theta = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), scaling.get(
        "high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _add_tokenizer(writer: Any, hf_dir: Path, config: dict[str, Any]) -> None:
    import gguf
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    by_id = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError(f"{hf_dir}: token ids are not contiguous")
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    model = json.loads((hf_dir / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list([t for t, _ in by_id])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in by_id])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(int(config["bos_token_id"]))
    writer.add_eos_token_id(int(config["eos_token_id"]))


def write_llama_gguf(hf_dir: Path, target: Path, qtype_name: str) -> None:
    """An f32 Llama Hugging Face directory as a llama.cpp GGUF whose 2-D weights are ``qtype_name``
    (F16 or Q8_0; 1-D tensors stay F32)."""
    import gguf
    from cpullm.gguf_io import permute_rows

    config = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    file_type = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype_name]

    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_name(hf_dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(file_type)
    _add_tokenizer(writer, hf_dir, config)

    rope_freqs = llama3_rope_freqs(config)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for name, data in _iter_safetensors(hf_dir):
        data = np.asarray(data, dtype=np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            data = permute_rows(data, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            data = permute_rows(data, kv_heads)
        gname = gguf_tensor_name(name)
        if data.ndim != 2:
            writer.add_tensor(gname, data)
        elif qtype_name == "F16":
            writer.add_tensor(gname, data.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def safetensors_data_bytes(directory: Path) -> int:
    """The tensor bytes (not headers) of every ``*.safetensors`` file in a directory."""
    total = 0
    for file in directory.glob("*.safetensors"):
        with file.open("rb") as f:
            (header,) = struct.unpack("<Q", f.read(8))
        total += file.stat().st_size - 8 - header
    return total
