"""Streaming text: pieces never break a character split across tokens, join to exactly the full decode,
keep SentencePiece's leading spaces right, and never show part of a stop string."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cpullm
from conftest import write_tokenizer
from cpullm.streaming import IncrementalDecoder, StopStrings, TextStream
from cpullm.tokenizer import Tokenizer
from sp_tokenizer import write_spm_tokenizer

TEXTS = [
    "Zürich, São Paulo, Kraków — 東京 and 北京; emoji 🙂🚀 too.",
    "🙂🚀👩‍👩‍👧 🇫🇷🇯🇵 family & flags",
    "naïve café, Ελληνικά, русский, 한국어, עברית, हिन्दी",
    "東京タワーは高い。北京烤鸭很好吃！",
    "déjà vu: ½ ∑ ∞ ≠ ≤ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 — fin. 😀😃😄😁",
    "plain ascii text, nothing special here",
]


@pytest.fixture(scope="module", params=["byte_level_bpe", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level_bpe":
        write_tokenizer(directory)
    else:
        write_spm_tokenizer(directory)
    tok = Tokenizer.from_directory(directory)
    assert tok is not None
    return tok


def _stream(tokenizer: Tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:  # type: ignore[assignment]
    decoder = IncrementalDecoder(tokenizer, context)
    pieces = [decoder.push(t) for t in ids]
    pieces.append(decoder.flush())
    return [p for p in pieces if p]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_full_decode_and_never_break_characters(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    for piece in pieces:
        piece.encode("utf-8")  # valid UTF-8: no lone surrogates either


def test_the_texts_really_split_characters_across_tokens(tokenizer: Tokenizer) -> None:
    # The tests above would prove little if every token decoded to whole characters.
    split = 0
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        split += sum("\ufffd" in tokenizer.decode([t]) for t in ids)
    assert split > 20


@pytest.mark.parametrize("text", TEXTS[:3] + ["The capital of France is Paris. Hello there"])
def test_a_continuation_keeps_the_text_it_adds_after_the_context(tokenizer: Tokenizer, text: str) -> None:
    """As when a prompt is continued: the pieces are what the new tokens add after the prompt's text, so
    prompt + pieces reads exactly like the whole decode (a SentencePiece word keeps its leading space)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    boundaries = 0
    for k in range(1, len(ids)):
        head = tokenizer.decode(ids[:k])
        if head.endswith("\ufffd"):
            continue  # a prompt is whole text: it never ends inside a character
        boundaries += 1
        pieces = _stream(tokenizer, ids[k:], context=ids[:k])
        assert head + "".join(pieces) == full, k
        assert all("\ufffd" not in piece for piece in pieces)
    assert boundaries >= 5


def test_sentencepiece_leading_space_is_kept_after_a_prompt(tmp_path: Path) -> None:
    write_spm_tokenizer(tmp_path)
    tok = Tokenizer.from_directory(tmp_path)
    assert tok is not None
    prompt = tok.encode("The capital of")
    reply = tok.encode("The capital of France", add_special_tokens=False)[3:]  # "▁France"
    assert tok.decode(reply) == "France"  # decoded alone, SentencePiece drops the space
    assert _stream(tok, reply, context=prompt) == [" France"]
    assert _stream(tok, reply) == ["France"]  # no context: the reply alone, as transformers decodes it


def test_random_token_sequences_still_join_to_the_full_decode(tokenizer: Tokenizer) -> None:
    """Token soup (what an untrained model says); whatever the decode makes of it, the pieces join to
    the same text.

    Byte-level BPE: any ids at all, invalid UTF-8 included. Byte-fallback (SentencePiece): the `tokenizers`
    decoder renders a run of byte tokens that is not valid UTF-8 as U+FFFD *as a whole*, so valid leading
    bytes already streamed would turn into U+FFFD afterwards; no streamer can take back what it printed,
    so there the byte runs are whole characters (which is what a model that produces text emits)."""
    rng = np.random.default_rng(0)
    vocab = tokenizer.vocab_size
    byte_tokens = [i for i in range(vocab) if (tokenizer.id_to_token(i) or "").startswith("<0x")]
    chars = [tokenizer.encode(c, add_special_tokens=False) for c in "".join(TEXTS) if c.strip()]
    chars = [ids[1:] if tokenizer.id_to_token(ids[0]) == "▁" else ids for ids in chars]  # the character only
    for _ in range(200):
        if not byte_tokens:
            ids = rng.integers(0, vocab, int(rng.integers(1, 40))).tolist()
        else:
            ids = []
            for _ in range(int(rng.integers(1, 25))):
                if rng.random() < 0.5:
                    ids.append(int(rng.integers(0, vocab)))
                    if ids[-1] in byte_tokens:
                        ids.pop()
                else:
                    ids.extend(chars[int(rng.integers(0, len(chars)))])
        pieces = _stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_inside_the_stream_are_skipped_consistently(tokenizer: Tokenizer) -> None:
    a = tokenizer.encode("Hello there", add_special_tokens=False)
    b = tokenizer.encode("The capital 🙂", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    assert eos is not None
    ids = a + [eos] + b + [eos]
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def _stop_pieces(stop: list[str], chunks: list[str]) -> tuple[list[str], bool]:
    filt = StopStrings(stop)
    out = [filt.push(c) for c in chunks]
    if not filt.stopped:
        out.append(filt.flush())
    return [p for p in out if p], filt.stopped


@pytest.mark.parametrize("split", [1, 2, 3, 5, 100])
def test_stop_strings_cut_the_text_and_are_never_partly_shown(split: int) -> None:
    text = "Paris is nice.\nUser: next question\nUser: again"
    chunks = [text[i:i + split] for i in range(0, len(text), split)]
    pieces, stopped = _stop_pieces(["\nUser:"], chunks)
    assert stopped and "".join(pieces) == "Paris is nice."
    shown = ""
    for piece in pieces:
        shown += piece
        assert "\n" not in shown  # not even the first character of the stop string

    # The earliest of several stop strings wins; a prefix that does not complete is released at the end.
    pieces, stopped = _stop_pieces(["again", "next"], chunks)
    assert stopped and "".join(pieces) == "Paris is nice.\nUser: "
    pieces, stopped = _stop_pieces(["\nUser: never"], chunks)
    assert not stopped and "".join(pieces) == text
    pieces, stopped = _stop_pieces(["aab"], ["a", "a", "a", "b", "c"])  # overlapping partial matches
    assert stopped and "".join(pieces) == "a"


def test_stop_string_values_are_checked() -> None:
    for bad, message in [([""], "must not be empty"), ([3], "must be strings"), (5, "string or a list")]:
        with pytest.raises(ValueError, match=message):
            StopStrings(bad)  # type: ignore[arg-type]


def test_model_stream_with_stop_strings(make_llama: Any) -> None:
    directory, _ = make_llama(seed=4)
    write_tokenizer(directory)
    model = cpullm.load(directory, threads=1)
    ids = model.tokenizer.encode("The capital of")
    tokens = list(model.generate_tokens(ids, 40, stop_token_ids=()))
    free = model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert free == model.generate("The capital of", 40, stop_token_ids=())
    stop = free[len(free) // 2: len(free) // 2 + 3]
    expected = free[: free.index(stop)]
    pieces = list(model.stream("The capital of", 40, stop=[stop, "never appears"], stop_token_ids=()))
    assert "".join(pieces) == expected
    assert model.generate("The capital of", 40, stop=stop, stop_token_ids=()) == expected


def test_text_stream_combines_decoding_and_stop_strings(tokenizer: Tokenizer) -> None:
    text = "東京 🙂 and then STOP here 🚀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["STOP"])
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.stopped:
            break
    else:
        pieces.append(stream.flush())
    assert stream.stopped and "".join(pieces) == stream.text == "東京 🙂 and then "


def test_model_stream_continues_a_sentencepiece_prompt_with_its_spaces(make_llama: Any) -> None:
    import torch

    directory, hf_model = make_llama(seed=7, vocab_size=384)
    tok = write_spm_tokenizer(directory)
    # A random model emits token soup; keep it off the byte tokens (see the token-soup test above).
    byte_ids = [i for i in range(384) if (tok.id_to_token(i) or "").startswith("<0x")]
    with torch.no_grad():
        hf_model.lm_head.weight[byte_ids] = 0.0
    hf_model.save_pretrained(directory)
    model = cpullm.load(directory, threads=1)
    prompt = model.tokenizer.encode("The capital of")
    tokens = list(model.generate_tokens(prompt, 30, stop_token_ids=()))
    whole = model.tokenizer.decode(prompt + tokens, skip_special_tokens=True)
    head = model.tokenizer.decode(prompt, skip_special_tokens=True)
    text = "".join(model.stream("The capital of", 30, stop_token_ids=()))
    assert head + text == whole
    assert text.startswith(" ") and not model.tokenizer.decode(tokens).startswith(" ")  # the space rule mattered
