"""Hostile model files: hypothesis mutates real small models (headers, offsets, shapes, dtypes, JSON
values, truncation) of every format cpullm loads, and every mutant either loads and runs or raises an
exception of a known family. The campaign runs in a subprocess (tests/fuzz_worker.py) with a memory limit
and a per-case watchdog, so a crash, a hang or a huge allocation fails the test rather than the suite.

CPULLM_FUZZ_EXAMPLES=N sets the cases per format (default 100; docs/robustness.md has a larger run);
CPULLM_FUZZ_RANDOM=1 draws a fresh random campaign instead of the fixed, reproducible one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import cpullm
import cpullm.convert
from gguf_util import bpe_tokenizer, f32_state, matrices, write_gguf

WORKER = Path(__file__).with_name("fuzz_worker.py")
EXAMPLES = int(os.environ.get("CPULLM_FUZZ_EXAMPLES", "100"))
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _campaign(seeds: list[Path], tmp_path: Path) -> None:
    command = [sys.executable, str(WORKER), *map(str, seeds), "--examples", str(EXAMPLES), "--case-timeout", "120"]
    if os.environ.get("CPULLM_FUZZ_RANDOM"):
        command.append("--random")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    timeout = max(300, EXAMPLES * 10)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    report = f"exit status {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-12000:]}"
    assert proc.returncode == 0, report
    assert f"fuzz: {EXAMPLES} cases" in proc.stdout, report
    print(proc.stdout.strip())


def test_fuzz_hf_safetensors(make_llama: Any, tmp_path: Path) -> None:
    source, _ = make_llama(seed=21, vocab_size=64, **SMALL)
    (source / "generation_config.json").write_text('{"eos_token_id": 1}')
    _campaign([source], tmp_path)


def test_fuzz_converted(make_llama: Any, tmp_path: Path) -> None:
    source, _ = make_llama(seed=22, vocab_size=64, **SMALL)
    seeds = []
    for dtype in ("int8", "f32"):
        seeds.append(cpullm.convert.convert(source, tmp_path / f"conv-{dtype}", dtype=dtype, progress=False))
    _campaign(seeds, tmp_path)


def test_fuzz_gguf(make_llama: Any, tmp_path: Path) -> None:
    tok = bpe_tokenizer(pre="smollm")
    _, model = make_llama(seed=23, vocab_size=len(tok["tokens"]), **SMALL)
    seeds = []
    for qtype in ("F32", "Q8_0"):
        path = tmp_path / f"tiny-{qtype}.gguf"
        write_gguf(path, model.config, f32_state(model), tok, matrices(qtype))
        seeds.append(path)
    _campaign(seeds, tmp_path)


WRONG_TYPES = [[], {}, [1], {"type": []}, "x", None, -1, 0, 1e308, True]


def test_every_config_value_of_the_wrong_type(make_llama: Any, tmp_path: Path) -> None:
    """A sweep rather than a random draw: each config.json key (and the optional keys cpullm reads) set to
    each value of a wrong type or range gives a known exception, both at load and at convert."""
    import json
    import shutil

    source, _ = make_llama(seed=24, vocab_size=64, **SMALL)
    config = json.loads((source / "config.json").read_text())
    keys = sorted(set(config) | {"rope_scaling", "rope_parameters", "head_dim", "sliding_window", "use_sliding_window",
                                 "partial_rotary_factor", "num_local_experts", "num_experts_per_tok", "attention_bias"})
    work = tmp_path / "m"
    unexpected = []
    for key in keys:
        for value in WRONG_TYPES:
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(source, work)
            (work / "config.json").write_text(json.dumps({**config, key: value}))
            for action in ("load", "convert"):
                try:
                    if action == "load":
                        with cpullm.load(work, threads=1) as m:
                            m.logits([1, 2, 3])
                    else:
                        cpullm.convert.convert(work, tmp_path / "out", dtype="f32", force=True, progress=False)
                except (cpullm.CpullmError, ValueError, OSError):
                    pass
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    unexpected.append(f"{action} {key}={value!r}: {type(e).__name__}: {e}")
    assert not unexpected, "\n".join(unexpected)
