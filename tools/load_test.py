#!/usr/bin/env python3
"""A bounded load test of `cpullm serve` (or any OpenAI-compatible server) on loopback.

C concurrent clients each send R streamed chat requests, one after another (greedy, max_tokens N, a few
fixed questions in rotation), and read them as server-sent events. Every request must complete (a
finish_reason, a usage chunk, then [DONE]) with the same text a lone greedy request gets; the script
exits 1 otherwise. It prints throughput (generated tokens per second over the whole run, requests per
second) and latency (time to the first content token and to the end of the reply: p50, p95, max).

    python tools/load_test.py --serve [MODEL] --clients 8 --requests 4 --max-tokens 64
    python tools/load_test.py --url http://127.0.0.1:8000 --api-key KEY

``--serve`` starts ``cpullm serve`` on a free port for the run (extra flags after ``--serve-args``) and
stops it at the end. Needs httpx (in the test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three fruits.",
    "What is 12 times 12?",
    "Give me a tip for learning Python.",
    "Describe a sunset.",
    "Why is the sky blue?",
]


@dataclass
class Result:
    question: str
    text: str
    finish_reason: str | None
    completion_tokens: int
    ttft: float
    total: float
    done: bool


async def one_request(client: httpx.AsyncClient, url: str, headers: dict[str, str], question: str,
                      max_tokens: int) -> Result:
    body = {"model": "default", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    pieces: list[str] = []
    finish = None
    tokens = 0
    done = False
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                content = choice["delta"].get("content")
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    pieces.append(content)
                finish = choice.get("finish_reason") or finish
    total = time.perf_counter() - start
    return Result(question, "".join(pieces), finish, tokens, ttft if ttft is not None else total, total, done)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run(args: argparse.Namespace, url: str) -> int:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout)
    limits = httpx.Limits(max_connections=args.clients + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        questions = QUESTIONS[: max(1, min(len(QUESTIONS), args.clients))]
        reference = {}
        for q in questions:  # one at a time: the answers to check against, and a warm-up
            reference[q] = (await one_request(client, url, headers, q, args.max_tokens)).text

        async def client_task(i: int) -> list[Result]:
            out = []
            for r in range(args.requests):
                out.append(await one_request(client, url, headers, questions[(i + r) % len(questions)],
                                             args.max_tokens))
            return out

        start = time.perf_counter()
        gathered = await asyncio.gather(*(client_task(i) for i in range(args.clients)), return_exceptions=True)
        wall = time.perf_counter() - start
    failures = [g for g in gathered if isinstance(g, BaseException)]
    results = [r for g in gathered if not isinstance(g, BaseException) for r in g]
    wrong = [r for r in results if not r.done or r.finish_reason not in ("stop", "length") or r.text != reference[r.question]]
    tokens = sum(r.completion_tokens for r in results)
    summary: dict[str, Any] = {
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "requests": args.clients * args.requests, "completed": len(results) - len(wrong),
        "failed": len(failures) + len(wrong), "wall_seconds": round(wall, 2),
        "completion_tokens": tokens, "tokens_per_second": round(tokens / wall, 1),
        "requests_per_second": round(len(results) / wall, 2),
        "ttft_seconds": {k: round(v, 3) for k, v in (("p50", percentile([r.ttft for r in results], 0.5)),
                                                     ("p95", percentile([r.ttft for r in results], 0.95)),
                                                     ("max", max((r.ttft for r in results), default=float("nan"))))},
        "latency_seconds": {k: round(v, 3) for k, v in (("p50", percentile([r.total for r in results], 0.5)),
                                                        ("p95", percentile([r.total for r in results], 0.95)),
                                                        ("max", max((r.total for r in results), default=float("nan"))))},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['requests']} requests ({args.clients} clients x {args.requests}, max_tokens "
              f"{args.max_tokens}, greedy, streamed): {summary['completed']} correct, {summary['failed']} failed")
        print(f"wall {wall:.2f} s, {tokens} tokens generated: {summary['tokens_per_second']} tok/s, "
              f"{summary['requests_per_second']} requests/s")
        t, l = summary["ttft_seconds"], summary["latency_seconds"]
        print(f"time to first token: p50 {t['p50']:.3f} s, p95 {t['p95']:.3f} s, max {t['max']:.3f} s")
        print(f"request latency:     p50 {l['p50']:.3f} s, p95 {l['p95']:.3f} s, max {l['max']:.3f} s")
    for failure in failures:
        print(f"client failed: {failure!r}", file=sys.stderr)
    for r in wrong:
        print(f"wrong result for {r.question!r}: done={r.done} finish={r.finish_reason} text={r.text!r}",
              file=sys.stderr)
    return 1 if failures or wrong else 0


def start_server(model: str | None, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "cpullm", "serve", *([model] if model else []), "--port", str(port),
               "--log-level", "warning", *extra]
    proc = subprocess.Popen(command, env={**os.environ, "CPULLM_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"cpullm serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("cpullm serve did not start")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--serve", nargs="?", const="", metavar="MODEL",
                        help="start `cpullm serve [MODEL]` on a free port for the run")
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                        help="further flags for `cpullm serve` (everything after this)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    proc = None
    url = args.url
    if args.serve is not None:
        proc, url = start_server(args.serve or None, args.serve_args)
    try:
        return asyncio.run(run(args, url.rstrip("/")))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())
