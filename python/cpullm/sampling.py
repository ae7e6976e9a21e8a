"""Choosing the next token from a row of logits: greedy, temperature, top-k, top-p, min-p and the
repetition penalty, with a seed that makes a run reproducible.

The logits are processed in the order transformers uses (``generation/logits_process.py``):

1. repetition penalty over every distinct token id of the context (prompt and generated tokens): a
   positive logit is divided by the penalty, a negative one multiplied by it;
2. temperature: logits divided by it; ``temperature == 0`` means greedy (the arg-max of the penalised
   logits; the filters below then play no part);
3. top-k: keep the tokens whose logit is at least the k-th largest (ties at the boundary are kept);
4. top-p: keep the smallest set of most probable tokens whose probabilities add up to ``top_p`` or more;
5. min-p: keep the tokens whose probability is at least ``min_p`` times the largest probability;

then one token is drawn from the renormalised probabilities of what is left. Tokens more than 46 nats
below the best one (probability under 1e-20 of the best's) are never drawn. Every step works on whole
NumPy arrays (a partition for top-k, a partial sort for top-p); nothing loops over the vocabulary in
Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["SamplingParams", "Sampler", "filter_distribution", "resolve_sampling"]

_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens. Neutral values switch a step off: ``top_k=0``, ``top_p=1.0``, ``min_p=0.0``,
    ``repetition_penalty=1.0``. ``seed=None`` draws from fresh operating-system entropy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        if not _is_integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 switches it off), got {self.top_k!r}")
        p = self.top_p
        if not _is_number(p) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] (1 switches it off), got {p!r}")
        m = self.min_p
        if not _is_number(m) or not (0.0 <= m <= 1.0):
            raise ValueError(f"min_p must be a number in [0, 1] (0 switches it off), got {m!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 switches it off), got {r!r}")
        if self.seed is not None and (not _is_integer(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        # Store plain Python numbers whatever the caller passed (NumPy scalars, ints for floats).
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "min_p", float(m))
        object.__setattr__(self, "repetition_penalty", float(r))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def defaults_from_generation_config(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling settings a model's ``generation_config.json`` asks for.

    As in transformers, the file's temperature only counts when it also says ``"do_sample": true``;
    otherwise decoding is greedy. ``top_k``, ``top_p``, ``min_p`` and ``repetition_penalty`` are taken
    when present; absent ones stay switched off (transformers would imply ``top_k=50`` when sampling;
    cpullm applies only what the file says)."""
    out: dict[str, Any] = {}
    if generation_config.get("do_sample") is True:
        temperature = generation_config.get("temperature")
        out["temperature"] = 1.0 if temperature is None else temperature
    else:
        out["temperature"] = 0.0
    for key in ("top_k", "top_p", "min_p", "repetition_penalty"):
        value = generation_config.get(key)
        if value is not None:
            out[key] = value
    return out


def resolve_sampling(generation_config: Mapping[str, Any] | None = None, **overrides: Any) -> SamplingParams:
    """``SamplingParams`` from the model's defaults with the caller's values (those not None) on top.
    Raises ValueError, naming the setting, for an invalid value from either source."""
    unknown = set(overrides) - set(_SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    defaults = defaults_from_generation_config(generation_config or {})
    chosen = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SamplingParams(**{**defaults, **chosen})
    except ValueError as e:
        SamplingParams(**chosen)  # the caller's own values: their error as it is
        raise ValueError(f"generation_config.json: {e} (pass an explicit value to override it)") from None


def _penalised(logits: np.ndarray, seen: np.ndarray | None, penalty: float) -> np.ndarray:
    if seen is None or seen.size == 0 or penalty == 1.0:
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    values = out[seen]
    out[seen] = np.where(values < 0, values * penalty, values / penalty)
    return out


def _top_p_count(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices (into ``probs``) of the smallest most-probable set whose mass reaches ``top_p``:
    a token is kept when the mass of the tokens ranked above it is still below ``top_p``. Sorts only as
    many of the largest probabilities as it needs (argpartition, growing the window)."""
    n = probs.size
    m = min(n, 64)
    while True:
        if 4 * m >= n:
            m = n
        if m < n:
            part = np.argpartition(-probs, m - 1)[:m]
        else:
            part = np.arange(n)
        order = part[np.argsort(-probs[part], kind="stable")]
        sorted_p = probs[order]
        before = np.cumsum(sorted_p) - sorted_p  # mass ranked above each token
        keep = int(np.count_nonzero(before < top_p))
        # Within this window the count is exact if the window's total mass reached top_p, or it is all tokens.
        if m == n or keep < m:
            return order[: max(keep, 1)]
        m = min(n, m * 8)


# Tokens this many nats below the best one have a probability under 1e-20 of the best one's: less, all
# of them together, than the 2**-53 resolution of the uniform draw that picks a token, and less than top-p
# (p < 1) or min-p (above 1e-20) would ever keep. They are set aside before any exponential is taken.
_NEGLIGIBLE_NATS = 46.0


def _top_k_pool(x: np.ndarray, k: int, temperature: np.float32, stride: int = 64) -> np.ndarray | None:
    """Ids of a set of tokens that holds the k largest scaled logits x / temperature, ties included, or
    None when the sample below fails. The pool is every token at or above a threshold that a strided
    sample puts a little below the k-th largest logit: a full partition of the vocabulary was the
    costliest step of sampling, and this touches the sample and the pool only. Scaling by a positive
    temperature is monotonic, so the pool is taken on the raw logits; it is only refused when the
    float32 rounding of the scaling could tie a token below the threshold with the k-th value."""
    sample = x[::stride]
    picked = min(sample.size, k // stride + 8)
    threshold = np.partition(sample, sample.size - picked)[sample.size - picked]
    pool = np.flatnonzero(x >= threshold)
    if pool.size < k:
        return None
    kth = np.partition(x[pool], pool.size - k)[pool.size - k] / temperature
    return pool if threshold / temperature < kth else None


def filter_distribution(
    logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may choose and their probabilities: ``(ids, probs)`` (ids in no particular
    order, probs summing to 1). ``seen``: the distinct token ids of the context, for the repetition
    penalty. Greedy parameters give the single arg-max token with probability 1."""
    x = _penalised(np.asarray(logits, dtype=np.float32), seen, params.repetition_penalty)
    if params.greedy:
        return np.array([int(np.argmax(x))]), np.array([1.0])
    temperature = np.float32(params.temperature)
    vocab = x.size
    # The candidates: a top-k pool when top-k applies, else the whole vocabulary. Their logits are
    # scaled in float32, as transformers scales (so top-k sees the same ties).
    pool = _top_k_pool(x, params.top_k, temperature) if 0 < params.top_k < vocab else None
    ids = np.arange(vocab) if pool is None else pool
    z = x / temperature if pool is None else x[pool] / temperature
    best = float(z.max())
    floor = best - _NEGLIGIBLE_NATS
    if 0 < params.top_k < vocab:
        floor = max(float(np.partition(z, z.size - params.top_k)[z.size - params.top_k]), floor)
    if params.min_p > 0.0 and params.top_p == 1.0:
        # Min-p's own cut (applied exactly below), lowered a little. Not with top-p, which comes first and
        # must see every token min-p will drop.
        floor = max(floor, best + math.log(params.min_p) - 1e-3)
    keep = np.flatnonzero(z >= floor)
    ids, z = ids[keep], z[keep]
    probs = np.exp(z.astype(np.float64) - best)
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = _top_p_count(probs, params.top_p)
        ids, probs = ids[keep], probs[keep]
        probs = probs / probs.sum()
    if params.min_p > 0.0:
        keep = np.flatnonzero(probs >= params.min_p * probs.max())
        ids, probs = ids[keep], probs[keep]
        probs = probs / probs.sum()
    return ids, probs


class Sampler:
    """Chooses tokens one at a time for one generation. ``context``: the token ids already in the
    sequence (the prompt), which the repetition penalty counts; ``accept`` each chosen token."""

    def __init__(self, params: SamplingParams, vocab_size: int, context: Iterable[int] = ()) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._track = params.repetition_penalty != 1.0
        self._seen_mask = np.zeros(vocab_size, dtype=bool) if self._track else None
        self._seen_ids = np.empty(0, dtype=np.int64)
        if self._track:
            ctx = np.asarray(list(context), dtype=np.int64)
            ctx = ctx[(ctx >= 0) & (ctx < vocab_size)]
            self._seen_mask[ctx] = True
            self._seen_ids = np.flatnonzero(self._seen_mask)

    def accept(self, token: int) -> None:
        if self._track and not self._seen_mask[token]:
            self._seen_mask[token] = True
            self._seen_ids = np.append(self._seen_ids, token)

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return filter_distribution(logits, self.params, self._seen_ids if self._track else None)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            x = _penalised(logits, self._seen_ids if self._track else None, self.params.repetition_penalty)
            return int(np.argmax(x))
        ids, probs = self.distribution(logits)
        cdf = np.cumsum(probs)
        i = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])
