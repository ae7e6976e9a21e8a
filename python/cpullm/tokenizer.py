"""Tokenization through the ``tokenizers`` library, and chat templates rendered with Jinja2 the way
transformers renders them."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer

from . import _C
from .errors import CpullmError, ModelFormatError


class ChatTemplateError(CpullmError, ValueError):
    """The chat template is absent, or refused the messages (its ``raise_exception``)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


# The named special tokens transformers hands to chat templates (``special_tokens_map``).
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class _SafeDict:
    """``dict`` for templates, without attribute access to anything else."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore names, so a template cannot reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise ChatTemplateError(f"chat templates may not set underscore names on a namespace: {name!r}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Not Jinja's own tojson, which escapes HTML characters; transformers' options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


def _alias_reasoning(message: Mapping[str, Any]) -> dict[str, Any]:
    # transformers drops the keys whose value is None (OpenAI-style content=None beside tool_calls would
    # otherwise render as "None"), and fills ``reasoning_content`` (and ``thinking``) from whichever
    # reasoning name a message uses.
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(chat: list[Any]) -> tuple[list[Any], str]:
    """The chat with _CONTINUE_TAG appended to the last message's text (its content, or the last text
    block of a list content), and that text."""
    if not chat:
        raise ChatTemplateError("continue_final_message is set but the conversation is empty")
    last = dict(chat[-1])
    content = last.get("content")
    if isinstance(content, str):
        final, last["content"] = content, content + _CONTINUE_TAG
    elif isinstance(content, (list, tuple)):
        blocks = [dict(b) if isinstance(b, Mapping) else b for b in content]
        index = next((i for i in reversed(range(len(blocks))) if isinstance(blocks[i], dict) and "text" in blocks[i]), None)
        if index is None:
            raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")
        final = str(blocks[index]["text"])
        blocks[index]["text"] = final + _CONTINUE_TAG
        last["content"] = blocks
    else:
        raise ChatTemplateError('continue_final_message is set but the final message has no "content" to continue')
    return [*chat[:-1], last], final


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken objects.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: Mapping[str, Any], chat_template: str | None) -> None:
        self._tok = tokenizer
        self.config = dict(config)
        self.chat_template = chat_template
        self._compiled: jinja2.Template | None = None
        self._max_token_chars: int | None = None
        self.special_tokens = {
            key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_text(self.config.get(key))) is not None
        }
        self.special_ids = frozenset(
            i for i, added in tokenizer.get_added_tokens_decoder().items() if getattr(added, "special", False)
        )
        # Building the tokenizer (its JSON parsed, or a GGUF's vocabulary) freed as much heap again as it
        # keeps (~45 MiB for a 128k-id vocabulary), which glibc would hold on to through the weights' load.
        _C.trim_heap()

    @classmethod
    def from_directory(cls, directory: Path) -> "Tokenizer | None":
        path = directory / "tokenizer.json"
        if not path.exists():
            return None
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ModelFormatError(f"{path}: not a usable tokenizer: {e}") from e
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFormatError(f"{config_path}: not readable JSON: {e}") from e
            if not isinstance(config, dict):
                raise ModelFormatError(f"{config_path}: expected a JSON object")
        template = config.get("chat_template")
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.exists():  # transformers 5 writes the template here and prefers it
            try:
                template = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ModelFormatError(f"{jinja_path}: not a readable UTF-8 template: {e}") from e
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ModelFormatError(f"{directory}: chat_template must be a string")
        return cls(tok, config, template)

    def max_token_chars(self) -> int:
        """The most characters one token decodes to (at least 1): a vocabulary entry's length bounds it,
        since byte-level entries hold one symbol per byte and SentencePiece ones one per character."""
        if self._max_token_chars is None:
            self._max_token_chars = max([1, *(len(piece) for piece in self._tok.get_vocab(with_added_tokens=True))])
        return self._max_token_chars

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        text = self.special_tokens.get("bos_token")
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        text = self.special_tokens.get("eos_token")
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
            if bad is None:
                raise
            # What undecodable input bytes become under Python's surrogateescape (argv, some stdin).
            raise ValueError(f"text is not valid Unicode: a lone surrogate U+{ord(text[bad]):04X} at index {bad} "
                             "(input that was not UTF-8?)") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, **extra: Any) -> str:
        """The conversation rendered by the chat template, with the variables transformers passes: the
        messages, ``add_generation_prompt``, ``tools`` and ``documents`` (None unless given), the named
        special tokens (``bos_token``, ``eos_token``, ...), and any ``extra`` keyword arguments.
        ``continue_final_message``: the text ends inside the last message, for the model to go on with it
        (transformers' way: a marker appended to that message's text, the render cut where it lands)."""
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template; use generate() with a plain prompt")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
        if any(not isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError("every message must be a dict such as {'role': 'user', 'content': '...'}")
        chat = [_alias_reasoning(m) for m in messages]
        final = None
        if continue_final_message not in (True, False, "content"):
            raise ChatTemplateError(f"continue_final_message may be True or 'content' (the message text), got "
                                    f"{continue_final_message!r}")
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt are not compatible: the first goes "
                                 "on with the last message, the second starts a new assistant message")
            chat, final = _tag_final_message(chat)
        variables = {"tools": None, "documents": None, **self.special_tokens, **extra}
        try:
            text = self._compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {e}") from e
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # e.g. content that is not text
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
        if final is None:
            return text
        if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ChatTemplateError("continue_final_message: the final message does not appear in the rendered chat "
                                    "(the template rewrites it)")
        at = text.rindex(_CONTINUE_TAG.strip())
        return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool | None = None, *,
        tokenize: bool = True, return_dict: bool = False, continue_final_message: bool = False, **extra: Any
    ) -> Any:
        """Token ids of the rendered conversation, the ids transformers' ``apply_chat_template`` gives for
        the same arguments. The rendered text already holds its special tokens, so none are added again (no
        second BOS). Two defaults differ from transformers 5's, for a runtime whose next step is a reply:
        ``add_generation_prompt`` is True (unless ``continue_final_message``), and the ids come as a list
        (``return_dict=True``: ``{"input_ids", "attention_mask"}``). ``tokenize=False``: the text."""
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        text = self.render_chat(messages, add_generation_prompt, continue_final_message, **extra)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids
