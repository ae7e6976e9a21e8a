#!/usr/bin/env python3
"""What lower-precision attention operands would cost in accuracy, before writing a kernel for them.

Runs a Hugging Face model in transformers (f32, CPU, eager attention) with its attention's operands
rounded to a narrower type (the products and sums stay f32, as an f32-accumulating dot-product
instruction keeps them), and prints, per mode, the teacher-forced top-1 agreement with exact f32
attention, the perplexity ratio and the largest logit difference, over windows of real text:

    f16kv   keys and values in f16 (cpullm's KV cache next to int8 / bf16 weights)
    qk      queries and keys in bf16 (scores by AVX512-BF16 vdpbf16ps)
    qkv     also the values in bf16
    all     also the softmax weights in bf16 (both attention products in bf16)

    python tools/attention_precision.py HF_DIR [--modes f16kv qk qkv all] [--tokens 4096] [--window 512]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

import torch

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
MODES = ["f16kv", "qk", "qkv", "all"]


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(torch.float32)


def attention_with(mode: str, exact: Callable[..., Any], repeat_kv: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """transformers' eager attention with the operands of `mode` rounded (f32 arithmetic throughout)."""

    def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs: Any) -> Any:
        if mode == "f16kv":
            key, value = rounded(key, torch.float16), rounded(value, torch.float16)
        else:
            query, key = rounded(query, torch.bfloat16), rounded(key, torch.bfloat16)
            if mode in ("qkv", "all"):
                value = rounded(value, torch.bfloat16)
        if mode != "all":
            return exact(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        keys = repeat_kv(key, module.num_key_value_groups)
        values = repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = rounded(torch.softmax(scores, dim=-1, dtype=torch.float32), torch.bfloat16)
        return torch.matmul(weights, values).transpose(1, 2).contiguous(), weights

    return attend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    modeling = __import__(type(model).__module__, fromlist=["eager_attention_forward"])
    if not hasattr(modeling, "eager_attention_forward"):
        raise SystemExit(f"{type(model).__name__}: no eager_attention_forward in {modeling.__name__} to replace")
    exact = modeling.eager_attention_forward
    ids = AutoTokenizer.from_pretrained(args.hf_dir)(args.text.read_text(), return_tensors="pt").input_ids[0]
    ids = ids[: args.tokens + 1]
    windows = [ids[s: s + args.window + 1] for s in range(0, len(ids) - 1, args.window)]

    def logits() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(w[None, :-1]).logits[0] for w in windows if len(w) > 1]

    reference = logits()
    targets = [w[1:] for w in windows if len(w) > 1]
    n = sum(len(t) for t in targets)
    nll_ref = sum(torch.nn.functional.cross_entropy(r, t, reduction="sum").item() for r, t in zip(reference, targets))
    for mode in args.modes:
        modeling.eager_attention_forward = attention_with(mode, exact, modeling.repeat_kv)
        try:
            got = logits()
        finally:
            modeling.eager_attention_forward = exact
        agree = sum((r.argmax(-1) == g.argmax(-1)).sum().item() for r, g in zip(reference, got))
        nll = sum(torch.nn.functional.cross_entropy(g, t, reduction="sum").item() for g, t in zip(got, targets))
        diff = max((r - g).abs().max().item() for r, g in zip(reference, got))
        print(f"{mode:6s} top-1 = f32 attention on {agree / n:.2%} of {n} positions; perplexity ratio "
              f"{math.exp((nll - nll_ref) / n):.4f}; largest logit difference {diff:.3f}", flush=True)


if __name__ == "__main__":
    main()
