"""The model worker: one thread runs every generation, interleaving them fairly.

Requests wait in a first-come, first-served queue; at most ``max_concurrent`` of them are active at a
time, and the worker gives each active request one step per round (round-robin): a decode step (one
forward pass and one sampled token), or a chunk of at most ``prefill_chunk`` prompt tokens, so a long
prompt does not hold up the streams of the others for its whole length. Only one forward pass runs at a
time, so the model's OpenMP threads are never oversubscribed; the C++ forward releases the GIL, so the
HTTP side (asyncio, another thread) keeps answering meanwhile.

Each active request runs in a *slot*: a native sequence (KV cache) with the token ids it holds. There
are ``max_concurrent`` slots, made on first use and then kept, so memory stays bounded (at most
``max_concurrent`` KV caches of at most the context length each). A finished request leaves its tokens
in its slot; a new request takes the free slot whose cached tokens share the longest prefix with its
prompt, and runs only the rest (``generation.prefill``), so a client that continues a conversation
(or reuses a system prompt) does not pay for it again.

Text is made exactly as ``Model.stream`` / ``ChatSession.stream`` make it: the same ``prefill`` /
``decode`` loop (``cpullm.generation``), ``Sampler`` and ``TextStream`` (incremental decoding, stop
strings). A prompt longer than ``prefill_chunk`` runs in parts between other requests' steps; the
parts before the last only fill the cache (``prefill(..., need_logits=False)``), so the cache, and
with it the text, is the one a single call makes, with fast prefill too. Results go to the asyncio side
through ``loop.call_soon_threadsafe`` onto the request's ``asyncio.Queue``. A request can be cancelled
at any time (its client went away): it leaves the queue, or the worker drops it before its next step
and cuts its slot's cache back to what it verifiably holds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

from ..generation import GenerationStats, common_prefix, decode, prefill, resync
from ..sampling import Sampler, SamplingParams
from ..streaming import TextStream

__all__ = ["Engine", "Event", "Job", "QueueFullError", "SHUTTING_DOWN"]

SHUTTING_DOWN = "the server is shutting down"

log = logging.getLogger("cpullm.server")


class QueueFullError(Exception):
    """The waiting queue is full; the server answers 503."""


@dataclass
class Event:
    """What the worker hands the HTTP side: a text ``piece``, then one final event with ``finish_reason``
    ("stop" or "length") and the token counts, or ``error`` (a message) instead."""

    piece: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class _Slot:
    index: int
    sequence: Any = None
    cached: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0


_ids = itertools.count()


class Job:
    """One generation: prompt token ids, sampling, limits, and where its events go.

    ``chat``: the reply is decoded alone (as ``ChatSession`` does); otherwise as the continuation of the
    prompt (as ``Model.stream`` does, keeping a SentencePiece word's leading space)."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int | None,
                 stop: tuple[str, ...], *, chat: bool, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.id = next(_ids)
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.max_tokens = max_tokens
        self.stop = stop
        self.chat = chat
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.submitted = 0.0
        # Worker-side state.
        self._slot: _Slot | None = None
        self._prefilled = 0
        self._stats = GenerationStats()
        self._cached_tokens = 0
        self._tokens: Iterator[int] | None = None
        self._text: TextStream | None = None

    def _emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        """The job's events as they come, ending with the final one."""
        while True:
            event = await self.queue.get()
            yield event
            if event.final:
                return


class Engine:
    """Runs ``Job``s on one model in a worker thread (see the module docstring)."""

    def __init__(self, model: Any, *, max_concurrent: int = 4, max_queued: int = 256, prefill_chunk: int = 256) -> None:
        if max_concurrent < 1 or max_queued < 0 or prefill_chunk < 1:
            raise ValueError("max_concurrent and prefill_chunk must be >= 1, max_queued >= 0")
        self.model = model
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.prefill_chunk = prefill_chunk
        self._slots = [_Slot(i) for i in range(max_concurrent)]
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.completed = 0  # jobs that ran to their end (not cancelled), for /health and tests
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="cpullm-engine", daemon=True)
        self._thread.start()

    # --- the HTTP side ----------------------------------------------------------------------------
    @property
    def active(self) -> int:
        with self._cond:
            return len(self._active)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise QueueFullError(SHUTTING_DOWN)
            if len(self._active) + len(self._waiting) >= self.max_concurrent + self.max_queued:
                raise QueueFullError(f"the server is busy: {len(self._active)} requests running and "
                                     f"{len(self._waiting)} waiting; try again later")
            job.submitted = time.monotonic()
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stops ``job`` (idempotent; nothing happens to a job that has finished)."""
        with self._cond:
            if job.done:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.done = True
                self.cancelled += 1
            self._cond.notify()

    def stop(self) -> None:
        """Asks the worker to end every job (with an error event) and stop; returns at once."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Ends every job (with an error event), stops the worker and frees the KV caches."""
        self.stop()
        self._thread.join(timeout)

    # --- the worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
                while self._waiting and len(self._active) < self.max_concurrent:
                    job = self._waiting.popleft()
                    job._slot = self._take_slot(job.prompt_ids)
                    self._active.append(job)
                jobs = list(self._active)
            for job in jobs:
                if not job.done:
                    self._step(job)
            with self._cond:
                finished = [job for job in self._active if job.done]
                for job in finished:
                    self._active.remove(job)
                    self._release(job)
        self._shutdown()

    def _take_slot(self, prompt_ids: list[int]) -> _Slot:
        """The free slot with the longest cached prefix of the prompt (ties: the least recently used)."""
        free = [s for s in self._slots if not s.busy]
        slot = max(free, key=lambda s: (common_prefix(s.cached, prompt_ids), -s.last_used))
        slot.busy = True
        return slot

    def _release(self, job: Job) -> None:
        slot = job._slot
        job._tokens = None
        if slot is None:
            return
        if slot.sequence is not None:
            resync(slot.sequence, slot.cached)
        slot.busy = False
        slot.last_used = time.monotonic()
        job._slot = None

    def _finish(self, job: Job, event: Event | None) -> None:
        tokens = job._tokens
        if tokens is not None:
            tokens.close()  # type: ignore[attr-defined]
        with self._cond:  # counted before the client hears of it
            job.done = True
            if event is None:
                self.cancelled += 1
            elif event.error is None:
                self.completed += 1
        if event is not None:
            job._emit(event)

    def _step(self, job: Job) -> None:
        if job.cancelled:
            self._finish(job, None)
            return
        try:
            if job._tokens is None:
                self._prefill_step(job)
                if job._tokens is None:
                    return
            self._decode_step(job)
        except Exception as e:  # a bug or a closed model: this request fails, the server goes on
            log.exception("generation failed")
            slot = job._slot
            if slot is not None:
                slot.sequence, slot.cached = None, []  # its state is unknown: start it afresh
            self._finish(job, Event(error=f"generation failed: {e}"))

    def _prefill_step(self, job: Job) -> None:
        slot = job._slot
        assert slot is not None
        model = self.model
        if slot.sequence is None:
            slot.sequence = model._new_sequence()
            slot.cached = []
        prompt = job.prompt_ids
        if job._prefilled == 0:
            # Start after what the slot already holds (prefill itself would cut a longer cache back to
            # the chunk's length).
            job._prefilled = min(common_prefix(slot.cached, prompt), len(prompt) - 1)
            job._cached_tokens = job._prefilled
        end = min(len(prompt), job._prefilled + self.prefill_chunk)
        logits = prefill(slot.sequence, slot.cached, prompt[:end], model.threads, job._stats,
                         None if job.max_tokens is None else job.max_tokens + len(prompt) - end,
                         need_logits=end == len(prompt))
        job._prefilled = end
        if logits is None:
            return
        sampler = Sampler(job.params, model.spec.vocab_size, prompt)
        job._tokens = decode(slot.sequence, slot.cached, logits, sampler, max_tokens=job.max_tokens,
                             stop_ids=model._stop_ids(None), max_context=model.spec.max_context,
                             threads=model.threads, stats=job._stats)
        job._text = TextStream(model.tokenizer, context=() if job.chat else prompt, stop=job.stop)

    def _decode_step(self, job: Job) -> None:
        text = job._text
        assert text is not None and job._tokens is not None
        token = next(job._tokens, None)
        if token is not None:
            piece = text.push(token)
            if piece:
                job._emit(Event(piece=piece))
            if not text.stopped:
                return
            reason = "stop"
        else:
            piece = text.flush()
            if piece:
                job._emit(Event(piece=piece))
            reason = "stop" if job._stats.finish_reason == "stop" else "length"  # "context" reads as length
        self._finish(job, Event(finish_reason=reason, prompt_tokens=len(job.prompt_ids),
                                completion_tokens=job._stats.generated_tokens, cached_tokens=job._cached_tokens))

    def _shutdown(self) -> None:
        with self._cond:
            jobs = list(self._active) + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
        for job in jobs:
            if not job.done:
                self._finish(job, Event(error=SHUTTING_DOWN))
        for slot in self._slots:
            slot.sequence, slot.cached = None, []
