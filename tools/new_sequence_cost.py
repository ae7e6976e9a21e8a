#!/usr/bin/env python3
"""What a new sequence's first prefill costs against one that is reused: prefill tok/s of the same
prompt on (a) a new sequence each time, made after the previous one was dropped (as each generate()
call makes one), (b) a new sequence warmed by a 16-token prefill and cut back to nothing first, and
(c) one sequence cut back with truncate(0) between prefills. The three alternate, so a drift of the
machine hits them alike; medians are printed.

    python tools/new_sequence_cost.py MODEL [--threads 1] [--prompt-tokens 128] [--rounds 20] [--so X.so]

With ``--so`` a separately built ``_C`` extension is timed instead of the installed one (as in
tools/ab_forward.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cpullm
from cpullm.bench import synthetic_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_forward import use_extension  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--so", default=None, help="a separately built _C extension to time")
    args = parser.parse_args()
    use_extension(args.so)

    model = cpullm.load(args.model, threads=args.threads)
    prompt = synthetic_prompt(model.spec.vocab_size, args.prompt_tokens)
    positions = args.prompt_tokens + 64
    reused = model._new_sequence()
    reused.reserve(positions)
    reused.forward(prompt, False, args.threads)
    rates: dict[str, list[float]] = {"new": [], "new, warmed": [], "reused": []}
    for _ in range(args.rounds):
        for kind, runs in rates.items():
            if kind == "reused":
                sequence = reused
                sequence.truncate(0)
            else:
                sequence = model._new_sequence()
                sequence.reserve(positions)
                if kind == "new, warmed":
                    sequence.forward(prompt[:16], False, args.threads)
                    sequence.truncate(0)
            start = time.perf_counter()
            sequence.forward(prompt, False, args.threads)
            runs.append(args.prompt_tokens / (time.perf_counter() - start))
            del sequence
    print(", ".join(f"{kind} {statistics.median(runs):.0f}" for kind, runs in rates.items()), "prefill tok/s (medians)")


if __name__ == "__main__":
    main()
