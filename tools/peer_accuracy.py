#!/usr/bin/env python3
"""How closely each engine of tools/bench_peers.py follows transformers f32 on real text: teacher-forced,
the share of positions whose most likely next token is transformers' (top-1 agreement) and the ratio of
perplexities, over the same windows of the same token ids for every engine.

    python tools/peer_accuracy.py [--model smollm2|llama-1b-shape] [--engines ...] [--tokens 4096]
                                  [--window 512] [--threads 2] [--peers-python PY] [--work DIR] [--json OUT]

The engines read the files bench_peers builds (same --work). Every window is one forward pass that returns
every position's logits (cpullm's `Model.logits`, llama.cpp with `logits_all`, CTranslate2's
`forward_batch`), so cpullm's int8 rows all take two activation digits here: fast prefill changes only rows
whose logits are not read, and `tools/int8_accuracy.py --generated 32 --fast-prefill` measures it on the
tokens a generation would show. The single-digit engines (llama.cpp Q8_0, CTranslate2 int8) quantize every
row alike, so this is also their generation's accuracy. Each engine runs in its own process; llama-cpp-python
may live in another virtual environment (--peers-python). The default text is the GNU GPL v3 as Debian ships
it, as for tools/int8_accuracy.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import CT2_FORCED_ISA, ENGINES, MODELS, prepare  # noqa: E402
from int8_accuracy import DEFAULT_TEXT, log_softmax, windows  # noqa: E402

REFERENCE = "transformers-f32"
# Logits for every position come back as one pass per window; fast prefill would change nothing here.
ACCURACY_ENGINES = [e for e in ENGINES if not e.endswith("-fast")]


def window_logits(engine: str, path: str, threads: int, window: int):
    """A function from one window of token ids to its logits [len, vocab] (float32), for ENGINE."""
    if engine.startswith("cpullm"):
        import cpullm

        model = cpullm.load(path, threads=threads)
        return lambda ids: model.logits(ids)
    if engine.startswith("llama.cpp"):
        import llama_cpp

        llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=window,
                              n_batch=window, n_ubatch=window, logits_all=True, verbose=False)

        def run(ids: list[int]) -> np.ndarray:
            llm.reset()
            llm.eval(ids)
            return np.array(llm.scores[: len(ids)], dtype=np.float32)

        return run
    if engine.startswith("ctranslate2"):
        if engine in CT2_FORCED_ISA:
            os.environ["CT2_FORCE_CPU_ISA"] = CT2_FORCED_ISA[engine]  # read when the library loads
        else:
            os.environ.pop("CT2_FORCE_CPU_ISA", None)
        import ctranslate2
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        generator = ctranslate2.Generator(path, device="cpu", compute_type="int8", intra_threads=threads)
        return lambda ids: np.asarray(generator.forward_batch([[tok.id_to_token(i) for i in ids]]))[0]
    if engine.startswith("transformers"):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        def run(ids: list[int]) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.tensor([ids])).logits[0].float().numpy()

        return run
    raise ValueError(f"unknown engine {engine}")


def worker(engine: str, path: str, threads: int, chunks: list[list[int]]) -> dict[str, Any]:
    """Per position of every window but its last: the top-1 id and the log-likelihood of the next token."""
    logits_of = window_logits(engine, path, threads, max(len(c) for c in chunks))
    top1, loglik = [], []
    for chunk in chunks:
        logp = log_softmax(logits_of(chunk))[:-1]
        targets = np.asarray(chunk[1:])
        top1 += logp.argmax(axis=-1).tolist()
        loglik += logp[np.arange(len(targets)), targets].tolist()
    return {"top1": top1, "loglik": loglik}


def run_worker_process(python: str, engine: str, path: Path, threads: int, chunks_file: Path) -> dict[str, Any]:
    cmd = [python, os.path.abspath(__file__), "--worker", engine, "--path", str(path), "--threads", str(threads),
           "--chunks", str(chunks_file)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--engines", nargs="+", choices=ACCURACY_ENGINES,
                        default=["cpullm-f32", "cpullm-int8", "cpullm-int8-g64", "llama.cpp-Q8_0", "ctranslate2-int8",
                                 "ctranslate2-int8-avx512"])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers-python", default=sys.executable, help="interpreter with llama-cpp-python")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cpullm" / "bench-peers")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        chunks = json.loads(args.chunks.read_text())
        print(json.dumps(worker(args.worker, args.path, args.threads, chunks)))
        return

    from tokenizers import Tokenizer

    engines = [REFERENCE] + [e for e in args.engines if e != REFERENCE]
    paths = prepare(args.work, engines, args.model)
    tokenizer = Tokenizer.from_file(str(paths["hf"] / "tokenizer.json"))
    ids = tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False).ids[: args.tokens]
    chunks = windows(ids, args.window)
    chunks_file = args.work / "peer-accuracy-chunks.json"
    chunks_file.write_text(json.dumps(chunks))
    results = {}
    for engine in engines:
        python = args.peers_python if engine.startswith("llama.cpp") else sys.executable
        print(f"[peer_accuracy] {engine}", file=sys.stderr, flush=True)
        results[engine] = run_worker_process(python, engine, paths[engine], args.threads, chunks_file)
    reference = results[REFERENCE]
    ref_top1 = np.asarray(reference["top1"])
    ref_ppl = math.exp(-np.mean(reference["loglik"]))
    rows = []
    for engine in engines:
        r = results[engine]
        ppl = math.exp(-np.mean(r["loglik"]))
        rows.append({"engine": engine, "positions": len(r["top1"]), "ppl": ppl, "ppl_ratio": ppl / ref_ppl,
                     "top1_agreement": float(np.mean(np.asarray(r["top1"]) == ref_top1))})
    print(f"{args.model}; text {args.text} ({len(ref_top1)} predicted positions, windows of {args.window}); "
          f"against {REFERENCE}")
    print(f"{'engine':<24} {'perplexity':>11} {'ppl ratio':>10} {'top-1 = ref':>12}")
    for row in rows:
        print(f"{row['engine']:<24} {row['ppl']:>11.4f} {row['ppl_ratio']:>10.4f} {100 * row['top1_agreement']:>11.2f}%")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "text": str(args.text), "window": args.window,
                                         "reference": REFERENCE, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
