"""cpullm's Llama forward pass against transformers' LlamaForCausalLM (f32, CPU) on tiny random
configs that cover the shapes and RoPE settings real checkpoints use."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

import cpullm
from conftest import dequantized_copy, fast_prefill_case, hf_logits, median_row_err, rel_err

# f32 end to end; the two sides only sum in different orders. Measured about 5e-7 on these models.
F32_TOL = 2e-5

CONFIGS: dict[str, dict[str, Any]] = {
    # no grouping, head_dim 64, tied embeddings, the default rope base
    "mha-hd64-tied": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    # grouped 3:1, head_dim 24 (not a power of two), untied, rope_theta 5000
    "gqa3-hd24": dict(hidden_size=144, num_attention_heads=6, num_key_value_heads=2, rope_theta=5000.0),
    # grouped 4:1, explicit head_dim 40 != hidden / heads, llama3 rope scaling whose bands all occur
    "gqa4-hd40-llama3": dict(
        hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=40, rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ),
    # linear scaling, a large base, awkward FFN and vocab sizes, tied
    "linear-odd-sizes": dict(
        hidden_size=120, num_attention_heads=4, num_key_value_heads=1, intermediate_size=173, vocab_size=311,
        rope_theta=500000.0, rope_scaling=dict(type="linear", factor=2.0), tie_word_embeddings=True,
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def llama(request: pytest.FixtureRequest, make_llama: Any) -> tuple[Any, Any]:
    directory, hf_model = make_llama(seed=len(request.param), **CONFIGS[request.param])
    return cpullm.load(directory, threads=2), hf_model


def _ids(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def test_prefill_logits_match_transformers(llama: tuple[Any, Any], isa: str) -> None:
    model, hf_model = llama
    ids = _ids(model.spec.vocab_size, 37)
    assert rel_err(model.logits(ids), hf_logits(hf_model, ids)) < F32_TOL


def test_long_prompt_past_llama3_bands(llama: tuple[Any, Any]) -> None:
    model, hf_model = llama
    ids = _ids(model.spec.vocab_size, 200, seed=3)  # well past original_max_position_embeddings
    assert rel_err(model.logits(ids), hf_logits(hf_model, ids)) < F32_TOL


def test_decode_with_cache_equals_full_pass(llama: tuple[Any, Any], isa: str) -> None:
    model, _ = llama
    ids = _ids(model.spec.vocab_size, 24, seed=1).astype(np.int32)
    full = model.logits(ids)
    sequence = cpullm._C.Sequence(model._model())
    chunks = [ids[:5], ids[5:6], ids[6:13], *[ids[i:i + 1] for i in range(13, 24)]]
    stepped = np.concatenate([sequence.forward(c, True, model.threads) for c in chunks])
    assert sequence.n_past == 24
    assert rel_err(stepped, full) < F32_TOL


@pytest.mark.parametrize("config", ["mha-hd64-tied", "gqa3-hd24"])
def test_cache_growth_keeps_every_position(make_llama: Any, config: str) -> None:
    # The KV cache starts at 256 positions and doubles; growing moves each head's keys and values to new
    # places (the cache is head-major), so a sequence that grows twice mid-way, at block boundaries and
    # off them, must give the logits of one pass. Equal bit for bit: every chunk has at least 2 tokens, so
    # the same kernels (whose per-output sums do not depend on the token count) see the same values; a
    # single token takes the one-token kernels, which sum in another order.
    directory, hf_model = make_llama(seed=7, **CONFIGS[config], max_position_embeddings=1024)
    model = cpullm.load(directory, threads=2)
    ids = _ids(model.spec.vocab_size, 600, seed=4).astype(np.int32)
    full = model.logits(ids)
    sequence = cpullm._C.Sequence(model._model())
    bounds = [0, 100, 254, 256, 258, 301, 510, 512, 600]
    stepped = np.concatenate([sequence.forward(ids[a:b], True, model.threads) for a, b in zip(bounds, bounds[1:])])
    assert sequence.capacity >= 600
    np.testing.assert_array_equal(stepped, full)
    assert rel_err(full[-50:], hf_logits(hf_model, ids)[-50:]) < F32_TOL


@pytest.mark.parametrize("config", ["gqa3-hd24", "mha-hd64-tied", "gqa4-hd40-llama3"])
def test_prefill_attention_tiles_cut_at_a_chunk_give_one_pass_bits(make_llama: Any, config: str) -> None:
    # A prefill's consecutive tokens attend in tiles (4 tokens of a group of 3, 6 of a group of 1, 3 of
    # a group of 4), cut where their last positions cross a 256-position chunk: a piece starting at 250
    # makes tiles straddle 256 that a pass from 0 does not, and must give that pass's bits.
    directory, _ = make_llama(seed=17, **CONFIGS[config], max_position_embeddings=1024)
    model = cpullm.load(directory, threads=1)
    ids = _ids(model.spec.vocab_size, 300, seed=6).astype(np.int32)
    for kv in ("f32", "f16"):
        whole = cpullm._C.Sequence(model._model(), kv).forward(ids, True, 1)
        sequence = cpullm._C.Sequence(model._model(), kv)
        pieces = [sequence.forward(ids[a:b], True, 1) for a, b in ((0, 250), (250, 261), (261, 300))]
        np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_reserve_sizes_the_cache_ahead_and_changes_no_result(make_llama: Any) -> None:
    # generate() reserves prompt + max_tokens positions before the prompt runs, so that the cache does
    # not grow (a copy of every cached position) in the middle of decoding.
    directory, _ = make_llama(seed=3, **CONFIGS["gqa3-hd24"], max_position_embeddings=1024)
    model = cpullm.load(directory, threads=2)
    ids = _ids(model.spec.vocab_size, 300, seed=6).astype(np.int32)
    full = model.logits(ids)
    sequence = cpullm._C.Sequence(model._model())
    sequence.reserve(300)
    assert 300 <= sequence.capacity < 300 + 16  # a first reservation is what was asked, in whole key blocks
    capacity = sequence.capacity
    stepped = np.concatenate([sequence.forward(ids[a:b], True, model.threads) for a, b in ((0, 7), (7, 290), (290, 300))])
    assert sequence.capacity == capacity
    np.testing.assert_array_equal(stepped, full)
    sequence.reserve(10)  # never shrinks, and keeps what is cached
    assert sequence.capacity == capacity and sequence.n_past == 300
    sequence.reserve(10**9)  # clamped to the context
    assert 1024 <= sequence.capacity < 1024 + 16
    np.testing.assert_array_equal(sequence.forward(ids[:1], True, model.threads)[0],
                                  model.logits(np.concatenate([ids, ids[:1]]))[-1])
    with pytest.raises(ValueError, match="reserve"):
        sequence.reserve(-1)
    # A first reservation takes what it asks (whole key blocks of 16), not the on-demand minimum of 256:
    # on huge pages the whole cache is resident from its first position. A later one grows as on demand.
    small = cpullm._C.Sequence(model._model())
    small.reserve(40)
    assert small.capacity == 48
    small.reserve(50)
    assert small.capacity == 256


def test_a_refused_reservation_changes_nothing(make_llama: Any) -> None:
    # reserve() is a hint: with the address space capped below what it asks (1M positions of a tiny
    # model, ~800 MB), it leaves the cache as it was, and forward passes go on growing it on demand.
    import subprocess
    import sys

    directory, _ = make_llama(seed=3, **CONFIGS["gqa3-hd24"], max_position_embeddings=1 << 20)
    script = f'''
import resource, numpy as np, cpullm
model = cpullm.load({str(directory)!r}, threads=1, kv_cache_dtype="f32")
ids = np.arange(40, dtype=np.int32) % model.spec.vocab_size
expected = model.logits(ids)
sequence = model._new_sequence()
sequence.forward(ids[:20], True, 1)
before = sequence.capacity
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (200 << 20), resource.RLIM_INFINITY))
sequence.reserve(1 << 20)
assert sequence.capacity == before, (sequence.capacity, before)
rest = sequence.forward(ids[20:], True, 1)
assert np.abs(rest - expected[20:]).max() <= 1e-4 * np.abs(expected).max()
print("ok")
'''
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_generate_sizes_the_cache_once(make_llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    directory, _ = make_llama(seed=3, **CONFIGS["gqa3-hd24"], max_position_embeddings=1024)
    model = cpullm.load(directory, threads=1)
    seen: list[tuple[int, int]] = []  # (tokens run, capacity after) per forward call
    native = cpullm._C.Sequence

    class Recording:
        def __init__(self, *args: Any) -> None:
            self.inner = native(*args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def forward(self, tokens: Any, all_logits: bool, threads: int) -> Any:
            out = self.inner.forward(tokens, all_logits, threads)
            seen.append((len(tokens), self.inner.capacity))
            return out

    monkeypatch.setattr(cpullm._C, "Sequence", Recording)
    prompt = _ids(model.spec.vocab_size, 250, seed=8).tolist()
    assert len(list(model.generate_tokens(prompt, max_tokens=40, stop_token_ids=[], temperature=0))) == 40
    assert seen[0][0] == 250 and len(seen) == 40  # the last token is not run
    assert {capacity for _, capacity in seen} == {seen[0][1]} and seen[0][1] >= 290
    # A limit far past the context (or any C int) sizes the cache for the context at most.
    seen.clear()
    assert len(list(model.generate_tokens(prompt[:5], max_tokens=2**40, stop_token_ids=[], temperature=0))) == 1019
    assert 1024 <= seen[0][1] < 1024 + 16


def test_generate_again_gives_the_same_tokens(make_llama: Any) -> None:
    # Each generate() makes a sequence of its own: a seeded sampled generation repeats exactly, with
    # another one in between.
    directory, _ = make_llama(seed=5, **CONFIGS["gqa3-hd24"], max_position_embeddings=1024)
    model = cpullm.load(directory, threads=2, kv_cache_dtype="f16")
    prompt = _ids(model.spec.vocab_size, 45, seed=2).tolist()
    first = list(model.generate_tokens(prompt, max_tokens=30, stop_token_ids=[], temperature=0.8, seed=7))
    other = _ids(model.spec.vocab_size, 60, seed=3).tolist()
    list(model.generate_tokens(other, max_tokens=20, stop_token_ids=[], temperature=0))
    again = list(model.generate_tokens(prompt, max_tokens=30, stop_token_ids=[], temperature=0.8, seed=7))
    assert again == first and len(first) == 30


@pytest.mark.parametrize("config", ["mha-hd64-tied", "gqa3-hd24"])
def test_decode_over_a_long_cache_is_the_same_on_any_thread_count(make_llama: Any, config: str) -> None:
    # Past kAttendChunk (256) positions, a decode step's attention is cut into chunks of positions that
    # threads take separately (whole KV groups or single heads, depending on the thread count) and folds
    # them in order; one thread walks the same chunks itself. Every thread count must give the same bits,
    # and the steps the logits of transformers' full pass.
    directory, hf_model = make_llama(seed=11, **CONFIGS[config], max_position_embeddings=1024)
    model = cpullm.load(directory, threads=1)
    ids = _ids(model.spec.vocab_size, 704, seed=5).astype(np.int32)
    outputs = []
    for threads in (1, 2, 3, 4):
        sequence = cpullm._C.Sequence(model._model())
        sequence.forward(ids[:700], False, threads)
        outputs.append(np.concatenate([sequence.forward(ids[i:i + 1], True, threads) for i in range(700, 704)]))
    for other in outputs[1:]:
        np.testing.assert_array_equal(other, outputs[0])
    assert rel_err(outputs[0], hf_logits(hf_model, ids)[700:]) < F32_TOL


def hf_logits_f16_cache(hf_model: Any, ids: np.ndarray) -> np.ndarray:
    """transformers' logits with every key and value (after RoPE) rounded to f16 as it enters the cache,
    which is what cpullm's f16 KV cache stores; the rest of the pass stays f32."""
    import torch
    from transformers import DynamicCache

    class F16Cache(DynamicCache):
        def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
            rounded = (key_states.half().float(), value_states.half().float())
            return super().update(*rounded, layer_idx, *args, **kwargs)

    # transformers 5 renamed past_key_values to cache
    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = hf_model(torch.tensor(ids, dtype=torch.long)[None], **{name: F16Cache()}, use_cache=True)
    return out.logits[0].float().numpy()


@pytest.mark.parametrize("config", ["mha-hd64-tied", "gqa3-hd24"])
def test_f16_kv_cache_matches_transformers_with_rounded_cache(make_llama: Any, config: str) -> None:
    # Against transformers whose cache rounds keys and values to f16 too. The two sides' keys differ by
    # f32 summation noise (~1e-6 relative), so an element lands on the other side of an f16 rounding
    # boundary with a probability p of about that noise over the f16 spacing (2^-11), ~2e-3, and is then
    # one f16 ulp off; the roundings themselves are ~0.29 ulp RMS each. Errors add in quadrature, so the
    # disagreement left is about sqrt(p) / 0.29 ~ 0.15 of what the rounding does to the logits (measured
    # 0.08-0.15 on the four tiny configs): the bound is 0.3 of the rounded reference's distance from
    # plain f32 transformers, and that distance itself shows the rounding is really applied. Single
    # steps past a 256-position chunk (one-token kernels, another summation order) are held to the same
    # bound against one pass, and give the same bits on any thread count.
    directory, hf_model = make_llama(seed=13, **CONFIGS[config], max_position_embeddings=1024)
    model = cpullm.load(directory, threads=2, kv_cache_dtype="f16")
    assert model.kv_cache_dtype == "f16"
    ids = _ids(model.spec.vocab_size, 300, seed=9).astype(np.int32)
    full = model.logits(ids)
    reference = hf_logits_f16_cache(hf_model, ids)
    rounding = rel_err(reference, hf_logits(hf_model, ids))
    assert 1e-4 < rounding < 5e-3  # f16's 2^-11 spacing, through a few layers
    assert rel_err(full, reference) < 0.3 * rounding
    for threads in (1, 3):
        sequence = model._new_sequence()
        assert sequence.kv_dtype == "f16"
        sequence.forward(ids[:270], False, threads)
        steps = np.concatenate([sequence.forward(ids[i:i + 1], True, threads) for i in range(270, 300)])
        assert rel_err(steps, full[270:]) < 0.3 * rounding
        if threads == 1:
            first_steps = steps
        else:
            np.testing.assert_array_equal(steps, first_steps)
    model.kv_cache_dtype = "f32"
    assert rel_err(model.logits(ids), hf_logits(hf_model, ids)) < F32_TOL
    # Defaults: the cache follows f32 weights, and is f16 next to int8 and bf16 weights.
    assert [cpullm.load(directory, dtype=d, threads=1).kv_cache_dtype for d in ("f32", "bf16", "int8")] == \
        ["f32", "f16", "f16"]
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        model.kv_cache_dtype = "int8"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        cpullm.load(directory, kv_cache_dtype="f8")


def test_results_do_not_depend_on_thread_count(llama: tuple[Any, Any]) -> None:
    model, _ = llama
    ids = _ids(model.spec.vocab_size, 19, seed=2).astype(np.int32)
    outputs = []
    for threads in (1, 2, 3):
        sequence = cpullm._C.Sequence(model._model())
        outputs.append(sequence.forward(ids, True, threads))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


def test_greedy_generation_matches_transformers(llama: tuple[Any, Any]) -> None:
    import torch

    model, hf_model = llama
    prompt = _ids(model.spec.vocab_size, 8, seed=4)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(prompt)[None], do_sample=False, max_new_tokens=32, min_new_tokens=32,
            eos_token_id=None, pad_token_id=0,
        )
    expected = out[0, len(prompt):].tolist()
    ours = list(model.generate_tokens(prompt, max_tokens=32, stop_token_ids=()))
    assert ours == expected


def test_bf16_weights_match_transformers_on_rounded_weights(make_llama: Any) -> None:
    import torch

    directory, hf_model = make_llama(seed=9, **CONFIGS["gqa3-hd24"])
    model = cpullm.load(directory, dtype="bf16", threads=2, kv_cache_dtype="f32")  # the weights' rounding alone
    rounded = type(hf_model)(hf_model.config).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in hf_model.state_dict().items()})
    ids = _ids(model.spec.vocab_size, 21)
    # Same arithmetic as f32 once the weights are rounded: activations stay f32 on our side.
    assert rel_err(model.logits(ids), hf_logits(rounded, ids)) < F32_TOL
    # And the rounding itself moves logits by about bf16's precision (2^-8), no more.
    assert rel_err(model.logits(ids), hf_logits(hf_model, ids)) < 2e-2


@pytest.mark.parametrize("source_dtype", ["bfloat16", "float16"])
def test_sharded_half_precision_checkpoint(make_llama: Any, source_dtype: str) -> None:
    import torch

    directory, hf_model = make_llama(seed=5, save_kwargs={"max_shard_size": "100KB"}, **CONFIGS["gqa3-hd24"])
    half = type(hf_model)(hf_model.config).eval()
    half.load_state_dict(hf_model.state_dict())
    half = half.to(getattr(torch, source_dtype))
    half.save_pretrained(directory, max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("*.safetensors"))) > 2
    reference = type(hf_model)(hf_model.config).eval()
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    model = cpullm.load(directory)
    ids = _ids(model.spec.vocab_size, 16)
    assert rel_err(model.logits(ids), hf_logits(reference, ids)) < F32_TOL


# int8 bounds on these random models (max |diff| / max |f32 logit|). Random Gaussian weights are the
# hard case for group-wise int8 (no structure, every group's max is an outlier): measured 0.03-0.06
# against f32 for group sizes 32-128, all of it the weights' rounding: against transformers running the
# dequantized weights the two-digit activations leave about 2e-4. Accuracy on real text is measured on
# SmolLM2 instead (top-1 agreement and perplexity ratio, docs/int8.md).
INT8_VS_F32_TOL = 0.1
INT8_VS_DEQUANTIZED_TOL = 1e-3


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int8_logits_stay_within_documented_bound(llama: tuple[Any, Any], group_size: int, isa: str) -> None:
    f32_model, hf_model = llama
    model = cpullm.load(f32_model.source, dtype="int8", group_size=group_size, threads=2)
    ids = _ids(model.spec.vocab_size, 33, seed=7)
    assert model.kv_cache_dtype == "f16"  # int8's default; its rounding is below int8's by far
    assert rel_err(model.logits(ids), hf_logits(hf_model, ids)) < INT8_VS_F32_TOL
    model.kv_cache_dtype = "f32"  # the weights' and activations' rounding alone from here on
    int8_logits = model.logits(ids)
    assert rel_err(int8_logits, hf_logits(hf_model, ids)) < INT8_VS_F32_TOL
    # Against transformers running the very weights we quantized (dequantized back to f32), only the
    # on-the-fly activation quantization remains.
    assert rel_err(int8_logits, hf_logits(dequantized_copy(hf_model, group_size), ids)) < INT8_VS_DEQUANTIZED_TOL


def test_int8_decode_with_cache_equals_full_pass(llama: tuple[Any, Any]) -> None:
    f32_model, _ = llama
    model = cpullm.load(f32_model.source, dtype="int8", threads=2, kv_cache_dtype="f32")
    ids = _ids(model.spec.vocab_size, 20, seed=8).astype(np.int32)
    full = model.logits(ids)
    sequence = cpullm._C.Sequence(model._model())
    stepped = np.concatenate([sequence.forward(ids[:7], True, 2)] + [sequence.forward(ids[i:i + 1], True, 2)
                                                                       for i in range(7, 20)])
    # Activations are quantized per token row, so prefill and decode compute identical products.
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("fast_prefill", [False, True], ids=["two-digit", "fast-prefill"])
def test_int8_prompts_give_the_same_bits_on_any_thread_count(llama: tuple[Any, Any], fast_prefill: bool,
                                                             isa: str) -> None:
    # From 32 tokens on, 2+ threads split a prompt's int8 matmuls by tokens as well as by weight rows
    # (Sequence::matmul: two parts, each the rows its threads quantized). Every output element is the
    # same sum however the rows are split, so each thread count must give the same bits: around the
    # threshold, with odd part sizes, and with fast prefill's one-digit rows on both sides of a part's
    # edge (only the last row's logits come back there, which every earlier row reaches through the
    # cache).
    f32_model, _ = llama
    model = cpullm.load(f32_model.source, dtype="int8", threads=2, fast_prefill=fast_prefill)
    for n_tokens in (31, 32, 33, 66, 101):
        ids = _ids(model.spec.vocab_size, n_tokens, seed=n_tokens).astype(np.int32)
        outputs = [model._new_sequence().forward(ids, not fast_prefill, threads) for threads in (1, 2, 3)]
        np.testing.assert_array_equal(outputs[1], outputs[0], err_msg=f"{n_tokens} tokens, 2 threads")
        np.testing.assert_array_equal(outputs[2], outputs[0], err_msg=f"{n_tokens} tokens, 3 threads")


def test_fast_prefill_matches_one_digit_reference(llama: tuple[Any, Any], isa: str) -> None:
    # Fast prefill: a prompt's rows but the last take one-digit activations, the last row (whose
    # logits come back) and every decoded token two. Against transformers on the same int8 weights
    # with that quantization stated in torch, cpullm differs by summation order (1e-4-2e-4 per row,
    # as with two digits everywhere) and by the rare activation that f32 noise puts on the other side
    # of a rounding boundary. With one digit such a flip moves an activation by a whole step, max / 127
    # of its group: measured in one of the four configs on Zen 4 (mha-hd64-tied on the AVX-512 paths), 0.21 of
    # the one-digit rows' whole effect (the distance to the same reference with two digits
    # everywhere, 0.009-0.014, which shows the mode is really on); the others 0.01-0.03 of it.
    f32_model, hf_model = llama
    model = cpullm.load(f32_model.source, dtype="int8", threads=2, kv_cache_dtype="f32", fast_prefill=True)
    ids = _ids(model.spec.vocab_size, 40, seed=21).astype(np.int32)
    assert model._new_sequence().fast_prefill
    got, fast_ref, exact_ref = fast_prefill_case(model, hf_model, ids, prompt=27)
    effect = rel_err(fast_ref, exact_ref)
    assert effect > 3e-3  # one digit moves the logits by far more than the bounds below
    assert rel_err(got, fast_ref) < 0.4 * effect
    # Without a flip every row is within 5e-4. A flip in a prompt row reaches every later row through
    # the cache (on an Intel Xeon with AMX, gqa4-hd40-llama3 gave 0.28 of the effect on every path, the
    # median row 1.8e-3): then the rows still follow the one-digit reference far more than the two-digit one.
    assert median_row_err(got, fast_ref) < max(5e-4, 0.4 * median_row_err(exact_ref, fast_ref))
    # Rows whose logits are all returned keep two digits: the same bits as without fast prefill.
    model_exact = cpullm.load(f32_model.source, dtype="int8", threads=2, kv_cache_dtype="f32")
    np.testing.assert_array_equal(model.logits(ids), model_exact.logits(ids))
    # A one-token prompt has no row without logits.
    np.testing.assert_array_equal(model._new_sequence().forward(ids[:1], False, 2),
                                  model_exact._new_sequence().forward(ids[:1], False, 2))


# Heads of 24 attend in f32 on every path; heads of 32 (a multiple of 16) over fast prefill's bf16
# copies where the path has a bf16 dot product (conftest.uses_bf16_attention).
FAST_PREFILL_SHAPES = [CONFIGS["gqa3-hd24"], dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2)]


@pytest.mark.parametrize("shape", FAST_PREFILL_SHAPES, ids=["hd24", "gqa4-hd32"])
def test_fast_prefill_switch(make_llama: Any, shape: dict[str, Any]) -> None:
    directory, _ = make_llama(seed=3, **shape)
    model = cpullm.load(directory, dtype="int8", threads=1)
    assert model.fast_prefill is False and model._new_sequence().fast_prefill is False
    model.fast_prefill = True
    assert model._new_sequence().fast_prefill is True
    with pytest.raises(ValueError, match="fast_prefill"):
        model.fast_prefill = "yes"
    with pytest.raises(ValueError, match="fast_prefill"):
        cpullm.load(directory, fast_prefill=1)
    # f32 weights have no int8 activations: the switch changes nothing there (nor the attention).
    f32 = cpullm.load(directory, threads=1, fast_prefill=True)
    ids = _ids(f32.spec.vocab_size, 30, seed=2).astype(np.int32)
    plain = cpullm.load(directory, threads=1)
    np.testing.assert_array_equal(f32._new_sequence().forward(ids, False, 1), plain._new_sequence().forward(ids, False, 1))


@pytest.mark.parametrize("shape", FAST_PREFILL_SHAPES, ids=["hd24", "gqa4-hd32"])
@pytest.mark.parametrize("fast", [False, True])
def test_feed_fills_the_cache_as_one_call_would(make_llama: Any, fast: bool, shape: dict[str, Any]) -> None:
    # Sequence.feed runs tokens into the cache without logits (no LM head; under fast prefill no row
    # keeps two digits, and with bf16 attention every row attends in bf16), so a prompt fed in parts and
    # finished with forward gives the bits of one call (1 thread: one summation order), with the default
    # and with fast prefill alike.
    directory, _ = make_llama(seed=5, **shape)
    model = cpullm.load(directory, dtype="int8", threads=1, fast_prefill=fast)
    ids = _ids(model.spec.vocab_size, 90, seed=4).astype(np.int32)
    whole = model._new_sequence().forward(ids, False, 1)
    parts = model._new_sequence()
    assert parts.feed(ids[:37], 1) is None and parts.n_past == 37
    parts.feed(ids[37:70], 1)
    np.testing.assert_array_equal(parts.forward(ids[70:], False, 1), whole)
    # A part that returned logits would have kept its last row at two digits: not the same cache.
    split = model._new_sequence()
    split.forward(ids[:37], False, 1)
    split.forward(ids[37:70], False, 1)
    assert np.array_equal(split.forward(ids[70:], False, 1), whole) == (not fast)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        parts.feed(np.array([model.spec.vocab_size], np.int32), 1)
