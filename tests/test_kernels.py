"""Each kernel against a NumPy reference, on every kernel path, at sizes that are not multiples of any
vector width (tails), and against the scalar path."""

from __future__ import annotations

import numpy as np
import pytest

import cpullm._C as C
from cpullm.dtypes import bf16_bits_to_f32, f32_to_bf16_bits

# (T, N, K): single-token decode, a few tokens, K below, at and just past the vector widths, odd N.
SHAPES = [(1, 1, 1), (1, 7, 5), (1, 33, 64), (3, 17, 15), (4, 16, 16), (5, 37, 129), (9, 70, 257), (1, 131, 1000)]


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _tolerance(K: int) -> float:
    # f32 accumulation of K products in a different order than float64: error grows ~ sqrt(K) * eps
    # relative to the sum of |terms|, bounded here against that sum (not the possibly cancelled result).
    return 8 * np.finfo(np.float32).eps * np.sqrt(K)


@pytest.mark.parametrize("T,N,K", SHAPES)
def test_matmul_f32_matches_numpy(isa: str, T: int, N: int, K: int) -> None:
    rng = np.random.default_rng(T * 1000 + N * 10 + K)
    x, w = _rand(rng, T, K), _rand(rng, N, K)
    expected = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    y = C.matmul_f32(x, w)
    assert y.shape == (T, N)
    assert np.all(np.abs(y - expected) <= _tolerance(K) * scale + 1e-30)


@pytest.mark.parametrize("T,N,K", SHAPES)
def test_matmul_bf16_matches_numpy(isa: str, T: int, N: int, K: int) -> None:
    rng = np.random.default_rng(T * 7 + N * 11 + K)
    x, w = _rand(rng, T, K), _rand(rng, N, K)
    bits = f32_to_bf16_bits(w)
    w_rounded = bf16_bits_to_f32(bits).astype(np.float64)
    expected = x.astype(np.float64) @ w_rounded.T
    scale = np.abs(x).astype(np.float64) @ np.abs(w_rounded).T
    y = C.matmul_bf16(x, bits)
    assert np.all(np.abs(y - expected) <= _tolerance(K) * scale + 1e-30)


@pytest.mark.parametrize("n", [1, 3, 8, 15, 16, 17, 31, 33, 64, 100, 1023])
def test_dot_and_axpy_match_numpy(isa: str, n: int) -> None:
    rng = np.random.default_rng(n)
    a, b = _rand(rng, n), _rand(rng, n)
    expected = float(a.astype(np.float64) @ b.astype(np.float64))
    assert abs(C.dot_f32(a, b) - expected) <= _tolerance(n) * float(np.abs(a) @ np.abs(b))

    y = _rand(rng, n)
    expected_y = y.astype(np.float64) + 0.37 * a.astype(np.float64)
    out = C.axpy_f32(0.37, a, y.copy())
    np.testing.assert_allclose(out, expected_y, rtol=1e-6, atol=1e-6)


def test_simd_paths_agree_with_scalar() -> None:
    rng = np.random.default_rng(42)
    x, w = _rand(rng, 6, 301), _rand(rng, 45, 301)
    previous = C.get_isa()
    try:
        results = {}
        for name in C.cpu_features()["available_isas"]:
            C.set_isa(name)
            results[name] = C.matmul_f32(x, w)
    finally:
        C.set_isa(previous)
    for name, y in results.items():
        np.testing.assert_allclose(y, results["scalar"], rtol=1e-5, atol=1e-4, err_msg=name)


def test_bf16_rounding_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    values = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
        np.array([0.0, -0.0, np.inf, -np.inf, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38], dtype=np.float32),
    ]).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16_bits(values), expected)
    assert np.isnan(bf16_bits_to_f32(f32_to_bf16_bits(np.array([np.nan], dtype=np.float32)))).all()


def test_cpu_features_report_and_forcing() -> None:
    features = C.cpu_features()
    assert features["available_isas"][0] == "scalar"
    assert features["isa"] in features["available_isas"]
    with pytest.raises(ValueError, match="not supported"):
        C.set_isa("no-such-isa")


def test_env_var_forces_scalar_path() -> None:
    import subprocess
    import sys
    import os

    env = {**os.environ, "CPULLM_ISA": "scalar"}
    out = subprocess.run(
        [sys.executable, "-c", "import cpullm._C as C; print(C.get_isa())"], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "scalar"
