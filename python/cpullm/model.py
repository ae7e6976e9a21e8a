"""``Model``: a loaded model, its raw forward pass and generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import _C
from .errors import ContextOverflowError, CpullmError, ModelFormatError
from .spec import ModelSpec
from .tokenizer import Tokenizer


class Model:
    """A loaded model: shared weights, any number of sequences (each with its own KV cache)."""

    def __init__(
        self,
        spec: ModelSpec,
        tensors: dict[str, np.ndarray],
        *,
        tokenizer: Tokenizer | None,
        generation_config: Mapping[str, Any],
        config: Mapping[str, Any],
        dtype: str,
        threads: int,
        source: Path,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config)
        self.config = dict(config)
        self.dtype = dtype
        self.threads = threads
        self.source = source
        self.weights_bytes = sum(int(a.nbytes) for a in tensors.values())
        try:
            self._native: Any = _C.Transformer(spec.to_native(), tensors)
        except ValueError as e:
            raise ModelFormatError(f"{source}: {e}") from e
        self.eos_token_ids = _eos_ids(self.generation_config, self.config)

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Releases the weights (and their memory maps once nothing else refers to them)."""
        self._native = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _model(self) -> Any:
        if self._native is None:
            raise CpullmError("this model has been closed")
        return self._native

    # --- raw forward ----------------------------------------------------------------------------
    def _token_array(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence of integers")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab_size}), got range [{ids.min()}, {ids.max()}]")
        if ids.size > self.spec.max_context:
            raise ContextOverflowError(f"{ids.size} tokens exceed the context length {self.spec.max_context}")
        return ids.astype(np.int32)

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 [T, vocab] logits of one full forward pass over ``token_ids`` (a fresh cache)."""
        ids = self._token_array(token_ids)
        sequence = _C.Sequence(self._model())
        return sequence.forward(ids, True, self.threads)

    # --- generation -----------------------------------------------------------------------------
    def generate_tokens(
        self,
        prompt_ids: Sequence[int] | np.ndarray,
        max_tokens: int = 256,
        stop_token_ids: Sequence[int] | None = None,
    ) -> Iterator[int]:
        """Yields greedily chosen token ids, one per decode step, until a stop id (the model's EOS ids
        unless ``stop_token_ids`` is given; not yielded), ``max_tokens``, or the end of the context."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        ids = self._token_array(prompt_ids)
        stops = set(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        sequence = _C.Sequence(self._model())
        logits = sequence.forward(ids, False, self.threads)
        step = np.empty(1, dtype=np.int32)
        for _ in range(max_tokens):
            token = int(np.argmax(logits[-1]))
            if token in stops:
                return
            yield token
            if sequence.n_past >= self.spec.max_context:
                return
            step[0] = token
            logits = sequence.forward(step, False, self.threads)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int] | Sequence[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise CpullmError(f"{self.source} has no tokenizer.json: pass token ids instead of text")
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt)
        return prompt

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256) -> Iterator[str]:
        """Yields the reply's text in pieces as it is generated (greedy). A piece never ends inside a
        character that is split across tokens."""
        if self.tokenizer is None:
            raise CpullmError(f"{self.source} has no tokenizer.json: use generate_tokens() with token ids")
        generated: list[int] = []
        emitted = 0
        for token in self.generate_tokens(self._prompt_ids(prompt), max_tokens):
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 sequence: wait for the next token
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if len(text) > emitted:
            yield text[emitted:]

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256) -> str:
        """The greedy continuation of ``prompt`` (text or token ids) as text."""
        return "".join(self.stream(prompt, max_tokens))

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Model({str(self.source)!r}, {s.model_type}, layers={s.n_layers}, dim={s.dim}, "
            f"dtype={self.dtype}, threads={self.threads})"
        )


def _eos_ids(generation_config: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[int, ...]:
    value = generation_config.get("eos_token_id", config.get("eos_token_id"))
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))
