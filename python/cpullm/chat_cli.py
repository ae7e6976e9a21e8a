"""``cpullm chat``: an interactive terminal chat.

Replies stream as they are generated. Ctrl-C stops the current reply (the session keeps what was shown)
and returns to the prompt; Ctrl-C at the prompt clears the line; Ctrl-D (or /exit) leaves. Lines are
edited with readline, and the input history is kept in ``$XDG_STATE_HOME/cpullm/chat_history``
(``~/.local/state/cpullm/chat_history``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from .errors import CpullmError

PROMPT = ">>> "

HELP = """commands:
  /reset          forget the conversation (keeps the system message)
  /system TEXT    set the system message (no TEXT: show it)
  /stats          tokens and speed of the last reply
  /help           this list
  /exit           leave (Ctrl-D works too)
Ctrl-C stops a reply. Start a message with // to send a line that begins with /."""


def _history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "cpullm" / "chat_history"


def _setup_readline() -> Callable[[], None]:
    """Line editing and a persistent history where readline exists; returns a function that saves it."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return lambda: None
    path = _history_path()
    try:
        readline.read_history_file(path)
    except (OSError, UnicodeDecodeError):
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def format_stats(stats: Any) -> str:
    if stats.finish_reason is None and stats.prompt_tokens == 0:
        return "no reply yet"
    return (
        f"prompt: {stats.prompt_tokens} tokens ({stats.cached_tokens} cached, {stats.processed_tokens} processed"
        f", {stats.prompt_tokens_per_second:.1f} tok/s) | reply: {stats.generated_tokens} tokens, "
        f"{stats.generation_tokens_per_second:.1f} tok/s | end: {stats.finish_reason}"
    )


class ChatREPL:
    def __init__(self, session: Any, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.session = session
        self.out = out
        self.err = err

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def command(self, line: str) -> bool:
        """Runs a /command; returns False to leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.session.reset()
            self.note("(conversation forgotten)")
        elif name == "/system":
            if rest:
                self.session.set_system(rest)
                self.note("(system message set)")
            else:
                current = self.session.system
                self.note("(no system message)" if current is None else f"system: {current}")
        elif name == "/stats":
            self.note(format_stats(self.session.stats))
        elif name in ("/help", "/?"):
            self.note(HELP)
        else:
            self.note(f"unknown command {name}; /help lists them")
        return True

    def reply(self, message: str) -> None:
        dropped_before = self.session.dropped_messages
        stream = None
        try:
            stream = self.session.stream(message)
            for piece in stream:
                self.out.write(piece)
                self.out.flush()
            self.out.write("\n")
            self.out.flush()
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            self.out.write("\n")
            self.out.flush()
            self.note("(reply stopped)")
            return
        except CpullmError as e:  # context overflow, a template refusing the conversation: say so, carry on
            self.note(f"error: {e}")
            return
        if self.session.dropped_messages > dropped_before:
            self.note(f"(forgot the {self.session.dropped_messages - dropped_before} oldest messages to fit the context)")
        if self.session.stats.finish_reason == "context":
            self.note("(the reply stopped at the end of the context)")

    def run(self) -> int:
        save_history = _setup_readline()
        try:
            while True:
                try:
                    line = input(PROMPT)
                except EOFError:
                    self.out.write("\n")
                    return 0
                except KeyboardInterrupt:
                    self.out.write("\n")
                    continue
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/") and not text.startswith("//"):
                    if not self.command(text):
                        return 0
                    continue
                if text.startswith("//"):
                    text = text[1:]
                self.reply(text)
        finally:
            save_history()


def run_chat(args: argparse.Namespace, sampling: dict[str, Any]) -> int:
    from .cli import as_text
    from .loader import load

    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")  # a terminal that cannot show a character gets "?", not a crash
    model = load(args.model, dtype=args.dtype, threads=args.threads, kv_cache_dtype=args.kv_cache_dtype,
                 fast_prefill=args.fast_prefill)
    with model:
        system = None if args.system is None else as_text(args.system)
        session = model.chat(system=system, on_overflow=args.on_overflow, **sampling)
        if sys.stdin.isatty():
            sys.stderr.write(f"cpullm chat: {model.source} ({model.dtype}, {model.threads} threads, "
                             f"context {model.spec.max_context}, {model.kv_cache_dtype} KV cache). "
                             "/help for commands, Ctrl-D to leave.\n")
        return ChatREPL(session).run()
