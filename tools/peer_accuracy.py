#!/usr/bin/env python3
"""How closely each engine of tools/bench_peers.py follows transformers f32 on real text: teacher-forced,
the share of positions whose most likely next token is transformers' (top-1 agreement) and the ratio of
perplexities, over the same windows of the same token ids for every engine.

    python tools/peer_accuracy.py [--model smollm2|llama-1b-shape] [--engines ...] [--tokens 4096]
                                  [--window 512] [--threads 2] [--peers-python PY] [--work DIR] [--json OUT]

The engines read the files bench_peers builds (same --work). Every window is one forward pass that returns
every position's logits (cpullm's `Model.logits`, llama.cpp with `logits_all`, CTranslate2's
`forward_batch`), so cpullm's int8 rows all take two activation digits there. Fast prefill changes only
rows whose logits are not read, so the -fast engines are scored as `tools/int8_accuracy.py --generated N`
scores generation: each window cut at prompt lengths N + 1, 2N + 1, ..., the prompt one pass (its last row
predicts the first generated token), the next N - 1 tokens fed in one pass with every logit read. Every
other engine quantizes each row's activations alike whichever rows it was given with, so its
teacher-forced logits at those positions are what that protocol would give it, up to summation order
where a kernel's choice depends on the batch size: the second column scores every engine on those
positions (--generated, default 32). Each engine runs in its own process; llama-cpp-python
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
from bench_peers import ENGINES, MODELS, ct2_generator, prepare  # noqa: E402
from int8_accuracy import DEFAULT_TEXT, log_softmax, windows  # noqa: E402

REFERENCE = "transformers-f32"


def generated_positions(chunks: list[list[int]], step: int) -> list[int]:
    """Where int8_accuracy.evaluate_generated's predictions fall among worker's (every window's positions
    but its last, window after window), in its order."""
    positions, offset = [], 0
    for chunk in chunks:
        for p in range(step + 1, len(chunk) - step + 1, step):
            positions += range(offset + p - 1, offset + p + step - 1)
        offset += len(chunk) - 1
    return positions


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
        generator, tok = ct2_generator(engine, path, threads)
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


def worker(engine: str, path: str, threads: int, chunks: list[list[int]], step: int) -> dict[str, Any]:
    """Per position of every window but its last: the top-1 id and the log-likelihood of the next token;
    for the -fast engines only at generated_positions(chunks, step)."""
    if engine.startswith("cpullm") and engine.endswith("-fast"):
        import cpullm
        from int8_accuracy import evaluate_generated

        model = cpullm.load(path, threads=threads, fast_prefill=True)
        top1, loglik = evaluate_generated(model, chunks, step)
        return {"top1": top1.tolist(), "loglik": loglik.tolist(), "generated_only": True}
    logits_of = window_logits(engine, path, threads, max(len(c) for c in chunks))
    top1, loglik = [], []
    for chunk in chunks:
        logp = log_softmax(logits_of(chunk))[:-1]
        targets = np.asarray(chunk[1:])
        top1 += logp.argmax(axis=-1).tolist()
        loglik += logp[np.arange(len(targets)), targets].tolist()
    return {"top1": top1, "loglik": loglik}


def run_worker_process(python: str, engine: str, path: Path, threads: int, chunks_file: Path,
                       step: int) -> dict[str, Any]:
    cmd = [python, os.path.abspath(__file__), "--worker", engine, "--path", str(path), "--threads", str(threads),
           "--chunks", str(chunks_file), "--generated", str(step)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--engines", nargs="+", choices=ENGINES,
                        default=["cpullm-f32", "cpullm-int8", "cpullm-int8-fast", "cpullm-int8-g64", "cpullm-int8-g64-fast",
                                 "llama.cpp-Q8_0", "ctranslate2-int8", "ctranslate2-int8-avx512"])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generated", type=int, default=32, metavar="N")
    parser.add_argument("--peers-python", default=sys.executable, help="interpreter with llama-cpp-python")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cpullm" / "bench-peers")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generated < 1 or args.window < 2 * args.generated + 1:
        parser.error("--window must hold at least one generation: 2 * --generated + 1 tokens")

    if args.worker:
        chunks = json.loads(args.chunks.read_text())
        print(json.dumps(worker(args.worker, args.path, args.threads, chunks, args.generated)))
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
        results[engine] = run_worker_process(python, engine, paths[engine], args.threads, chunks_file, args.generated)
    generated = generated_positions(chunks, args.generated)

    def scores(result: dict[str, Any], subset: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A worker's top-1 ids and log-likelihoods at the positions SUBSET names ("all" or "generated")."""
        top1, loglik = np.asarray(result["top1"]), np.asarray(result["loglik"])
        if result.get("generated_only"):
            return (top1, loglik) if subset == "generated" else None
        return (top1, loglik) if subset == "all" else (top1[generated], loglik[generated])

    rows = []
    for engine in engines:
        row: dict[str, Any] = {"engine": engine}
        for subset in ("all", "generated"):
            scored = scores(results[engine], subset)
            if scored is None:
                continue
            (top1, loglik), (ref_top1, ref_loglik) = scored, scores(results[REFERENCE], subset)
            ppl, ref_ppl = math.exp(-loglik.mean()), math.exp(-ref_loglik.mean())
            row[subset] = {"positions": int(top1.size), "ppl": ppl, "ppl_ratio": ppl / ref_ppl,
                           "top1_agreement": float(np.mean(top1 == ref_top1))}
        rows.append(row)
    print(f"{args.model}; text {args.text}, windows of {args.window}: all {len(results[REFERENCE]['top1'])} "
          f"predicted positions, and the {len(generated)} that a generation of {args.generated} tokens after "
          f"prompts of {args.generated + 1}, {2 * args.generated + 1}, ... scores; against {REFERENCE}")
    print(f"{'engine':<24} {'ppl ratio':>10} {'top-1 = ref':>12} {'generated: ppl ratio':>21} {'top-1':>8}")
    for row in rows:
        cells = [f"{row[k]['ppl_ratio']:>{w}.4f} {100 * row[k]['top1_agreement']:>{v}.2f}%" if k in row else
                 f"{'-':>{w}} {'-':>{v + 1}}" for k, w, v in (("all", 10, 11), ("generated", 21, 7))]
        print(f"{row['engine']:<24} {cells[0]} {cells[1]}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "text": str(args.text), "window": args.window,
                                         "generated": args.generated, "reference": REFERENCE, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
