#!/usr/bin/env python3
"""Measures this machine's ceilings for LLM inference, so speed figures can be read as fractions of
what the hardware allows:

- read bandwidth (GB/s): threads summing a 1 GiB array; decode reads every weight once per token, so
  its ceiling is bandwidth / bytes per token;
- int8 multiply-add rate (GOP/s, 2 ops per multiply-add): the dot-product instruction of the kernel
  path in use, from registers; prefill's ceiling is this rate / ops per token.

Each figure is the best of several runs (the machine may be shared). Usage:
    python tools/probe.py [--threads 1 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

import cpullm._C as C


def read_bandwidth(threads: int, gib: float = 1.0, runs: int = 7) -> float:
    data = np.ones(int(gib * (1 << 30)) // 8, dtype=np.int64)
    C.probe_read(data, threads)  # fault the pages in
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        C.probe_read(data, threads)
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def int8_rate(threads: int, iterations: int = 20_000_000, runs: int = 5, native: Any = C) -> float:
    """GOP/s of the peak loop on `threads` threads, best of `runs` (`native`: the `_C` extension to time)."""
    native.probe_q8_peak(iterations // 10, threads)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        native.probe_q8_peak(iterations, threads)
        best = min(best, time.perf_counter() - start)
    return 2 * 8 * 32 * iterations * threads / best / 1e9


def probe(threads: list[int]) -> dict:
    return {
        "isa": C.get_isa(),
        "read_gb_s": {t: round(read_bandwidth(t), 2) for t in threads},
        "int8_gop_s": {t: round(int8_rate(t), 1) for t in threads},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = probe(args.threads)
    if args.json:
        print(json.dumps(result))
        return
    print(f"kernel path: {result['isa']}")
    for t in args.threads:
        print(f"{t} thread(s): read {result['read_gb_s'][t]:.1f} GB/s, int8 {result['int8_gop_s'][t]:.0f} GOP/s")


if __name__ == "__main__":
    main()
