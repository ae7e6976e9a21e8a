"""``cpullm bench``: load time, prefill and decode speed, time to first token and peak memory of one
model on this machine, as medians over repeats, on a fixed synthetic prompt."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import _C


@dataclass
class BenchResult:
    model: str
    dtype: str
    kv_cache_dtype: str
    fast_prefill: bool
    threads: int
    isa: str
    prompt_tokens: int
    gen_tokens: int
    repeats: int
    weights_mb: float
    load_s: float
    prefill_tok_s: float
    ttft_ms: float
    decode_tok_s: float
    peak_rss_mb: float


def synthetic_prompt(vocab_size: int, n: int) -> np.ndarray:
    """A fixed pseudo-random prompt: the same ids for every run, machine and version."""
    low = min(100, vocab_size // 4)
    return np.random.default_rng(1234).integers(low, vocab_size - low, n).astype(np.int32)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS; MB here are 10^6 bytes, as weights_mb's.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024) / 1e6


def run_bench(model_path: str, *, dtype: str | None, threads: int | None, prompt_tokens: int, gen_tokens: int,
              repeats: int, kv_cache_dtype: str | None = None, fast_prefill: bool = False) -> BenchResult:
    from .loader import load

    if prompt_tokens < 1 or gen_tokens < 1 or repeats < 1:
        raise ValueError("prompt tokens, generated tokens and repeats must all be >= 1")
    load_times, prefill, ttft, decode = [], [], [], []
    model: Any = None
    sequence: Any = None
    for _ in range(repeats):
        if model is not None:
            sequence = None  # it holds the previous model's weights: peak RSS would count two models
            model.close()
        start = time.perf_counter()
        model = load(model_path, dtype=dtype, threads=threads, kv_cache_dtype=kv_cache_dtype, fast_prefill=fast_prefill)
        load_times.append(time.perf_counter() - start)
        if prompt_tokens + gen_tokens > model.spec.max_context:
            raise ValueError(f"{prompt_tokens} + {gen_tokens} tokens exceed the context length {model.spec.max_context}")
        prompt = synthetic_prompt(model.spec.vocab_size, prompt_tokens)
        sequence = model._new_sequence()
        sequence.reserve(prompt_tokens + gen_tokens)
        start = time.perf_counter()
        logits = sequence.forward(prompt, False, model.threads)
        token = int(np.argmax(logits[-1]))
        first = time.perf_counter() - start
        ttft.append(first)
        prefill.append(prompt_tokens / first)
        step = np.empty(1, dtype=np.int32)
        start = time.perf_counter()
        for _ in range(gen_tokens):
            step[0] = token
            token = int(np.argmax(sequence.forward(step, False, model.threads)[-1]))
        decode.append(gen_tokens / (time.perf_counter() - start))
    result = BenchResult(
        model=str(model_path), dtype=model.dtype, kv_cache_dtype=model.kv_cache_dtype,
        fast_prefill=model.fast_prefill and model.dtype == "int8", threads=model.threads,
        isa=_C.get_isa(),
        prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
        weights_mb=round(model.weights_bytes / 1e6, 1),
        load_s=round(statistics.median(load_times), 4),
        prefill_tok_s=round(statistics.median(prefill), 1),
        ttft_ms=round(1000 * statistics.median(ttft), 1),
        decode_tok_s=round(statistics.median(decode), 2),
        peak_rss_mb=round(_peak_rss_mb(), 1),
    )
    model.close()
    return result


def format_result(result: BenchResult, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(result))
    rows = [
        ("model", result.model),
        ("dtype / KV cache / threads / kernels",
         f"{result.dtype} / {result.kv_cache_dtype} / {result.threads} / {result.isa}"
         + (" / fast prefill" if result.fast_prefill else "")),
        ("weights", f"{result.weights_mb:.1f} MB"),
        ("load", f"{result.load_s * 1000:.1f} ms"),
        (f"prefill ({result.prompt_tokens} tokens)", f"{result.prefill_tok_s:.1f} tok/s"),
        ("time to first token", f"{result.ttft_ms:.1f} ms"),
        (f"decode ({result.gen_tokens} tokens)", f"{result.decode_tok_s:.2f} tok/s"),
        ("peak RSS", f"{result.peak_rss_mb:.1f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"(medians of {result.repeats} runs)")
    return "\n".join(lines)
