#!/usr/bin/env python3
"""What an int8 activation scheme would cost in accuracy, before writing a kernel for it.

Simulates, in transformers (f32, CPU), every linear layer of a Hugging Face model as cpullm's int8
matmul: weights rounded to int8 per group of 32 inputs (symmetric, max / 127), activations rounded by a
scheme; then, like tools/int8_accuracy.py, teacher-forced top-1 agreement with the f32 model and the
perplexity ratio on real text. Integer dot products are exact, so dequantize-then-multiply in f32
gives the kernel's numbers up to float rounding (the two-digit row reproduces cpullm's measured
97.90 % on SmolLM2). Usage:

    python tools/activation_schemes.py HF_DIR [SCHEME ...] [--text FILE] [--tokens 4096]

SCHEME is KIND:ROTATION:GROUP: KIND one of w8 (exact activations), a8 (one int8 digit per value),
a14 (two digits, cpullm's scheme), pC (one digit, every group's scale the row's
scale times a power of two, the row's scale the best of C candidates; see pow2_digit), mTAU (two digits only in groups whose scale is at least TAU times
the rms of the row's group scales, one digit elsewhere; prints the share of two-digit groups); ROTATION 0, or the size of an orthonormal Hadamard transform applied
to blocks of inputs of both the activations and the weights before they are rounded (it leaves the
product unchanged and spreads outliers); GROUP the activations' quantization group. A scheme may end in
@NAME,NAME,... (the last part of linear layers' names, e.g. @q_proj,k_proj,v_proj,gate_proj,up_proj):
it then applies to those layers only, and every other layer keeps cpullm's scheme (a14:0:32).

With ``--generated N`` the schemes apply to prompts only, as a prefill-only scheme would: every window
is cut at prompt lengths N + 1, 2N + 1, ...; the prompt but its last token runs under the scheme (its
keys and values fill the cache), and its last token plus the N - 1 after it run with cpullm's two digits
over that cache (teacher-forced decoding, whose N predictions are scored). The f32 and all-two-digit
figures on the same predictions are printed beside it.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise SystemExit(f"rotation size {n} is not a power of two")
    return h / math.sqrt(n)


def grouped(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x split in groups along its last axis, and each group's scale max|x| / 127 (1 for all-zero)."""
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    scale = xg.abs().amax(-1, keepdim=True) / 127
    return xg, torch.where(scale > 0, scale, torch.ones_like(scale))


def one_digit(x: torch.Tensor, group: int) -> torch.Tensor:
    xg, s = grouped(x, group)
    return (torch.round(xg / s).clamp(-127, 127) * s).reshape(x.shape)


def two_digits(x: torch.Tensor, group: int) -> torch.Tensor:
    xg, s = grouped(x, group)
    hi = torch.round(xg / s).clamp(-127, 127)
    fine = s / 127
    lo = torch.round((xg - hi * s) / fine).clamp(-127, 127)
    return (hi * s + lo * fine).reshape(x.shape)


def pow2_digit(x: torch.Tensor, group: int, candidates: int, max_shift: int = 12) -> torch.Tensor:
    """One digit per value, each group's scale its row's scale s times a power of two 2^-k, k in [0,
    max_shift] (so that a kernel can scale a group's integer sum by a shift instead of a multiply): the
    smallest such scale at or above the group's max|x| / 127. s is the row's largest group scale times
    2^(j / candidates) for the j in [0, candidates) that minimises the sum of the groups' squared scales
    (the variance of the row's rounding error, up to the weights)."""
    xg, _ = grouped(x, group)
    raw = xg.abs().amax(-1, keepdim=True) / 127  # [..., G, 1]
    top = raw.amax(-2, keepdim=True)
    top = torch.where(top > 0, top, torch.ones_like(top))
    steps = torch.arange(candidates, dtype=x.dtype).reshape(candidates, *([1] * raw.dim()))
    row = top.unsqueeze(0) * torch.exp2(steps / candidates)  # [C, ..., 1, 1]
    ratio = row / torch.where(raw > 0, raw, row * 2.0 ** -max_shift)  # [C, ..., G, 1]
    k = torch.floor(torch.log2(ratio)).clamp(0, max_shift)
    scales = row * torch.exp2(-k)  # [C, ..., G, 1]
    best = scales.square().sum(-2, keepdim=True).argmin(0, keepdim=True)
    s = torch.gather(scales, 0, best.expand(1, *scales.shape[1:]))[0]
    return (torch.round(xg / s).clamp(-127, 127) * s).reshape(x.shape)


TWO_DIGIT_GROUPS = [0, 0]  # groups given two digits by mixed_digits, groups seen


def mixed_digits(x: torch.Tensor, group: int, tau: float) -> torch.Tensor:
    """Two digits for the groups whose scale is at least tau times the rms of the row's group scales
    (their rounding dominates the row's error), one digit for the others."""
    xg, s = grouped(x, group)
    raw = xg.abs().amax(-1, keepdim=True) / 127  # all-zero groups at 0, not grouped()'s stand-in 1
    rms = raw.square().mean(-2, keepdim=True).sqrt()
    wide = raw >= tau * rms
    TWO_DIGIT_GROUPS[0] += int(wide.sum())
    TWO_DIGIT_GROUPS[1] += wide.numel()
    hi = torch.round(xg / s).clamp(-127, 127)
    fine = s / 127
    lo = torch.where(wide, torch.round((xg - hi * s) / fine).clamp(-127, 127), torch.zeros_like(hi))
    return (hi * s + lo * fine).reshape(x.shape)


class SimulatedInt8Linear(torch.nn.Module):
    # Set while the generated tokens of --generated run: every layer then takes cpullm's two digits.
    decoding = False

    def __init__(self, linear: torch.nn.Linear, kind: str, rotation: int, group: int) -> None:
        super().__init__()
        weight = linear.weight.data.float()
        fan_in = weight.shape[1]
        self.rotation = rotation if rotation and fan_in % rotation == 0 else 0
        if rotation and not self.rotation:
            raise SystemExit(f"rotation {rotation} does not divide an input size of {fan_in}")
        if self.rotation:
            self.h = hadamard(self.rotation)
            weight = self.rotate(weight)
        self.weight_q = one_digit(weight, 32)
        self.bias = linear.bias
        self.kind, self.group = kind, group

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(*x.shape[:-1], x.shape[-1] // self.rotation, self.rotation) @ self.h).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation:
            x = self.rotate(x)
        if SimulatedInt8Linear.decoding:
            x = two_digits(x, 32)
        elif self.kind == "a8":
            x = one_digit(x, self.group)
        elif self.kind == "a14":
            x = two_digits(x, self.group)
        elif self.kind.startswith("p"):
            x = pow2_digit(x, self.group, int(self.kind[1:]))
        elif self.kind.startswith("m"):
            x = mixed_digits(x, self.group, float(self.kind[1:]))
        y = x @ self.weight_q.T
        return y if self.bias is None else y + self.bias


def evaluate(model: torch.nn.Module, chunks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    top1, loglik = [], []
    with torch.no_grad():
        for chunk in chunks:
            logp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), -1)[:-1]
            targets = torch.tensor(chunk[1:])
            top1.append(logp.argmax(-1))
            loglik.append(logp[torch.arange(len(targets)), targets])
    return torch.cat(top1), torch.cat(loglik)


def prompt_cuts(chunk: list[int], step: int) -> range:
    """The prompt lengths --generated cuts a window at: step + 1, 2 step + 1, ... while step tokens follow."""
    return range(step + 1, len(chunk) - step + 1, step)


def evaluate_generated(model: torch.nn.Module, chunks: list[list[int]], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like evaluate, but each window's predictions come in runs of `step` from a cached prompt (see
    --generated); returns them in the order of positions_generated."""
    top1, loglik = [], []
    with torch.no_grad():
        for chunk in chunks:
            for p in prompt_cuts(chunk, step):
                SimulatedInt8Linear.decoding = False
                cache = model(torch.tensor([chunk[: p - 1]]), use_cache=True).past_key_values
                SimulatedInt8Linear.decoding = True
                try:
                    out = model(torch.tensor([chunk[p - 1 : p - 1 + step]]), past_key_values=cache, use_cache=True)
                finally:
                    SimulatedInt8Linear.decoding = False
                logp = torch.log_softmax(out.logits[0].double(), -1)
                targets = torch.tensor(chunk[p : p + step])
                top1.append(logp.argmax(-1))
                loglik.append(logp[torch.arange(len(targets)), targets])
    return torch.cat(top1), torch.cat(loglik)


def positions_generated(chunks: list[list[int]], step: int) -> torch.Tensor:
    """Indices into evaluate()'s flat predictions of the ones evaluate_generated scores."""
    picked, base = [], 0
    for chunk in chunks:
        for p in prompt_cuts(chunk, step):
            picked.extend(range(base + p - 1, base + p - 1 + step))
        base += len(chunk) - 1
    return torch.tensor(picked, dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("schemes", nargs="*", default=["w8:0:32", "a14:0:32", "a8:0:32", "a8:32:32", "a8:64:16"])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--generated", type=int, default=0, metavar="N",
                        help="schemes on prompts only, N teacher-forced two-digit tokens scored after each")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False)[: args.tokens]
    chunks = [ids[i:i + args.window] for i in range(0, len(ids) - 1, args.window) if len(ids[i:i + args.window]) > 1]

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    ref_top1, ref_ll = evaluate(load(), chunks)
    if args.generated:
        picked = positions_generated(chunks, args.generated)
        ref_top1, ref_ll = ref_top1[picked], ref_ll[picked]
    ref_ppl = math.exp(-ref_ll.mean().item())
    print(f"{args.model}: {ref_ll.numel()} predicted positions; f32 perplexity {ref_ppl:.3f}")
    print(f"{'scheme':<12} {'ppl ratio':>10} {'top-1 = f32':>12}")
    for scheme in args.schemes:
        spec, _, only = scheme.partition("@")
        kind, rotation, group = spec.split(":")
        if kind not in ("w8", "a8", "a14") and not re.fullmatch(r"m.*|p[1-9][0-9]*", kind):
            raise SystemExit(f"unknown scheme kind {kind!r} in {scheme!r}")
        if kind.startswith("m"):
            try:
                float(kind[1:])
            except ValueError:
                raise SystemExit(f"mTAU needs a number for TAU, not {kind[1:]!r} in {scheme!r}") from None
        targets = set(only.split(",")) if only else None
        model = load()
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    if targets is None or name in targets:
                        setattr(module, name, SimulatedInt8Linear(child, kind, int(rotation), int(group)))
                    else:
                        setattr(module, name, SimulatedInt8Linear(child, "a14", 0, 32))
        TWO_DIGIT_GROUPS[:] = [0, 0]
        top1, ll = evaluate_generated(model, chunks, args.generated) if args.generated else evaluate(model, chunks)
        if TWO_DIGIT_GROUPS[1]:
            print(f"  two-digit groups: {100 * TWO_DIGIT_GROUPS[0] / TWO_DIGIT_GROUPS[1]:.1f} %")
        ratio = math.exp(-ll.mean().item()) / ref_ppl
        print(f"{scheme:<12} {ratio:>10.4f} {(top1 == ref_top1).double().mean().item() * 100:>11.2f} %", flush=True)


if __name__ == "__main__":
    main()
