#!/usr/bin/env python3
"""The int8 matmul kernel alone, as a share of the machine's int8 dot-product peak, for the matrix
shapes of a model's prefill: made-up data, no quantization or packing inside the timing
(`_C.probe_matmul_q8`; with --threads, row blocks shared out as the model does), each figure next to
the peak loop of the same kernel path on as many threads, timed in the same process (`tools/probe.py`'s).
One-digit rows are fast prefill's, two-digit rows the default's; the two-digit ceiling is half the peak.

A/B runs of kernel variants: each ``--so`` is a separately built ``_C`` extension, timed in a fresh
process, round after round, so that a drift of the machine hits every variant alike (as
tools/ab_forward.py does for the whole forward pass). ``CPULLM_ISA`` picks the kernel path.

    python tools/kernel_bench.py [--so A.so B.so ...] [--shapes smollm2 llama-1b | KxN ...]
                                 [--tokens 128] [--digits 1 2] [--rounds 5] [--repeats 6] [--threads 1]

Prints per variant, shape and digit count the median over rounds of the best call's share of the
peak (and the rounds' range).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from ab_forward import use_extension  # tools/ab_forward.py and tools/probe.py, beside this script
from probe import int8_rate

# The int8 matmuls of one layer, as (inputs K, outputs N): fused QKV, attention output, fused gate / up,
# down projection.
SHAPES = {
    "smollm2": [(576, 960), (576, 576), (576, 3072), (1536, 576)],
    "llama-1b": [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)],
}


def measure(so: str | None, shapes: list[tuple[int, int]], tokens: int, digits: list[int], repeats: int,
            group: int, threads: int) -> list[dict[str, float]]:
    native = use_extension(so)
    results = []
    for K, N in shapes:
        for d in digits:
            seconds = native.probe_matmul_q8(tokens, K, N, group, tokens if d == 1 else 0, repeats, threads)
            peak = int8_rate(threads, 4_000_000, 5, native) * 1e9 / 2  # multiply-adds per second
            results.append({"K": K, "N": N, "digits": d, "share": tokens * K * N / seconds / peak,
                            "gmac_s": tokens * K * N / seconds / 1e9})
    return results


def parse_shapes(names: list[str]) -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    for name in names:
        if name in SHAPES:
            shapes += SHAPES[name]
        else:
            try:
                k, n = (int(v) for v in name.lower().split("x"))
            except ValueError:
                raise SystemExit(f"kernel_bench: a shape is a model ({', '.join(SHAPES)}) or KxN, not {name!r}")
            shapes.append((k, n))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--so", nargs="*", default=[None])
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "llama-1b"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--digits", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=6, help="calls per measurement (the best is kept)")
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)
    if args.worker:
        print(json.dumps(measure(args.so[0], shapes, args.tokens, args.digits, args.repeats, args.group,
                                 args.threads)))
        return
    shares: dict[tuple[str, int, int, int], list[float]] = {}
    for _ in range(args.rounds):
        for so in args.so:
            cmd = [sys.executable, __file__, "--worker", "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                   "--group", str(args.group), "--threads", str(args.threads), "--shapes", *args.shapes, "--digits", *map(str, args.digits)]
            if so:
                cmd += ["--so", so]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # e.g. an extension built before probe_matmul_q8 existed
                raise SystemExit(f"kernel_bench: the worker for {so or 'the installed extension'} failed:\n"
                                 f"{done.stderr.strip()[-2000:]}")
            for r in json.loads(done.stdout.splitlines()[-1]):
                shares.setdefault((so or "installed", r["K"], r["N"], r["digits"]), []).append(r["share"])
    print(f"{args.tokens} tokens, group {args.group}, {args.threads} thread(s); share of the int8 peak, median over "
          f"{args.rounds} rounds [min-max]")
    for K, N in shapes:
        for d in args.digits:
            for so in args.so:
                values = shares[(so or "installed", K, N, d)]
                print(f"K={K} N={N}  {d} digit{'s' if d == 2 else ' '}  {so or 'installed'}: "
                      f"{statistics.median(values):.0%} [{min(values):.0%}-{max(values):.0%}]")


if __name__ == "__main__":
    main()
