"""The decode loop over one native sequence (KV cache): pre-fill what is not cached yet, then sample,
yield and feed back one token at a time until a stop token, the token budget or the end of the context.

The loop keeps ``cached``, a list of the token ids whose keys and values the sequence holds, in step with
the sequence, so that a chat session can reuse the longest common prefix on its next turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Container, Iterator, Sequence

import numpy as np

from .sampling import Sampler, is_integer

__all__ = ["GenerationStats", "common_prefix", "decode", "prefill", "resync"]


@dataclass
class GenerationStats:
    """What one generation cost. ``prompt_tokens`` = ``cached_tokens`` (reused from the KV cache) +
    ``processed_tokens`` (run through the forward pass). ``finish_reason``: "stop" (a stop token or stop
    string), "length" (``max_tokens`` reached), "context" (the context window is full), "interrupted"
    (an exception such as KeyboardInterrupt), or None while running. Seconds count only cpullm's own
    work, not the time the caller spends between pieces."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    processed_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    generation_seconds: float = 0.0
    finish_reason: str | None = None

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.processed_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def resync(sequence: Any, cached: list[int]) -> None:
    """After an interruption, makes ``cached`` and the sequence agree again: both keep the shorter of the
    two prefixes (a forward pass that finished but whose token was not recorded is dropped)."""
    n = min(int(sequence.n_past), len(cached))
    sequence.truncate(n)
    del cached[n:]


# Positions a generation reserves beyond its prompt at most. Reserving saves the cache's growth (a copy
# of it) while decoding, which matters for short generations; a long one amortises its few growths, and
# with transparent huge pages every head's region of a reserved cache is backed from its first position
# on, so a reservation for a huge max_tokens would cost memory long before the positions exist.
_RESERVE_AHEAD = 4096


def prefill(sequence: Any, cached: list[int], prompt_ids: Sequence[int], threads: int,
            stats: GenerationStats, max_tokens: int | None = None, need_logits: bool = True) -> np.ndarray | None:
    """Runs the part of ``prompt_ids`` that the sequence does not hold yet and returns the logits of the
    prompt's last position. The cached tokens that agree with the prompt are kept (at least the last
    prompt token is always run, since its logits are needed). With ``max_tokens`` (the tokens that may
    follow), the cache is sized for the whole generation first, so it does not grow while decoding.
    ``need_logits`` False (a part of a longer prompt): the tokens only fill the cache, None is returned,
    and under fast prefill the part's last row takes one digit like the others, so a prompt fed in
    parts gives the cache one call would."""
    start = time.perf_counter()
    reuse = min(common_prefix(cached, prompt_ids), len(prompt_ids) - 1)
    sequence.truncate(reuse)
    del cached[reuse:]
    if max_tokens is not None:  # the sequence clamps it to its context
        sequence.reserve(len(prompt_ids) + min(max_tokens, _RESERVE_AHEAD))
    new = np.asarray(prompt_ids[reuse:], dtype=np.int32)
    logits = sequence.forward(new, False, threads) if need_logits else sequence.feed(new, threads)
    cached.extend(int(t) for t in new)
    stats.prompt_tokens = len(prompt_ids)
    stats.cached_tokens = reuse
    stats.processed_tokens = int(new.size)
    stats.prefill_seconds = time.perf_counter() - start
    return logits[-1] if need_logits else None


def decode(sequence: Any, cached: list[int], logits: np.ndarray, sampler: Sampler, *, max_tokens: int | None,
           stop_ids: Container[int], max_context: int, threads: int, stats: GenerationStats) -> Iterator[int]:
    """Yields sampled token ids; each is fed back through the model when the caller asks for the next.
    Stop ids end the loop without being yielded. Sets ``stats.finish_reason`` when it ends by itself."""
    step = np.empty(1, dtype=np.int32)
    produced = 0
    # Positions left for the reply: a token takes the next one when it is yielded, so prompt and reply
    # fill the context at most, as transformers' max_length counts them (and the server's limit on
    # prompt + max_tokens). max_tokens wins a tie.
    room = max_context - sequence.n_past
    limit = room if max_tokens is None else min(max_tokens, room)
    if limit <= 0:  # nothing asked for, or the prompt filled the context
        stats.finish_reason = "length" if max_tokens == 0 else "context"
        return
    while True:
        start = time.perf_counter()
        token = sampler(logits)
        stats.generation_seconds += time.perf_counter() - start
        if token in stop_ids:
            stats.finish_reason = "stop"
            return
        sampler.accept(token)
        produced += 1
        stats.generated_tokens = produced
        yield token
        if produced >= limit:  # the last token is not run: nothing needs its logits
            stats.finish_reason = "length" if produced == max_tokens else "context"
            return
        start = time.perf_counter()
        step[0] = token
        logits = sequence.forward(step, False, threads)[-1]
        cached.append(token)
        stats.generation_seconds += time.perf_counter() - start


def check_max_tokens(max_tokens: object) -> int | None:
    """max_tokens as a plain int (or None): an integer >= 0, NumPy's included."""
    if max_tokens is None:
        return None
    if not is_integer(max_tokens) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0 or None, got {max_tokens!r}")
    return int(max_tokens)
