"""Sampling: the kept token sets and probabilities agree with transformers' logits processors, sampled
tokens follow the filtered distribution, a seed reproduces a run, and bad settings are refused."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import cpullm
from conftest import write_tokenizer
from cpullm.generation import GenerationStats
from cpullm.sampling import Sampler, SamplingParams, filter_distribution, resolve_sampling


def _transformers_distribution(logits: np.ndarray, params: SamplingParams, context: list[int]) -> np.ndarray:
    """Probabilities over the vocabulary after transformers' processors, in the order its generate()
    builds them (repetition penalty, temperature, top-k, top-p, min-p)."""
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([context or [0]], dtype=torch.long)
    scores = torch.tensor(logits[None], dtype=torch.float32)
    chain: list[Any] = []
    if params.repetition_penalty != 1.0 and context:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    chain.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        chain.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        chain.append(MinPLogitsWarper(params.min_p))
    for processor in chain:
        scores = processor(ids, scores)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


def _as_dense(ids: np.ndarray, probs: np.ndarray, vocab: int) -> np.ndarray:
    dense = np.zeros(vocab)
    dense[ids] = probs
    return dense


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=50),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=1.5, top_p=0.5),
    dict(temperature=1.0, top_p=0.02),  # smaller than the top token's probability: exactly one token
    dict(temperature=2.0, top_p=0.999),  # a wide nucleus: the partial sort must grow its window
    dict(temperature=1.3, min_p=0.1),
    dict(temperature=0.9, min_p=0.5),
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.3),
    dict(temperature=1.2, repetition_penalty=0.7, top_p=0.8),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("vocab", [1000, 6000])
def test_kept_tokens_and_probabilities_match_transformers(setting: dict[str, Any], vocab: int) -> None:
    rng = np.random.default_rng(vocab + len(setting))
    logits = (rng.standard_normal(vocab) * 3.0).astype(np.float32)
    context = rng.integers(0, vocab, 60).tolist() + [int(np.argmax(logits)), int(np.argmin(logits))]
    params = SamplingParams(**setting)
    expected = _transformers_distribution(logits, params, context)
    ids, probs = filter_distribution(logits, params, np.unique(context))
    assert set(ids.tolist()) == set(np.flatnonzero(expected > 0).tolist())
    np.testing.assert_allclose(_as_dense(ids, probs, vocab), expected, rtol=1e-5, atol=1e-9)


def test_top_k_keeps_ties_like_transformers() -> None:
    logits = np.array([3.0, 1.0, 2.0, 2.0, 2.0, 0.5], dtype=np.float32)
    ids, _ = filter_distribution(logits, SamplingParams(temperature=1.0, top_k=2))
    expected = _transformers_distribution(logits, SamplingParams(temperature=1.0, top_k=2), [])
    assert sorted(ids.tolist()) == [0, 2, 3, 4] == np.flatnonzero(expected > 0).tolist()


def test_large_vocabulary_with_ties_at_every_boundary_matches_transformers() -> None:
    """A SmolLM2-sized vocabulary whose logits come in runs of equal values (coarsely rounded), so that
    the k-th value, the top-p boundary and the min-p cut all fall on ties."""
    rng = np.random.default_rng(11)
    logits = (np.round(rng.standard_normal(49152) * 8) / 2).astype(np.float32)
    for setting in (dict(temperature=0.7, top_k=40), dict(temperature=0.9, top_k=40, top_p=0.9),
                    dict(temperature=1.0, min_p=0.2), dict(temperature=0.6, top_k=1000, top_p=0.5, min_p=0.01)):
        params = SamplingParams(**setting)
        expected = _transformers_distribution(logits, params, [])
        ids, probs = filter_distribution(logits, params)
        assert set(ids.tolist()) == set(np.flatnonzero(expected > 0).tolist()), setting
        np.testing.assert_allclose(_as_dense(ids, probs, logits.size), expected, rtol=1e-5, atol=1e-9)


def test_tiny_temperatures_and_non_finite_logits() -> None:
    logits = (np.random.default_rng(5).standard_normal(1000) * 5).astype(np.float32)
    for temperature in (1e-30, 1e-38, 1e-45):  # the last two overflow float32 when logits are scaled
        for extra in ({}, dict(top_k=10), dict(top_p=0.5), dict(min_p=0.1)):
            ids, probs = filter_distribution(logits, SamplingParams(temperature=temperature, **extra))
            assert ids.tolist() == [int(np.argmax(logits))] and probs.tolist() == [1.0]
    with pytest.raises(ValueError, match="no finite value"):
        filter_distribution(np.full(10, np.nan, np.float32), SamplingParams(temperature=1.0))
    poisoned = logits.copy()
    poisoned[[0, 7]] = np.nan  # a NaN never wins, wherever it is
    best = int(np.nanargmax(poisoned))
    assert filter_distribution(poisoned, SamplingParams())[0].tolist() == [best]
    assert best in filter_distribution(poisoned, SamplingParams(temperature=0.5, top_k=3))[0].tolist()
    with pytest.raises(ValueError, match="no finite value"):
        filter_distribution(np.full(10, -np.inf, np.float32), SamplingParams(temperature=0.7, top_k=3))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    for top_p, kept in [(0.5, [0]), (0.51, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (0.96, [0, 1, 2, 3])]:
        ids, p = filter_distribution(logits, SamplingParams(temperature=1.0, top_p=top_p))
        assert sorted(ids.tolist()) == kept, top_p
        np.testing.assert_allclose(p.sum(), 1.0)


def test_min_p_is_relative_to_the_most_likely_token() -> None:
    probs = np.array([0.4, 0.2, 0.1, 0.05, 0.25])
    logits = np.log(probs).astype(np.float32)
    ids, p = filter_distribution(logits, SamplingParams(temperature=1.0, min_p=0.45))  # threshold 0.18
    assert sorted(ids.tolist()) == [0, 1, 4]
    np.testing.assert_allclose(_as_dense(ids, p, 5), [0.4 / 0.85, 0.2 / 0.85, 0, 0, 0.25 / 0.85])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = np.array([2.0, -2.0, 1.0, -1.0], dtype=np.float32)
    seen = np.array([0, 1])
    ids, p = filter_distribution(logits, SamplingParams(temperature=1.0, repetition_penalty=2.0), seen)
    penalised = np.array([1.0, -4.0, 1.0, -1.0])
    np.testing.assert_allclose(_as_dense(ids, p, 4), np.exp(penalised) / np.exp(penalised).sum(), rtol=1e-6)
    # Greedy decoding applies the penalty too (as transformers does): token 0 no longer wins outright.
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=3.0), 4, context=[0])
    assert sampler(logits) == 2


def test_sampled_tokens_follow_the_filtered_distribution() -> None:
    """Draws N tokens with a fixed seed and bounds the total-variation distance between the empirical and
    the expected (filtered, renormalised) distribution.

    Bound: for k categories, P(||p_hat - p||_1 >= eps) <= 2^k exp(-N eps^2 / 2) (Bretagnolle-Huber-Carol).
    With k = 4 kept tokens, N = 20000 and eps = 0.05 (a total variation of 0.025) that is below 3e-10, so
    a correct sampler passes for essentially every seed; the seed is fixed anyway, so the test is
    deterministic. The alternatives a bug would produce (no temperature, no renormalisation after top-p,
    a nucleus one token too small or too large) are all more than 0.05 away in total variation, so the
    test would catch them."""
    logits = np.array([2.0, 1.6, 1.5, 1.1, 0.9, 0.4, 0.2, -0.3, -0.8, -1.5, -2.0, -3.0], dtype=np.float32)
    params = SamplingParams(temperature=0.8, top_k=9, top_p=0.8, min_p=0.03, seed=1234)
    expected = _transformers_distribution(logits, params, [])
    kept = np.flatnonzero(expected > 0)
    assert kept.size == 4

    n = 20000
    sampler = Sampler(params, logits.size)
    draws = np.fromiter((sampler(logits) for _ in range(n)), dtype=np.int64, count=n)
    assert set(np.unique(draws).tolist()) <= set(kept.tolist())  # nothing outside the kept set, ever
    empirical = np.bincount(draws, minlength=logits.size) / n
    tv = 0.5 * np.abs(empirical - expected).sum()
    assert tv < 0.025, (empirical, expected)

    # The test's power: what plausible bugs would have sampled from instead.
    def tv_to(p: np.ndarray) -> float:
        return 0.5 * float(np.abs(p / p.sum() - expected).sum())

    softmax = np.exp(logits - logits.max()).astype(np.float64)
    no_temperature = _transformers_distribution(logits, SamplingParams(temperature=1.0, top_k=9, top_p=0.8,
                                                                       min_p=0.03), [])
    order = np.argsort(-expected)
    smaller = np.zeros_like(expected)
    smaller[order[: kept.size - 1]] = expected[order[: kept.size - 1]]
    larger_set = order[: kept.size + 1]
    tempered = np.exp((logits - logits.max()) / 0.8).astype(np.float64)
    larger = np.zeros_like(expected)
    larger[larger_set] = tempered[larger_set]
    for alternative in (softmax, no_temperature, smaller, larger):
        assert tv_to(alternative) > 0.05


def test_same_seed_same_tokens() -> None:
    logits = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    first = Sampler(params, 500)
    second = Sampler(params, 500)
    a = [first(logits) for _ in range(50)]
    b = [second(logits) for _ in range(50)]
    c = [Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=8), 500)(logits) for _ in range(50)]
    assert a == b
    assert len(set(a)) > 5 and a != c


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.01), "top_p"),
        (dict(min_p=-0.01), r"min_p must be a number in \[0, 1\]"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be a number in \[1e-06, 1e\+06\]"),
        (dict(repetition_penalty=1e-46), "repetition_penalty"),  # > 0 in Python, 0 in float32
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        # finite in Python, infinite in the native sampler's float32
        (dict(temperature=1e39), "temperature must be a finite number >= 0 and <= 3.4e"),
        (dict(repetition_penalty=1e308), "repetition_penalty must be a number in"),
        (dict(seed=-3), "seed must be an integer >= 0"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_invalid_settings_are_refused_clearly(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**setting)


def test_defaults_come_from_generation_config() -> None:
    assert resolve_sampling({}) == SamplingParams()  # greedy, everything off
    # transformers ignores temperature & co. unless do_sample is set: so do we (greedy).
    assert resolve_sampling({"temperature": 0.6, "top_p": 0.9}).greedy
    config = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    assert resolve_sampling(config) == SamplingParams(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1)
    assert resolve_sampling({"do_sample": True}).temperature == 1.0
    assert resolve_sampling(config, temperature=0.0, top_k=None).greedy  # explicit values win, None keeps
    assert resolve_sampling(config, top_k=None).top_k == 20
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        resolve_sampling({"do_sample": True, "top_p": 1.5})
    assert resolve_sampling({"do_sample": True, "top_p": 1.5}, top_p=0.5).top_p == 0.5
    with pytest.raises(ValueError, match="^top_p"):  # the caller's own mistake is not blamed on the file
        resolve_sampling({"do_sample": True, "top_p": 1.5}, top_p=2.0)
    with pytest.raises(TypeError, match="unknown sampling option"):
        resolve_sampling({}, top_q=0.3)


def test_generation_is_reproducible_with_a_seed_and_follows_generation_config(make_llama: Any) -> None:
    directory, _ = make_llama(seed=4)
    write_tokenizer(directory)
    model = cpullm.load(directory, threads=1)
    ids = model.tokenizer.encode("The capital of")
    options = dict(temperature=1.0, top_k=100, top_p=0.95, seed=11)
    a = list(model.generate_tokens(ids, 24, stop_token_ids=(), **options))
    b = list(model.generate_tokens(ids, 24, stop_token_ids=(), **options))
    c = list(model.generate_tokens(ids, 24, stop_token_ids=(), **{**options, "seed": 12}))
    greedy = list(model.generate_tokens(ids, 24, stop_token_ids=()))
    assert a == b and a != c and a != greedy
    assert model.generate("The capital of", 24, **options) == model.generate("The capital of", 24, **options)

    (directory / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 1.0,
                                                                  "top_k": 100, "top_p": 0.95}))
    sampled_by_default = cpullm.load(directory, threads=1)
    assert list(sampled_by_default.generate_tokens(ids, 24, stop_token_ids=(), seed=11)) == a
    assert list(sampled_by_default.generate_tokens(ids, 24, stop_token_ids=(), temperature=0)) == greedy
    with pytest.raises(ValueError, match="top_p"):
        model.generate_tokens(ids, 5, top_p=0)  # refused at the call, not at the first token
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate_tokens(ids, -1)


def test_greedy_with_repetition_penalty_matches_transformers_generate(make_llama: Any) -> None:
    import torch

    directory, hf_model = make_llama(seed=5)
    model = cpullm.load(directory, threads=1)
    prompt = [5, 17, 17, 99, 230, 5, 41]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, repetition_penalty=1.5,
                                eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    ours = list(model.generate_tokens(prompt, 20, stop_token_ids=(), repetition_penalty=1.5))
    assert ours == expected
    assert ours != list(model.generate_tokens(prompt, 20, stop_token_ids=()))  # the penalty made a difference


def test_generation_stops_at_the_context_limit(make_llama: Any) -> None:
    directory, _ = make_llama(seed=6)
    model = cpullm.load(directory, threads=1, context_length=40)
    stats = GenerationStats()
    tokens = list(model.generate_tokens(list(range(30)), None, stop_token_ids=(), temperature=1.0, seed=0,
                                        stats=stats))
    # 30 prompt tokens + 10 generated fill the 40 positions, as transformers' max_length counts them (an
    # 11th could be sampled from the last position's logits, but would have no position of its own).
    assert len(tokens) == 10 and stats.finish_reason == "context"
    assert stats.prompt_tokens == stats.processed_tokens == 30


def test_top_k_beyond_any_vocabulary_keeps_every_token() -> None:
    """top_k past int64 (or any value >= the vocabulary) means every token, as top_k=0 does."""
    logits = np.random.default_rng(3).standard_normal(50).astype(np.float32)
    ids_all, probs_all = filter_distribution(logits, SamplingParams(temperature=0.8))
    for top_k in (50, 2**40, 2**63, 2**80):
        ids, probs = filter_distribution(logits, SamplingParams(temperature=0.8, top_k=top_k))
        order, order_all = np.argsort(ids), np.argsort(ids_all)
        np.testing.assert_array_equal(ids[order], ids_all[order_all])
        np.testing.assert_allclose(probs[order], probs_all[order_all], rtol=1e-6)
