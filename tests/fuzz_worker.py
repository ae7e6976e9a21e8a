"""Fuzz worker, run by tests/test_fuzz.py in its own process (so that a crash, a hang or a huge allocation
fails the test instead of killing pytest): mutates a real small model (an HF safetensors directory, a
converted directory or a GGUF file) with hypothesis and loads each mutant with cpullm. Every case must end
in a success (then a short forward pass runs) or an exception of a known family (cpullm.CpullmError,
ValueError, OSError). Anything else (KeyError, TypeError, MemoryError, ...) fails the case; hypothesis
shrinks it and prints it. A case that runs longer than --case-timeout seconds makes faulthandler dump
every thread's stack and exit the process (status 1).

    python tests/fuzz_worker.py SEED [SEED ...] --examples N [--random]

SEED: a model directory or .gguf file. Prints one summary line: cases, loaded, rejected (by family).
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpullm

KNOWN = (cpullm.CpullmError, ValueError, OSError)
INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1,
                    2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
JSON_VALUES = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 7, 96, 2**31 - 1, 2**31, 2**40, 2**63, -(2**63), 10**30]),
    st.integers(-1000, 100000),
    st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), 0.5, 1e6]),
    st.sampled_from([None, True, False, "", "llama", "f32", "int8", "bf16", "F32", "mistral", "linear",
                     "llama3", "yarn", [], {}, [1, 2], {"a": 1}, "x" * 300]),
)


# --- mutations --------------------------------------------------------------------------------------


def _binary_mutation(data: st.DataObject, raw: bytes, hot: list[tuple[int, int]]) -> bytes:
    """One raw change: a byte, an interesting little-endian integer, a truncation, an insertion or a
    deletion, at a position inside one of the `hot` ranges (headers) or anywhere."""
    if not raw:
        return raw
    ranges = [(max(0, a), min(len(raw), b)) for a, b in hot if min(len(raw), b) > max(0, a)] or [(0, len(raw))]
    a, b = data.draw(st.sampled_from(ranges + [(0, len(raw))]), label="range")
    pos = data.draw(st.integers(a, b - 1), label="pos")
    op = data.draw(st.sampled_from(["byte", "flip", "u32", "u64", "truncate", "insert", "delete"]), label="op")
    buf = bytearray(raw)
    if op == "byte":
        buf[pos] = data.draw(st.integers(0, 255))
    elif op == "flip":
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op in ("u32", "u64"):
        fmt, size = ("<I", 4) if op == "u32" else ("<Q", 8)
        value = data.draw(st.one_of(st.sampled_from(INTERESTING_INTS + [len(raw), len(raw) + 1]),
                                    st.integers(0, 2 ** (8 * size) - 1))) % (2 ** (8 * size))
        buf[pos:pos + size] = struct.pack(fmt, value)[: max(0, len(raw) - pos)]
    elif op == "truncate":
        del buf[pos:]
    elif op == "insert":
        buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        del buf[pos:pos + data.draw(st.integers(1, 64))]
    return bytes(buf)


def _json_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_paths(v, prefix + (k,))
    elif isinstance(obj, list) and len(obj) <= 8:
        for i, v in enumerate(obj):
            out += _json_paths(v, prefix + (i,))
    return out


def _json_mutation(data: st.DataObject, obj: Any) -> Any:
    """Replaces or deletes one value anywhere in a JSON document (nested keys included)."""
    paths = _json_paths(obj)
    if not paths:
        return data.draw(JSON_VALUES)
    path = data.draw(st.sampled_from(paths), label="json path")
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES, label="json value")
    return obj


def _safetensors_hot(raw: bytes) -> list[tuple[int, int]]:
    n = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
    return [(0, 8), (8, 8 + min(n, len(raw)))]


def _mutate_safetensors(data: st.DataObject, raw: bytes) -> bytes:
    if data.draw(st.booleans(), label="structured"):
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        names = sorted(k for k in header if k != "__metadata__")
        name = data.draw(st.sampled_from(names), label="tensor")
        entry = header[name]
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "rename", "json"]))
        if field == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I64", "F64", "BOOL",
                                                       "F8_E4M3", "Q4", "", 3]))
        elif field == "shape":
            shape = list(entry["shape"])
            choice = data.draw(st.sampled_from(["set", "append", "drop", "swap"]))
            dim = st.one_of(st.sampled_from([0, 1, -1, 2**31, 2**32 + 1, 2**62, 2**63]), st.integers(0, 1000))
            if choice == "set" and shape:
                shape[data.draw(st.integers(0, len(shape) - 1))] = data.draw(dim)
            elif choice == "append":
                shape.append(data.draw(dim))
            elif choice == "drop" and shape:
                shape.pop()
            else:
                shape.reverse()
            entry["shape"] = shape
        elif field == "data_offsets":
            lo, hi = entry["data_offsets"]
            big = st.one_of(st.sampled_from([0, -1, 2**63, 2**64 + 5, len(raw)]), st.integers(0, len(raw) + 64))
            entry["data_offsets"] = [data.draw(big), hi] if data.draw(st.booleans()) else [lo, data.draw(big)]
        elif field == "delete":
            del header[name]
        elif field == "rename":
            header[data.draw(st.sampled_from(names))] = header.pop(name)
        else:
            header = _json_mutation(data, header)
        body = json.dumps(header).encode()
        if data.draw(st.booleans(), label="pad header"):
            body += b" " * (-len(body) % 8)
        return struct.pack("<Q", len(body)) + body + raw[8 + n:]
    return _binary_mutation(data, raw, _safetensors_hot(raw))


_DATA_START: dict[Path, int] = {}


def _gguf_hot(seed: Path) -> list[tuple[int, int]]:
    """The fixed header and the tensor infos (just before the data) of the unmutated seed file. (Read
    once from the seed: a memory map of a file this worker rewrites would fault.)"""
    if seed not in _DATA_START:
        from gguf import GGUFReader

        reader = GGUFReader(str(seed))
        _DATA_START[seed] = int(reader.data_offset)
        del reader
    start = _DATA_START[seed]
    return [(0, 24), (max(0, start - 2048), start)]


def mutate(data: st.DataObject, seed: Path, case: Path) -> Path:
    """Copies the seed model to `case` with one to three mutations; returns what to load."""
    if seed.is_dir():
        shutil.copytree(seed, case)
        target = case
    else:
        case.mkdir()
        target = case / seed.name
        shutil.copy(seed, target)
    files = sorted(p.name for p in (case.iterdir() if seed.is_dir() else [target]))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        name = data.draw(st.sampled_from(files), label="file")
        path = (case if seed.is_dir() else target.parent) / name
        raw = path.read_bytes()
        if name.endswith(".json") and data.draw(st.integers(0, 4)) > 0:
            try:
                raw = json.dumps(_json_mutation(data, json.loads(raw)), allow_nan=True).encode()
            except ValueError:
                raw = _binary_mutation(data, raw, [(0, len(raw))])
        elif name.endswith(".safetensors"):
            raw = _mutate_safetensors(data, raw) if len(raw) >= 8 and _header_ok(raw) else \
                _binary_mutation(data, raw, [(0, 64)])
        elif name.endswith(".gguf"):
            raw = _binary_mutation(data, raw, _gguf_hot(seed))
        else:
            raw = _binary_mutation(data, raw, [(0, len(raw))])
        path.write_bytes(raw)
    return target


def _header_ok(raw: bytes) -> bool:
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        json.loads(raw[8:8 + n])
        return 8 + n <= len(raw)
    except ValueError:
        return False


# --- the campaign -----------------------------------------------------------------------------------


def run(seeds: list[Path], examples: int, randomize: bool, case_timeout: float) -> collections.Counter:
    outcomes: collections.Counter = collections.Counter()
    for seed in seeds:
        if seed.suffix == ".gguf":
            _gguf_hot(seed)
    work = Path(tempfile.mkdtemp(prefix="cpullm-fuzz-"))
    counter = [0]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=not randomize,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        counter[0] += 1
        seed = data.draw(st.sampled_from(seeds), label="seed")
        directory = work / f"case{counter[0]}"
        target = mutate(data, seed, directory)
        faulthandler.dump_traceback_later(case_timeout, exit=True)
        try:
            with cpullm.load(target, threads=1) as model:
                ids = [i % model.spec.vocab_size for i in (1, 2, 3)]
                logits = model.logits(ids)
                assert logits.shape == (3, model.spec.vocab_size)
                list(model.generate_tokens(ids, max_tokens=2))
            outcomes["loaded"] += 1
        except KNOWN as e:
            outcomes[type(e).__name__] += 1
        finally:
            faulthandler.cancel_dump_traceback_later()
            shutil.rmtree(directory, ignore_errors=True)

    try:
        case()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("seeds", nargs="+", type=Path)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--random", action="store_true", help="a new random campaign (default: derandomized)")
    parser.add_argument("--case-timeout", type=float, default=60.0)
    parser.add_argument("--memory-limit-gb", type=float, default=8.0)
    args = parser.parse_args()
    faulthandler.enable()
    if args.memory_limit_gb > 0 and "asan" not in os.environ.get("LD_PRELOAD", ""):
        import resource

        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    outcomes = run(args.seeds, args.examples, args.random, args.case_timeout)
    total = sum(outcomes.values())
    print(f"fuzz: {total} cases: " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
