"""`cpullm chat` in a real terminal (pexpect drives a pseudo-terminal): a streamed turn, readline
history, /stats, /system, /reset, Ctrl-C during a reply, Ctrl-C at the prompt, Ctrl-D to leave. And the
sampling flags of `cpullm generate`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import cpullm
from chat_util import make_word_chat_model
from conftest import restore_sigint

pexpect = pytest.importorskip("pexpect")

TIMEOUT = 60


def _spawn(tmp_path: Path, *args: str) -> Any:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "XDG_STATE_HOME": str(tmp_path / "state"), "TERM": "dumb",
           "LC_ALL": "C.UTF-8"}
    child = pexpect.spawn(sys.executable, ["-m", "cpullm", "chat", *args], env=env, encoding="utf-8",
                          timeout=TIMEOUT, dimensions=(40, 200), preexec_fn=restore_sigint)
    return child


@pytest.fixture(scope="module")
def word_model(make_llama: Any) -> Path:
    return make_word_chat_model(make_llama, seed=9)


def test_chat_streams_keeps_history_and_resets(word_model: Path, tmp_path: Path) -> None:
    model = cpullm.load(word_model, threads=1)
    session = model.chat(max_tokens=12)
    first = session.send("Capital of France?")
    second = session.send("Capital of France?")  # what the recalled line gets, second in the conversation
    assert first.strip() and second.strip() and first != second

    child = _spawn(tmp_path, str(word_model), "--threads", "1", "-n", "12")
    try:
        child.expect_exact(">>> ")
        child.sendline("Capital of France?")
        child.expect_exact(first + "\r\n")
        child.expect_exact(">>> ")
        child.send("\x10")  # Ctrl-P: readline's previous-history
        child.send("\r")
        child.expect_exact(second + "\r\n")
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect(r"prompt: \d+ tokens \(\d+ cached, \d+ processed.*reply: 12 tokens.*end: length")
        child.expect_exact(">>> ")
        child.sendline("/system Answer like a pirate.")
        child.expect_exact("(system message set)")
        child.sendline("/reset")
        child.expect_exact("(conversation forgotten)")
        child.sendline("/system")
        child.expect_exact("system: Answer like a pirate.")
        child.sendline("/nonsense")
        child.expect_exact("unknown command /nonsense")
        child.expect_exact(">>> ")
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "state" / "cpullm" / "chat_history").read_text().splitlines()
    assert "Capital of France?" in history and "/reset" in history  # kept for the next run


def test_ctrl_c_stops_a_reply_without_leaving(make_llama: Any, tmp_path: Path) -> None:
    # A context so long that the reply (words until the context is full) outlasts any terminal buffer.
    directory = make_word_chat_model(make_llama, seed=9, max_position_embeddings=1 << 16)
    child = _spawn(tmp_path, str(directory), "--threads", "1")
    try:
        child.expect_exact(">>> ")
        child.sendline("Tell me a long story")
        child.expect(r"(?: [a-z]+){20}")  # the reply is streaming
        child.sendintr()  # Ctrl-C
        child.expect_exact("(reply stopped)")
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect(r"reply: \d+ tokens.*end: interrupted")
        child.expect_exact(">>> ")
        child.sendintr()  # Ctrl-C at the prompt: a fresh line, still running
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "cpullm", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


def test_generate_sampling_flags_and_stdin(word_model: Path) -> None:
    model = cpullm.load(word_model, threads=1)
    options = dict(temperature=0.8, top_k=30, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=5)
    expected = model.generate("the capital of", 16, **options)
    flags = ["--temperature", "0.8", "--top-k", "30", "--top-p", "0.9", "--min-p", "0.05",
             "--repetition-penalty", "1.2", "--seed", "5", "-n", "16", "--threads", "1"]
    result = _cli("generate", str(word_model), *flags, stdin="the capital of")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    stop = expected.split()[2]
    stopped = _cli("generate", str(word_model), *flags, "-p", "the capital of", "--stop", stop)
    assert stopped.stdout == expected[: expected.index(stop)] + "\n"


def test_generate_into_a_closed_pipe_ends_quietly(word_model: Path) -> None:
    # `cpullm generate ... | head -c1`: the reader is gone before the reply is written (here before the
    # command starts, so the first write already fails): exit 0 with nothing on stderr, no traceback
    # and no "Exception ignored" from the interpreter's last flush.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "cpullm", "generate", str(word_model), "-p", "the capital of",
                                 "-n", "8", "--threads", "1"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=120)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


def test_chat_reads_lines_from_a_pipe(word_model: Path) -> None:
    model = cpullm.load(word_model, threads=1)
    session = model.chat(system="Be brief.", max_tokens=6, temperature=0.7, seed=1)
    expected = [session.send("hello"), session.send("and then?")]
    result = _cli("chat", str(word_model), "--system", "Be brief.", "-n", "6", "--temperature", "0.7", "--seed", "1",
                  stdin="hello\nand then?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ">>> " + expected[0] + "\n>>> " + expected[1] + "\n>>> \n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--top-p", "0"], "top_p must be a number in (0, 1]"),
        (["--min-p", "2"], "min_p must be a number in [0, 1]"),
        (["--repetition-penalty", "0"], "repetition_penalty must be a number in [1e-06, 1e+06]"),
        (["--top-k", "-5"], "expected an integer >= 0"),
        (["--stop", ""], "stop strings must not be empty"),
        (["--on-overflow", "truncate"], "invalid choice"),
    ],
)
def test_bad_sampling_flags_give_one_clear_line(word_model: Path, args: list[str], message: str) -> None:
    result = _cli("chat", str(word_model), *args, stdin="")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_input_that_is_not_utf8_reads_as_replacement_characters(word_model: Path) -> None:
    """Bytes that are not UTF-8, on standard input or in -p / --system, become U+FFFD as they are read,
    so a chat goes on (as a prompt with U+FFFD where they were) instead of dying with a traceback."""
    model = cpullm.load(word_model, threads=1)
    expected = model.generate("the \ufffd capital", 4)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    for args, stdin in [(["generate", "-p", b"the \xff capital"], None), (["generate"], b"the \xff capital")]:
        argv = [sys.executable.encode(), b"-m", b"cpullm", *(a if isinstance(a, bytes) else a.encode() for a in args),
                str(word_model).encode(), b"-n", b"4", b"--threads", b"1"]
        result = subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == expected + "\n"
    session = model.chat(max_tokens=3)
    first = session.send("hi \ufffd there")
    chat = subprocess.run([sys.executable, "-m", "cpullm", "chat", str(word_model), "-n", "3", "--threads", "1"],
                          input=b"hi \xfe there\n", capture_output=True, env=env, timeout=120)
    assert chat.returncode == 0 and b"Traceback" not in chat.stderr
    assert chat.stdout.decode() == ">>> " + first + "\n>>> \n"
    with pytest.raises(ValueError, match="lone surrogate U\\+DCFF at index 1"):
        model.generate("a\udcffb", 2)
