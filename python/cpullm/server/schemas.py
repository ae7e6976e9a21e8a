"""Request bodies of the OpenAI API, checked: every mistake a client can make becomes a ``RequestError``
(an HTTP status and OpenAI's error JSON, ``{"error": {"message", "type", "param", "code"}}``) that names
the field, before any work is queued.

Fields are typed the way OpenAI documents them. Fields this server does not know are ignored (as
llama.cpp's server does), but a known feature it cannot honour with a non-default value (``n > 1``,
``logprobs``, tools, penalties other than 0, ``echo``, ...) is refused by name rather than silently
dropped. The sampling values themselves are checked by ``cpullm.sampling.SamplingParams``, the same
check the Python API applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..sampling import SamplingParams
from ..streaming import normalize_stop

__all__ = ["ChatRequest", "CompletionRequest", "RequestError", "parse_chat", "parse_completion", "parse_json",
           "error_body"]

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
MAX_STOP_STRINGS = 16
# OpenAI's default for /v1/completions (vLLM and llama-cpp-python's servers follow it); chat
# completions generate until the turn ends.
COMPLETION_DEFAULT_MAX_TOKENS = 16
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and OpenAI's error fields."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:  # noqa: A002 - OpenAI's name
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, param=self.param, type=self.type, code=self.code)


def error_body(message: str, *, param: str | None = None, type: str = "invalid_request_error",  # noqa: A002
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class _Common:
    model: str | None
    max_tokens: int | None
    sampling: dict[str, Any]  # only the values the client set
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass
class ChatRequest(_Common):
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass
class CompletionRequest(_Common):
    prompt: str | list[int] = ""


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not body.strip():
        raise RequestError("the request body is empty; send a JSON object")
    try:
        value = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError(f"the request body must be a JSON object, got {_json_type(value)}")
    _check_unicode(value)
    return value


def _check_unicode(value: Any) -> None:
    """Refuses strings JSON can carry but Unicode text cannot: lone surrogates ("\\ud800")."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError("the request holds a string with a lone UTF-16 surrogate escape, which is "
                                   "not valid Unicode text") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_int(body: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise RequestError(f"'{key}' must be an integer, got {_json_type(value)}", param=key)
    if value < minimum:
        raise RequestError(f"'{key}' must be >= {minimum}, got {value}", param=key)
    return value


def _optional_bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{key}' must be a boolean, got {_json_type(value)}", param=key)
    return value


def _refuse_unless(body: Mapping[str, Any], key: str, ok: Any, what: str) -> None:
    """Refuses a feature the server does not implement when the client asks for more than its default."""
    value = body.get(key)
    if value is None:
        return
    if not ok(value):
        raise RequestError(f"'{key}' is not supported by this server ({what})", param=key)


# llama.cpp's and vLLM's request fields for constrained output.
_CONSTRAINED_DECODING_KEYS = ("grammar", "json_schema", "guided_json", "guided_regex", "guided_choice",
                              "guided_grammar", "guided_decoding_backend", "structured_outputs")
# top_p so small that only the most likely token is kept (its probability alone exceeds it).
_TOP_P_ONE_TOKEN = 1e-9


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in SAMPLING_KEYS:
        value = body.get(key)
        if value is None or (key == "seed" and value == -1):  # llama.cpp's clients send -1 for "random"
            continue
        if key == "top_p" and value == 0 and not isinstance(value, bool):  # OpenAI allows 0: the top token alone
            value = _TOP_P_ONE_TOKEN
        integer = key in ("top_k", "seed")
        if integer and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not (_is_int(value) if integer else _is_number(value)):
            kind = "an integer" if integer else "a number"
            raise RequestError(f"'{key}' must be {kind}, got {_json_type(value)}", param=key)
        try:
            SamplingParams(**{key: value})  # the Python API's own check and message
        except ValueError as e:
            raise RequestError(str(e), param=key) from None
        out[key] = value
    return out


def _common(body: Mapping[str, Any], max_tokens_keys: tuple[str, ...]) -> dict[str, Any]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {_json_type(model)}", param="model")
    max_tokens = None
    for key in max_tokens_keys:
        value = _optional_int(body, key, 1)
        if value is not None:
            max_tokens = value if max_tokens is None else min(max_tokens, value)
    n = _optional_int(body, "n", 1)
    if n is not None and n != 1:
        raise RequestError(f"'n' must be 1: this server returns one choice per request, got {n}", param="n")
    stop_value = body.get("stop")
    if stop_value is not None and not isinstance(stop_value, (str, list)):
        raise RequestError(f"'stop' must be a string or an array of strings, got {_json_type(stop_value)}",
                           param="stop")
    try:
        stop = normalize_stop(stop_value)
    except ValueError as e:
        raise RequestError(str(e), param="stop") from None
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError(f"'stream_options' must be an object, got {_json_type(options)}",
                               param="stream_options")
        if not stream:
            raise RequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        include_usage = _optional_bool(options, "include_usage")
    for key in ("presence_penalty", "frequency_penalty"):
        value = body.get(key)
        if value is not None and not _is_number(value):
            raise RequestError(f"'{key}' must be a number, got {_json_type(value)}", param=key)
        _refuse_unless(body, key, lambda v: v == 0, "only 0; use repetition_penalty")
    _refuse_unless(body, "logit_bias", lambda v: isinstance(v, dict) and not v, "only an empty object")
    for key in _CONSTRAINED_DECODING_KEYS:
        # Other servers' constrained output: ignoring it would hand back unconstrained text as if it obeyed.
        _refuse_unless(body, key, lambda v: v in ("", {}, []), "no constrained decoding")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(f"'user' must be a string (it is accepted and ignored), got {_json_type(user)}", param="user")
    return dict(model=model, max_tokens=max_tokens, sampling=_sampling(body), stop=stop, stream=stream,
                include_usage=include_usage)


def _message_text(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise RequestError(f"{param}[{j}] must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                                   f"this server reads text only, got {kind!r}", param=param)
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{param} must be a string or an array of text parts, got {_json_type(content)}",
                       param=param)


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError("'messages' is required: an array of {\"role\", \"content\"} objects", param="messages")
    if not isinstance(messages, list):
        raise RequestError(f"'messages' must be an array, got {_json_type(messages)}", param="messages")
    if not messages:
        raise RequestError("'messages' must not be empty", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object, got {_json_type(message)}", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str):
            raise RequestError(f"messages[{i}].role is required and must be a string", param=f"messages[{i}].role")
        if role not in _ROLES:
            raise RequestError(f"messages[{i}].role {role!r} is not supported; use one of "
                               f"{', '.join(sorted(_ROLES))}", param=f"messages[{i}].role")
        if "content" not in message or message["content"] is None:
            raise RequestError(f"messages[{i}].content is required", param=f"messages[{i}].content")
        out.append({"role": _ROLES[role], "content": _message_text(message["content"], i)})
    return out


def parse_chat(body: Mapping[str, Any]) -> ChatRequest:
    """A ``POST /v1/chat/completions`` body, checked."""
    common = _common(body, ("max_tokens", "max_completion_tokens"))
    messages = _messages(body)
    _refuse_unless(body, "tools", lambda v: isinstance(v, list) and not v, "no tool calling")
    _refuse_unless(body, "functions", lambda v: isinstance(v, list) and not v, "no function calling")
    _refuse_unless(body, "tool_choice", lambda v: v in ("none", "auto"), "no tool calling")
    _refuse_unless(body, "logprobs", lambda v: v is False, "no log-probabilities")
    _refuse_unless(body, "top_logprobs", lambda v: v == 0, "no log-probabilities")
    _refuse_unless(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text",
                   "plain text only")
    return ChatRequest(messages=messages, **common)


def parse_completion(body: Mapping[str, Any]) -> CompletionRequest:
    """A ``POST /v1/completions`` body, checked. ``prompt``: a string, token ids, or a one-element
    array of either (one prompt per request)."""
    common = _common(body, ("max_tokens",))
    if common["max_tokens"] is None:
        common["max_tokens"] = COMPLETION_DEFAULT_MAX_TOKENS
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("'prompt' is required: a string or an array of token ids", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty", param="prompt")
    elif isinstance(prompt, list):
        if not prompt:
            raise RequestError("'prompt' is empty", param="prompt")
        if not all(_is_int(t) for t in prompt):
            if all(isinstance(p, (str, list)) for p in prompt):
                raise RequestError(f"'prompt' holds {len(prompt)} prompts; this server takes one per request",
                                   param="prompt")
            raise RequestError("'prompt' must be a string or an array of integer token ids", param="prompt")
    else:
        raise RequestError(f"'prompt' must be a string or an array of token ids, got {_json_type(prompt)}",
                           param="prompt")
    _refuse_unless(body, "echo", lambda v: v is False, "the prompt is not echoed")
    _refuse_unless(body, "logprobs", lambda v: v in (0, False), "no log-probabilities")
    _refuse_unless(body, "best_of", lambda v: v == 1, "one candidate per request")
    _refuse_unless(body, "suffix", lambda v: v == "", "no insertion")
    return CompletionRequest(prompt=prompt, **common)
