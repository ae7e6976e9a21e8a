#!/usr/bin/env python3
"""Prefill and decode speed of the native forward pass alone (no tokenizer, sampling or Python loop
around it), for A/B runs of kernel changes: each ``--so`` is a separately built ``_C`` extension (a
scratch CMake build of a variant), loaded in turn by path in a fresh process, round after round, so a
drift of the machine hits every variant alike. Without ``--so`` the installed extension is timed.

    python tools/ab_forward.py MODEL [--so A.so B.so ...] [--threads 2] [--rounds 3] [--passes 3]
                               [--prompt-tokens 128] [--gen-tokens 48] [--steady] [--kv-cache-dtype f16]
                               [--prefill exact fast]

Prints, per variant, the best prefill and decode tok/s of each round (best of --passes passes within a
round). For `perf record`, one worker alone: ``--worker [--so X.so] --passes N`` after a delay (``-D``)
that skips the load.
With ``--steady`` each pass first sizes the KV cache for the whole run (a pass over prompt + generated
tokens, then truncated to nothing), so that no growth of the cache falls inside the timed window.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from typing import Any


def use_extension(so: str | None) -> Any:
    """The ``_C`` extension at path ``so`` (None: the installed one), made the one cpullm.load builds
    models with, for the rest of this process."""
    import cpullm
    import cpullm.model as model_module

    if not so:
        return cpullm._C
    spec = importlib.util.spec_from_file_location("_C", so)
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    model_module._C = native  # the loader builds the Transformer through this name
    return native


def measure(model_path: str, so: str | None, threads: int, prompt_tokens: int, gen_tokens: int,
            steady: bool = False, kv_cache_dtype: str | None = None, fast_prefill: bool = False,
            passes: int = 3) -> dict[str, float]:
    import numpy as np

    import cpullm
    from cpullm.bench import synthetic_prompt

    native = use_extension(so)
    model = cpullm.load(model_path, threads=threads)
    prompt = synthetic_prompt(model.spec.vocab_size, prompt_tokens)
    one = np.empty(1, np.int32)
    best_prefill = best_decode = 0.0
    for _ in range(passes):
        # (extensions built before the f16 cache take no second argument; None: the model's default)
        kv = kv_cache_dtype or model.kv_cache_dtype
        sequence = native.Sequence(model._model(), *([kv] if kv != "f32" else []))
        if fast_prefill:
            sequence.fast_prefill = True
        if steady:
            sequence.forward(synthetic_prompt(model.spec.vocab_size, prompt_tokens + gen_tokens), False, threads)
            sequence.truncate(0)  # keeps the capacity
        start = time.perf_counter()
        sequence.forward(prompt, False, threads)
        middle = time.perf_counter()
        for j in range(gen_tokens):
            one[0] = 100 + j
            sequence.forward(one, False, threads)
        end = time.perf_counter()
        best_prefill = max(best_prefill, prompt_tokens / (middle - start))
        best_decode = max(best_decode, gen_tokens / (end - middle))
    return {"prefill_tok_s": best_prefill, "decode_tok_s": best_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--so", nargs="*", default=[None])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3, help="passes per round, the best one counted")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--steady", action="store_true", help="size the KV cache before timing")
    parser.add_argument("--kv-cache-dtype", choices=["f32", "f16"], default=None,
                        help="the KV cache's type (default: the model's, f16 for int8 / bf16 weights)")
    parser.add_argument("--prefill", nargs="+", choices=["exact", "fast"], default=["exact"],
                        help="prefill modes to time with each extension (fast: Sequence.fast_prefill)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.model, args.so[0], args.threads, args.prompt_tokens, args.gen_tokens, args.steady,
                                 args.kv_cache_dtype, args.prefill == ["fast"], args.passes)))
        return
    for r in range(args.rounds):
        for so, mode in [(so, mode) for so in args.so for mode in args.prefill]:
            cmd = [sys.executable, __file__, args.model, "--worker", "--threads", str(args.threads),
                   "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                   "--prefill", mode, "--passes", str(args.passes)]
            if args.steady:
                cmd.append("--steady")
            if args.kv_cache_dtype:
                cmd += ["--kv-cache-dtype", args.kv_cache_dtype]
            if so:
                cmd += ["--so", so]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"round {r + 1} {so or 'installed'}{' fast prefill' if mode == 'fast' else ''}: prefill {result['prefill_tok_s']:.1f} tok/s, "
                  f"decode {result['decode_tok_s']:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
