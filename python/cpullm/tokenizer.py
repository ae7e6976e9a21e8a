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

from .errors import CpullmError, ModelFormatError


class ChatTemplateError(CpullmError, ValueError):
    """The chat template is absent, or refused the messages (its ``raise_exception``)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


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
        self.special_tokens = {
            key: text for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(self.config.get(key))) is not None
        }

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
        template = config.get("chat_template")
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.exists():  # transformers 5 writes the template here and prefers it
            template = jinja_path.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ModelFormatError(f"{directory}: chat_template must be a string")
        return cls(tok, config, template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template; use generate() with a plain prompt")
        if self._compiled is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys
            )
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise ChatTemplateError(f"the chat template does not compile: {e}") from e
        variables = {**self.special_tokens, **extra}
        return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of the rendered conversation. The rendered text already holds its special tokens,
        so none are added again (no second BOS)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra), add_special_tokens=False)
