"""`cpullm bench` reports every figure, sanely, as text and JSON (no speed is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest


def test_bench_json_and_table(make_llama: Any) -> None:
    directory, _ = make_llama(seed=31)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    cmd = [sys.executable, "-m", "cpullm", "bench", str(directory), "--dtype", "int8", "--prompt-tokens", "20",
           "--gen-tokens", "5", "--repeats", "2", "--threads", "1"]
    result = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["dtype"] == "int8" and data["threads"] == 1 and data["repeats"] == 2
    assert data["kv_cache_dtype"] == "f16"  # int8's default
    assert data["prompt_tokens"] == 20 and data["gen_tokens"] == 5
    for key in ("load_s", "prefill_tok_s", "ttft_ms", "decode_tok_s", "peak_rss_mb", "weights_mb"):
        assert data[key] > 0, key
    table = subprocess.run([*cmd, "--kv-cache-dtype", "f32"], capture_output=True, text=True, env=env, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "decode (5 tokens)" in table.stdout and "tok/s" in table.stdout
    assert "int8 / f32 / 1 /" in table.stdout  # dtype / KV cache / threads / kernels
    assert data["fast_prefill"] is False and "fast prefill" not in table.stdout
    fast = subprocess.run([*cmd, "--fast-prefill", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert fast.returncode == 0, fast.stderr
    assert json.loads(fast.stdout)["fast_prefill"] is True
    bad = subprocess.run([*cmd, "--kv-cache-dtype", "f8"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    too_long = subprocess.run([*cmd[:5], "--prompt-tokens", "300", "--gen-tokens", "1"], capture_output=True,
                              text=True, env=env, timeout=120)
    assert too_long.returncode == 2 and "exceed the context length" in too_long.stderr


def test_bench_peers_pairs_ratios_within_rounds() -> None:
    # tools/bench_peers.py's paired ratios: each round's cpullm figure over the same round's peer figure,
    # not a ratio of medians (which mixes rounds the machine ran at different speeds).
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "bench_peers.py"
    spec = importlib.util.spec_from_file_location("bench_peers", path)
    bench_peers = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = bench_peers  # its dataclasses look their module up
    spec.loader.exec_module(bench_peers)
    ours = [{"prefill_tok_s": p, "decode_tok_s": 100.0} for p in (100.0, 300.0, 200.0)]
    peer = [{"prefill_tok_s": p, "decode_tok_s": 50.0} for p in (50.0, 300.0, 400.0)]
    runs = {("cpullm-int8", 1): ours, ("ctranslate2-int8", 1): peer, ("cpullm-bf16", 1): ours}
    lines = bench_peers.paired_ratios(runs, ["cpullm-int8", "cpullm-bf16", "ctranslate2-int8"], 1)
    assert [(line["ours"], line["peer"], line["metric"]) for line in lines] == [
        ("cpullm-int8", "ctranslate2-int8", "prefill"), ("cpullm-int8", "ctranslate2-int8", "decode")]
    # (the ratio of the medians would be 200 / 300)
    assert lines[0]["per_round"] == [2.0, 1.0, 0.5] and lines[0]["median"] == 1.0
    assert lines[1]["per_round"] == [2.0, 2.0, 2.0] and lines[1]["median"] == 2.0


def test_peer_accuracy_scores_cpullm_against_transformers(make_llama: Any) -> None:
    # tools/peer_accuracy.py's workers: cpullm f32 through Model.logits and transformers f32 on the same
    # windows give the same top-1 tokens and log-likelihoods (to f32 summation order), each window's
    # last position left out (it predicts nothing in the text).
    import importlib.util
    from pathlib import Path

    import numpy as np

    tools = Path(__file__).resolve().parent.parent / "tools"
    sys.path.insert(0, str(tools))
    try:
        spec = importlib.util.spec_from_file_location("peer_accuracy", tools / "peer_accuracy.py")
        peer_accuracy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peer_accuracy)
    finally:
        while str(tools) in sys.path:  # the module adds it too
            sys.path.remove(str(tools))
    directory, _ = make_llama(seed=37)
    rng = np.random.default_rng(2)
    chunks = [rng.integers(0, 256, size=n).tolist() for n in (40, 17)]  # the tiny model's vocabulary is 256
    reference = peer_accuracy.worker("transformers-f32", str(directory), 1, chunks, 8)
    ours = peer_accuracy.worker("cpullm-f32", str(directory), 1, chunks, 8)
    assert len(reference["top1"]) == len(ours["top1"]) == 39 + 16
    assert ours["top1"] == reference["top1"]
    np.testing.assert_allclose(ours["loglik"], reference["loglik"], rtol=1e-4, atol=1e-4)
    # A -fast engine runs int8_accuracy's generation protocol; on f32 weights fast prefill changes nothing,
    # so it must give the one-pass logits at generated_positions.
    fast = peer_accuracy.worker("cpullm-int8-fast", str(directory), 1, chunks, 8)
    positions = peer_accuracy.generated_positions(chunks, 8)
    assert len(positions) == 3 * 8 + 8 and fast["generated_only"]
    assert fast["top1"] == [ours["top1"][i] for i in positions]
    np.testing.assert_allclose(fast["loglik"], np.asarray(ours["loglik"])[positions], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown engine"):
        peer_accuracy.worker("onnx-f32", str(directory), 1, chunks, 8)
