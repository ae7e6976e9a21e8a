"""Chat on the real default model, SmolLM2-135M-Instruct (its GGUF, through cpullm.hub): prompt ids equal
transformers' for multi-turn conversations with and without a system message, the real byte-level BPE
tokenizer streams emoji and CJK without broken characters, and a chat session reuses its cache and
answers exactly like a fresh run over the whole conversation."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

import cpullm
from cpullm.generation import common_prefix
from cpullm.streaming import IncrementalDecoder

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Japan? 東京かな 🙂"},
    ],
    [
        {"role": "system", "content": "Réponds en français. 🇫🇷"},
        {"role": "user", "content": "Bonjour !"},
        {"role": "assistant", "content": "Bonjour ! Comment puis-je vous aider ?"},
        {"role": "user", "content": "Zürich ou Genève ?\n\n  Two lines, trailing spaces.  "},
        {"role": "assistant", "content": "Genève. 👍🏽"},
        {"role": "user", "content": "Merci"},
    ],
]

TEXTS = [
    "emoji 🙂🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "日本語のテキストと中文文本，还有한국어.",
    "Zürich, São Paulo, Kraków — naïve café, Ελληνικά, ½ ∑ ∞",
]


@pytest.fixture(scope="module")
def reference_ids(request: pytest.FixtureRequest, smollm2_gguf: Path) -> list[list[int]]:
    """transformers' apply_chat_template ids for CONVERSATIONS, from the same GGUF. Reading the GGUF's
    tokenizer takes transformers several seconds, so the ids are kept in pytest's cache, keyed by the
    file, the conversations and the transformers version."""
    import transformers

    key = repr((smollm2_gguf.stat().st_size, CONVERSATIONS, transformers.__version__)).encode()
    name = f"cpullm_chat_reference/{hashlib.sha1(key).hexdigest()[:16]}"
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        stored = cache.get(name, None)
        if stored is not None:
            return stored
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    out = []
    for messages in CONVERSATIONS:
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    if cache is not None:
        cache.set(name, out)
    return out


@pytest.fixture(scope="module")
def smollm2_chat(smollm2_gguf: Path) -> Any:
    with cpullm.load(smollm2_gguf, dtype="f32") as model:
        yield model


def test_prompt_ids_match_transformers(smollm2_chat: Any, reference_ids: list[list[int]]) -> None:
    for messages, expected in zip(CONVERSATIONS, reference_ids):
        ids = smollm2_chat.tokenizer.apply_chat_template(messages)
        assert ids == expected, messages
        # <|im_start|> (id 1, also the BOS) opens each message, the template's default system message when
        # there is none, and the generation prompt; no BOS is added in front of it all.
        assert ids.count(1) == len(messages) + (messages[0]["role"] != "system") + 1 and ids[:2] != [1, 1]


def test_real_tokenizer_streams_emoji_and_cjk_whole(smollm2_chat: Any) -> None:
    tok = smollm2_chat.tokenizer
    split = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        split += sum("\ufffd" in tok.decode([t]) for t in ids)
        decoder = IncrementalDecoder(tok)
        pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)
    assert split > 10  # the real vocabulary does split these characters across tokens


def test_second_turn_reuses_the_cache_and_equals_a_fresh_run(smollm2_chat: Any) -> None:
    model = smollm2_chat
    session = model.chat(max_tokens=5)
    session.send("What is the capital of France?")
    cached = list(session._cached)
    prompt = session.prompt_ids("And of Italy?")
    reply = session.send("And of Italy?")
    assert session.stats.cached_tokens == common_prefix(cached, prompt) == len(cached)
    assert session.stats.processed_tokens == len(prompt) - len(cached) < 20
    fresh = list(model.generate_tokens(prompt, 5))
    assert reply == model.tokenizer.decode(fresh, skip_special_tokens=True)
