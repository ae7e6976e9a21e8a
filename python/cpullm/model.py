"""``Model``: a loaded model, its raw forward pass and generation."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from . import _C
from .dtypes import check_fast_prefill, check_kv_cache_dtype, default_kv_cache_dtype
from .errors import ContextOverflowError, CpullmError, ModelFormatError
from .filemap import release_file_pages
from .generation import GenerationStats, check_max_tokens, decode, prefill
from .sampling import Sampler, SamplingParams, is_integer, resolve_sampling
from .spec import ModelSpec
from .streaming import TextStream, normalize_stop
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .chat import ChatSession


class Model:
    """A loaded model: shared weights, any number of sequences (each with its own KV cache)."""

    def __init__(
        self,
        spec: ModelSpec,
        tensors: dict[str, np.ndarray],
        *,
        tokenizer: Tokenizer | None,
        generation_config: Mapping[str, Any],
        config: Mapping[str, Any],
        dtype: str,
        threads: int,
        source: Path,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config)
        self.config = dict(config)
        self.dtype = dtype
        self.threads = threads
        self.kv_cache_dtype = default_kv_cache_dtype(dtype)
        self.fast_prefill = False
        self.source = source
        self.weights_bytes = sum(int(a.nbytes) for a in tensors.values())
        def release(name: str) -> None:
            # The native model holds its own copy of this tensor now: drop the file pages, and the
            # last reference of an array that owns its memory, so that loading never holds both.
            release_file_pages(tensors.pop(name))

        try:
            self._native: Any = _C.Transformer(spec.to_native(), tensors, on_release=release)
        except ValueError as e:
            raise ModelFormatError(f"{source}: {e}") from e
        self.eos_token_ids = _eos_ids(self.generation_config, self.config, tokenizer)
        self._sessions: weakref.WeakSet[Any] = weakref.WeakSet()  # chat sessions, whose caches close() frees

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Releases the weights (their memory maps or arrays) and the KV caches of this model's chat
        sessions and generations at once; afterwards every method raises ``CpullmError``. Idempotent."""
        self._native = None
        for session in list(self._sessions):
            session._release()
        self._sessions.clear()

    @property
    def closed(self) -> bool:
        return self._native is None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _model(self) -> Any:
        if self._native is None:
            raise CpullmError(f"this model ({self.source}) has been closed; load it again to use it")
        return self._native

    @property
    def kv_cache_dtype(self) -> str:
        """Element type of the KV caches of sequences started from now on: "f32" or "f16" (half the
        memory and of the bytes attention reads per cached position; see docs/performance.md)."""
        return self._kv_cache_dtype

    @kv_cache_dtype.setter
    def kv_cache_dtype(self, value: str) -> None:
        self._kv_cache_dtype = check_kv_cache_dtype(value)

    @property
    def fast_prefill(self) -> bool:
        """With int8 weights: whether sequences started from now on quantize the activations of rows
        whose logits are not returned (a prompt but its last token) with one int8 digit instead of
        two: prompt processing about 1.5x faster, the logits returned and decoded tokens still two
        digits; the cache they fill is less exact (docs/int8.md has the measured cost). On CPUs with
        AMX those rows are instead rounded to bf16, not to int8 digits, and multiply on the bf16 tiles
        with the weights times their scales rounded to bf16: faster there, and closer to the default.
        Unlike the default, results then depend on which rows returned logits: a chat turn after a cached
        conversation keeps the earlier replies' two-digit rows, where one call over the whole text
        would give them one digit (the server's chunked prefill returns none before its last chunk,
        so it matches one call), and a longrope model crossing its switch length re-encodes its
        whole cache as one prefill, decoded tokens included. No effect on f32 / bf16 weights or on
        mixture-of-experts layers."""
        return self._fast_prefill

    @fast_prefill.setter
    def fast_prefill(self, value: bool) -> None:
        self._fast_prefill = check_fast_prefill(value)

    def _new_sequence(self) -> Any:
        """A native sequence (an empty KV cache) over this model."""
        sequence = _C.Sequence(self._model(), self._kv_cache_dtype)
        sequence.fast_prefill = self._fast_prefill
        return sequence

    # --- raw forward ----------------------------------------------------------------------------
    def _token_array(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence of integers")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab_size}), got range [{ids.min()}, {ids.max()}]")
        if ids.size > self.spec.max_context:
            raise ContextOverflowError(f"{ids.size} tokens exceed the context length {self.spec.max_context}")
        return ids.astype(np.int32)

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 [T, vocab] logits of one full forward pass over ``token_ids`` (a fresh cache)."""
        ids = self._token_array(token_ids)
        return self._new_sequence().forward(ids, True, self.threads)

    # --- generation -----------------------------------------------------------------------------
    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The sampling settings a generation would use: this model's ``generation_config.json``
        defaults (greedy unless it says ``do_sample``), with the given values (those not None) on top.
        Keys: temperature, top_k, top_p, min_p, repetition_penalty, seed."""
        return resolve_sampling(self.generation_config, **overrides)

    def _stop_ids(self, stop_token_ids: Sequence[int] | None) -> frozenset[int]:
        if stop_token_ids is None:
            return frozenset(self.eos_token_ids)
        if is_integer(stop_token_ids):
            stop_token_ids = [stop_token_ids]  # one id, as transformers' eos_token_id may be
        try:
            ids = list(stop_token_ids)
        except TypeError:
            raise ValueError(f"stop_token_ids must be token ids (a list of integers), got {stop_token_ids!r}") from None
        if not all(is_integer(t) for t in ids):
            raise ValueError(f"stop_token_ids must be integers, got {ids!r}")
        return frozenset(int(t) for t in ids)

    def generate_tokens(
        self,
        prompt_ids: Sequence[int] | np.ndarray,
        max_tokens: int | None = 256,
        stop_token_ids: Sequence[int] | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[int]:
        """Yields generated token ids, one per decode step, until a stop id (the model's EOS ids unless
        ``stop_token_ids`` is given; not yielded), ``max_tokens`` (None: no limit), or the end of the
        context. Sampling options default to the model's generation config (see ``sampling_params``);
        ``temperature=0`` is greedy. ``stats``: a ``GenerationStats`` to fill in. Arguments are checked
        here, before the first token is asked for."""
        self._model()
        max_tokens = check_max_tokens(max_tokens)
        params = self.sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                      repetition_penalty=repetition_penalty, seed=seed)
        ids = self._token_array(prompt_ids)
        stops = self._stop_ids(stop_token_ids)
        return self._generate(ids, max_tokens, stops, params, GenerationStats() if stats is None else stats)

    def _generate(self, ids: np.ndarray, max_tokens: int | None, stops: frozenset[int], params: SamplingParams,
                  stats: GenerationStats) -> Iterator[int]:
        sequence = self._new_sequence()
        cached: list[int] = []
        sampler = Sampler(params, self.spec.vocab_size, ids.tolist())
        logits = prefill(sequence, cached, ids, self.threads, stats, max_tokens)
        tokens = decode(sequence, cached, logits, sampler, max_tokens=max_tokens, stop_ids=stops,
                        max_context=self.spec.max_context, threads=self.threads, stats=stats)
        del sequence  # the decode loop holds the only reference: closing it frees the cache
        try:
            for token in tokens:
                yield token
                self._model()  # close() while a generation is under way ends it (CpullmError)
        finally:
            tokens.close()

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int] | Sequence[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise CpullmError(f"{self.source} has no tokenizer.json: pass token ids instead of text")
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt)
        return prompt

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 256,
        *,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stats: GenerationStats | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Yields the continuation of ``prompt`` (text, or token ids) in pieces as it is generated.

        A piece never ends inside a character split across tokens, and never shows part of a stop string:
        generation ends at the first stop string, which is not included. The pieces joined are the text
        the generated tokens add after the prompt (for a SentencePiece word that includes its leading
        space). Sampling options as for ``generate_tokens``."""
        self._model()
        if self.tokenizer is None:
            raise CpullmError(f"{self.source} has no tokenizer.json: use generate_tokens() with token ids")
        stops = normalize_stop(stop)
        prompt_ids = self._prompt_ids(prompt)
        stats = GenerationStats() if stats is None else stats
        tokens = self.generate_tokens(prompt_ids, max_tokens, stop_token_ids, stats=stats, **sampling)
        return self._stream_text(tokens, list(prompt_ids), stops, stats)

    def _stream_text(self, tokens: Iterator[int], prompt_ids: list[int], stops: tuple[str, ...],
                     stats: GenerationStats) -> Iterator[str]:
        text = TextStream(self.tokenizer, context=prompt_ids, stop=stops)
        try:
            for token in tokens:
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    stats.finish_reason = "stop"
                    return
            piece = text.flush()
            if piece:
                yield piece
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()

    def generate(self, prompt: str | Sequence[int], max_tokens: int | None = 256, **options: Any) -> str:
        """The continuation of ``prompt`` (text or token ids) as one string; options as for ``stream``."""
        return "".join(self.stream(prompt, max_tokens, **options))

    def chat(self, system: str | None = None, *, on_overflow: str = "error", **sampling: Any) -> "ChatSession":
        """A conversation with this model through its chat template; see ``cpullm.chat.ChatSession``.
        ``system``: the system message (None: whatever the template does without one).
        ``on_overflow``: "error" (raise ContextOverflowError) or "drop_oldest" (forget the oldest turns,
        keeping the system message) when the conversation outgrows the context. ``sampling``: default
        sampling options (and ``max_tokens``, ``stop``) for every turn."""
        from .chat import ChatSession

        return ChatSession(self, system=system, on_overflow=on_overflow, **sampling)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Model({str(self.source)!r}, {s.model_type}, layers={s.n_layers}, dim={s.dim}, "
            f"dtype={self.dtype}, threads={self.threads}, kv_cache_dtype={self.kv_cache_dtype})"
        )


def _eos_ids(generation_config: Mapping[str, Any], config: Mapping[str, Any],
             tokenizer: Tokenizer | None = None) -> tuple[int, ...]:
    """Every end-of-sequence id: generation_config.json's (a list where the model has several), else
    config.json's, else the tokenizer's ``eos_token`` (an explicit empty list means none)."""
    sources = [generation_config.get("eos_token_id"), config.get("eos_token_id"),
               tokenizer.eos_token_id if tokenizer is not None else None]
    for value in sources:
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        ids = tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))
        if ids or value == []:
            return ids
        # a value that holds no id at all (say "x"): the next source's, rather than never stopping
    return ()
