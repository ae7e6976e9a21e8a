"""Chat: prompt ids equal transformers' apply_chat_template for several template families, a session
reuses its KV cache (a new turn pre-fills only its own tokens) and answers exactly like a fresh run over
the whole conversation, overflow is handled as asked, and an interrupted turn leaves a usable session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cpullm
from chat_util import LLAMA2, SYSTEM, TEMPLATES, TURNS, write_chat_tokenizer, make_word_chat_model
from conftest import write_tokenizer
from cpullm.generation import common_prefix
from cpullm.tokenizer import ChatTemplateError

def _hf_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("kind", list(TEMPLATES))
@pytest.mark.parametrize("spm", [False, True], ids=["byte_level_bpe", "sentencepiece"])
def test_prompt_ids_match_transformers_for_multi_turn_conversations(tmp_path: Path, kind: str, spm: bool) -> None:
    from transformers import AutoTokenizer

    write_chat_tokenizer(tmp_path, kind, TEMPLATES[kind], spm=spm)
    ours = cpullm.tokenizer.Tokenizer.from_directory(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    assert ours is not None
    for n in (1, 3, 5):
        for messages in (TURNS[:n], [SYSTEM] + TURNS[:n]):
            assert ours.apply_chat_template(messages) == _hf_ids(reference, messages), (kind, n, messages[0])
            assert ours.render_chat(messages) == reference.apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=True)


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_transformers_options_of_apply_chat_template(tmp_path: Path, kind: str) -> None:
    """tokenize=False, return_dict=True and continue_final_message=True (the assistant's last message
    left open, for the model to go on with) give what transformers gives."""
    from transformers import AutoTokenizer

    write_chat_tokenizer(tmp_path, kind, TEMPLATES[kind])
    ours = cpullm.tokenizer.Tokenizer.from_directory(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    assert ours is not None
    messages = TURNS[:3] + [{"role": "assistant", "content": "Well, the answer is"}]
    for prompt in (True, False):
        assert ours.apply_chat_template(TURNS[:3], prompt, tokenize=False) == reference.apply_chat_template(
            TURNS[:3], add_generation_prompt=prompt, tokenize=False)
    expected = reference.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert expected.endswith("the answer is")
    assert ours.apply_chat_template(messages, continue_final_message=True, tokenize=False) == expected
    ids = ours.apply_chat_template(messages, continue_final_message=True)
    assert ids == _hf_ids_continued(reference, messages)
    assert ours.apply_chat_template(messages, continue_final_message=True, return_dict=True) == {
        "input_ids": ids, "attention_mask": [1] * len(ids)}
    with pytest.raises(ValueError, match="not compatible"):
        ours.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)


def test_message_keys_holding_none_are_dropped_as_transformers_does(tmp_path: Path) -> None:
    """OpenAI-style messages carry content=None beside tool_calls: transformers drops None-valued keys
    before rendering, so a template that prints content does not print "None"."""
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                "{% if m['tool_calls'] %}[call {{ m['tool_calls'][0]['name'] }}]{% endif %}{% endfor %}")
    write_tokenizer(tmp_path, chat_template=template)
    ours = cpullm.tokenizer.Tokenizer.from_directory(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    assert ours is not None
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"name": "get"}]}]
    expected = reference.apply_chat_template(messages, tokenize=False)
    assert "None" not in expected and ours.render_chat(messages, add_generation_prompt=False) == expected
    with pytest.raises(ChatTemplateError, match="continue_final_message may be True or 'content'"):
        ours.apply_chat_template(messages[:1], continue_final_message="reasoning_content")


def _hf_ids_continued(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, continue_final_message=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_template_exceptions_are_clear(tmp_path: Path) -> None:
    write_chat_tokenizer(tmp_path, "llama2", LLAMA2, spm=True)
    tok = cpullm.tokenizer.Tokenizer.from_directory(tmp_path)
    assert tok is not None
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # content the template cannot concatenate, and messages that are not dicts
    with pytest.raises(ChatTemplateError, match="the chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    for bad in ("hello", [["user", "hi"]], None):
        with pytest.raises(ChatTemplateError, match="must be"):
            tok.apply_chat_template(bad)


# --- sessions on a tiny random model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_dir(make_llama: Any) -> Path:
    return make_word_chat_model(make_llama)


@pytest.fixture(scope="module")
def chat_model(chat_dir: Path) -> cpullm.Model:
    return cpullm.load(chat_dir, threads=1)


class CountingSequence:
    """Wraps the native sequence and counts the tokens each forward pass sees; optionally raises
    KeyboardInterrupt right after the n-th forward pass returns (as a Ctrl-C that arrived while the C++
    code ran is raised when it returns)."""

    def __init__(self, inner: Any, interrupt_after_call: int | None = None) -> None:
        self.inner = inner
        self.calls: list[int] = []
        self.interrupt_after_call = interrupt_after_call

    @property
    def n_past(self) -> int:
        return self.inner.n_past

    def truncate(self, n: int) -> None:
        self.inner.truncate(n)

    def reserve(self, n: int) -> None:
        self.inner.reserve(n)

    def forward(self, ids: np.ndarray, all_logits: bool, threads: int) -> np.ndarray:
        out = self.inner.forward(ids, all_logits, threads)
        self.calls.append(int(ids.size))
        if self.interrupt_after_call is not None and len(self.calls) == self.interrupt_after_call:
            raise KeyboardInterrupt
        return out


def _counting(session: Any, interrupt_after_call: int | None = None) -> CountingSequence:
    inner = session._sequence.inner if isinstance(session._sequence, CountingSequence) else session._sequence
    session._sequence = CountingSequence(inner, interrupt_after_call)
    return session._sequence


def _fresh_reply(model: cpullm.Model, messages: list[dict[str, str]], **options: Any) -> str:
    """The reply a fresh run (new cache, whole conversation pre-filled) gives."""
    ids = model.tokenizer.apply_chat_template(messages)
    max_tokens = options.pop("max_tokens", None)
    tokens = list(model.generate_tokens(ids, max_tokens, **options))
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_new_turn_prefills_only_its_own_tokens_and_equals_a_fresh_run(chat_model: cpullm.Model) -> None:
    session = chat_model.chat(system="You are terse.", max_tokens=12)
    counter = _counting(session)
    first = session.send("Capital of France?")
    first_prompt = chat_model.tokenizer.apply_chat_template([SYSTEM | {"content": "You are terse."},
                                                             {"role": "user", "content": "Capital of France?"}])
    assert counter.calls[0] == len(first_prompt) == session.stats.processed_tokens  # a cold cache: everything
    assert session.stats.cached_tokens == 0 and session.stats.generated_tokens == 12
    assert first == _fresh_reply(chat_model, session.history[:-1], max_tokens=12)

    for message in ["And of Japan? 東京", "Zürich then? 🙂"]:
        previous = session.stats
        cached = list(session._cached)
        # The cache holds the last prompt and the reply, except the reply's last token: a reply cut by
        # max_tokens ends without running it (nothing needed its logits then).
        assert len(cached) == previous.prompt_tokens + previous.generated_tokens - 1
        prompt = session.prompt_ids(message)
        counter.calls.clear()
        reply = session.send(message)
        # All of it is reused (this model says whole words, which re-tokenize to the very ids generated;
        # where a reply re-tokenizes differently, less is reused, never anything stale).
        assert common_prefix(cached, prompt) == len(cached) == session.stats.cached_tokens
        # So the forward pass sees only the new turn's tokens (and that one reply token) ...
        assert counter.calls[0] == len(prompt) - len(cached) == session.stats.processed_tokens
        assert session.stats.processed_tokens < len(prompt) // 2
        # ... then one token per decode step.
        assert counter.calls[1:] == [1] * (session.stats.generated_tokens - 1)
        assert reply == _fresh_reply(chat_model, session.history[:-1], max_tokens=12)
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


def test_sampled_turns_equal_a_fresh_run_with_the_same_seed(chat_model: cpullm.Model) -> None:
    options = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.2, seed=3)
    session = chat_model.chat(max_tokens=10, **options)
    session.send("Hello there")
    reply = session.send("Tell me more 🙂")
    assert session.stats.cached_tokens > 0
    assert reply == _fresh_reply(chat_model, session.history[:-1], max_tokens=10, **options)
    again = chat_model.chat(max_tokens=10, **options)
    assert [again.send("Hello there"), again.send("Tell me more 🙂")] == [m["content"] for m in session.messages[1::2]]


def test_stop_strings_end_a_reply(chat_model: cpullm.Model) -> None:
    session = chat_model.chat(max_tokens=30)
    free = session.send("Hello there")
    stop = free[10:13]
    session.reset()
    cut = session.send("Hello there", stop=[stop])
    assert cut == free[: free.index(stop)]
    assert session.messages[-1]["content"] == cut and session.stats.finish_reason == "stop"
    session.send("more")  # the cache held the stop string's tokens; the next turn is still exact
    assert session.messages[-1]["content"] == _fresh_reply(chat_model, session.history[:-1], max_tokens=30)


def test_overflow_error_leaves_the_session_unchanged(chat_dir: Path) -> None:
    model = cpullm.load(chat_dir, threads=1, context_length=120)
    session = model.chat(system="Be brief.", max_tokens=16)
    sent = 0
    with pytest.raises(cpullm.ContextOverflowError, match="context holds 120"):
        for _ in range(20):
            session.send("Tell me about Zürich and 東京, please.")
            sent += 1
            assert session.stats.prompt_tokens < 120
    assert sent >= 1 and len(session.messages) == 2 * sent  # the refused message left no trace
    session.reset()
    assert session.send("Hi") == _fresh_reply(model, session.history[:-1], max_tokens=16)


def test_drop_oldest_forgets_old_turns_but_keeps_the_system_message(chat_dir: Path) -> None:
    model = cpullm.load(chat_dir, threads=1, context_length=160)
    session = model.chat(system="Be brief.", on_overflow="drop_oldest", max_tokens=12)
    for i in range(8):
        reply = session.send(f"Question number {i}: what about 東京?")
        history = session.history
        assert history[0] == {"role": "system", "content": "Be brief."}
        assert history[1]["role"] == "user" and history[-2]["content"] == f"Question number {i}: what about 東京?"
        assert session.stats.prompt_tokens + 12 <= 160
        assert reply == _fresh_reply(model, history[:-1], max_tokens=12)
    assert session.dropped_messages > 0 and len(session.messages) < 16
    with pytest.raises(cpullm.ContextOverflowError, match="the message is"):
        session.send("word " * 200)


def test_a_reply_that_fills_the_context_stops_there(chat_dir: Path) -> None:
    model = cpullm.load(chat_dir, threads=1, context_length=64)
    session = model.chat()
    session.send("Hi")
    assert session.stats.finish_reason == "context"
    assert session.stats.prompt_tokens + session.stats.generated_tokens == 64  # prompt and reply fill it
    with pytest.raises(cpullm.ContextOverflowError):
        session.send("again")  # "error" is the default: nothing is silently cut


def test_ctrl_c_in_the_caller_keeps_what_was_shown(chat_model: cpullm.Model) -> None:
    session = chat_model.chat(max_tokens=20)
    shown: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.stream("Hello there"):
            shown.append(piece)
            if len(shown) == 3:
                raise KeyboardInterrupt
    assert session.messages[-1] == {"role": "assistant", "content": "".join(shown)}
    assert session.stats.finish_reason == "interrupted"
    reply = session.send("Go on")
    assert reply == _fresh_reply(chat_model, session.history[:-1], max_tokens=20)


def test_ctrl_c_inside_a_forward_pass_leaves_a_consistent_cache(chat_model: cpullm.Model) -> None:
    session = chat_model.chat(max_tokens=20)
    _counting(session, interrupt_after_call=6)  # prefill, then interrupted on the 5th decode step
    shown: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.stream("Hello there"):
            shown.append(piece)
    assert shown and session.messages[-1]["content"] == "".join(shown)
    assert session._sequence.n_past == len(session._cached)
    _counting(session)
    reply = session.send("Go on")
    assert reply == _fresh_reply(chat_model, session.history[:-1], max_tokens=20)


def test_ctrl_c_during_the_prefill_drops_the_turn(chat_model: cpullm.Model) -> None:
    session = chat_model.chat(max_tokens=8)
    session.send("Hello there")
    before = list(session.messages)
    _counting(session, interrupt_after_call=1)
    with pytest.raises(KeyboardInterrupt):
        session.send("This turn never happens")
    assert session.messages == before and session.stats.finish_reason == "interrupted"
    _counting(session)
    assert session.send("Go on") == _fresh_reply(chat_model, session.history[:-1], max_tokens=8)


def test_an_abandoned_stream_is_committed_by_the_next_turn(chat_model: cpullm.Model) -> None:
    session = chat_model.chat(max_tokens=20)
    stream = session.stream("Hello there")
    first = next(stream)
    reply = session.send("Another question")  # the first stream is still suspended here
    assert session.messages[1] == {"role": "assistant", "content": first}
    assert reply == _fresh_reply(chat_model, session.history[:-1], max_tokens=20)
    stream.close()  # finishing the old stream later changes nothing
    assert len(session.messages) == 4


def test_system_message_changes_and_reset(chat_model: cpullm.Model) -> None:
    session = chat_model.chat(max_tokens=6)
    session.send("Hello")
    session.set_system("You are a pirate.")
    assert session.history[0] == {"role": "system", "content": "You are a pirate."} and len(session.messages) == 2
    reply = session.send("Ahoy?")
    assert reply == _fresh_reply(chat_model, session.history[:-1], max_tokens=6)
    session.reset()
    assert session.messages == [] and session.system == "You are a pirate."
    session.reset(None)
    assert session.system is None
    assert session.send("Hello") == _fresh_reply(chat_model, session.history[:-1], max_tokens=6)


def test_bad_chat_arguments_are_refused(chat_model: cpullm.Model, make_llama: Any) -> None:
    with pytest.raises(ValueError, match="temperature"):
        chat_model.chat(temperature=-1)
    with pytest.raises(ValueError, match="on_overflow"):
        chat_model.chat(on_overflow="truncate")
    with pytest.raises(TypeError, match="unknown chat option"):
        chat_model.chat(top_q=0.5)
    session = chat_model.chat()
    with pytest.raises(ValueError, match="top_p"):
        session.stream("hi", top_p=2.0)  # at the call, before any piece is asked for
    with pytest.raises(ValueError, match="max_tokens"):
        session.send("hi", max_tokens=-2)
    assert session.messages == []

    directory, _ = make_llama(seed=2)
    write_tokenizer(directory)  # no chat template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        cpullm.load(directory).chat()
