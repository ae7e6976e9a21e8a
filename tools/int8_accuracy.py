#!/usr/bin/env python3
"""How much int8 costs in accuracy on real text, with teacher forcing.

For each group size: the share of positions where the int8 model's top-1 token equals the f32
model's, and the ratio of their perplexities on the text. With ``--kv-cache-dtypes f32 f16`` every row
is also measured with an f16 KV cache (and f32 weights with one), against f32 weights and cache.
``--generated N`` scores generation instead of whole windows: each window is cut at prompt lengths N + 1,
2N + 1, ...; the prompt is one forward pass whose last row's logits predict the first generated token (as
in a chat turn), then the next N - 1 tokens are fed in one pass with every logit read (teacher-forced
decoding: two-digit rows either way), and those N predictions are scored. ``--fast-prefill`` adds an int8 row
with Model.fast_prefill for each group size (with --generated: the prompt's rows then take one digit).
Usage:

    python tools/int8_accuracy.py MODEL [--text FILE] [--tokens 4096] [--window 512] [--group-sizes 32 64 128]
                                  [--kv-cache-dtypes f32 f16] [--generated 32] [--fast-prefill]

MODEL is anything cpullm.load accepts that is not already quantized (a Hugging Face directory or a GGUF
file). The default text is the GNU GPL v3 as Debian ships it (/usr/share/common-licenses/GPL-3): real
English prose that every Debian machine has.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import cpullm

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def evaluate(model: cpullm.Model, chunks: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 predictions and the log-likelihood of each actual next token, over all chunks."""
    top1, loglik = [], []
    for chunk in chunks:
        logp = log_softmax(model.logits(chunk))[:-1]
        targets = np.asarray(chunk[1:])
        top1.append(logp.argmax(axis=-1))
        loglik.append(logp[np.arange(len(targets)), targets])
    return np.concatenate(top1), np.concatenate(loglik)


def evaluate_generated(model: cpullm.Model, chunks: list[list[int]], step: int) -> tuple[np.ndarray, np.ndarray]:
    """Like evaluate, over the predictions --generated scores (see the module's docstring)."""
    top1, loglik = [], []
    for chunk in chunks:
        for p in range(step + 1, len(chunk) - step + 1, step):
            sequence = model._new_sequence()
            first = sequence.forward(np.asarray(chunk[:p], np.int32), False, model.threads)
            rest = sequence.forward(np.asarray(chunk[p : p + step - 1], np.int32), True, model.threads)
            logp = log_softmax(np.concatenate([first, rest]))
            targets = np.asarray(chunk[p : p + step])
            top1.append(logp.argmax(axis=-1))
            loglik.append(logp[np.arange(len(targets)), targets])
    return np.concatenate(top1), np.concatenate(loglik)


def main() -> None:
    import cpullm  # here, so that tools/peer_accuracy.py's workers can import the helpers above without it

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache-dtypes", nargs="+", choices=["f32", "f16"], default=["f32"])
    parser.add_argument("--generated", type=int, default=0, metavar="N")
    parser.add_argument("--fast-prefill", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    def scored(model: cpullm.Model) -> tuple[np.ndarray, np.ndarray]:
        return evaluate_generated(model, chunks, args.generated) if args.generated else evaluate(model, chunks)

    reference = cpullm.load(args.model, dtype="f32", threads=args.threads)
    if reference.tokenizer is None:
        raise SystemExit("the model has no tokenizer")
    ids = reference.tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False)[: args.tokens]
    chunks = windows(ids, args.window)
    ref_top1, ref_ll = scored(reference)
    ref_ppl = math.exp(-ref_ll.mean())
    rows = [{"dtype": "f32", "group_size": None, "kv_cache_dtype": "f32", "fast_prefill": False,
             "positions": int(ref_ll.size), "ppl": ref_ppl, "top1_agreement": 1.0, "ppl_ratio": 1.0}]

    def measure(model: cpullm.Model, group: int | None) -> None:
        for kv in args.kv_cache_dtypes:
            if model.dtype == "f32" and kv == "f32":
                continue  # the reference itself
            model.kv_cache_dtype = kv
            for fast in ([False, True] if args.fast_prefill and model.dtype == "int8" else [False]):
                model.fast_prefill = fast
                top1, ll = scored(model)
                ppl = math.exp(-ll.mean())
                rows.append({"dtype": model.dtype, "group_size": group, "kv_cache_dtype": kv, "fast_prefill": fast,
                             "positions": int(ll.size), "ppl": ppl, "top1_agreement": float((top1 == ref_top1).mean()),
                             "ppl_ratio": ppl / ref_ppl})

    measure(reference, None)
    reference.close()
    for group in args.group_sizes:
        model = cpullm.load(args.model, dtype="int8", group_size=group, threads=args.threads)
        measure(model, group)
        model.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"model {args.model}; text {args.text} ({rows[0]['positions']} predicted positions, windows of {args.window})")
    print(f"{'dtype':<6} {'group':>5} {'KV':>4} {'prefill':>7} {'perplexity':>11} {'ppl ratio':>10} {'top-1 = f32':>12}")
    for r in rows:
        group = "-" if r["group_size"] is None else str(r["group_size"])
        prefill = "fast" if r["fast_prefill"] else "exact"
        print(f"{r['dtype']:<6} {group:>5} {r['kv_cache_dtype']:>4} {prefill:>7} {r['ppl']:>11.4f} {r['ppl_ratio']:>10.4f} "
              f"{100 * r['top1_agreement']:>11.2f}%")


if __name__ == "__main__":
    main()
