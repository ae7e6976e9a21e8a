"""Faults and long use: threads sharing one model, interrupts during prefill and decode, releasing memory
at close, long runs with flat memory, and bad parameters everywhere (see docs/robustness.md).

CPULLM_LONG_TESTS=1 runs the long-use tests ten times longer (10,000 generations, a 100,000-token chat)."""

from __future__ import annotations

import _thread
import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cpullm
import cpullm.convert
from chat_util import make_word_chat_model

LONG = 10 if os.environ.get("CPULLM_LONG_TESTS") else 1
# AddressSanitizer (tools/sanitize.sh) holds freed memory in quarantine: RSS grows by design there.
SANITIZED = "asan" in os.environ.get("LD_PRELOAD", "")
MESSAGES = ["hello there", "tell me more about the river", "what about the old house", "thank you",
            "where is the harbor", "please tell me a story about the ship"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def chat_dir(make_llama: Any) -> Path:
    return make_word_chat_model(make_llama, seed=31)


@pytest.fixture()
def model(chat_dir: Path) -> Any:
    with cpullm.load(chat_dir, threads=1) as m:
        yield m


# --- concurrency --------------------------------------------------------------------------------------


def _conversation(model: Any, seed: int) -> list[str]:
    session = model.chat(system="You are terse.", temperature=0.9, top_k=40, seed=seed, max_tokens=12)
    return [session.send(m) for m in MESSAGES[:4]]


def test_two_threads_on_two_sessions_equal_sequential_runs(model: Any) -> None:
    prompt = model.tokenizer.encode("the capital of france is")
    expected = {seed: (_conversation(model, seed), model.generate(prompt, 16, temperature=0.8, seed=seed))
                for seed in (1, 2)}
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(seed: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[seed] = (_conversation(model, seed), model.generate(prompt, 16, temperature=0.8, seed=seed))
                assert results[seed] == expected[seed]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == expected


def test_gil_is_released_during_the_forward_pass(model: Any) -> None:
    """With a huge switch interval, a thread holding the GIL keeps it until it releases it on purpose. So
    if the main thread runs Python code and finishes it while the other thread has not come back from a
    forward pass, that forward pass ran without the GIL. (A held GIL can never show this; retries only
    guard against the forward pass ending before the main thread was scheduled.)"""
    ids = np.arange(1500) % model.spec.vocab_size
    previous = sys.getswitchinterval()
    overlapped = False
    try:
        sys.setswitchinterval(1000.0)
        for _ in range(5):
            started = threading.Event()
            state = {"done": False}

            def run() -> None:
                started.set()
                model.logits(ids)
                state["done"] = True

            worker = threading.Thread(target=run)
            worker.start()
            started.wait()
            total = 0
            for i in range(2000):
                total += i
            overlapped = not state["done"]
            worker.join()
            if overlapped:
                break
    finally:
        sys.setswitchinterval(previous)
    assert overlapped, "the main thread never ran while a forward pass was under way"


def test_one_session_used_from_two_threads_is_refused(model: Any) -> None:
    session = model.chat(max_tokens=200)
    stream = session.stream("please tell me a long story about the ship and the harbor")
    next(stream)  # a turn is now active in this thread
    outcome: list[BaseException | str] = []

    def other() -> None:
        try:
            session.send("hello")
            outcome.append("sent")
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert isinstance(outcome[0], cpullm.CpullmError) and "another thread" in str(outcome[0])
    for name in ("history", "reset", "prompt_ids"):
        t = threading.Thread(target=lambda: outcome.append(_attempt(session, name)))
        t.start()
        t.join()
        assert isinstance(outcome[-1], cpullm.CpullmError), name
    rest = "".join(stream)
    assert len(session.messages) == 2 and session.messages[1]["content"].endswith(rest)
    assert session._sequence.n_past == session.cached_tokens
    # Once the turn is over, another thread may carry on.
    t = threading.Thread(target=lambda: outcome.append(session.send("hello")))
    t.start()
    t.join()
    assert isinstance(outcome[-1], str) and len(session.messages) == 4


def test_a_stream_superseded_by_a_later_turn_cannot_resume(model: Any) -> None:
    """A reply's stream held past the next turn's start (its text so far committed) stops with an error
    when resumed, in this thread or another, instead of writing into the KV cache the new turn owns
    (it crashed the process from another thread); the new turn's reply equals a fresh run."""
    session = model.chat(max_tokens=30)
    first = session.stream("please tell me a long story about the ship and the harbor")
    next(first)
    untouched = session.stream("and a second one")  # made, never read: committed as nothing
    second = session.stream("tell me about the old house")
    piece = next(second)
    with pytest.raises(cpullm.CpullmError, match="made before the conversation changed"):
        next(untouched)
    outcome: list[BaseException | str] = []

    def resume_in_another_thread() -> None:
        try:
            outcome.append("".join(first))
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=resume_in_another_thread)
    t.start()
    rest = "".join(second)
    t.join()
    assert isinstance(outcome[0], cpullm.CpullmError) and "used meanwhile" in str(outcome[0])
    reply = piece + rest
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2 and session.messages[-1]["content"] == reply
    fresh = model.chat(max_tokens=30)
    fresh.messages = [dict(m) for m in session.messages[:2]]
    assert fresh.send("tell me about the old house") == reply
    assert session._sequence.n_past == session.cached_tokens


def test_streams_read_to_the_end_or_never_leave_the_session_free(model: Any) -> None:
    """A stream whose last piece was read (held back text flushed at the end) but which was not closed,
    and a stream made and dropped unread, leave the session usable, from this thread and another."""
    session = model.chat(max_tokens=6)
    stream = session.stream("tell me about the ship", stop=["zzz-never"])
    pieces = [piece for piece in iter(lambda: next(stream, None), None)]
    assert session.messages[-1]["content"] == "".join(pieces)
    assert session.send("and then?")  # the finished stream is still referenced
    dropped = session.stream("one more")
    del dropped
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(session.send("from another thread")))
    t.start()
    t.join()
    assert isinstance(outcome[0], str) and outcome[0]


def _attempt(session: Any, name: str) -> BaseException | str:
    try:
        value = getattr(session, name)
        if callable(value):
            value()
        return "ok"
    except BaseException as e:  # noqa: BLE001
        return e


# --- interruptions -------------------------------------------------------------------------------------


class _InterruptDuringForward:
    """Wraps a session's native sequence: the `which`-th forward call gets a real interrupt
    (_thread.interrupt_main, as Ctrl-C) from another thread while the C++ forward runs without the GIL."""

    def __init__(self, inner: Any, which: int) -> None:
        self.inner, self.which, self.calls = inner, which, 0
        self.fired = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, tokens: Any, all_logits: bool, threads: int) -> Any:
        self.calls += 1
        if self.calls == self.which:
            entered = threading.Event()

            def interrupter() -> None:
                entered.wait()
                _thread.interrupt_main()
                self.fired.set()

            threading.Thread(target=interrupter, daemon=True).start()
            entered.set()
        return self.inner.forward(tokens, all_logits, threads)


@pytest.mark.parametrize("which", [1, 2, 5], ids=["prefill", "first-decode", "later-decode"])
def test_real_interrupt_during_forward_leaves_session_consistent(model: Any, which: int) -> None:
    session = model.chat(max_tokens=12)
    session.send(MESSAGES[0])
    before = list(session.messages)
    inner = session._sequence
    proxy = _InterruptDuringForward(inner, which)
    session._sequence = proxy
    pieces: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.stream(MESSAGES[5]):
            pieces.append(piece)
        # Only if the stream ended before the interrupter thread ran: take the interrupt here.
        proxy.fired.wait(60)
        for _ in range(100):
            time.sleep(0.01)
    session._sequence = inner
    assert inner.n_past == session.cached_tokens
    if pieces:
        assert session.messages[:2] == before and session.messages[-1]["content"] == "".join(pieces)
    else:
        assert session.messages == before  # nothing was said: the turn never happened
    # The next turn answers exactly like a fresh session over the same history.
    fresh = model.chat(max_tokens=12)
    fresh.messages = list(session.messages)
    assert session.send(MESSAGES[2]) == fresh.send(MESSAGES[2])
    assert inner.n_past == session.cached_tokens


def test_interrupting_model_stream_keeps_model_usable(model: Any) -> None:
    expected = model.generate("the old house", 10)
    with pytest.raises(KeyboardInterrupt):
        for _ in model.stream("the old house", 10):
            raise KeyboardInterrupt
    assert model.generate("the old house", 10) == expected


# --- memory and close ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_converted(make_llama: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An f32 converted model of about 50 MB, memory-mapped when loaded."""
    source, _ = make_llama(seed=32, vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                           tie_word_embeddings=True)  # the LM head reads the whole embedding: every page is touched
    from conftest import write_tokenizer
    from chat_util import CHATML

    write_tokenizer(source, chat_template=CHATML)
    out = tmp_path_factory.mktemp("big") / "f32"
    return cpullm.convert.convert(source, out, dtype="f32", progress=False)


def _use(m: Any) -> Any:
    m.logits([1, 2, 3, 4])  # touches every weight page
    session = m.chat(max_tokens=8)
    session.send("hello there")
    return session


@pytest.mark.parametrize("how", ["close", "with"])
def test_close_releases_weights_and_caches_at_once(big_converted: Path, how: str) -> None:
    gc.collect()
    if how == "close":
        m = cpullm.load(big_converted, threads=1)
        session = _use(m)
        loaded = rss_bytes()
        m.close()
    else:
        with cpullm.load(big_converted, threads=1) as m:
            session = _use(m)
            loaded = rss_bytes()
    after = rss_bytes()  # no gc.collect(): the release must not wait for the collector
    weights = m.weights_bytes
    assert weights > 40 * 2**20
    if not SANITIZED:  # AddressSanitizer's allocator keeps freed memory: RSS says little there
        # (Not loaded - base: pages an earlier test freed to the allocator but not the system may hold
        # part of the load, so the growth from base was seen at 0.66 of the weights. What close() gives
        # back is the property, and it also shows that the measurement sees the weights.)
        assert loaded - after > 0.7 * weights, f"close() freed {(loaded - after) / 2**20:.1f} MiB of {weights / 2**20:.1f}"
    # Everything raises a clear error afterwards.
    for call in (lambda: m.logits([1]), lambda: m.generate("hi", 2), lambda: m.stream("hi", 2),
                 lambda: m.generate_tokens([1, 2], 2), lambda: m.chat(), lambda: session.send("hi"),
                 lambda: session.stream("hi"), lambda: session.history, lambda: session.reset()):
        with pytest.raises(cpullm.CpullmError, match="closed"):
            call()
    m.close()  # idempotent


def test_close_during_a_stream_ends_it(model_factory: Any) -> None:
    m = model_factory()
    stream = m.stream("the old house", 20)
    next(stream)
    session = m.chat(max_tokens=20)
    chat_stream = session.stream("hello there")
    next(chat_stream)
    m.close()
    with pytest.raises(cpullm.CpullmError, match="closed"):
        list(stream)
    with pytest.raises(cpullm.CpullmError, match="closed"):
        list(chat_stream)


@pytest.fixture()
def model_factory(chat_dir: Path) -> Any:
    return lambda: cpullm.load(chat_dir, threads=1)


# --- long use -------------------------------------------------------------------------------------------


def test_thousand_generations_flat_memory_same_results(model: Any) -> None:
    prompts = [model.tokenizer.encode(m) for m in MESSAGES]
    expected = [list(model.generate_tokens(p, 6)) for p in prompts]
    n = 1000 * LONG
    for i in range(n // 10):
        assert list(model.generate_tokens(prompts[i % len(prompts)], 6)) == expected[i % len(prompts)]
    gc.collect()
    start = rss_bytes()
    for i in range(n - n // 10):
        assert list(model.generate_tokens(prompts[i % len(prompts)], 6)) == expected[i % len(prompts)]
    gc.collect()
    growth = rss_bytes() - start
    print(f"{n} generations: RSS {start / 2**20:.1f} -> {(start + growth) / 2**20:.1f} MiB")
    assert SANITIZED or growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {n} generations"


def test_ten_thousand_token_conversation_flat_memory(chat_dir: Path) -> None:
    with cpullm.load(chat_dir, threads=1, context_length=128) as m:
        session = m.chat(system="You are terse.", on_overflow="drop_oldest", max_tokens=16)
        total, turns, start = 0, 0, None
        goal = 10_000 * LONG
        while total < goal:
            session.send(MESSAGES[turns % len(MESSAGES)])
            total += session.stats.processed_tokens + session.stats.generated_tokens
            turns += 1
            assert session.cached_tokens <= 128 and session._sequence.n_past == session.cached_tokens
            if start is None and total > goal // 10:
                gc.collect()
                start = rss_bytes()
        gc.collect()
        growth = rss_bytes() - start
        print(f"{total} tokens in {turns} turns ({session.dropped_messages} messages dropped): "
              f"RSS {start / 2**20:.1f} -> {(start + growth) / 2**20:.1f} MiB")
        assert session.dropped_messages > 0
        assert SANITIZED or growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {total} tokens ({turns} turns)"
        # Results unchanged: the long-lived session answers like a fresh one over the same history.
        fresh = m.chat(system="You are terse.", on_overflow="drop_oldest", max_tokens=16)
        fresh.messages = list(session.messages)
        assert session.send(MESSAGES[1]) == fresh.send(MESSAGES[1])


# --- bad parameters --------------------------------------------------------------------------------------


BAD_LOAD = [dict(threads=0), dict(threads=-1), dict(threads=1.5), dict(threads="2"), dict(threads=True),
            dict(context_length=0), dict(context_length=-5), dict(context_length=1.5), dict(context_length="64"),
            dict(dtype="f16"), dict(group_size=0), dict(group_size=33), dict(group_size=-32)]
BAD_GENERATE = [dict(max_tokens=-1), dict(max_tokens=1.5), dict(max_tokens="3"), dict(temperature=-0.1),
                dict(temperature=float("nan")), dict(temperature="hot"), dict(top_k=-1), dict(top_k=2.5),
                dict(top_p=0), dict(top_p=1.5), dict(top_p=float("nan")), dict(min_p=-0.1), dict(min_p=2),
                dict(repetition_penalty=0), dict(repetition_penalty=-1), dict(repetition_penalty=float("inf")),
                dict(seed=-1), dict(seed=1.5), dict(stop=[""]), dict(stop=[3]), dict(prompt=""),
                dict(prompt=[]), dict(prompt=[-1]), dict(prompt=[10**9]), dict(prompt=[1.5])]


@pytest.mark.parametrize("kwargs", BAD_LOAD, ids=repr)
def test_bad_load_parameters_raise_value_error(chat_dir: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        cpullm.load(chat_dir, **kwargs)


@pytest.mark.parametrize("kwargs", BAD_GENERATE, ids=repr)
@pytest.mark.parametrize("api", ["generate", "stream", "chat"])
def test_bad_generation_parameters_raise_value_error(model: Any, api: str, kwargs: dict[str, Any]) -> None:
    options = dict(kwargs)
    prompt = options.pop("prompt", "hello there")
    if api == "chat":
        if not isinstance(prompt, str):
            pytest.skip("chat messages are text")
        with pytest.raises(ValueError):
            model.chat(**options).send(prompt)
        with pytest.raises(ValueError):
            model.chat().send(prompt, **options)
    else:
        with pytest.raises(ValueError):
            getattr(model, api)(prompt, **options)  # stream: checked before the first piece is asked for
    assert model.generate("hello there", 3)  # still usable


BAD_CLI = [
    ["generate", "--no-such-flag"], ["chat", "--bogus"], ["generate", "--threads", "0"], ["generate", "--threads", "-2"],
    ["generate", "--threads", "x"], ["generate", "-n", "-1"], ["generate", "-n", "1.5"], ["generate", "--temperature", "-1"],
    ["generate", "--temperature", "nan"], ["generate", "--top-k", "-1"], ["generate", "--top-p", "0"],
    ["generate", "--top-p", "2"], ["generate", "--min-p", "-1"], ["generate", "--repetition-penalty", "0"],
    ["generate", "--seed", "-1"], ["generate", "--stop", ""], ["generate", "--dtype", "f16"], ["generate", "-p", ""],
    ["chat", "--threads", "0"], ["chat", "-n", "-3"], ["chat", "--on-overflow", "wrap"], ["chat", "--temperature", "x"],
    ["convert", "SRC", "OUT", "--group-size", "0"], ["bench", "--prompt-tokens", "0"], ["nonsense"],
]


@pytest.mark.parametrize("argv", BAD_CLI, ids=" ".join)
def test_bad_cli_parameters_give_one_clear_line(chat_dir: Path, argv: list[str]) -> None:
    argv = list(argv)
    if argv[0] in ("generate", "chat", "bench"):
        argv.insert(1, str(chat_dir))
        if argv[0] == "generate" and "-p" not in argv:
            argv += ["-p", "hello"]
    proc = subprocess.run([sys.executable, "-m", "cpullm", *argv], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr
    assert proc.stdout.strip() == ""
