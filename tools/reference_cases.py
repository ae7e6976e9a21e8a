#!/usr/bin/env python3
"""transformers' answers, recorded on a machine that has torch, checked on one that has not: the way to
test a kernel path on a platform where the test suite's reference cannot run (an Arm machine without a
CPU build of torch, or an emulator, where the suite's `isa` fixture would give the new paths' first
real test).

    python tools/reference_cases.py record DIR [--gguf FILE] [--cases NAME ...]   # needs torch + transformers
    python tools/reference_cases.py check DIR [--isas neon neondot] [--threads 2]

`record` saves the test suite's tiny random models (every architecture of tests/test_architectures.py
and the Llama configs of tests/test_llama_parity.py) into DIR with a prompt and transformers' logits for
it: in f32, and on the same weights rounded to cpullm's int8 (group 32) and back, with cpullm's two-digit
activation quantization stated in torch (tests/conftest.py's hf_logits_digits). With `--gguf FILE` it
also records cpullm's own int8 logits and greedy tokens for that model on this machine's default path.

`check` loads every recorded model with the installed cpullm on each kernel path (default: all the CPU
has) and compares, with the test suite's bounds: f32 prefill and token-by-token decode against
transformers' f32 logits (relative error 2e-5), int8 against the int8 reference (1e-3); a GGUF case
against the recording machine's int8 run (1e-3: the integer sums are exact on every path, the float
epilogue and attention sum in another order) and its greedy tokens. Prints one line per case and path;
exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
F32_TOL = 2e-5  # tests/test_llama_parity.py's F32_TOL
INT8_TOL = 1e-3  # its INT8_VS_DEQUANTIZED_TOL
PROMPT = 70  # past the test models' sliding window (12) and Phi-3's longrope switch (32)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / np.max(np.abs(expected)))


def record(out: Path, gguf: Path | None, gen_tokens: int, only: list[str] | None = None) -> None:
    import torch

    sys.path.insert(0, str(TESTS))
    from conftest import dequantized_copy, hf_logits, hf_logits_digits, tiny_llama_config
    from test_architectures import ARCHS, build
    from test_llama_parity import CONFIGS
    from transformers import LlamaForCausalLM

    models: dict[str, Any] = {name: build(name, seed=len(name)) for name in ARCHS}
    for name, overrides in CONFIGS.items():
        torch.manual_seed(len(name))
        models[f"llama-{name}"] = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    unknown = sorted(set(only or []) - set(models))
    if unknown:
        raise SystemExit(f"reference_cases: no case {', '.join(unknown)} (cases: {', '.join(models)})")
    out.mkdir(parents=True, exist_ok=True)
    for name, hf_model in models.items():
        if only and name not in only:
            continue
        directory = out / name
        hf_model.save_pretrained(directory)
        ids = np.random.default_rng(len(name)).integers(0, hf_model.config.vocab_size, PROMPT)
        # Phi-3's longrope: a prompt longer than original_max_position_embeddings is encoded with the long
        # factors throughout, while decoding up to that length uses the short ones (and then re-encodes
        # the cache), so token-by-token logits match one pass's only from the switch on.
        scaling = getattr(hf_model.config, "rope_scaling", None) or {}
        longrope = scaling.get("rope_type", scaling.get("type")) == "longrope"
        decode_from = hf_model.config.original_max_position_embeddings if longrope else 0
        np.savez(directory / "reference.npz", ids=ids, f32=hf_logits(hf_model, ids),
                 int8=hf_logits_digits(dequantized_copy(hf_model), ids, 0), decode_from=decode_from)
        print(f"recorded {name}")
    if gguf is not None:
        import cpullm

        model = cpullm.load(gguf, dtype="int8")
        ids = np.array(model.tokenizer.encode("The capital of France is"), dtype=np.int64)
        tokens = list(model.generate_tokens(ids, gen_tokens, stop_token_ids=[], temperature=0.0))
        np.savez(out / "gguf.npz", ids=ids, logits=model.logits(ids), tokens=np.array(tokens))
        (out / "gguf.json").write_text(json.dumps({"path": str(Path(gguf).resolve()), "isa": cpullm._C.get_isa()}))
        print(f"recorded {gguf} ({cpullm._C.get_isa()})")


def check(directory: Path, isas: list[str] | None, threads: int, gguf: Path | None) -> bool:
    import cpullm
    from cpullm import _C

    isas = isas or _C.cpu_features()["available_isas"]
    ok = True

    def report(case: str, isa: str, what: str, err: float, bound: float) -> None:
        nonlocal ok
        passed = err < bound
        ok &= passed
        print(f"{'ok  ' if passed else 'FAIL'} {case:28s} {isa:10s} {what:14s} {err:.2e} (< {bound:.0e})")

    cases = sorted(p.parent for p in directory.glob("*/reference.npz"))
    if not cases and not (directory / "gguf.npz").exists():
        print(f"reference_cases: nothing recorded in {directory}", file=sys.stderr)
        return False
    for isa in isas:
        _C.set_isa(isa)
        for case in cases:
            ref = np.load(case / "reference.npz")
            ids = ref["ids"].astype(np.int32)
            f32 = cpullm.load(case, threads=threads)
            report(case.name, isa, "f32 prefill", rel_err(f32.logits(ids), ref["f32"]), F32_TOL)
            sequence = _C.Sequence(f32._model())
            stepped = np.concatenate([sequence.forward(ids[:5], True, threads)] +
                                     [sequence.forward(ids[i:i + 1], True, threads) for i in range(5, len(ids))])
            start = int(ref["decode_from"])
            report(case.name, isa, "f32 decode", rel_err(stepped[start:], ref["f32"][start:]), F32_TOL)
            int8 = cpullm.load(case, dtype="int8", threads=threads, kv_cache_dtype="f32")
            report(case.name, isa, "int8 prefill", rel_err(int8.logits(ids), ref["int8"]), INT8_TOL)
        if (directory / "gguf.npz").exists():
            ref = np.load(directory / "gguf.npz")
            source = json.loads((directory / "gguf.json").read_text())
            model = cpullm.load(gguf or source["path"], dtype="int8", threads=threads)
            report("gguf", isa, "int8 logits", rel_err(model.logits(ref["ids"]), ref["logits"]), INT8_TOL)
            tokens = list(model.generate_tokens(ref["ids"], len(ref["tokens"]), stop_token_ids=[], temperature=0.0))
            recorded = [int(t) for t in ref["tokens"]]
            same = next((i for i, (a, b) in enumerate(zip(tokens, recorded)) if a != b), min(len(tokens), len(recorded)))
            report("gguf", isa, "greedy tokens", float(max(len(tokens), len(recorded)) - same), 1.0)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("dir", type=Path)
    rec.add_argument("--gguf", type=Path, help="also record cpullm's int8 run of this model")
    rec.add_argument("--gen-tokens", type=int, default=24)
    rec.add_argument("--cases", nargs="+", help="record only these models (default: all)")
    chk = sub.add_parser("check")
    chk.add_argument("dir", type=Path)
    chk.add_argument("--isas", nargs="+")
    chk.add_argument("--threads", type=int, default=2)
    chk.add_argument("--gguf", type=Path, help="where the recorded GGUF model lies on this machine")
    args = parser.parse_args()
    if args.command == "record":
        record(args.dir, args.gguf, args.gen_tokens, args.cases)
    elif not check(args.dir, args.isas, args.threads, args.gguf):
        sys.exit(1)


if __name__ == "__main__":
    main()
