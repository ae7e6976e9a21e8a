"""The HTTP routes of ``cpullm serve``: OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models``, plus ``/health``, as a Starlette application.

Every request a client gets wrong is answered with a 4xx and OpenAI's error JSON; only a fault of the
server itself is a 500. Streaming responses are server-sent events exactly as OpenAI sends them
(``data: {json}\\n\\n`` chunks, then ``data: [DONE]``). A client that disconnects, while its request
waits or while it streams, cancels its generation at once.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..tokenizer import ChatTemplateError
from .engine import SHUTTING_DOWN, Engine, Event, Job, QueueFullError
from .schemas import ChatRequest, CompletionRequest, RequestError, error_body, parse_chat, parse_completion, parse_json

__all__ = ["create_app"]

log = logging.getLogger("cpullm.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
_FINGERPRINT = "cpullm"


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _sse(value: Any) -> bytes:
    return b"data: " + (value if isinstance(value, bytes) else _json(value)) + b"\n\n"


def _usage(event: Event) -> dict[str, Any]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": event.cached_tokens}}


class _EventStream(Response):
    """A server-sent event stream that cancels its job when the client goes away (noticed both by a
    failing send and by ASGI's ``http.disconnect``, so a request still waiting in the queue is dropped
    too) and when the response ends for any other reason."""

    def __init__(self, engine: Engine, job: Job, chunks: AsyncIterator[bytes]) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]  # no content-length: the body is streamed
        self.engine = engine
        self.job = job
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.engine.cancel(self.job)
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                try:
                    async for chunk in self.chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the client went away mid-send
                    pass
                group.cancel_scope.cancel()
        except OSError:
            pass
        finally:
            self.engine.cancel(self.job)
            await _aclose(self.chunks)


async def _aclose(chunks: AsyncIterator[bytes]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def create_app(model: Any, *, model_name: str, api_key: str | None = None, max_concurrent: int = 4,
               max_queued: int = 256, prefill_chunk: int = 256, max_body_bytes: int = MAX_BODY_BYTES,
               cors_origins: Sequence[str] = ()) -> Starlette:
    """The server's application for a loaded ``model``, served as ``model_name``. ``api_key``: when set,
    every ``/v1`` request must carry ``Authorization: Bearer <api_key>`` (``/health`` stays open, for load
    balancers). ``cors_origins``: web origins whose pages may call the API from a browser ("*": any).
    The engine (``app.state.engine``) starts here and stops with the application's lifespan."""
    if model.tokenizer is None:
        raise ValueError(f"{model.source} has no tokenizer.json; the server needs one")
    engine = Engine(model, max_concurrent=max_concurrent, max_queued=max_queued, prefill_chunk=prefill_chunk)
    created = int(time.time())
    context = model.spec.max_context
    vocab = model.spec.vocab_size
    max_token_chars = model.tokenizer.max_token_chars()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise RequestError("missing API key: send the header 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError("incorrect API key provided", status=401, code="invalid_api_key")

    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise RequestError(f"the request body is {int(length)} bytes; the limit is {max_body_bytes}", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise RequestError(f"the request body is over the limit of {max_body_bytes} bytes", status=413)
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def check_text_fits(text: str, param: str) -> None:
        # A token never decodes to more than max_token_chars characters, so text longer than the context
        # times that cannot fit: refused before the tokenizer spends seconds on it (it holds the GIL, and
        # every other request waits meanwhile).
        if len(text) > context * max_token_chars:
            raise RequestError(f"the prompt is {len(text)} characters, more than this model's context of {context} "
                               "tokens can hold; shorten the prompt", param=param, code="context_length_exceeded")

    def chat_prompt(messages: list[dict[str, str]]) -> list[int]:
        if model.tokenizer.chat_template is None:
            raise RequestError("this model has no chat template; use /v1/completions with a plain prompt")
        try:
            text = model.tokenizer.render_chat(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise RequestError(f"the model's chat template refused the messages: {e}", param="messages") from None
        check_text_fits(text, "messages")  # the rendered text: what a template drops does not count
        return model.tokenizer.encode(text, add_special_tokens=False)  # as apply_chat_template does

    def completion_prompt(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            check_text_fits(prompt, "prompt")
            ids = model.tokenizer.encode(prompt)
            if not ids:
                raise RequestError("'prompt' encodes to no tokens", param="prompt")
            return ids
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"'prompt' token ids must lie in [0, {vocab}), got {bad[0]}", param="prompt")
        return prompt

    def make_job(req: ChatRequest | CompletionRequest, prompt_ids: list[int], chat: bool) -> Job:
        n = len(prompt_ids)
        if n >= context:
            raise RequestError(f"the prompt is {n} tokens, and this model's context holds {context} tokens "
                               f"(with room for at least one generated token); shorten the prompt",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
        if req.max_tokens is not None and n + req.max_tokens > context:
            raise RequestError(f"the prompt is {n} tokens and max_tokens is {req.max_tokens}: {n + req.max_tokens} "
                               f"in all, more than this model's context of {context} tokens; ask for at most "
                               f"{context - n} token{'s' if context - n != 1 else ''}"
                               + (", or leave max_tokens out to generate until the context is full" if chat else ""),
                               param="max_tokens", code="context_length_exceeded")
        try:
            params = model.sampling_params(**req.sampling)
        except ValueError as e:
            raise RequestError(str(e)) from None
        job = Job(prompt_ids, params, req.max_tokens, req.stop, chat=chat)
        try:
            engine.submit(job)
        except QueueFullError as e:
            raise RequestError(str(e), status=503, type="server_error", code="overloaded") from None
        return job

    async def run(request: Request, req: ChatRequest | CompletionRequest, prompt_ids: list[int], chat: bool) -> Response:
        job = make_job(req, prompt_ids, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:
            render = _chat_chunks if chat else _completion_chunks
            return _EventStream(engine, job, render(job, rid, now, model_name, req.include_usage))
        try:
            text, final = await _collect(request, engine, job)
        finally:
            engine.cancel(job)
        if final is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        if final.error is not None:
            return JSONResponse(error_body(final.error, type="server_error"),
                                status_code=503 if final.error == SHUTTING_DOWN else 500)
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": final.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final.finish_reason}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                             "model": model_name, "system_fingerprint": _FINGERPRINT, "choices": [choice],
                             "usage": _usage(final)})

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse_chat(await read_json(request))
        prompt_ids = await run_in_threadpool(chat_prompt, req.messages)
        return await run(request, req, prompt_ids, chat=True)

    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse_completion(await read_json(request))
        prompt_ids = await run_in_threadpool(completion_prompt, req.prompt)
        return await run(request, req, prompt_ids, chat=False)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "cpullm",
                "context_length": context}

    async def list_models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        authorize(request)
        name = request.path_params["model"]
        if name != model_name:
            raise RequestError(f"the model {name!r} does not exist; this server serves {model_name!r}", status=404,
                               param="model", code="model_not_found")
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "active": engine.active, "queued": engine.queued,
                             "completed": engine.completed, "cancelled": engine.cancelled})

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.url.path}; this server offers /v1/chat/completions, /v1/completions, "
                        f"/v1/models and /health",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error", exc_info=exc)
        return JSONResponse(error_body(f"internal server error: {exc}", type="server_error"), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(engine.close)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers: dict[Any, Callable[..., Any]] = {RequestError: request_error, HTTPException: http_error,
                                               Exception: server_error}
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["*"]))
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan, middleware=middleware)
    app.router.redirect_slashes = False  # /v1/models/ is a JSON 404 like any unknown route, not a redirect
    app.state.engine = engine
    app.state.model_name = model_name
    return app


async def _collect(request: Request, engine: Engine, job: Job) -> tuple[str, Event | None]:
    """The whole text of a non-streaming job and its final event; (text, None) if the client went away
    first (the job is cancelled then)."""
    pieces: list[str] = []
    final: Event | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            engine.cancel(job)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        async for event in job.events():
            pieces.append(event.piece)
            if event.final:
                final = event
        group.cancel_scope.cancel()
    return "".join(pieces), final


async def _chat_chunks(job: Job, rid: str, created: int, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": _FINGERPRINT}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        body: dict[str, Any] = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    yield chunk({"role": "assistant", "content": ""})
    async for event in job.events():
        if event.error is not None:
            yield _sse(error_body(event.error, type="server_error"))
            return
        if event.piece:
            yield chunk({"content": event.piece})
        if event.final:
            yield chunk({}, event.finish_reason)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(event)})
    yield _sse(b"[DONE]")


async def _completion_chunks(job: Job, rid: str, created: int, model: str,
                             include_usage: bool) -> AsyncIterator[bytes]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": _FINGERPRINT}

    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        body: dict[str, Any] = {**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    async for event in job.events():
        if event.error is not None:
            yield _sse(error_body(event.error, type="server_error"))
            return
        if event.piece:
            yield chunk(event.piece)
        if event.final:
            yield chunk("", event.finish_reason)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(event)})
    yield _sse(b"[DONE]")
