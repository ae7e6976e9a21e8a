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
below the best one (probability under 1e-20 of the best's) are never drawn. Among tokens of equal
probability at the top-p boundary the higher id is kept first (transformers sorts ascending and drops
from the low end). The filter and the draw run in C++, one call per token (``csrc/model/sampling.cpp``);
the uniform number comes from a NumPy generator seeded with ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from . import _C

__all__ = ["SamplingParams", "Sampler", "filter_distribution", "resolve_sampling"]

_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


# The native sampler works in float32: larger "finite" values would be infinities there.
_F32_MAX = float(np.finfo(np.float32).max)
# Penalties divide or multiply float32 logits: far outside this range they overflow to infinities or
# vanish (useful values lie near 1; transformers' documentation suggests 1.0-1.5).
_PENALTY_RANGE = (1e-6, 1e6)
# top_k at least the vocabulary keeps every token; larger values go to the native sampler as this.
_TOP_K_ALL = 2**62


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An int or a NumPy integer, not a bool."""
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
        if not _is_number(t) or not math.isfinite(t) or not 0 <= t <= _F32_MAX:
            raise ValueError(f"temperature must be a finite number >= 0 and <= {_F32_MAX:.3g} (0 means greedy), got {t!r}")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 switches it off), got {self.top_k!r}")
        p = self.top_p
        if not _is_number(p) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] (1 switches it off), got {p!r}")
        m = self.min_p
        if not _is_number(m) or not (0.0 <= m <= 1.0):
            raise ValueError(f"min_p must be a number in [0, 1] (0 switches it off), got {m!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or not _PENALTY_RANGE[0] <= r <= _PENALTY_RANGE[1]:
            raise ValueError(f"repetition_penalty must be a number in [{_PENALTY_RANGE[0]:g}, {_PENALTY_RANGE[1]:g}] "
                             f"(1 switches it off), got {r!r}")
        if self.seed is not None and (not is_integer(self.seed) or self.seed < 0):
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


_NO_IDS = np.empty(0, dtype=np.int64)


def _native_args(params: SamplingParams, seen: np.ndarray | None) -> tuple[Any, ...]:
    ids = _NO_IDS if seen is None or params.repetition_penalty == 1.0 else seen
    return (params.temperature, min(params.top_k, _TOP_K_ALL), params.top_p, params.min_p, params.repetition_penalty,
            ids)


def filter_distribution(
    logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may choose and their probabilities: ``(ids, probs)`` (ids in no particular
    order, probs summing to 1). ``seen``: the distinct token ids of the context, for the repetition
    penalty. Greedy parameters give the single arg-max token with probability 1.

    The work is done in C++ (``csrc/model/sampling.cpp``), once per generated token: a top-k pool from a
    strided sample and one pass over the vocabulary, exponentials over the candidates only."""
    return _C.filter_logits(np.asarray(logits, dtype=np.float32).reshape(-1), *_native_args(params, seen))


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
        self._args = _native_args(self.params, self._seen_ids if self._track else None)

    def accept(self, token: int) -> None:
        if self._track and not self._seen_mask[token]:
            self._seen_mask[token] = True
            self._seen_ids = np.append(self._seen_ids, token)
            self._args = _native_args(self.params, self._seen_ids)

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return filter_distribution(logits, self.params, self._seen_ids if self._track else None)

    def __call__(self, logits: np.ndarray) -> int:
        u = 0.0 if self.params.greedy else self._rng.random()
        return _C.sample_token(logits, *self._args, u)
