"""Turning generated token ids into text as they come.

``IncrementalDecoder`` decodes a short window of tokens (a few already printed, then the new ones) and
emits only the text the new tokens add, the way text-generation-inference, llama-cpp-python and
transformers' ``TextStreamer`` do. Decoding a window rather than each token alone keeps the tokenizer's own
rules intact: SentencePiece drops the leading space of the *first* token of a decode, byte-level BPE
splits one character over several tokens. While the window's text ends in U+FFFD (an incomplete UTF-8
sequence) nothing is emitted; the next token usually completes the character.

``StopStrings`` holds back text that could be the start of a stop string, so a stop string is never
printed in part, and cuts the text where one appears.

``TextStream`` chains the two: tokens in, printable pieces out.
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["IncrementalDecoder", "StopStrings", "TextStream", "normalize_stop"]

# Tokens of earlier text decoded together with the new ones. One suffices for SentencePiece's leading
# space; a few more cover a prompt that ends inside a multi-token character.
_CONTEXT_TOKENS = 4
_MAX_CONTEXT_TOKENS = 32  # when the context ends in a long run of byte tokens


class IncrementalDecoder:
    """Feeds on token ids and returns the text each one adds.

    ``context``: token ids that come before the ones to be pushed (the end of the prompt): their text is
    not emitted, but they decide how the first new token decodes (a SentencePiece word after them keeps
    its leading space). The pieces returned by ``push`` and ``flush`` concatenate to
    ``decode(context + pushed)[len(decode(context)):]``; with no context that is ``decode(pushed)``.
    """

    def __init__(self, tokenizer: object, context: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self._decode_fn = tokenizer.decode  # type: ignore[attr-defined]
        self._skip = skip_special_tokens
        ctx = [int(t) for t in context]
        start = max(0, len(ctx) - _CONTEXT_TOKENS)
        # Never start the window inside a character: byte-fallback decoders turn a whole run of byte tokens
        # into U+FFFD when the run is not valid UTF-8, which would spoil the characters that follow.
        while start > 0 and len(ctx) - start < _MAX_CONTEXT_TOKENS and self._decode(ctx[start:]).startswith("\ufffd"):
            start -= 1
        self._ids: list[int] = ctx[start:]
        self._read = len(self._ids)  # tokens before this index have had their text emitted
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decode_fn(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token: int) -> str:
        """Adds one token; returns the text that is now certain (often "", never a broken character)."""
        self._ids.append(int(token))
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""  # nothing new yet (a special token skipped, or a character still incomplete)
        piece = text[len(self._prefix_text):]
        # The tokens just printed become the window's prefix for the next step.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return piece

    def flush(self) -> str:
        """The text still held back (at the end of generation): an incomplete character is given as the
        tokenizer decodes it (U+FFFD), since no further token will complete it."""
        text = self._decode(self._ids)
        piece = text[len(self._prefix_text):] if len(text) > len(self._prefix_text) else ""
        self._ids = self._ids[len(self._ids):]
        self._read = 0
        self._prefix_text = ""
        return piece


def normalize_stop(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    """Stop strings as a tuple; refuses anything but non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, (bytes, bytearray)):
        raise ValueError("stop must be a string or a list of strings, got bytes (decode them first)")
    try:
        values = tuple(stop)
    except TypeError:
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}") from None
    for s in values:
        if not isinstance(s, str):
            raise ValueError(f"stop strings must be strings, got {type(s).__name__}")
        if not s:
            raise ValueError("stop strings must not be empty")
    return values


class StopStrings:
    """Cuts a stream of text at the first stop string, never letting part of one through.

    ``push(text)`` returns the text that can be shown now; ``stopped`` turns True when a stop string has
    appeared (the returned text then ends just before it, and everything after is dropped)."""

    def __init__(self, stop: str | Iterable[str] | None) -> None:
        self.stop = normalize_stop(stop)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stop:
            return text
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buffer)), hold, -1):
                if buffer.endswith(s[:k]):
                    hold = k
                    break
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """The held-back text, once it is known that no stop string will complete it."""
        held, self._held = ("", "") if self.stopped else (self._held, "")
        return held


class TextStream:
    """Token ids in, printable text out: incremental decoding, then stop strings.

    ``text`` is everything returned so far; ``stopped`` says a stop string ended the text."""

    def __init__(self, tokenizer: object, context: Sequence[int] = (), stop: str | Iterable[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._decoder = IncrementalDecoder(tokenizer, context, skip_special_tokens)
        self._stops = StopStrings(stop)
        self._pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def push(self, token: int) -> str:
        piece = self._stops.push(self._decoder.push(token))
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        piece = self._stops.push(self._decoder.flush())
        if not self._stops.stopped:
            piece += self._stops.flush()
        if piece:
            self._pieces.append(piece)
        return piece
