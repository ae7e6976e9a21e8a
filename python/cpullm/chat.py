"""Conversations: a chat session renders the whole conversation with the model's chat template on every
turn, and keeps one KV cache between turns, so each turn runs only the tokens the cache does not hold yet
(the longest common prefix of the new prompt's token ids and the cached ids is reused).

Semantics worth knowing:

- Context overflow. ``on_overflow="error"`` raises ``ContextOverflowError`` before anything changes when
  the prompt leaves no room for a single reply token; ``"drop_oldest"`` forgets the oldest user/assistant
  turns (never the system message) until the prompt plus room for the reply (``max_tokens``, at most half
  the context) fits, and raises only if the new message alone does not fit. A reply that reaches the end of
  the context stops there (``stats.finish_reason == "context"``).
- Interruption. If a turn is interrupted (KeyboardInterrupt, any exception, or a stream abandoned before
  its end), the session stays usable: the turn is kept with the reply text yielded so far (what the user
  saw), or dropped entirely if no text had been yielded yet. The KV cache is cut back to the tokens it
  verifiably holds, so the next turn is as correct as a fresh run. An interrupt that arrives while the
  C++ forward pass runs (the GIL is released there) takes effect when it returns; the positions that pass
  added are then dropped from the cache along with the rest of the interrupted turn's unrecorded work.
- Threads. A session is one conversation: while a turn streams in one thread, using the session from
  another thread (``send``, ``stream``, ``reset``, ``history``, ...) raises ``CpullmError`` and changes
  nothing. Use one session per thread; sessions of one model share its weights and run in parallel.
- Closing. ``Model.close()`` frees every session's KV cache; the session then raises ``CpullmError``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from .errors import ContextOverflowError, CpullmError
from .generation import GenerationStats, check_max_tokens, decode, prefill, resync
from .sampling import Sampler, SamplingParams
from .streaming import TextStream, normalize_stop

__all__ = ["ChatSession"]

_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
_OPTION_KEYS = _SAMPLING_KEYS + ("max_tokens", "stop")
_OVERFLOW = ("error", "drop_oldest")
_KEEP: Any = object()  # reset(): keep the system message


@dataclass
class _Turn:
    base: list[dict[str, str]]  # the earlier messages this turn was rendered with (after any dropping)
    user: dict[str, str]
    dropped: int
    stats: GenerationStats
    pieces: list[str] = field(default_factory=list)
    # `running` while the turn's generator computes (set under the session's lock when it is claimed or
    # resumed, cleared by the generator itself just before it yields a piece; read under the lock),
    # `closed` once the turn is committed (under the lock), so a stream resumed after that (from any
    # thread) stops before it touches the KV cache the next turn owns.
    running: bool = False
    closed: bool = False
    # The conversation this turn's prompt was rendered from, and which stream() call made it: a stream
    # first read after a later stream() call or an edit is refused rather than run over a history that
    # moved on.
    rendered_from: tuple[Any, ...] = ()
    number: int = 0


def _check_options(options: Mapping[str, Any]) -> None:
    unknown = set(options) - set(_OPTION_KEYS)
    if unknown:
        raise TypeError(f"unknown chat option(s): {', '.join(sorted(unknown))}; "
                        f"expected some of {', '.join(_OPTION_KEYS)}")


class ChatSession:
    """A conversation with a model. Create it with ``Model.chat(system=None, on_overflow="error",
    **options)``; ``options`` (temperature, top_k, top_p, min_p, repetition_penalty, seed, max_tokens,
    stop) are the defaults of every turn, and each turn may override them.

    ``messages``: the user/assistant messages so far (the system message is ``system``).
    ``stats``: a ``GenerationStats`` of the last turn: ``prompt_tokens``, ``cached_tokens`` (reused from the
    KV cache), ``processed_tokens`` (run through the forward pass), ``generated_tokens``, tokens per second,
    ``finish_reason``. ``dropped_messages``: how many old messages "drop_oldest" has forgotten in all.
    """

    def __init__(self, model: Any, system: str | None = None, *, on_overflow: str = "error", **options: Any) -> None:
        if model.tokenizer is None:
            raise CpullmError(f"{model.source} has no tokenizer.json: chat needs a tokenizer and a chat template")
        if model.tokenizer.chat_template is None:
            from .tokenizer import ChatTemplateError

            raise ChatTemplateError("this model has no chat template; use generate() with a plain prompt")
        if on_overflow not in _OVERFLOW:
            raise ValueError(f"on_overflow must be one of {', '.join(map(repr, _OVERFLOW))}, got {on_overflow!r}")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a string or None, got {type(system).__name__}")
        _check_options(options)
        self.model = model
        self.system = system
        self.on_overflow = on_overflow
        self.options = {k: v for k, v in options.items() if v is not None}
        self._resolve(self.options)  # refuse bad defaults now, not at the first turn
        self.messages: list[dict[str, str]] = []
        self.stats = GenerationStats()
        self.dropped_messages = 0
        self._sequence: Any = model._new_sequence()
        self._cached: list[int] = []  # the token ids whose keys/values the sequence holds, in order
        self._active: _Turn | None = None
        self._streams_made = 0
        self._owner: int | None = None  # the thread whose turn is active
        self._lock = threading.Lock()   # guards _active / _owner
        sessions = getattr(model, "_sessions", None)
        if sessions is not None:
            sessions.add(self)

    def _release(self) -> None:
        """Model.close(): drops the KV cache; every later use raises CpullmError."""
        self._sequence = None
        self._cached = []

    def _check_usable(self) -> None:
        if self._sequence is None:
            raise CpullmError("this chat session's model has been closed")
        owner = self._owner
        if self._active is not None and owner is not None and owner != threading.get_ident():
            raise CpullmError("this ChatSession is in use by another thread (a turn is streaming there); "
                              "use one session per thread")

    # --- conversation state ---------------------------------------------------------------------
    def _conversation(self, messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        return head + [dict(m) for m in messages]

    @property
    def history(self) -> list[dict[str, str]]:
        """The conversation as the template sees it: the system message (if any), then the turns."""
        self._finish_active()
        return self._conversation(self.messages)

    def reset(self, system: str | None = _KEEP) -> None:
        """Forgets the turns (and, if given, replaces the system message). The KV cache is kept: the next
        turn reuses whatever prefix still matches (usually the system prompt)."""
        self._finish_active()
        if system is not _KEEP:
            self.set_system(system)
        self.messages = []

    def set_system(self, system: str | None) -> None:
        """Replaces the system message; the turns are kept (the next turn re-runs what changed)."""
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a string or None, got {type(system).__name__}")
        self._finish_active()
        self.system = system

    @property
    def cached_tokens(self) -> int:
        """How many tokens the session's KV cache holds."""
        return len(self._cached)

    def prompt_ids(self, message: str | None = None) -> list[int]:
        """The token ids the model would be given for the next turn (the conversation, plus ``message``
        as a new user turn, plus the generation prompt), before any overflow handling."""
        self._finish_active()
        messages = self.messages + ([{"role": "user", "content": message}] if message is not None else [])
        return self.model.tokenizer.apply_chat_template(self._conversation(messages), add_generation_prompt=True)

    # --- turns ----------------------------------------------------------------------------------
    def send(self, message: str, **options: Any) -> str:
        """Adds ``message`` as a user turn and returns the whole reply."""
        return "".join(self.stream(message, **options))

    def stream(self, message: str, **options: Any) -> Iterator[str]:
        """Adds ``message`` as a user turn and yields the reply in pieces as it is generated. Options
        override the session's defaults for this turn. Arguments and context overflow are checked here,
        before the first piece is asked for."""
        if not isinstance(message, str):
            raise TypeError(f"message must be a string, got {type(message).__name__}")
        if not message:
            raise ValueError("message is empty")
        _check_options(options)
        self._finish_active()
        merged = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        params, max_tokens, stops = self._resolve(merged)
        user = {"role": "user", "content": message}
        base, prompt_ids, dropped = self._fit(user, max_tokens)
        self._streams_made += 1
        turn = _Turn(base=base, user=user, dropped=dropped, stats=GenerationStats(),
                     rendered_from=self._state(), number=self._streams_made)
        return self._run(turn, prompt_ids, params, max_tokens, stops)

    def _state(self) -> tuple[Any, ...]:
        return (self.system, [dict(m) for m in self.messages])

    def _resolve(self, options: Mapping[str, Any]) -> tuple[SamplingParams, int | None, tuple[str, ...]]:
        max_tokens = check_max_tokens(options.get("max_tokens"))
        params = self.model.sampling_params(**{k: options.get(k) for k in _SAMPLING_KEYS})
        return params, max_tokens, normalize_stop(options.get("stop"))

    def _fit(self, user: dict[str, str], max_tokens: int | None) -> tuple[list[dict[str, str]], list[int], int]:
        """The earlier messages to keep, the prompt ids, and how many messages were dropped."""
        limit = self.model.spec.max_context
        template = self.model.tokenizer.apply_chat_template
        base = list(self.messages)
        ids = template(self._conversation(base + [user]), add_generation_prompt=True)
        if self.on_overflow == "error":
            if len(ids) >= limit:
                raise ContextOverflowError(
                    f"the conversation is {len(ids)} tokens and the context holds {limit}, leaving no room for a "
                    f"reply; reset the session or use on_overflow='drop_oldest'")
            return base, ids, 0
        room = max(1, min(limit if max_tokens is None else max_tokens, limit // 2))
        dropped = 0
        while len(ids) + room > limit and base:
            # Forget the oldest turn: its first message and everything up to the next user message.
            cut = 1
            while cut < len(base) and base[cut].get("role") != "user":
                cut += 1
            base = base[cut:]
            dropped += cut
            ids = template(self._conversation(base + [user]), add_generation_prompt=True)
        if len(ids) >= limit:
            raise ContextOverflowError(
                f"the message is {len(ids)} tokens with the system message and the chat template, and the "
                f"context holds {limit}")
        return base, ids, dropped

    def _run(self, turn: _Turn, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None,
             stops: tuple[str, ...]) -> Iterator[str]:
        model = self.model
        self._claim(turn)
        self.stats = turn.stats
        text = TextStream(model.tokenizer, stop=stops)  # the reply alone, as transformers decodes new tokens
        try:
            sampler = Sampler(params, model.spec.vocab_size, prompt_ids)
            logits = prefill(self._sequence, self._cached, prompt_ids, model.threads, turn.stats, max_tokens)
            tokens = decode(self._sequence, self._cached, logits, sampler, max_tokens=max_tokens,
                            stop_ids=model._stop_ids(None), max_context=model.spec.max_context,
                            threads=model.threads, stats=turn.stats)
            for token in tokens:
                piece = text.push(token)
                if piece:
                    turn.pieces.append(piece)
                    turn.running = False
                    yield piece
                    self._resume(turn)
                if self._sequence is None:
                    raise CpullmError("this chat session's model has been closed")
                if text.stopped:
                    turn.stats.finish_reason = "stop"
                    break
            else:
                piece = text.flush()
                if piece:
                    turn.pieces.append(piece)
                    turn.running = False
                    yield piece
        finally:
            self._finish(turn, by_its_stream=True)

    def _resume(self, turn: _Turn) -> None:
        with self._lock:
            if turn.closed or self._active is not turn:
                raise CpullmError("this reply's stream ended when the session was used meanwhile (a later turn, "
                                  "history, reset, set_system, ...); its text so far is in the history")
            turn.running = True

    def _finish_active(self) -> None:
        with self._lock:
            self._check_usable()
            active = self._active
        if active is not None:
            self._finish(active)

    def _claim(self, turn: _Turn) -> None:
        """Makes ``turn`` the active one, for this thread; refuses if another thread's turn is active."""
        while True:
            with self._lock:
                self._check_usable()
                if turn.number != self._streams_made or self._state() != turn.rendered_from:
                    raise CpullmError("this stream was made before the conversation changed (a later stream() "
                                      "call or an edit); call stream() again")
                active = self._active
                if active is not None and active.closed:  # committed but interrupted before it let go
                    self._active = active = None
                if active is None:
                    self._active = turn
                    self._owner = threading.get_ident()
                    turn.running = True
                    return
            self._finish(active)  # this thread's own abandoned stream: commit it first

    def _finish(self, turn: _Turn, by_its_stream: bool = False) -> None:
        """Commits a turn once, whether it ended normally, raised, or was abandoned."""
        with self._lock:
            if self._active is not turn or turn.closed:
                return
            if turn.running and not by_its_stream:
                raise CpullmError("this ChatSession's reply is being generated in another thread; use one session "
                                  "per thread")
            turn.closed = True
        try:
            if self._sequence is not None:  # None: the model was closed, nothing left to keep
                resync(self._sequence, self._cached)
            if turn.stats.finish_reason is None:
                turn.stats.finish_reason = "interrupted"
                if not turn.pieces:
                    return  # nothing was said: the turn never happened
            self.messages = turn.base + [turn.user, {"role": "assistant", "content": "".join(turn.pieces)}]
            self.dropped_messages += turn.dropped
        finally:
            with self._lock:
                self._active = None
                self._owner = None

    def __repr__(self) -> str:
        return f"ChatSession({len(self.messages)} messages, {len(self._cached)} cached tokens, on_overflow={self.on_overflow!r})"
