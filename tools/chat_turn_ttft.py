#!/usr/bin/env python3
"""Time to first token of a follow-up chat turn: what a user waits for after pressing Enter in
`cpullm chat`. A session answers a first message (greedy, a few tokens), then each timed turn sends a
message whose own tokens, chat template included, number about --turn-tokens; the KV cache holds the
conversation so far, so the turn pre-fills only its own tokens. Reports the median over --repeats of
the time from the call until the first text piece arrives, and the tokens the turn pre-filled.

    python tools/chat_turn_ttft.py [MODEL] [--threads 2] [--turn-tokens 32] [--repeats 7] [--fast-prefill]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import cpullm

# Short follow-up messages, cut or repeated to the wanted length by the tokenizer.
_FILLER = ("And what about the mountains to the north of the valley, and the old roads that cross them "
           "in winter, when the passes are closed and the travellers wait in the villages below? ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct", help="model path (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turn-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fast-prefill", action="store_true", help="fast prefill for the prompt rows (cpullm.load's)")
    args = parser.parse_args()

    model = cpullm.load(args.model, threads=args.threads, fast_prefill=args.fast_prefill)
    tokenizer = model.tokenizer
    words = _FILLER.split()
    times, prefilled = [], []
    offset = 0  # tokens a turn pre-fills beyond its rendered message (the previous answer's end marker)
    for repeat in range(args.repeats + 1):  # the first pass only measures the offset
        session = model.chat()
        session.send("Tell me about a valley.", max_tokens=16, temperature=0)
        before = len(session.prompt_ids())
        n = 1
        while n < len(words) and len(session.prompt_ids(" ".join(words[: n + 1]))) - before + offset <= args.turn_tokens:
            n += 1
        message = " ".join(words[:n])
        rendered = len(session.prompt_ids(message)) - before
        start = time.perf_counter()
        for piece in session.stream(message, max_tokens=8, temperature=0):
            if piece:
                elapsed = time.perf_counter() - start
                break
        if repeat == 0:
            offset = session.stats.processed_tokens - rendered
            continue
        times.append(elapsed)
        prefilled.append(session.stats.processed_tokens)
    result = {"threads": args.threads, "fast_prefill": args.fast_prefill, "turn_tokens": statistics.median(prefilled),
              "ttft_ms_median": 1000 * statistics.median(times), "ttft_ms_all": [round(1000 * t, 1) for t in times]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
