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


# Decode reads a matrix's rows in four streams, the range's quarters in step (KernelsImpl::
# one_token_streams), and a prompt's rows in tiles: every row must still be summed in the tiles' order,
# so that a token's logits do not depend on whether it came alone or with others. Row counts around the
# quarters (rows past the last whole quarter go alone) and inputs with vector tails.
@pytest.mark.parametrize("N", [1, 3, 4, 5, 9, 45, 130])
@pytest.mark.parametrize("K", [7, 64, 301])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_matmul_one_token_gives_the_prompt_rows_bits(isa: str, dtype: str, N: int, K: int) -> None:
    rng = np.random.default_rng(N * 31 + K)
    x, w = _rand(rng, 6, K), _rand(rng, N, K)
    matmul = C.matmul_f32 if dtype == "f32" else C.matmul_bf16
    weights = w if dtype == "f32" else f32_to_bf16_bits(w)
    prompt = matmul(x, weights)
    for t in range(len(x)):
        np.testing.assert_array_equal(matmul(x[t : t + 1], weights)[0], prompt[t], err_msg=f"token {t}")


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
    available = features["available_isas"]
    assert available[0] == "scalar"
    assert features["isa"] in available
    # Paths come in order of preference, each only where the CPU has what it needs.
    order = ["scalar", "neon", "neondot", "neoni8mm", "avx2", "avxvnni", "vnni256", "avx512", "avx512vnni",
             "avx512bf16", "amx"]
    assert available == [name for name in order if name in available]
    assert "avx512bf16" not in available or ("avx512vnni" in available and features["avx512bf16"])
    assert "amx" not in available or ("avx512bf16" in available and features["amx_int8"] and features["amx_bf16"])
    # Only the amx path computes fast prefill's rows on bf16 tiles.
    assert features["fast_rows_bf16"] == (features["isa"] == "amx")
    assert ("neon" in available) == features["neon"]  # AArch64 builds; sdot only where the CPU has it
    assert "neondot" not in available or (features["neon"] and features["neon_dotprod"])  # (compilers that know it)
    assert "neoni8mm" not in available or (features["neon"] and features["neon_i8mm"])
    x86 = features["avx2"] and features["fma"] and features["f16c"]
    assert ("vnni256" in available) == (x86 and features["avx512vl"] and features["avx512vnni"])
    assert "avxvnni" not in available or (x86 and features["avxvnni"])  # (built only by compilers that know it)
    import subprocess
    import sys
    import os

    env = {k: v for k, v in os.environ.items() if k != "CPULLM_ISA"}
    default = subprocess.run([sys.executable, "-c", "import cpullm._C as C; print(C.get_isa())"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert default == available[-1]
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


def test_every_path_passes_its_self_check_and_start_up_takes_the_best() -> None:
    import os
    import subprocess
    import sys

    available = C.cpu_features()["available_isas"]
    for name in available:
        assert C.self_check(name) == "", name
    with pytest.raises(ValueError, match="not supported"):
        C.self_check("no-such-isa")
    # A fresh start (no CPULLM_ISA) passes over nothing and says nothing: -W error turns a warning into
    # a failed import.
    env = {k: v for k, v in os.environ.items() if k != "CPULLM_ISA"}
    out = subprocess.run([sys.executable, "-W", "error", "-c",
                          "import cpullm, cpullm._C as C; print(C.get_isa(), len(C.self_check_failures()))"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [available[-1], "0"]


def test_a_path_failing_its_self_check_is_passed_over_with_a_warning() -> None:
    import cpullm

    available = C.cpu_features()["available_isas"]
    assert C.pick_isa([]) == (available[-1], [])
    if len(available) > 1:
        best = available[-1]
        assert C.pick_isa([best]) == (available[-2], [(best, "made to fail")])
    # Every path failing leaves the scalar one, the reference, which is never checked against itself.
    chosen, passed_over = C.pick_isa(available)
    assert chosen == "scalar"
    assert [isa for isa, _ in passed_over] == available[:0:-1]
    with pytest.warns(RuntimeWarning, match=r"avx512vnni kernels failed their start-up self-check \(int8 matmul "
                                            r"differs\); using avx512 instead"):
        cpullm._warn_self_check_failures([("avx512vnni", "int8 matmul differs")], "avx512")

# --- int8 ---------------------------------------------------------------------------------------

Q8_SHAPES = [(1, 1, 32, 32), (1, 7, 40, 32), (3, 17, 100, 32), (4, 9, 64, 64), (5, 37, 300, 64), (2, 5, 129, 128),
             (1, 70, 576, 32), (6, 11, 1000, 256)]
# Prompts: whole tiles of 16 tokens for the amx path, and tokens past them; groups cut into several
# 64-byte pieces (256) or a whole and a short one (96), a last group short of the others' short piece
# (200 = 2 * 96 + 8, 300 = 4 * 64 + 44, 1000 = 3 * 256 + 232).
Q8_PROMPT_SHAPES = [(16, 17, 100, 32), (35, 40, 300, 64), (21, 33, 576, 32), (18, 20, 1000, 256),
                    (40, 16, 200, 96), (33, 50, 192, 96)]


def _clamp127(v: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(v), -127, np.clip(v, -127, 127))


def _fast_max_shift(group: int) -> int:
    """The largest shift of a one-digit group's integer sum (group products of |digit| <= 127 and
    |weight| <= 128) that stays within int32."""
    shift = 0
    while shift < 30 and group * 127 * 128 * 2 ** (shift + 1) <= 2**31 - 1:
        shift += 1
    return shift


def _fast_scale_reference(row_scale: np.float32, scale: np.float32, group: int) -> np.float32:
    """A one-digit row's group scale (q8_fast_scale), by search: the row's largest group scale times
    the smallest power of two 2^-k, k in [0, max shift], at or above the group's own scale; a zero or
    subnormal group scale, or a row scale that is not finite, is left as it is."""
    if not np.isfinite(row_scale) or scale < np.finfo(np.float32).tiny:
        return scale
    exponent = int(np.frexp(row_scale)[1]) + 126  # the biased exponent of a normal float
    for k in range(min(_fast_max_shift(group), exponent - 1), -1, -1):
        candidate = np.float32(row_scale * np.float32(2.0**-k))
        if candidate >= scale:
            return candidate
    return row_scale


def _quantize_rows_reference(x: np.ndarray, group: int, one_digit_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Independent NumPy statement of the activation quantization the kernels promise: per group
    s = max|x| / 127, hi = rint(x * (1 / s)), lo = rint((x - hi * s) * (1 / (s / 127))), every step in
    float32 (the reciprocals are float32 divisions); rows [0, one_digit_rows) with one digit: s from
    _fast_scale_reference, lo = 0. Returns ([T, 2K] hi then lo, s / 127 per group)."""
    T, K = x.shape
    G = -(-K // group)
    q = np.zeros((T, 2 * K), np.int8)
    s = np.zeros((T, G), np.float32)
    for t in range(T):
        row_scale = np.float32(np.abs(x[t]).max()) / np.float32(127)
        for g in range(G):
            sl = slice(g * group, min(K, (g + 1) * group))
            part = x[t, sl]
            scale = np.float32(np.abs(part).max()) / np.float32(127)
            if t < one_digit_rows:
                scale = _fast_scale_reference(row_scale, scale, group)
            fine = scale / np.float32(127)
            s[t, g] = fine
            if fine >= np.finfo(np.float32).tiny:  # else (zero, or a subnormal fine step) both digits 0
                with np.errstate(invalid="ignore"):  # NaN (inf * 0) clamps to -127, as in the kernels
                    hi = _clamp127(np.rint(part * (np.float32(1) / scale))).astype(np.float32)
                    rest = (part - hi * scale).astype(np.float32)
                    lo = _clamp127(np.rint(rest * (np.float32(1) / fine)))
                q[t, sl] = hi.astype(np.int8)
                if t >= one_digit_rows:
                    q[t, K + sl.start:K + sl.stop] = lo.astype(np.int8)
    return q, s


def _combined(q: np.ndarray) -> np.ndarray:
    """127 * hi + lo: the integer each activation stands for, in units of its group's scale."""
    K = q.shape[1] // 2
    return 127 * q[:, :K].astype(np.int64) + q[:, K:].astype(np.int64)


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float64; NaN-free inputs."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return rounded.view(np.float32).astype(np.float64)


def _q8_bf16_reference(x: np.ndarray, wq: np.ndarray, ws: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Fast rows on bf16 tiles (Kernels::quantize_fast_bf16), stated in NumPy: each activation rounded
    to bf16, each weight q * ws in float32 rounded to bf16, the products summed in float64; and the same
    over |products| (the tile unit sums in float32)."""
    K = x.shape[1]
    xb = _bf16(x)
    wb = _bf16(wq.astype(np.float32) * np.repeat(ws, group, axis=1)[:, :K])
    return xb @ wb.T, np.abs(xb) @ np.abs(wb).T


def _q8_reference(xq: np.ndarray, xs: np.ndarray, wq: np.ndarray, ws: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """sum_g xs * ws * (exact integer dot of the group), in float64; and the same over |products|, which
    bounds every partial sum the kernel forms (its lanes may cancel)."""
    xc = _combined(xq)
    T, K = xc.shape
    G = xs.shape[1]
    y = np.zeros((T, wq.shape[0]))
    mag = np.zeros_like(y)
    for g in range(G):
        sl = slice(g * group, min(K, (g + 1) * group))
        scale = xs[:, g:g + 1].astype(np.float64) * ws[:, g].astype(np.float64)[None, :]
        y += (xc[:, sl] @ wq[:, sl].astype(np.int64).T) * scale
        mag += (np.abs(xc[:, sl]) @ np.abs(wq[:, sl]).astype(np.int64).T) * scale
    return y, mag


def test_activation_quantization_matches_numpy(isa: str) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, 333)) * np.exp(rng.standard_normal((7, 333)))).astype(np.float32)
    x[2, 64:96] = 0.0  # an all-zero group: scale 0, q 0
    for group in (32, 64, 128):
        q, s = C.quantize_q8(x, group)
        q_ref, s_ref = _quantize_rows_reference(x, group)
        np.testing.assert_array_equal(s, s_ref)
        np.testing.assert_array_equal(q, q_ref)


def test_activation_quantization_sums_and_tiny_groups(isa: str) -> None:
    # The VNNI paths take back 128 * sum(x) through the quantizer's per-group sums, so they must be
    # exact; a group whose fine step would be subnormal (max |x| below ~1.9e-34, where 1 / fine can
    # overflow) is all zero, tails and sums included, on every path.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 100)).astype(np.float32)
    x[1, 32:64] = 0.0
    x[1, 40], x[1, 41] = 1e-36, -3e-37
    x[2, 96:] = [1e-35, 0.0, -2e-35, 0.0]  # a short tail group of tiny values
    x[3, 64:96] = 1e-30  # small, but its fine step is a normal float: quantized as usual
    q, s, sums = C.quantize_q8(x, 32, with_sums=True)
    q_ref, s_ref = _quantize_rows_reference(x, 32)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)
    assert not q[1, 32:64].any() and not q[1, 132:164].any() and not q[2, 96:100].any()
    assert q[3, 64] == 127
    K = x.shape[1]
    hi, lo = q[:, :K].astype(np.int64), q[:, K:].astype(np.int64)
    for g in range(s.shape[1]):
        sl = slice(32 * g, min(K, 32 * (g + 1)))
        np.testing.assert_array_equal(sums[:, g], 128 * (127 * hi[:, sl].sum(1) + lo[:, sl].sum(1)))
    with pytest.raises(ValueError, match="multiple of 32"):
        C.quantize_q8(x, 2048)


def test_activation_quantization_of_a_nan_is_the_same_on_every_path(isa: str) -> None:
    # A NaN activation (a broken model, or a poisoned test) must not reach the int8 conversion, whose
    # result would be undefined: it is left out of its group's maximum and clamps to -127, on every path.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 100)).astype(np.float32)
    x[1, 10] = np.nan
    q, s = C.quantize_q8(x, 32)
    q_ref, s_ref = _quantize_rows_reference(np.nan_to_num(x, nan=0.0), 32)
    np.testing.assert_array_equal(s, s_ref)
    assert q[1, 10] == -127 and q[1, 100 + 10] == -127
    q_ref[1, 10] = q_ref[1, 110] = -127
    np.testing.assert_array_equal(q, q_ref)


def test_activation_quantization_of_infinities_is_the_same_on_every_path(isa: str) -> None:
    # An infinite activation makes its group's scale infinite, where the vector paths' padding lanes (a
    # short last group, K % 32 not a multiple of their width) would turn 0 - 0 * inf into a NaN digit:
    # digits, scales and sums must still be the portable version's.
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 75)).astype(np.float32)
    x[0, 70], x[1, 3], x[2, 64], x[3, 74] = np.inf, -np.inf, -np.inf, np.inf
    got = C.quantize_q8(x, 32, True, False)
    previous = C.get_isa()
    C.set_isa("scalar")
    try:
        expected = C.quantize_q8(x, 32, True, False)
    finally:
        C.set_isa(previous)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_wide_activations_hold_both_digits_in_one_int16(isa: str) -> None:
    # AVX2's matmul_q8 reads two-digit rows as int16 127 * hi + lo (one 16-bit multiply-add instead of
    # one int8 one per digit): those values must be the portable digits' exactly, scales and sums too,
    # for ordinary, zero, tiny, NaN and infinite inputs and a short last group; zero past K.
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((6, 203)) * np.exp(rng.standard_normal((6, 203)))).astype(np.float32)
    x[1, 32:64] = 0.0
    x[2, 40], x[2, 41] = 1e-36, -3e-37
    x[3, 10] = np.nan
    x[4, 70], x[5, 202] = np.inf, -np.inf
    for group in (32, 64, 512):
        wide = C.quantize_q8_wide(x, group)
        if wide is None:
            assert isa not in ("avx2", "avx512")  # the paths whose matmul_q8 reads it
            continue
        values, scales, sums = wide
        previous = C.get_isa()
        C.set_isa("scalar")
        try:
            q, s_ref, sums_ref = C.quantize_q8(x, group, with_sums=True)
        finally:
            C.set_isa(previous)
        K = x.shape[1]
        assert values.dtype == np.int16 and values.shape[1] >= K
        np.testing.assert_array_equal(values[:, :K], 127 * q[:, :K].astype(np.int32) + q[:, K:])
        assert not values[:, K:].any()
        np.testing.assert_array_equal(scales, s_ref)
        np.testing.assert_array_equal(sums, sums_ref)


def test_weight_quantizer_matches_numpy() -> None:
    from cpullm.dtypes import quantize_q8

    rng = np.random.default_rng(4)
    w = rng.standard_normal((13, 200)).astype(np.float32)
    q, s = quantize_q8(w, 64)
    q_ref, s_ref = _quantize_rows_reference(w, 64)
    np.testing.assert_array_equal(q, q_ref[:, :200])  # the weights keep the first digit only
    np.testing.assert_allclose(s / 127, s_ref, rtol=1e-6)


def test_weight_quantizer_in_row_chunks_is_the_whole_matrix_formula() -> None:
    # quantize_q8 works through a matrix a few MiB of rows at a time (bounding NumPy's temporaries at
    # load); rows are independent, so the result must be the whole-matrix formula's, bit for bit, across
    # chunk edges (600 rows of 65 groups of 64: 252 rows per chunk), a short last group and zero groups.
    from cpullm.dtypes import quantize_q8

    rng = np.random.default_rng(9)
    w = (rng.standard_normal((600, 4100)) * np.exp(rng.standard_normal((600, 1)))).astype(np.float32)
    w[251:254, :64] = 0.0
    q, s = quantize_q8(w, 64)
    padded = np.zeros((600, 65 * 64), np.float32)
    padded[:, :4100] = w
    blocks = padded.reshape(600, 65, 64)
    s_ref = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float32)
    q_ref = np.clip(np.rint(blocks / np.where(s_ref > 0, s_ref, 1)[:, :, None]), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(q, q_ref.reshape(600, -1)[:, :4100])


def test_two_digit_activations_are_about_14_bits() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    q, s = C.quantize_q8(x, 32)
    restored = _combined(q) * np.repeat(s, 32, axis=1)
    step = np.repeat(np.abs(x).reshape(4, 8, 32).max(axis=2), 32, axis=1) / 127 / 127
    assert np.all(np.abs(restored - x) <= 0.5 * step * 1.001 + 1e-12)


@pytest.mark.parametrize("T,N,K,group", Q8_SHAPES + Q8_PROMPT_SHAPES)
def test_matmul_q8_matches_numpy(isa: str, T: int, N: int, K: int, group: int) -> None:
    from cpullm.dtypes import quantize_q8

    rng = np.random.default_rng(T * 31 + N * 7 + K + group)
    x, w = _rand(rng, T, K), _rand(rng, N, K)
    wq, ws = quantize_q8(w, group)
    xq, xs = _quantize_rows_reference(x, group)
    expected, magnitude = _q8_reference(xq, xs, wq, ws, group)
    y = C.matmul_q8(x, wq, ws, group)
    # Integer sums are exact; only the f32 scaling and the sum over groups and lanes round.
    n_terms = -(-K // group) * 8
    assert np.all(np.abs(y - expected) <= 4 * np.finfo(np.float32).eps * n_terms * magnitude + 1e-30)
    # With two-digit activations, what remains is the weights' own rounding: the kernel equals the f32
    # product with dequantized weights to about 1e-4 of the magnitude.
    from cpullm.dtypes import dequantize_q8

    weight_only = x.astype(np.float64) @ dequantize_q8(wq, ws, group).astype(np.float64).T
    assert np.max(np.abs(y - weight_only)) <= 1e-4 * np.max(np.abs(x) @ np.abs(w).T)


def test_one_digit_quantization(isa: str) -> None:
    # Fast prefill's rows, on every path: one digit, each group's scale the row's largest times a power
    # of two (at most one bit coarser than the group's own max|x| / 127, unless 2^-max_shift of the row's
    # is coarser still), lo digits zero, sums 128 * 127 * sum(hi); also for a group of zeros, a group far
    # below the row's largest, a short last group (100 = 3 * 32 + 4), a row of tiny values and one with
    # an infinite activation (whose groups keep their own scales).
    rng = np.random.default_rng(11)
    x = _rand(rng, 7, 100) * np.exp(_rand(rng, 1, 100))
    x[3, 32:64] = 0.0
    x[4, 97] = np.inf
    x[5, 64:96] *= 1e-6  # below 2^-12 of the row's largest: k stops at the max shift
    x[6] *= np.float32(1e-31)  # row scale ~1e-33: 2^-12 of it is still normal, fine steps subnormal
    for group in (32, 64):
        q1, s1, sums1 = C.quantize_q8(x, group, with_sums=True, one_digit=True)
        q_ref, s_ref = _quantize_rows_reference(x, group, one_digit_rows=7)
        np.testing.assert_array_equal(s1, s_ref)
        np.testing.assert_array_equal(q1[:, :100], q_ref[:, :100])
        assert not q1[:, 100:].any()
        G = -(-100 // group)
        hi = q1[:, :100].astype(np.int64)
        expected = [[128 * 127 * hi[t, g * group:(g + 1) * group].sum() for g in range(G)] for t in range(7)]
        np.testing.assert_array_equal(sums1, expected)
        # Every group scale of a finite row: the row's largest times 2^-k, 0 <= k <= max shift.
        for t in (0, 1, 2, 3, 5):
            top = s1[t].max()
            for g in range(G):
                if s1[t, g] > 0:
                    ratio = float(top) / float(s1[t, g])
                    assert ratio == 2.0 ** round(np.log2(ratio)) and 1 <= ratio <= 2.0 ** _fast_max_shift(group)
        # Within half a step of the group's scale, which is under twice max|x| / 127 of the group (or
        # the row's largest times 2^-max_shift, for the group far below it).
        rows = [0, 1, 2, 3, 5]
        padded = np.pad(x[rows], ((0, 0), (0, G * group - 100)))
        own = np.repeat(np.abs(padded).reshape(len(rows), G, group).max(axis=2) / 127, group, axis=1)[:, :100]
        scale = 127 * np.repeat(s1[rows], group, axis=1)[:, :100]
        floor = np.repeat(127 * s1[rows].max(axis=1, keepdims=True) * 2.0 ** -_fast_max_shift(group), 100, axis=1)
        assert np.all(scale < np.maximum(2 * own, floor * 1.0001) * 1.0001)
        assert np.all(np.abs(hi[rows] * scale - x[rows]) <= 0.5 * scale * 1.001 + 1e-12)


@pytest.mark.parametrize("group", [32, 64, 512])
def test_one_digit_rows_at_the_largest_shift(isa: str, group: int) -> None:
    # The largest integer sums a one-digit group can have (every digit 127 against weights of -127 in
    # the row's largest group, whose shift is the max) stay exact: no int32 overflow on any path.
    K, N = 2 * group, 20
    x = np.ones((3, K), np.float32)
    x[:, group:] = 2.0**-20  # far below the first group: it takes the largest k
    w = -np.ones((N, K), np.float32)
    from cpullm.dtypes import quantize_q8

    wq, ws = quantize_q8(w, group)
    y = C.matmul_q8(x, wq, ws, group, one_digit_rows=3)
    xq, xs = _quantize_rows_reference(x, group, one_digit_rows=3)
    expected, magnitude = _q8_reference(xq, xs, wq, ws, group)
    assert np.all(np.abs(y - expected) <= 4 * np.finfo(np.float32).eps * 8 * magnitude)
    np.testing.assert_allclose(y, -(group + group * 2.0 ** -20), rtol=2e-3)


# (20, 40, 2300, 64): rows of more than 2,048 inputs, which the amx path's bf16 tiles take in passes.
@pytest.mark.parametrize("T,N,K,group", Q8_SHAPES + Q8_PROMPT_SHAPES + [(9, 33, 96, 32), (13, 40, 200, 64),
                                                                     (20, 40, 2300, 64)])
def test_matmul_q8_one_digit_rows(isa: str, T: int, N: int, K: int, group: int) -> None:
    """Fast prefill's rows: the first one_digit_rows rows with one digit, the others with two, in one
    call. Each row equals the exact integer reference of its own digits, and does not depend on the
    other rows; where the lo digits are zero anyway, one-digit rows (their groups scaled by shifts)
    equal two-digit rows within float rounding. On a path that computes fast rows on bf16 tiles (amx),
    those meet the bf16 reference instead."""
    from cpullm.dtypes import quantize_q8

    rng = np.random.default_rng(T * 13 + N * 5 + K + group)
    x, w = _rand(rng, T, K), _rand(rng, N, K)
    wq, ws = quantize_q8(w, group)
    n_terms = -(-K // group) * 8
    bf16_rows = C.cpu_features()["fast_rows_bf16"]
    results = {}
    for one_digit_rows in sorted({0, 1, T // 2, T - 1, T}):
        y = C.matmul_q8(x, wq, ws, group, one_digit_rows=one_digit_rows)
        if bf16_rows:
            xq, xs = _quantize_rows_reference(x, group)
            expected, magnitude = _q8_bf16_reference(x, wq, ws, group)
            # The tile unit's float32 sums of K products: within K eps of their magnitude.
            fast = slice(0, one_digit_rows)
            assert np.all(np.abs(y[fast] - expected[fast]) <= 2 * np.finfo(np.float32).eps * K * magnitude[fast] + 1e-30)
            # And a bf16 rounding from the two-digit result, far closer than one digit would be.
            exact, exact_magnitude = _q8_reference(xq, xs, wq, ws, group)
            assert np.all(np.abs(y[fast] - exact[fast]) <= 2.0 ** -7 * exact_magnitude[fast] + 1e-30)
        else:
            xq, xs = _quantize_rows_reference(x, group, one_digit_rows)
        expected, magnitude = _q8_reference(xq, xs, wq, ws, group)
        rows = slice(one_digit_rows if bf16_rows else 0, T)
        assert np.all(np.abs(y[rows] - expected[rows]) <= 4 * np.finfo(np.float32).eps * n_terms * magnitude[rows] + 1e-30)
        results[one_digit_rows] = y
    for r, y in results.items():
        np.testing.assert_array_equal(y[:r], results[T][:r])
        np.testing.assert_array_equal(y[r:], results[0][r:])
    # Activations that are whole multiples of their group's step (each group's largest is 127 steps)
    # have zero lo digits with or without fast prefill, and every group the row's scale.
    steps = rng.integers(-127, 128, size=(T, K)).astype(np.float32)
    steps[:, ::group] = 127
    exact = steps * np.float32(2.0 ** -7)
    # The same integers, scaled by shifts and a unit instead of per-group multiplies: the same within
    # the float rounding of both.
    if not bf16_rows:
        fast, default = C.matmul_q8(exact, wq, ws, group, one_digit_rows=T), C.matmul_q8(exact, wq, ws, group)
        _, magnitude = _q8_reference(*_quantize_rows_reference(exact, group), wq, ws, group)
        assert np.all(np.abs(fast - default) <= 8 * np.finfo(np.float32).eps * n_terms * magnitude + 1e-30)
    with pytest.raises(ValueError, match="one_digit_rows"):
        C.matmul_q8(x, wq, ws, group, one_digit_rows=T + 1)


@pytest.mark.parametrize("T,N,K,group", [(13, 40, 200, 64), (33, 50, 576, 32), (20, 40, 2300, 64), (9, 17, 96, 32)])
def test_matmul_q8_bits_agree_across_simd_paths(T: int, N: int, K: int, group: int) -> None:
    """Every SIMD path of this CPU (all but scalar, whose float steps are not fused, and amx, whose fast
    rows are bf16) gives the same bits for one- and two-digit rows: the same integer sums, scaled in the
    same order (one-digit rows by their shifts and unit), whatever the vector width or tile shape."""
    from cpullm.dtypes import quantize_q8

    paths = [isa for isa in C.cpu_features()["available_isas"] if isa not in ("scalar", "amx")]
    if len(paths) < 2:
        pytest.skip("fewer than two SIMD paths on this CPU")
    rng = np.random.default_rng(T + N + K)
    x, w = _rand(rng, T, K), _rand(rng, N, K)
    wq, ws = quantize_q8(w, group)
    previous = C.get_isa()
    try:
        results = {}
        for isa in paths:
            C.set_isa(isa)
            results[isa] = C.matmul_q8(x, wq, ws, group, one_digit_rows=T - 1)
    finally:
        C.set_isa(previous)
    for isa in paths[1:]:
        np.testing.assert_array_equal(results[isa], results[paths[0]], err_msg=f"{isa} against {paths[0]}")


@pytest.mark.skipif("amx" not in C.cpu_features()["available_isas"], reason="the CPU has no AMX (or the OS grants none)")
# One token (decode, in four streams on amx) over 3, 7 and 4 row blocks; rows of more than 2,048 inputs,
# which the fast rows take in passes (groups of 96 and 128 cut by a pass).
@pytest.mark.parametrize("T,N,K,group", Q8_PROMPT_SHAPES + [(128, 96, 576, 32), (64, 48, 2048, 64), (1, 33, 96, 32),
                                                           (1, 100, 96, 32), (1, 64, 576, 32), (33, 50, 2300, 32),
                                                           (17, 40, 2600, 128), (20, 33, 2400, 96)])
def test_amx_tiles_give_the_vnni_bits(T: int, N: int, K: int, group: int) -> None:
    """The amx path's int8 tiles compute the integer sums of the VNNI tiles and scale them in the same
    order: its two-digit rows, with and without fast rows before them, are the avx512bf16 path's bit for
    bit (which keeps a row's bits independent of the rows it is batched with: decode, chunked prompts,
    threads), also a prompt's one last row, which the fast rows' weight conversion sums. Its fast rows
    are bf16 tiles' (test_matmul_q8_one_digit_rows)."""
    from cpullm.dtypes import quantize_q8

    rng = np.random.default_rng(T + N + K + group)
    x, w = _rand(rng, T, K), _rand(rng, N, K)
    wq, ws = quantize_q8(w, group)
    previous = C.get_isa()
    try:
        for one_digit_rows in sorted({0, min(16, T), T // 2, max(T - 1, 0), T}):
            C.set_isa("amx")
            got = C.matmul_q8(x, wq, ws, group, one_digit_rows=one_digit_rows)
            C.set_isa("avx512bf16")
            np.testing.assert_array_equal(got[one_digit_rows:], C.matmul_q8(x, wq, ws, group)[one_digit_rows:])
    finally:
        C.set_isa(previous)


@pytest.mark.skipif("amx" not in C.cpu_features()["available_isas"], reason="the CPU has no AMX (or the OS grants none)")
@pytest.mark.parametrize("T,N,K", [(1, 70, 257), (1, 131, 1000), (3, 17, 15), (9, 70, 257)])
def test_amx_float_matmuls_read_ahead_with_the_same_bits(T: int, N: int, K: int) -> None:
    """The amx table's f32 / bf16 matmuls only request decode's weights ahead: the avx512bf16 bits."""
    rng = np.random.default_rng(T + N + K)
    x, w = _rand(rng, T, K), _rand(rng, N, K)
    bits = f32_to_bf16_bits(w)
    previous = C.get_isa()
    try:
        C.set_isa("amx")
        got = (C.matmul_f32(x, w), C.matmul_bf16(x, bits))
        C.set_isa("avx512bf16")
        np.testing.assert_array_equal(got[0], C.matmul_f32(x, w))
        np.testing.assert_array_equal(got[1], C.matmul_bf16(x, bits))
    finally:
        C.set_isa(previous)


def test_probe_matmul_q8_checks_its_sizes_and_kernel_bench_runs() -> None:
    """The kernel benchmark's timing hook refuses sizes it cannot hold, and tools/kernel_bench.py prints
    one line per shape, digit count and extension."""
    import subprocess
    import sys
    from pathlib import Path

    assert C.probe_matmul_q8(5, 70, 40, 32, 2, 2) > 0
    for bad in [(0, 64, 16, 32, 0, 1), (4, 64, 16, 48, 0, 1), (4, 64, 16, 32, 5, 1), (4, 64, 16, 32, -1, 1),
                (4, 1 << 21, 16, 32, 0, 1), (1 << 15, 1, 1 << 14, 32, 0, 1), (4, 64, 16, 32, 0, 0),
                (4, 64, 16, 32, 0, 1, 0)]:
        with pytest.raises(ValueError, match="probe_matmul_q8"):
            C.probe_matmul_q8(*bad)
    tool = Path(__file__).resolve().parents[1] / "tools" / "kernel_bench.py"
    out = subprocess.run([sys.executable, str(tool), "--shapes", "64x48", "100x20", "--tokens", "7", "--rounds", "1",
                          "--repeats", "1", "--threads", "2"], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("K=")]
    assert [line.split(":")[0] for line in lines] == [
        "K=64 N=48  1 digit   installed", "K=64 N=48  2 digits  installed",
        "K=100 N=20  1 digit   installed", "K=100 N=20  2 digits  installed"]
    bad_shape = subprocess.run([sys.executable, str(tool), "--shapes", "64by48"], capture_output=True, text=True,
                               timeout=60)
    assert bad_shape.returncode != 0 and "KxN" in bad_shape.stderr


@pytest.mark.parametrize("N,K,group", [(1, 1, 32), (17, 129, 32), (16, 64, 64), (33, 1000, 256), (5, 513, 512)])
def test_packed_q8_layout_round_trips(N: int, K: int, group: int) -> None:
    """The kernels' packed layout (16-row blocks, 4-byte quads, scales per group) holds exactly the
    row-major weights: reading each row back equals NumPy's dequantization, padding included."""
    from cpullm.dtypes import dequantize_q8, quantize_q8

    rng = np.random.default_rng(N * 1000 + K)
    wq, ws = quantize_q8(_rand(rng, N, K), group)
    np.testing.assert_array_equal(C.q8_unpack(wq, ws, group), dequantize_q8(wq, ws, group))


def test_q8_rejects_bad_group() -> None:
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        C.matmul_q8(x, np.zeros((2, 64), np.int8), np.zeros((2, 4), np.float32), 16)
    with pytest.raises(ValueError, match="up to 512"):
        C.matmul_q8(x, np.zeros((2, 64), np.int8), np.zeros((2, 1), np.float32), 1024)


@pytest.mark.parametrize("n", [1, 7, 16, 33, 1000])
def test_silu_mul_matches_numpy(isa: str, n: int) -> None:
    rng = np.random.default_rng(n)
    gate = (rng.standard_normal(n) * 8).astype(np.float32)
    gate[: min(n, 4)] = [-100.0, 100.0, 0.0, -0.0][: min(n, 4)]  # saturated ends and zero
    up = rng.standard_normal(n).astype(np.float32)
    g = gate.astype(np.float64)
    expected = g / (1.0 + np.exp(-g)) * up
    # The vector exp is within a few ulp; silu's division and product add a few more roundings.
    np.testing.assert_allclose(C.silu_mul(gate, up), expected, rtol=8 * np.finfo(np.float32).eps, atol=1e-30)


@pytest.mark.parametrize("n,hd,first", [(1, 64, 0), (5, 64, 0), (17, 48, 0), (40, 128, 0), (300, 80, 0), (16, 24, 0),
                                         (33, 40, 17), (70, 64, 5), (300, 80, 113), (9, 64, 8), (256, 64, 0),
                                         (257, 64, 0), (900, 64, 0), (1000, 40, 600), (800, 64, 255)])
def test_attend_matches_numpy(isa: str, n: int, hd: int, first: int) -> None:
    # first > 0: a sliding window that starts inside a key block of the cache's layout; the binding
    # pads the last block with NaN, which must not leak into the result. Past 256 positions the range is
    # cut into chunks whose results are folded (a window may start in any chunk).
    rng = np.random.default_rng(n * hd + first)
    q = rng.standard_normal(hd).astype(np.float32)
    k = rng.standard_normal((n, hd)).astype(np.float32)
    v = rng.standard_normal((n, hd)).astype(np.float32)
    scale = 1.0 / np.sqrt(hd)
    s = k[first:].astype(np.float64) @ q.astype(np.float64) * scale
    p = np.exp(s - s.max())
    expected = (p / p.sum()) @ v[first:].astype(np.float64)
    # f32 dot products of length hd and a softmax over n terms: a few hundred ulp of the magnitude.
    bound = 64 * np.finfo(np.float32).eps * (np.sqrt(hd) + np.sqrt(n)) * np.abs(v).max()
    assert np.max(np.abs(C.attend(q, k, v, scale, first) - expected)) <= bound


def test_f16_rounding_matches_numpy(isa: str) -> None:
    # The f16 KV cache's conversion, against NumPy's float16 (round to nearest even): every magnitude
    # from subnormals to the top of the range, exact ties, signed zeros, infinities and NaN. Beyond the
    # largest f16 the cache saturates at +-65504 where NumPy gives infinities. On every path (the vector
    # ones convert whole vectors and leave a tail to the portable code), so the cache holds the same bits.
    rng = np.random.default_rng(16)
    x = np.concatenate([
        rng.standard_normal(20000) * np.exp2(rng.uniform(-30, 17, 20000)),
        # halfway between neighbouring f16 values (normal and subnormal): ties go to the even one
        (np.arange(-3000, 3000, dtype=np.float64) + 0.5) * 2.0**-24,
        (np.arange(1024, 2048, dtype=np.float64) + 0.5) * 2.0**-10,
        [0.0, -0.0, 65504.0, -65504.0, 65519.99, 2.0**-25, -(2.0**-25), 2.0**-25 * 1.0001, 2.0**-14, 5.9604645e-08],
    ]).astype(np.float32)
    x = x[np.abs(x) < 65520]  # these round to finite f16 values in NumPy too
    ours = C.to_f16(x)
    np.testing.assert_array_equal(ours, x.astype(np.float16).view(np.uint16))
    big = np.array([65520.0, 70000.0, 3e38, -65520.0, -1e6, np.inf, -np.inf, np.nan], np.float32)
    np.testing.assert_array_equal(C.from_f16(C.to_f16(big))[:5], [65504.0, 65504.0, 65504.0, -65504.0, -65504.0])
    assert C.from_f16(C.to_f16(big))[5] == 65504.0 and C.from_f16(C.to_f16(big))[6] == -65504.0
    assert np.isnan(C.from_f16(C.to_f16(big))[7])
    # Every NaN is the one NaN the portable code writes (sign kept), in and past the vector lanes, as
    # are the saturated values; odd lengths leave tails of every size.
    odd = np.array([np.nan, -np.nan, 1.5, 65520.0, -np.inf, 2.0**-25, -0.0, 65519.0, -65520.0, -1e6, 70000.0,
                    1e-40, -3e-39, 2.0**-24 * 1.5, -(2.0**-24) * 2.5, 65504.0] * 3, np.float32)
    odd[9] = np.frombuffer(np.uint32(0x7F800001).tobytes(), np.float32)[0]  # a signalling NaN payload
    odd[20] = np.frombuffer(np.uint32(0xFFC12345).tobytes(), np.float32)[0]
    previous = C.get_isa()
    C.set_isa("scalar")
    try:
        portable = [C.to_f16(odd[:n]) for n in range(len(odd) + 1)]
    finally:
        C.set_isa(previous)
    for n in range(len(odd) + 1):
        np.testing.assert_array_equal(C.to_f16(odd[:n]), portable[n])
    assert C.to_f16(odd[:1])[0] == 0x7E00 and C.to_f16(odd[20:21])[0] == 0xFE00
    # Back to f32: exact for every one of the 65,536 bit patterns.
    bits = np.arange(1 << 16, dtype=np.uint16)
    back, expected = C.from_f16(bits), bits.view(np.float16).astype(np.float32)
    assert np.array_equal(np.isnan(back), np.isnan(expected))
    np.testing.assert_array_equal(back[~np.isnan(back)].view(np.uint32), expected[~np.isnan(expected)].view(np.uint32))


@pytest.mark.parametrize("n_q,n,hd,first", [(1, 1, 64, 0), (3, 37, 64, 0), (1, 300, 80, 113), (4, 17, 128, 0),
                                            (3, 700, 64, 100), (2, 50, 40, 3), (1, 1000, 24, 0), (3, 90, 20, 5)])
def test_attend_over_an_f16_cache_matches_numpy(isa: str, n_q: int, n: int, hd: int, first: int) -> None:
    # An f16 cache stores rounded keys and values; the products and sums stay f32, so against the
    # attention of the rounded values the bound is the f32 one. hd 40 and 24 (not whole 16-lane
    # vectors) take the general value path; hd 20 leaves a tail on 8- and 16-lane vectors alike.
    rng = np.random.default_rng(n_q * 7 + n + hd)
    q = rng.standard_normal((n_q, hd)).astype(np.float32)
    k = (rng.standard_normal((n, hd)) * 3).astype(np.float32)
    v = rng.standard_normal((n, hd)).astype(np.float32)
    kr, vr = (a.astype(np.float16).astype(np.float64) for a in (k, v))
    scale = 1.0 / np.sqrt(hd)
    s = q.astype(np.float64) @ kr[first:].T * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    expected = (p / p.sum(axis=1, keepdims=True)) @ vr[first:]
    bound = 64 * np.finfo(np.float32).eps * (np.sqrt(hd) + np.sqrt(n)) * np.abs(v).max()
    got = C.attend(q, k, v, scale, first, "f16")
    assert np.max(np.abs(got - expected)) <= bound
    # and it is not the f32 cache's result: the rounding is really applied
    assert n == 1 or np.max(np.abs(got - C.attend(q, k, v, scale, first))) > 0
    # The f16 path converts exactly and then does the f32 path's arithmetic, down to the fused
    # multiply-adds of the value sums' tail lanes: the same bits as an f32 cache holding the rounded values.
    k16, v16 = (a.astype(np.float16).astype(np.float32) for a in (k, v))
    np.testing.assert_array_equal(got, C.attend(q, k16, v16, scale, first))
    with pytest.raises(ValueError, match="kv_dtype"):
        C.attend(q, k, v, scale, first, "f8")


@pytest.mark.parametrize("n_q,n,hd,first", [(2, 37, 64, 0), (3, 100, 64, 21), (4, 17, 128, 0), (5, 50, 40, 3),
                                            (7, 300, 64, 200), (3, 9, 24, 0), (3, 700, 64, 100)])
def test_attend_several_heads_of_a_group_matches_numpy(isa: str, n_q: int, n: int, hd: int, first: int) -> None:
    # Heads of one KV group attend together (each key and value row loaded once for all of them), in
    # batches of up to 4: every head's result must be its own attention.
    rng = np.random.default_rng(n_q * 1000 + n + hd)
    q = rng.standard_normal((n_q, hd)).astype(np.float32)
    k = rng.standard_normal((n, hd)).astype(np.float32)
    v = rng.standard_normal((n, hd)).astype(np.float32)
    scale = 1.0 / np.sqrt(hd)
    s = q.astype(np.float64) @ k[first:].astype(np.float64).T * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    expected = (p / p.sum(axis=1, keepdims=True)) @ v[first:].astype(np.float64)
    bound = 64 * np.finfo(np.float32).eps * (np.sqrt(hd) + np.sqrt(n)) * np.abs(v).max()
    got = C.attend(q, k, v, scale, first)
    assert got.shape == (n_q, hd)
    assert np.max(np.abs(got - expected)) <= bound
    for h in range(n_q):  # one head alone gives the same numbers
        np.testing.assert_array_equal(C.attend(q[h], k, v, scale, first), got[h])


@pytest.mark.parametrize("group,tokens,n,hd,first,kv", [
    (3, 4, 37, 64, 0, "f16"), (4, 3, 300, 64, 0, "f16"), (1, 6, 20, 128, 0, "f32"), (2, 6, 70, 40, 5, "f32"),
    (5, 2, 50, 80, 3, "f16"), (3, 4, 260, 64, 0, "f32"), (6, 2, 17, 24, 0, "f16"), (7, 1, 40, 64, 2, "f32"),
    (3, 4, 4, 64, 0, "f16"), (4, 3, 530, 128, 100, "f16")])
def test_attend_over_a_tile_of_tokens_matches_numpy(isa: str, group: int, tokens: int, n: int, hd: int, first: int,
                                                    kv: str) -> None:
    # A prefill's consecutive tokens attend together: their query heads (group each) are batched as
    # rows that share every key and value row loaded, the causal mask giving each token one position
    # more than the one before it. Batches of rows mix tokens (6 rows, groups of 4 or 5), head sizes
    # take the register-split value path (80, 128 on 16 lanes) and the general one (40, 24), ranges
    # cross a 256-position chunk (260, 530, the tokens' ends all in the last one). Each token's rows
    # must give its own attention, bit for bit what the token alone gives (decode, or a cut tile).
    rng = np.random.default_rng(group * 1000 + tokens * 100 + n + hd)
    q = rng.standard_normal((tokens * group, hd)).astype(np.float32)
    k = (rng.standard_normal((n, hd)) * 2).astype(np.float32)
    v = rng.standard_normal((n, hd)).astype(np.float32)
    kr, vr = ((a.astype(np.float16) if kv == "f16" else a).astype(np.float64) for a in (k, v))
    scale = 1.0 / np.sqrt(hd)
    got = C.attend(q, k, v, scale, first, kv, group)
    assert got.shape == (tokens * group, hd)
    bound = 64 * np.finfo(np.float32).eps * (np.sqrt(hd) + np.sqrt(n)) * np.abs(v).max()
    for i in range(tokens):
        end = n - tokens + i + 1  # token i sees positions [first, end)
        rows = slice(i * group, (i + 1) * group)
        s = q[rows].astype(np.float64) @ kr[first:end].T * scale
        p = np.exp(s - s.max(axis=1, keepdims=True))
        expected = (p / p.sum(axis=1, keepdims=True)) @ vr[first:end]
        assert np.max(np.abs(got[rows] - expected)) <= bound, i
        np.testing.assert_array_equal(C.attend(q[rows], k[:end], v[:end], scale, first, kv), got[rows])
    if n > 256 and tokens > 1:  # tokens whose ends straddle a chunk are cut into two tiles by the model
        with pytest.raises(ValueError, match="one chunk"):
            C.attend(q, k[:257 + tokens - 2], v[:257 + tokens - 2], scale, first, kv, group)
    with pytest.raises(ValueError, match="per_token"):
        C.attend(q, k, v, scale, first, kv, -1)
    if group > 1:
        with pytest.raises(ValueError, match="per_token"):
            C.attend(np.concatenate([q, q[:1]]), k, v, scale, first, kv, group)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """f32 -> bf16 (the upper half of the f32, rounded to nearest even), back as f32: finite values."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def _bf16_attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, first: int,
                              end: int) -> tuple[np.ndarray, float]:
    """Fast prefill's bf16 attention stated in NumPy (float64 apart from the roundings it promises): q, k
    and v rounded to bf16, each 256-position chunk's softmax weights rounded to bf16 for its value sums,
    the chunks folded by their f32 statistics; and the largest weight, for the bound."""
    qr, kr, vr = (_round_bf16(a).astype(np.float64) for a in (q, k, v))
    outs, maxima, sums, largest = [], [], [], 0.0
    for a in range(first, end):
        if a != first and a % 256:
            continue
        b = min(end, (a // 256 + 1) * 256)
        s = qr @ kr[a:b].T * scale
        m = s.max(axis=1, keepdims=True)
        e = np.exp(s - m)
        p = e / e.sum(axis=1, keepdims=True)
        largest = max(largest, float(p.max()))
        outs.append(_round_bf16(p.astype(np.float32)).astype(np.float64) @ vr[a:b])
        maxima.append(m)
        sums.append(e.sum(axis=1, keepdims=True))
    top = np.max(maxima, axis=0)
    weights = [z * np.exp(m - top) for z, m in zip(sums, maxima)]
    return sum(w * o for w, o in zip(weights, outs)) / sum(weights), largest


@pytest.mark.parametrize("group,tokens,n,hd,first", [
    (1, 1, 37, 64, 0), (6, 1, 100, 64, 3), (4, 1, 17, 128, 0), (3, 4, 40, 64, 0), (2, 6, 9, 16, 1),
    (3, 2, 300, 64, 21), (5, 1, 530, 128, 100), (3, 3, 50, 80, 5), (2, 1, 20, 256, 0), (4, 3, 260, 96, 0),
    (7, 1, 33, 32, 0), (6, 2, 600, 64, 301)])
def test_bf16_attention_matches_numpy(isa: str, group: int, tokens: int, n: int, hd: int, first: int) -> None:
    """Fast prefill's one-digit rows attend over bf16 copies of the cache where the path has a bf16 dot
    product (the avx512bf16 path and amx, built on it): against NumPy with the same roundings (q, k, v and each chunk's
    softmax weights to bf16), within the f32 bound of the other attention tests plus one bf16 step of
    the largest weight (which the kernel's f32 softmax may round the other way than NumPy's); each
    token's rows bit for bit what the token alone gives. Heads of 16 to 256 (whole and split register
    rows, 80 and 96 one vector at a time), odd position counts (a zero pair past the last value, NaN past
    the last key), windows that start on odd positions and in later chunks."""
    rng = np.random.default_rng(group * 1000 + tokens * 100 + n + hd)
    q = rng.standard_normal((tokens * group, hd)).astype(np.float32)
    k = (rng.standard_normal((n, hd)) * 2).astype(np.float32)
    v = rng.standard_normal((n, hd)).astype(np.float32)
    scale = 1.0 / np.sqrt(hd)
    if isa not in ("avx512bf16", "amx"):
        with pytest.raises(ValueError, match="bf16 dot product"):
            C.attend(q, k, v, scale, first, "bf16", group)
        return
    got = C.attend(q, k, v, scale, first, "bf16", group)
    assert got.shape == (tokens * group, hd)
    bound = 64 * np.finfo(np.float32).eps * (np.sqrt(hd) + np.sqrt(n)) * np.abs(v).max()
    for i in range(tokens):
        end = n - tokens + i + 1
        rows = slice(i * group, (i + 1) * group)
        expected, largest = _bf16_attention_reference(q[rows], k[:end], v[:end], scale, first, end)
        assert np.max(np.abs(got[rows] - expected)) <= bound + 2.0**-7 * largest * np.abs(v).max(), i
        np.testing.assert_array_equal(C.attend(q[rows], k[:end], v[:end], scale, first, "bf16"), got[rows])
    # The roundings are really applied: about 2^-9 of the values' magnitude from the f32 attention.
    assert np.max(np.abs(got - C.attend(q, k, v, scale, first, "f32", group))) > 1e-4 * np.abs(v).max()
    with pytest.raises(ValueError, match="multiple of 16"):
        C.attend(q[:, :hd - 8], k[:, :hd - 8], v[:, :hd - 8], scale, first, "bf16", group)


def test_a_forced_kernel_path_the_cpu_cannot_run_is_reported() -> None:
    import os
    import subprocess
    import sys

    code = "import cpullm, cpullm._C as C; print(C.get_isa())"
    env = {**os.environ, "CPULLM_ISA": "bogus"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == C.cpu_features()["available_isas"][-1]
    assert "CPULLM_ISA='bogus' is not a kernel path this CPU can run" in result.stderr
    quiet = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                           env={**os.environ, "CPULLM_ISA": "scalar"}, timeout=60)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "scalar", quiet.stderr
