"""The tokenizer of a GGUF file, rebuilt from its metadata as a ``tokenizers.Tokenizer``.

A GGUF carries no tokenizer.json; llama.cpp stores the vocabulary (``tokenizer.ggml.tokens``), token
types, scores or merges, the special token ids and the chat template as metadata. Two families of
``tokenizer.ggml.model`` cover the Llama-family models cpullm runs:

- ``"gpt2"``: byte-level BPE (SmolLM2, Llama 3, Qwen2). Merges come from the file; the split of text
  into words before BPE depends on how the vocabulary was trained and is named by ``tokenizer.ggml.pre``.
- ``"llama"``: SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama). The file usually has
  scores instead of merges: a merge's rank is the score of the token it makes.

The result is meant to tokenize exactly as transformers' tokenizer for the same GGUF
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) does, with one deliberate exception: for the
``smollm`` (and ``starcoder``) pre-tokenizer, digits are split off one by one as in the model's own
tokenizer.json and in llama.cpp, where transformers' GGUF loader uses plain GPT-2 splitting; the two
differ only on a run of whitespace followed by a digit. Likewise ``tokenizer.ggml.add_space_prefix =
false`` on a SentencePiece vocabulary is honoured here (as llama.cpp does), where transformers' loader
ignores it.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelFormatError, UnsupportedModelError
from .gguf_io import TOKEN_CONTROL, TOKEN_USER_DEFINED, GGUFFile, meta_token_id
from .tokenizer import Tokenizer

# Word-splitting patterns of byte-level BPE vocabularies (public definitions of each model family).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_PRE = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GPT-2's own splitting after every digit is cut off on its own (StarCoder-style vocabularies).
_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell"}
# GPT-2's splitting: what transformers and llama.cpp use for these and for names they do not know.
_GPT2_PRE = {None, "default", "gpt2", "gpt-2"}

# Ids of tokens llama.cpp also treats as the end of generation when the vocabulary has them as control
# tokens (llama-vocab.cpp: text of end-of-turn markers), besides eos/eot/eom ids named in the metadata.
_END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>")


@lru_cache(maxsize=1)
def _byte_spelling() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    others take the characters from U+0100 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return tuple(table)


def _string_list(gguf: GGUFFile, key: str, required: bool = True) -> list[str] | None:
    value = gguf.get(key)
    if value is None:
        if required:
            raise ModelFormatError(f"{gguf.path}: metadata '{key}' is missing (the file has no usable tokenizer)")
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelFormatError(f"{gguf.path}: metadata '{key}' must be an array of strings")
    return value


def _number_list(gguf: GGUFFile, key: str, n: int) -> list[Any] | None:
    value = gguf.get(key)
    if value is None:
        return None
    if isinstance(value, list) or getattr(value, "ndim", 0) != 1 or len(value) != n:
        raise ModelFormatError(f"{gguf.path}: metadata '{key}' must be a numeric array of {n} values (one per token)")
    return value.tolist()


def _flag(gguf: GGUFFile, key: str, default: bool) -> bool:
    value = gguf.get(key)
    return default if value is None else bool(value)


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE ranks a merge by the score of the token it produces (higher first). Every way of
    cutting a token into two vocabulary tokens is a merge of that rank; among equal scores, longer left
    then longer right pieces first, then vocabulary order (as transformers orders them)."""
    index = {token: i for i, token in enumerate(tokens)}
    score_of: dict[str, float] = {}
    for token, score in zip(tokens, scores):
        score_of[token] = float(score)
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score in score_of.items():
        cuts = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in index and token[k:] in index]
        cuts.sort(key=lambda cut: (index[cut[0]], index[cut[1]]))
        ranked.extend((score, len(left), len(right), left, right) for left, right in cuts)
    ranked.sort(key=lambda entry: entry[:3], reverse=True)  # stable: ties keep the order above
    return [(left, right) for _, _, _, left, right in ranked]


def _file_merges(gguf: GGUFFile) -> list[tuple[str, str]] | None:
    merges = _string_list(gguf, "tokenizer.ggml.merges", required=False)
    if merges is None:
        return None
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelFormatError(f"{gguf.path}: tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _bpe(gguf: GGUFFile, **options: Any) -> _HFTokenizer:
    """A BPE tokenizer over the file's vocabulary and merges; a merge the vocabulary does not hold (the
    tokenizers library raises a bare Exception) is a format error."""
    try:
        return _HFTokenizer(models.BPE(**options))
    except Exception as e:  # noqa: BLE001 - the library's only exception type here
        raise ModelFormatError(f"{gguf.path}: the tokenizer's vocabulary and merges do not agree: {e}") from e


def _byte_level(gguf: GGUFFile, tokens: list[str], scores: list[float] | None) -> tuple[_HFTokenizer, set[str]]:
    spelling = _byte_spelling()
    alphabet = set(spelling)
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        # A token written in plain text rather than GPT-2's byte alphabet (a mislabelled added token) is
        # respelled so that it still matches its bytes.
        key = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[key] = i
    merges = _file_merges(gguf)
    if merges is None:
        if scores is None:
            raise ModelFormatError(f"{gguf.path}: a gpt2 tokenizer needs tokenizer.ggml.merges or scores")
        merges = _merges_from_scores(tokens, scores)
    tok = _bpe(gguf, vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
               end_of_word_suffix="", fuse_unk=False)
    pre = gguf.get("tokenizer.ggml.pre")
    if pre in _REGEX_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _DIGITS_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        if pre not in _GPT2_PRE:
            warnings.warn(
                f"{gguf.path}: tokenizer.ggml.pre '{pre}' is not known to cpullm; splitting words as GPT-2 does "
                f"(as transformers does), which may differ from the model's own tokenizer",
                stacklevel=3,
            )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def _sentencepiece(gguf: GGUFFile, tokens: list[str], scores: list[float] | None, add_space: bool) -> _HFTokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = _file_merges(gguf)
    if merges is None:
        if scores is None:
            raise ModelFormatError(f"{gguf.path}: a llama (SentencePiece) tokenizer needs tokenizer.ggml.scores")
        merges = _merges_from_scores(tokens, scores)
    tok = _bpe(gguf, vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _post_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
                    add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    single, pair, special = ["$A:0"], ["$A:0", "$B:1"], []
    if add_bos and bos is not None:
        single, pair = [f"{bos}:0", *single], [f"{bos}:0", "$A:0", f"{bos}:1", "$B:1"]
        special.append((bos, bos_id))
    if add_eos and eos is not None:
        single.append(f"{eos}:0")
        pair = pair[:2] + [f"{eos}:0"] + pair[2:] + [f"{eos}:1"]
        if eos != bos or not (add_bos and bos is not None):
            special.append((eos, eos_id))
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def chat_template(gguf: GGUFFile) -> str | None:
    template = gguf.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelFormatError(f"{gguf.path}: tokenizer.chat_template must be a string")
    return template


def eos_token_ids(gguf: GGUFFile) -> list[int]:
    """Every id that ends generation: eos, eot and eom from the metadata, then the control tokens whose
    text is a known end-of-turn marker (as llama.cpp does). The first is the file's eos id."""
    tokens = _string_list(gguf, "tokenizer.ggml.tokens", required=False) or []
    n = len(tokens) or (1 << 62)
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token = meta_token_id(gguf, key, n)
        if token is not None and token not in ids:
            ids.append(token)
    types = _number_list(gguf, "tokenizer.ggml.token_type", len(tokens)) if tokens else None
    if types is not None:
        for i, (text, kind) in enumerate(zip(tokens, types)):
            if kind == TOKEN_CONTROL and text in _END_OF_TURN_TEXTS and i not in ids:
                ids.append(i)
    return ids


def build_tokenizer(gguf: GGUFFile) -> Tokenizer | None:
    """cpullm's Tokenizer for this file, or None when the file carries no vocabulary."""
    kind = gguf.get("tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = _string_list(gguf, "tokenizer.ggml.tokens")
    n = len(tokens)
    if n == 0:
        raise ModelFormatError(f"{gguf.path}: tokenizer.ggml.tokens is empty")
    scores = _number_list(gguf, "tokenizer.ggml.scores", n)
    types = _number_list(gguf, "tokenizer.ggml.token_type", n) or [1] * n

    if kind == "gpt2":
        tok, alphabet = _byte_level(gguf, tokens, scores)
        add_bos_default = False
    elif kind == "llama":
        add_space = _flag(gguf, "tokenizer.ggml.add_space_prefix", True)
        tok, alphabet = _sentencepiece(gguf, tokens, scores, add_space), None
        add_bos_default = True  # llama.cpp and transformers add BOS for SentencePiece unless told not to
    else:
        raise UnsupportedModelError(
            f"{gguf.path}: tokenizer model '{kind}' is not supported (supported: gpt2 byte-level BPE, "
            f"llama SentencePiece BPE)"
        )

    names = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta_token_id(gguf, f"tokenizer.ggml.{key}", n)
        if token_id is not None:
            names[name] = (tokens[token_id], token_id)

    # Control tokens (and the named special tokens) stay whole in text and are skipped when decoding with
    # skip_special_tokens; user-defined tokens stay whole but are ordinary text.
    special = [
        AddedToken(text, normalized=False, special=True)
        for text, kind_ in zip(tokens, types)
        if kind_ == TOKEN_CONTROL and (alphabet is None or set(text) <= alphabet)
    ]
    seen = {t.content for t in special}
    for text, _ in names.values():
        if text not in seen:
            special.append(AddedToken(text, normalized=False, special=True))
            seen.add(text)
    if special:
        tok.add_special_tokens(special)
    vocab = tok.get_vocab(with_added_tokens=False)
    user = [
        AddedToken(text, normalized=False, special=False)
        for text, kind_ in zip(tokens, types)
        if kind_ == TOKEN_USER_DEFINED and text in vocab and text not in seen
    ]
    if user:
        tok.add_tokens(user)

    add_bos = _flag(gguf, "tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = _flag(gguf, "tokenizer.ggml.add_eos_token", False)
    bos, bos_id = names.get("bos_token", (None, None))
    eos, eos_id = names.get("eos_token", (None, None))
    tok.post_processor = _post_processor(bos, bos_id, eos, eos_id, add_bos, add_eos)

    config: dict[str, Any] = {name: text for name, (text, _) in names.items()}
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = add_eos
    template = chat_template(gguf)
    if template is not None:
        config["chat_template"] = template
    return Tokenizer(tok, config, template)
