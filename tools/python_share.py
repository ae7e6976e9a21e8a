#!/usr/bin/env python3
"""Python's share of a decoded token in a sampled chat stream: the time outside the native calls (the
decode loop, incremental detokenizing, stop strings, the session's bookkeeping) against the whole turn.
The session's native sequence is wrapped so that every forward call is timed, and so is every call of
the C++ sampler (reported apart); the rest of the turn's wall time is Python's.

    python tools/python_share.py [MODEL] [--threads 2] [--tokens 128] [--repeats 3]
                                 [--temperature 0.7] [--top-k 40] [--top-p 0.95]

Prints, per repeat, the tokens generated, the time per forward call, and the sampler's and Python's time
per token with their shares of the turn.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import cpullm
import cpullm.sampling as sampling


class _Timed:
    """Forwards every attribute to ``inner``, timing calls of its method ``name`` (the timed function is
    made once, so the wrapper adds no work per call beyond the clock)."""

    def __init__(self, inner: Any, name: str) -> None:
        self.inner, self.seconds, self.calls = inner, 0.0, 0
        method = getattr(inner, name)

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            result = method(*args)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return result

        setattr(self, name, timed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.95)
    args = parser.parse_args()
    model = cpullm.load(args.model, threads=args.threads)
    chat = model.chat(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=1)
    for _ in chat.stream("Warm up.", max_tokens=8):
        pass
    for _ in range(args.repeats):
        chat.reset()
        for _ in chat.stream("Hi", max_tokens=8):  # a short first turn, so the timed one is mostly decoding
            pass
        timed = _Timed(chat._sequence, "forward")
        chat._sequence = timed
        native = _Timed(sampling._C, "sample_token")
        sampling._C = native
        start = time.perf_counter()
        for _ in chat.stream("Write a long story about a dragon who learns to cook.", max_tokens=args.tokens):
            pass
        total = time.perf_counter() - start
        sampling._C = native.inner
        chat._sequence = timed.inner
        generated = max(chat.stats.generated_tokens, 1)
        python = total - timed.seconds - native.seconds
        print(f"{generated} tokens: forward {1e3 * timed.seconds / max(timed.calls, 1):.2f} ms a call; C++ sampler "
              f"{1e6 * native.seconds / generated:.0f} us a token = {100 * native.seconds / total:.2f} %; Python "
              f"{1e3 * python / generated:.3f} ms a token = {100 * python / total:.2f} % of the turn", flush=True)


if __name__ == "__main__":
    main()
