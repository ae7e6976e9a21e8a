"""`cpullm serve`, the OpenAI-compatible server, against a real uvicorn server on 127.0.0.1 running the real
default model (SmolLM2-135M-Instruct, int8, as `cpullm serve` loads it), driven by the official `openai`
client: chat and text completions, streamed and not (greedy streamed text equals the non-streamed text and
the Python API's), usage counts, sampling extensions, prefix reuse, a bounded load test (8 concurrent
streaming clients), bad requests (each a 4xx in OpenAI's error shape), the API key, and clients that
disconnect (their generation stops)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import cpullm  # noqa: E402
from cpullm.server import create_app  # noqa: E402

API_KEY = "sk-test-cpullm"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Server:
    """A uvicorn server in a thread, on a free 127.0.0.1 port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.engine = app.state.engine
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def client(self, api_key: str = "none", **kw: Any) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def wait_idle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.engine.active or self.engine.queued:
            assert time.monotonic() < deadline, f"still {self.engine.active} active, {self.engine.queued} queued"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Iterator[Any]:
    with cpullm.load(smollm2_gguf.parent / "int8") as m:  # what `cpullm serve` loads by default
        yield m


@pytest.fixture(scope="module")
def server(model: Any) -> Iterator[Server]:
    s = Server(create_app(model, model_name="smollm2-135m-instruct", max_concurrent=4,
                          cors_origins=["http://localhost:3000"]))
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed(model: Any) -> Iterator[Server]:
    s = Server(create_app(model, model_name="smollm2-135m-instruct", api_key=API_KEY, max_concurrent=1))
    yield s
    s.close()


def post(server: Server, path: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=60, **kw)


# --- the API, through the official client -------------------------------------------------------------


def test_models_and_health(server: Server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct"]
    assert server.client().models.retrieve("smollm2-135m-instruct").id == "smollm2-135m-instruct"
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "smollm2-135m-instruct"


def test_chat_streamed_equals_non_streamed_and_the_python_api(server: Server, model: Any) -> None:
    client = server.client()
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0,
                                           max_tokens=24)
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert "Paris" in text
    prompt_ids = model.tokenizer.apply_chat_template(QUESTION)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert text == model.chat().send(QUESTION[0]["content"], temperature=0, max_tokens=24)

    chunks = list(client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # really in pieces
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [reply.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_completion_streamed_equals_non_streamed_and_the_python_api(server: Server, model: Any) -> None:
    client = server.client()
    prompt = "The capital of France is"
    reply = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=12)
    text = reply.choices[0].text
    assert reply.object == "text_completion" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    assert text == model.generate(prompt, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    ids = model.tokenizer.encode(prompt)  # token ids as the prompt: the same continuation
    assert client.completions.create(model="m", prompt=ids, temperature=0, max_tokens=12).choices[0].text == text


def test_stop_strings_and_finish_reasons(server: Server) -> None:
    client = server.client()
    full = client.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=16).choices[0]
    assert full.finish_reason == "length" and " 7," in full.text
    cut = client.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=16, stop=[" 7", "x"])
    assert cut.choices[0].text == full.text[: full.text.index(" 7")] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=16,
                                            stop=" 7", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="m", messages=QUESTION, temperature=0)  # no max_tokens: until EOS
    assert chat.choices[0].finish_reason == "stop" and "Paris" in chat.choices[0].message.content


def test_sampling_is_reproducible_with_a_seed_and_takes_the_extensions(server: Server) -> None:
    client = server.client()
    extra = {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1}
    runs = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story."}],
                                           temperature=1.0, top_p=0.95, seed=7, max_tokens=20,
                                           extra_body=extra).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]
    other = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story."}],
                                           temperature=1.0, top_p=0.95, seed=8, max_tokens=20, extra_body=extra)
    assert other.choices[0].message.content != runs[0]


def test_a_continued_conversation_reuses_the_cache(server: Server, model: Any) -> None:
    client = server.client()
    first = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=24)
    messages = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content},
                           {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]}]
    second = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24)
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    session = model.chat()  # the same conversation through the Python API
    session.send(QUESTION[0]["content"], temperature=0, max_tokens=24)
    assert second.choices[0].message.content == session.send("And of Italy?", temperature=0, max_tokens=24)


def test_load_8_concurrent_streaming_clients(server: Server) -> None:
    """8 clients, 3 streamed requests each, at once (4 generated at a time, the rest queued): every one
    completes, with exactly the text a lone request gets."""
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello."]
    client = server.client()
    expected = {q: client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                                  temperature=0, max_tokens=12).choices[0].message.content
                for q in questions}

    def one_client(i: int) -> list[tuple[str, str, str | None]]:
        c = server.client()
        out = []
        for r in range(3):
            q = questions[(i + r) % len(questions)]
            stream = c.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], temperature=0,
                                               max_tokens=12, stream=True)
            pieces, reason = [], None
            for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    reason = chunk.choices[0].finish_reason or reason
            out.append((q, "".join(pieces), reason))
        return out

    completed_before = server.engine.completed
    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(one_client, range(8)) for r in rs]
    assert len(results) == 24
    for q, text, reason in results:
        assert text == expected[q] and reason in ("stop", "length")
    assert server.engine.completed - completed_before == 24
    server.wait_idle()


def test_requests_are_interleaved_round_robin(model: Any) -> None:
    """Two requests at once both make progress token by token: neither waits for the other to end."""
    import asyncio

    from cpullm.server.engine import Engine, Job

    engine = Engine(model, max_concurrent=2)
    order: list[int] = []

    async def run() -> None:
        jobs = [Job(model.tokenizer.encode(p), model.sampling_params(temperature=0), 10, (), chat=False)
                for p in ("1, 2, 3,", "a, b, c,")]
        for job in jobs:
            original = job._emit
            job._emit = lambda event, job=job, original=original: (order.append(job.id), original(event))  # type: ignore
            engine.submit(job)
        for job in jobs:
            async for _ in job.events():
                pass

    try:
        asyncio.run(run())
    finally:
        engine.close()
    first = order[0]
    assert order.index(next(i for i in order if i != first)) < order.count(first) - 1


# --- bad requests: a 4xx in OpenAI's shape, never a 500 ------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BAD = [
    (CHAT, {"model": "m"}, "messages"),
    (CHAT, {"messages": "hello"}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"content": "hi"}]}, "role"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    (CHAT, {"messages": [{"role": "user", "content": 42}]}, "content"),
    (CHAT, {"messages": [{"role": "user"}]}, "content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "text"),
    (CHAT, {"messages": QUESTION, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": QUESTION, "temperature": -1}, "temperature"),
    (CHAT, {"messages": QUESTION, "top_p": 1.5}, "top_p"),
    (CHAT, {"messages": QUESTION, "top_k": 2.5}, "top_k"),
    (CHAT, {"messages": QUESTION, "min_p": 2}, "min_p"),
    (CHAT, {"messages": QUESTION, "repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"messages": QUESTION, "seed": -3}, "seed"),
    (CHAT, {"messages": QUESTION, "max_tokens": "10"}, "max_tokens"),
    (CHAT, {"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": QUESTION, "max_tokens": 10**9}, "8192"),
    (CHAT, {"messages": QUESTION, "n": 2}, "'n'"),
    (CHAT, {"messages": QUESTION, "stop": [1]}, "stop"),
    (CHAT, {"messages": QUESTION, "stop": ""}, "stop"),
    (CHAT, {"messages": QUESTION, "stream": "yes"}, "stream"),
    (CHAT, {"messages": QUESTION, "stream_options": []}, "stream_options"),
    (CHAT, {"messages": QUESTION, "stream_options": {"include_usage": True}}, "only allowed when 'stream' is true"),
    (CHAT, {"messages": QUESTION, "user": 5}, "'user' must be a string"),
    (CHAT, {"messages": QUESTION, "guided_json": {"type": "object"}}, "no constrained decoding"),
    (COMPLETIONS, {"prompt": "hi", "grammar": "root ::= \"a\""}, "no constrained decoding"),
    (CHAT, {"messages": QUESTION, "model": 7}, "model"),
    (CHAT, {"messages": QUESTION, "logprobs": True}, "logprobs"),
    (CHAT, {"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"messages": QUESTION, "presence_penalty": 0.5}, "presence_penalty"),
    (CHAT, {"messages": QUESTION, "temperature": float("nan")}, "temperature"),
    (COMPLETIONS, {"model": "m"}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": 42}, "prompt"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, "one per request"),
    (COMPLETIONS, {"prompt": [1, 2, 10**7]}, "token ids"),
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "echo": True}, "echo"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, "max_tokens"),
]


@pytest.mark.parametrize("path,body,needle", BAD, ids=[f"{p.split('/')[-1]}-{n}-{i}" for i, (p, _, n) in enumerate(BAD)])
def test_bad_request_is_a_400_naming_the_problem(server: Server, path: str, body: Any, needle: str) -> None:
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert needle in error["message"], error["message"]


@pytest.mark.parametrize("body", [b"{\"messages\": [", b"", b"[1, 2]", b"null", b"\xff\xfe", b"{\"a\": NaN",
                                  b"[" * 100_000, b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                                  b'{"prompt": "\\udfff"}'])
def test_malformed_json_is_a_400(server: Server, body: bytes) -> None:
    response = post(server, CHAT, body)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_the_context_limits_are_400s_that_name_both_lengths(server: Server) -> None:
    long = post(server, COMPLETIONS, {"prompt": "hello " * 9000, "max_tokens": 4})
    assert long.status_code == 400
    message = long.json()["error"]["message"]
    assert "9001 tokens" in message and "8192 tokens" in message  # the prompt and the context
    assert long.json()["error"]["code"] == "context_length_exceeded"
    n = len(server.app.state.engine.model.tokenizer.encode("hello"))
    huge = post(server, COMPLETIONS, {"prompt": "hello", "max_tokens": 8193 - n})
    message = huge.json()["error"]["message"]
    assert huge.status_code == 400 and f"max_tokens is {8193 - n}" in message and "8192 tokens" in message
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client().chat.completions.create(model="m", messages=QUESTION, max_tokens=100_000)
    ok = post(server, COMPLETIONS, {"prompt": "hello", "max_tokens": 2})  # the server goes on
    assert ok.status_code == 200


def test_openai_defaults_and_other_servers_conventions(server: Server) -> None:
    """A completion without max_tokens stops after 16 tokens (OpenAI's default there; a chat goes on to
    the end of its turn); seed -1 means no seed (llama.cpp's clients); top_p 0 keeps the most likely
    token, as OpenAI allows."""
    reply = post(server, COMPLETIONS, {"prompt": "Once upon a time", "temperature": 0}).json()
    assert reply["usage"]["completion_tokens"] == 16 and reply["choices"][0]["finish_reason"] == "length"
    greedy = post(server, CHAT, {"messages": QUESTION, "temperature": 0, "max_tokens": 12}).json()
    for extra in ({"temperature": 1.0, "top_p": 0}, {"temperature": 0, "seed": -1}):
        response = post(server, CHAT, {"messages": QUESTION, "max_tokens": 12, **extra})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"] == greedy["choices"][0]["message"]


def test_a_prompt_too_long_for_any_tokenization_is_refused_at_once(server: Server) -> None:
    """Megabytes of prompt are refused by their length in characters (the rendered chat's: what a
    template drops does not count), before the tokenizer would spend seconds on them holding up every
    other request."""
    start = time.monotonic()
    for path, body in ((CHAT, {"messages": [{"role": "user", "content": "a " * 3_000_000}]}),
                       (COMPLETIONS, {"prompt": "a " * 3_000_000})):
        response = post(server, path, body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        chars = int(response.json()["error"]["message"].split(" characters")[0].split()[-1])
        assert 6_000_000 <= chars < 6_001_000  # the text, with the chat template's additions (a system message)
    assert time.monotonic() - start < 3  # tokenizing one of them took ~7 s


def test_unknown_routes_methods_and_oversized_bodies(server: Server) -> None:
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    slash = httpx.post(server.url + CHAT + "/", content=b"{}")  # no redirect to follow
    assert slash.status_code == 404 and slash.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["message"]
    assert httpx.get(server.url + CHAT).status_code == 405
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")
    big = post(server, CHAT, b"{\"messages\": \"" + b"x" * (9 * 1024 * 1024) + b"\"}")
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]


def test_cors_only_for_the_allowed_origins(server: Server, keyed: Server) -> None:
    preflight = {"origin": "http://localhost:3000", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    r = httpx.options(server.url + CHAT, headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = httpx.options(server.url + CHAT, headers={**preflight, "origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/models", headers={"origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in httpx.get(keyed.url + "/health",
                                                          headers={"origin": "http://localhost:3000"}).headers


def test_api_key(keyed: Server) -> None:
    assert httpx.get(keyed.url + "/health").status_code == 200  # open, for load balancers
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {API_KEY}"}):
        r = httpx.post(keyed.url + CHAT, json={"messages": QUESTION}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").chat.completions.create(model="m", messages=QUESTION, max_tokens=2)
    reply = keyed.client(API_KEY).chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=8)
    assert "Paris" in reply.choices[0].message.content


# --- clients that go away ------------------------------------------------------------------------------


def test_disconnect_mid_stream_stops_the_generation(server: Server) -> None:
    server.wait_idle()
    cancelled = server.engine.cancelled
    body = {"prompt": "1, 2, 3, 4,", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + COMPLETIONS, json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        data = []
        for line in lines:
            if line.startswith("data: "):
                data.append(line)
            if len(data) >= 5:
                break
        assert server.engine.active == 1
    start = time.monotonic()
    server.wait_idle(timeout=10)  # 4000 tokens would take minutes: the generation stopped
    assert server.engine.cancelled == cancelled + 1
    reply = server.client().completions.create(model="m", prompt="The capital of France is", max_tokens=4,
                                               temperature=0)  # served promptly
    assert reply.choices[0].text and time.monotonic() - start < 20


def test_disconnect_while_waiting_for_a_non_streamed_reply(server: Server) -> None:
    server.wait_idle()
    cancelled = server.engine.cancelled
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + COMPLETIONS, json={"prompt": "1, 2, 3,", "max_tokens": 4000, "temperature": 0},
                   timeout=httpx.Timeout(60, read=1.0))
    server.wait_idle(timeout=10)
    assert server.engine.cancelled == cancelled + 1


def test_disconnect_of_queued_requests(keyed: Server) -> None:
    """With one request at a time, a client that leaves the queue never runs; the one running goes on."""
    keyed.wait_idle()
    cancelled, completed = keyed.engine.cancelled, keyed.engine.completed
    headers = {"authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "1, 2, 3,", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", keyed.url + COMPLETIONS, json=body, headers=headers, timeout=60) as first:
        lines = first.iter_lines()
        next(lines)
        with httpx.stream("POST", keyed.url + COMPLETIONS, json=body, headers=headers, timeout=60) as second:
            assert second.status_code == 200
            deadline = time.monotonic() + 10
            while keyed.engine.queued != 1:
                assert time.monotonic() < deadline, "the second request was not queued"
                time.sleep(0.01)
        deadline = time.monotonic() + 10
        while keyed.engine.queued:
            assert time.monotonic() < deadline, "the abandoned request is still queued"
            time.sleep(0.01)
        assert keyed.engine.active == 1
        data = [line for _, line in zip(range(20), lines) if line]  # the first goes on
        assert len(data) == 10 and all(line.startswith("data: {") for line in data)
    keyed.wait_idle()
    assert keyed.engine.cancelled == cancelled + 2 and keyed.engine.completed == completed


def test_queue_full_is_a_503(model: Any) -> None:
    import asyncio

    from cpullm.server.engine import Engine, Job, QueueFullError

    engine = Engine(model, max_concurrent=1, max_queued=1)

    async def run() -> None:
        jobs = [Job([1, 2, 3], model.sampling_params(temperature=0), 50, (), chat=False) for _ in range(3)]
        engine.submit(jobs[0])
        engine.submit(jobs[1])
        with pytest.raises(QueueFullError, match="busy"):
            engine.submit(jobs[2])
        for job in jobs[:2]:
            engine.cancel(job)

    try:
        asyncio.run(run())
    finally:
        engine.close()


def test_a_failing_generation_fails_alone(model: Any) -> None:
    """A fault inside one generation ends that request with an error event; the next one is served."""
    import asyncio

    from cpullm.server.engine import Engine, Job

    engine = Engine(model, max_concurrent=1)
    original, calls = engine._decode_step, []

    def fail_once(job: Any) -> None:
        if not calls:
            calls.append(job)
            raise RuntimeError("injected fault")
        original(job)

    engine._decode_step = fail_once  # type: ignore[method-assign]

    async def run() -> list[Any]:
        finals = []
        for _ in range(2):
            job = Job([1, 2, 3], model.sampling_params(temperature=0), 4, (), chat=False)
            engine.submit(job)
            finals.append([e async for e in job.events()][-1])
        return finals

    try:
        failed, served = asyncio.run(run())
    finally:
        engine.close()
    assert "injected fault" in failed.error and served.error is None and served.finish_reason == "length"
    assert engine.completed == 1


# --- the command ---------------------------------------------------------------------------------------


def test_cpullm_serve_command(smollm2_gguf: Path, cpullm_home: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "CPULLM_HOME": str(cpullm_home), "CPULLM_API_KEY": API_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "cpullm", "serve", "--port", str(port), "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted = False
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0,
                                               max_tokens=8)
        assert "Paris" in reply.choices[0].message.content
        # Ctrl-C with a stream running: the stream ends at once with an error event, the server exits.
        body = {"prompt": "1, 2, 3,", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {API_KEY}"}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGINT)
            interrupted = True
            rest = [line for line in lines if line]
        assert "shutting down" in json.loads(rest[-1][6:])["error"]["message"]
    finally:
        if not interrupted:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/v1" in out


def test_serve_without_the_extra_is_a_one_line_error() -> None:
    code = ("import sys; sys.modules['starlette'] = None; from cpullm.cli import main; "
            "sys.exit(main(['serve', 'no-such-model']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cpullm: error: the server needs the optional package 'starlette': pip install 'cpullm[server]'"]


def test_a_long_prompt_is_prefilled_in_chunks_to_the_same_result(server: Server, model: Any) -> None:
    """A prompt longer than the engine's prefill chunk (256) runs in several steps, interleaved with other
    requests, and still continues exactly as the Python API does."""
    prompt = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box." for i in range(80)) + " Item 80:"
    assert len(model.tokenizer.encode(prompt)) > 2 * 256 + 10
    reply = server.client().completions.create(model="m", prompt=prompt, temperature=0, max_tokens=8)
    assert reply.choices[0].text == model.generate(prompt, max_tokens=8, temperature=0)
    raw = post(server, COMPLETIONS, {"prompt": prompt, "temperature": 0, "max_tokens": 8, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]) == reply.choices[0].text


def test_a_long_prompt_with_fast_prefill_continues_as_one_call(smollm2_gguf: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With fast prefill the chunks before the last fill the cache without logits (need_logits=False:
    Sequence.feed, whose cache equals one call's, tests/test_llama_parity.py), so no chunk boundary keeps
    a two-digit row, and the server's text is the Python API's, which runs the prompt in one call."""
    import cpullm.server.engine as engine_module

    asked: list[bool] = []
    real_prefill = engine_module.prefill

    def recording_prefill(*args: Any, need_logits: bool = True, **kwargs: Any) -> Any:
        asked.append(need_logits)
        return real_prefill(*args, need_logits=need_logits, **kwargs)

    monkeypatch.setattr(engine_module, "prefill", recording_prefill)
    prompt = " ".join(f"Step {i}: move the {['cup', 'plate', 'fork'][i % 3]} left." for i in range(70)) + " Step 70:"
    with cpullm.load(smollm2_gguf.parent / "int8", fast_prefill=True) as fast:
        n = len(fast.tokenizer.encode(prompt))
        assert n > 2 * 256 + 10
        s = Server(create_app(fast, model_name="m", max_concurrent=1))
        try:
            reply = s.client().completions.create(model="m", prompt=prompt, temperature=0, max_tokens=12)
        finally:
            s.close()
        assert asked == [False] * (-(-n // 256) - 1) + [True]
        assert reply.choices[0].text == fast.generate(prompt, max_tokens=12, temperature=0)
