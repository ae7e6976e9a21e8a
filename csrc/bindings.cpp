// The only file that knows pybind11. It turns NumPy arrays into views after checking dtype, layout and
// shape, keeps the arrays alive as long as the C++ objects that point into them, and releases the GIL
// around compute. C++ exceptions become Python ones (std::invalid_argument -> ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "cpu/dispatch.h"
#include "cpu/features.h"
#include "cpu/self_check.h"
#include "model/sampling.h"
#include "model/transformer.h"

namespace py = pybind11;
using namespace cpullm;

namespace {

using F32Array = py::array_t<float, py::array::c_style>;

WType wtype_of(const py::array& a, const std::string& name) {
  if (a.dtype().is(py::dtype::of<float>())) return WType::F32;
  // bf16 travels as its raw uint16 bits: NumPy has no bf16 type.
  if (a.dtype().is(py::dtype::of<uint16_t>())) return WType::BF16;
  if (a.dtype().is(py::dtype::of<int8_t>())) return WType::Q8;
  throw std::invalid_argument("tensor '" + name + "' has dtype " + std::string(py::str(a.dtype())) +
                              "; expected float32, uint16 holding bf16 bits, or int8");
}

TensorView view_of(const py::array& a, const std::string& name) {
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument("tensor '" + name + "' is not C-contiguous");
  TensorView v;
  v.type = wtype_of(a, name);
  v.data = a.data();
  for (py::ssize_t i = 0; i < a.ndim(); ++i) v.shape.push_back(a.shape(i));
  return v;
}

// Owns the arrays the Transformer points into (not those it copied: see Transformer's `release`).
struct PyTransformer {
  std::map<std::string, py::array> arrays;
  std::unique_ptr<Transformer> model;
};

std::shared_ptr<PyTransformer> make_transformer(const py::dict& spec_dict, const py::dict& tensor_dict,
                                                const py::object& on_release) {
  ModelSpec s;
  auto get_int = [&](const char* key) {
    if (!spec_dict.contains(key)) throw std::invalid_argument(std::string("model spec: '") + key + "' is missing");
    const long long v = spec_dict[key].cast<long long>();
    if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max())
      throw std::invalid_argument(std::string("model spec: '") + key + "' = " + std::to_string(v) + " is out of range");
    return static_cast<int>(v);
  };
  s.n_layers = get_int("n_layers");
  s.dim = get_int("dim");
  s.n_heads = get_int("n_heads");
  s.n_kv_heads = get_int("n_kv_heads");
  s.head_dim = get_int("head_dim");
  s.ffn_dim = get_int("ffn_dim");
  s.vocab_size = get_int("vocab_size");
  s.max_context = get_int("max_context");
  s.rotary_dim = get_int("rotary_dim");
  s.group_size = get_int("group_size");
  s.norm_eps = spec_dict["norm_eps"].cast<float>();
  s.attn_scale = spec_dict["attn_scale"].cast<float>();
  s.rope_attn_factor = spec_dict["rope_attn_factor"].cast<float>();
  s.inv_freq = spec_dict["inv_freq"].cast<std::vector<float>>();
  // Optional keys (architecture features); absent means off.
  if (spec_dict.contains("inv_freq_long")) s.inv_freq_long = spec_dict["inv_freq_long"].cast<std::vector<float>>();
  if (spec_dict.contains("rope_switch")) s.rope_switch = get_int("rope_switch");
  if (spec_dict.contains("layer_windows")) s.layer_windows = spec_dict["layer_windows"].cast<std::vector<int>>();
  if (spec_dict.contains("n_experts")) s.n_experts = get_int("n_experts");
  if (spec_dict.contains("n_experts_used")) s.n_experts_used = get_int("n_experts_used");

  auto owner = std::make_shared<PyTransformer>();
  std::map<std::string, TensorView> views;
  for (auto item : tensor_dict) {
    const std::string name = item.first.cast<std::string>();
    py::array arr = py::reinterpret_borrow<py::array>(item.second);
    if (!py::isinstance<py::array>(item.second))
      throw std::invalid_argument("tensor '" + name + "' is not a NumPy array");
    views[name] = view_of(arr, name);
    owner->arrays[name] = arr;
  }
  PyTransformer* raw = owner.get();
  owner->model = std::make_unique<Transformer>(std::move(s), views, [&](const std::string& name) {
    raw->arrays.erase(name);
    if (!on_release.is_none()) on_release(name);
  });
  return owner;
}

// A sequence keeps its transformer (and so the weights) alive.
struct PySequence {
  std::shared_ptr<PyTransformer> owner;
  std::unique_ptr<Sequence> seq;
};

using TokenArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// Token ids from Python as int32, checked: an integer array (floats are refused rather than cast), 1-D,
// at most INT_MAX of them, every id representable (an id past 2^31 would otherwise wrap into the vocabulary). `what` names the
// call in errors; the range against the vocabulary is Sequence::forward's to check.
TokenArray token_ids(const py::object& given, const char* what) {
  // A list or tuple of ids becomes an array first (ints give int64, floats float64: refused below).
  const py::array tokens = py::isinstance<py::array>(given) ? py::reinterpret_borrow<py::array>(given)
                                                             : py::array(py::module_::import("numpy").attr("asarray")(given));
  const char kind = tokens.dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw std::invalid_argument(std::string(what) + ": token ids must be integers, got dtype " +
                                std::string(py::str(tokens.dtype())));
  if (tokens.ndim() != 1) throw std::invalid_argument(std::string(what) + ": token ids must be a 1-D array");
  if (tokens.shape(0) > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string(what) + ": too many tokens");
  if (py::isinstance<TokenArray>(tokens)) return py::reinterpret_borrow<TokenArray>(tokens);
  const auto wide = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(tokens);
  if (!wide) throw std::invalid_argument(std::string(what) + ": token ids must be 64-bit integers or narrower");
  TokenArray ids(wide.shape(0));
  int32_t* out = ids.mutable_data();
  for (py::ssize_t i = 0; i < wide.shape(0); ++i) {
    const int64_t v = wide.data()[i];
    // (uint64 ids past 2^63 arrive negative: refused as well, if not by value.)
    if (v < INT32_MIN || v > INT32_MAX)
      throw std::invalid_argument(std::string(what) + ": token id " + std::to_string(v) + " is outside the vocabulary");
    out[i] = static_cast<int32_t>(v);
  }
  return ids;
}

py::array_t<float> forward(PySequence& ps, const py::object& token_array, bool all_logits, int n_threads) {
  const TokenArray tokens = token_ids(token_array, "forward");
  const int n = static_cast<int>(tokens.shape(0));
  const int vocab = ps.owner->model->spec().vocab_size;
  const py::ssize_t rows = all_logits ? n : 1;
  py::array_t<float> logits({rows, static_cast<py::ssize_t>(vocab)});
  float* out = logits.mutable_data();
  const int32_t* ids = tokens.data();
  {
    py::gil_scoped_release release;
    ps.seq->forward(ids, n, out, all_logits, n_threads);
  }
  return logits;
}

template <class Fn>
F32Array matmul_impl(const F32Array& x, const py::array& w, Fn&& fn) {
  if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(1))
    throw std::invalid_argument("matmul: expected x [T, K] and w [N, K]");
  F32Array y({x.shape(0), w.shape(0)});
  fn(x.data(), x.shape(0), x.shape(1), w.data(), w.shape(0), y.mutable_data());
  return y;
}

// An int8 matmul's operands as the model makes them: T rows of x quantized per group (rows [0,
// one_digit_rows) with one digit, as fast prefill does) and the [N, K] weights packed, in huge pages
// like a model's. Sizes are the caller's to check.
// Groups of int8 activations and weights: whole 32-byte blocks, and at most kQ8MaxGroup inputs, beyond
// which the int32 sums can overflow.
void check_q8_group(const char* fn, int64_t group) {
  if (group <= 0 || group % kQ8Block != 0 || group > kQ8MaxGroup)
    throw std::invalid_argument(std::string(fn) + ": group must be a positive multiple of 32 up to 512");
}

struct Q8Problem {
  std::vector<int8_t> xq;
  std::vector<float> xs;
  std::vector<int32_t> sums, shifts;
  std::vector<float> units;
  PageArena packed;
  Q8Acts acts;
  Q8Weights w;

  Q8Problem(const float* x, int64_t T, int64_t K, const int8_t* wq, const float* ws, int64_t N, int64_t group,
            int64_t one_digit_rows)
      : w(q8_layout(N, K, group)) {
    const int64_t G = w.n_groups, stride = q8_act_stride(K);
    xq.resize(size_t(2 * T * stride));
    xs.resize(size_t(T * G));
    sums.resize(size_t(T * G));
    shifts.resize(size_t(T * G));
    units.resize(size_t(T));
    for (int64_t t = 0; t < T; ++t) {
      quantize_q8_for_matmul(kernels(), x + t * K, K, group, stride, xq.data() + 2 * t * stride, xs.data() + t * G,
                             sums.data() + t * G, t < one_digit_rows, shifts.data() + t * G, units.data() + t);
    }
    acts = q8_acts(xq.data(), xs.data(), sums.data(), T, K, shifts.data(), units.data());
    acts.one_digit_rows = one_digit_rows;
    packed = PageArena(size_t(w.block_bytes * w.n_blocks));
    pack_q8(wq, ws, w, packed.data());
    w.data = packed.data();
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cpullm's C++ core: kernels, the forward pass and the KV cache";

  // glibc keeps the pages of freed heap memory mapped; a load frees a lot of it (the JSON a tokenizer
  // is parsed from: ~45 MiB for a 128k-id vocabulary), which would otherwise stay in the RSS.
  m.def("trim_heap", []() {
#if defined(__GLIBC__)
    malloc_trim(0);
    return true;
#else
    return false;
#endif
  }, "Returns the C heap's free pages to the system where the C library can (glibc); True if it could.");
  m.def("cpu_features", []() {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512dq"] = f.avx512dq;
    d["avx512vnni"] = f.avx512vnni;
    d["avx512bf16"] = f.avx512bf16;
    d["avxvnni"] = f.avxvnni;
    d["amx_int8"] = f.amx_int8;
    d["amx_bf16"] = f.amx_bf16;
    d["bf16_attention"] = kernels().attend_bf16 != nullptr;  // of the path in use (fast prefill's attention)
    d["fast_rows_bf16"] = kernels().quantize_fast_bf16 != nullptr;  // of the path in use (fast prefill's int8 matmuls)
    d["neon"] = f.neon;
    d["neon_dotprod"] = f.neon_dotprod;
    d["neon_i8mm"] = f.neon_i8mm;
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;  // built without OpenMP: every kernel runs on the calling thread
#endif
    d["available_isas"] = available_isas();
    d["isa"] = std::string(kernels().name);
    return d;
  }, "What the CPU offers, which kernel paths can run here, and the one in use.");
  m.def("set_isa", &set_isa, py::arg("name"),
        "Switch the kernel path (scalar, neon, neondot, neoni8mm, avx2, avxvnni, vnni256, avx512, avx512vnni, avx512bf16, amx; see available_isas).");
  m.def("get_isa", []() { return std::string(kernels().name); });
  m.def("self_check", [](const std::string& name) {
    const std::string previous = kernels().name;
    set_isa(name);  // throws for a name this CPU cannot run
    const std::string why = self_check(kernels());
    set_isa(previous);
    return why;
  }, py::arg("name"), "The named kernel path's self-check against the scalar path: '' if it passes, else what differs.");
  m.def("self_check_failures", []() {
    py::list out;
    for (const SelfCheckFailure& f : self_check_failures()) out.append(py::make_tuple(f.isa, f.why));
    return out;
  }, "(path, why) for each kernel path start-up passed over because its self-check failed.");
  m.def("pick_isa", [](const std::vector<std::string>& failing) {
    // Start-up's choice, with the named paths made to fail their check: how tests see the fallback.
    std::vector<SelfCheckFailure> failures;
    const std::string name = pick_isa([&](const Kernels& k) {
      for (const std::string& f : failing)
        if (f == k.name) return std::string("made to fail");
      return self_check(k);
    }, failures);
    py::list passed_over;
    for (const SelfCheckFailure& f : failures) passed_over.append(py::make_tuple(f.isa, f.why));
    return py::make_tuple(name, passed_over);
  }, py::arg("failing"), "The path start-up would pick if the named ones failed their self-check, and those passed over.");

  // Kernels bound one by one, for tests against NumPy.
  m.def("matmul_f32", [](const F32Array& x, const F32Array& w) {
    return matmul_impl(x, w, [](const float* xp, int64_t T, int64_t K, const void* wp, int64_t N, float* y) {
      kernels().matmul_f32(xp, T, K, static_cast<const float*>(wp), 0, N, y, N);
    });
  }, py::arg("x"), py::arg("w"), "y = x @ w.T with f32 weights");
  m.def("matmul_bf16", [](const F32Array& x, const py::array_t<uint16_t, py::array::c_style>& w) {
    return matmul_impl(x, w, [](const float* xp, int64_t T, int64_t K, const void* wp, int64_t N, float* y) {
      kernels().matmul_bf16(xp, T, K, static_cast<const uint16_t*>(wp), 0, N, y, N);
    });
  }, py::arg("x"), py::arg("w"), "y = x @ w.T with bf16 weights given as uint16 bits");
  m.def("quantize_q8", [](const F32Array& x, int64_t group, bool with_sums, bool one_digit) {
    if (x.ndim() != 2) throw std::invalid_argument("quantize_q8: expected x [T, K]");
    check_q8_group("quantize_q8", group);
    const int64_t T = x.shape(0), K = x.shape(1), G = (K + group - 1) / group, stride = q8_act_stride(K);
    py::array_t<int8_t> q({T, 2 * K});
    F32Array scales({T, G});
    py::array_t<int32_t> sums({T, G});
    std::vector<int8_t> row(static_cast<size_t>(2 * stride));
    for (int64_t t = 0; t < T; ++t) {
      kernels().quantize_q8(x.data() + t * K, K, group, stride, row.data(), scales.mutable_data() + t * G,
                            sums.mutable_data() + t * G, one_digit);
      std::memcpy(q.mutable_data() + 2 * t * K, row.data(), size_t(K));
      std::memcpy(q.mutable_data() + 2 * t * K + K, row.data() + stride, size_t(K));
    }
    if (with_sums) return py::tuple(py::make_tuple(q, scales, sums));
    return py::tuple(py::make_tuple(q, scales));
  }, py::arg("x"), py::arg("group"), py::arg("with_sums") = false, py::arg("one_digit") = false,
     "Per-group two-digit int8 quantization of activation rows: (q [T, 2K]: hi then lo digits, scales [T, G]"
     "[, sums [T, G]: 128 * (127 * sum(hi) + sum(lo)) per group]); one_digit: lo digits dropped, as fast "
     "prefill quantizes");
  m.def("quantize_q8_wide", [](const F32Array& x, int64_t group) -> py::object {
    if (x.ndim() != 2) throw std::invalid_argument("quantize_q8_wide: expected x [T, K]");
    check_q8_group("quantize_q8_wide", group);
    const Kernels& k = kernels();
    if (!k.quantize_q8_wide) return py::none();
    const int64_t T = x.shape(0), K = x.shape(1), G = (K + group - 1) / group, stride = q8_act_stride(K);
    py::array_t<int16_t> values({T, stride});
    F32Array scales({T, G});
    py::array_t<int32_t> sums({T, G});
    for (int64_t t = 0; t < T; ++t)
      k.quantize_q8_wide(x.data() + t * K, K, group, stride, reinterpret_cast<int8_t*>(values.mutable_data() + t * stride),
                         scales.mutable_data() + t * G, sums.mutable_data() + t * G);
    return py::make_tuple(values, scales, sums);
  }, py::arg("x"), py::arg("group"),
     "The active ISA's wide layout of two-digit activation rows, if it has one (else None): (values [T, "
     "stride] int16 = 127 * hi + lo, zero past K; scales [T, G]; sums [T, G]), as its matmul_q8 reads them");
  m.def("matmul_q8", [](const F32Array& x, const py::array_t<int8_t, py::array::c_style>& wq, const F32Array& ws,
                        int64_t group, int64_t one_digit_rows) {
    if (x.ndim() != 2 || wq.ndim() != 2 || x.shape(1) != wq.shape(1))
      throw std::invalid_argument("matmul_q8: expected x [T, K] and wq [N, K]");
    check_q8_group("matmul_q8", group);
    const int64_t T = x.shape(0), K = x.shape(1), N = wq.shape(0), G = (K + group - 1) / group;
    if (ws.ndim() != 2 || ws.shape(0) != N || ws.shape(1) != G) throw std::invalid_argument("matmul_q8: ws must be [N, ceil(K / group)]");
    if (one_digit_rows < 0 || one_digit_rows > T) throw std::invalid_argument("matmul_q8: one_digit_rows must lie in [0, T]");
    const Q8Problem p(x.data(), T, K, wq.data(), ws.data(), N, group, one_digit_rows);
    F32Array y({T, N});
    kernels().matmul_q8(p.acts, p.w, 0, p.w.n_blocks, y.mutable_data(), N);
    return y;
  }, py::arg("x"), py::arg("wq"), py::arg("ws"), py::arg("group"), py::arg("one_digit_rows") = 0,
     "y = x @ dequant(wq, ws).T with x quantized per group on the fly, as the model does (the first "
     "one_digit_rows rows with one digit, as fast prefill does)");
  m.def("q8_unpack", [](const py::array_t<int8_t, py::array::c_style>& wq, const F32Array& ws, int64_t group) {
    if (wq.ndim() != 2 || group <= 0 || group % kQ8Block != 0 || group > kQ8MaxGroup)
      throw std::invalid_argument("q8_unpack: expected wq [N, K] and a group that is a multiple of 32 up to 512");
    const int64_t N = wq.shape(0), K = wq.shape(1);
    Q8Weights w = q8_layout(N, K, group);
    if (ws.ndim() != 2 || ws.shape(0) != N || ws.shape(1) != w.n_groups)
      throw std::invalid_argument("q8_unpack: ws must be [N, ceil(K / group)]");
    std::vector<uint8_t> packed(size_t(w.block_bytes * w.n_blocks));
    pack_q8(wq.data(), ws.data(), w, packed.data());
    w.data = packed.data();
    F32Array out({N, K});
    for (int64_t n = 0; n < N; ++n) q8_row(w, n, out.mutable_data() + n * K);
    return out;
  }, py::arg("wq"), py::arg("ws"), py::arg("group"),
     "Packs int8 weights into the kernels' layout and reads every row back dequantized (a layout test)");
  m.def("probe_q8_peak", [](int64_t iterations, int threads) {
    if (iterations < 1 || threads < 1 || threads > 1024) throw std::invalid_argument("probe_q8_peak: bad arguments");
    int64_t checksum = 0;
    {
      py::gil_scoped_release release;
      const auto fn = kernels().q8_peak_loop;
#pragma omp parallel for num_threads(threads) reduction(+ : checksum)
      for (int t = 0; t < threads; ++t) checksum += fn(iterations);
    }
    return checksum;
  }, py::arg("iterations"), py::arg("threads"),
     "Runs the int8 peak loop on each thread (iterations x 8 x 32 multiply-adds per thread)");
  m.def("probe_matmul_q8", [](int64_t T, int64_t K, int64_t N, int64_t group, int64_t one_digit_rows,
                              int repeats, int threads) {
    // The int8 matmul alone on made-up data (no quantization or packing in the timed calls): a kernel
    // benchmark for tools/kernel_bench.py. Threads claim chunks of row blocks as the model's matmuls do
    // (matmul_chunk, dynamically). Returns the best of `repeats` calls, in seconds.
    if (T < 1 || K < 1 || N < 1 || T > (1 << 16) || K > (1 << 20) || N > (1 << 20) || T * K > (int64_t(1) << 28) ||
        T * N > (int64_t(1) << 28) || N * K > (int64_t(1) << 30) || repeats < 1 || threads < 1 || threads > 1024)
      throw std::invalid_argument("probe_matmul_q8: sizes out of range");
    check_q8_group("probe_matmul_q8", group);
    if (one_digit_rows < 0 || one_digit_rows > T) throw std::invalid_argument("probe_matmul_q8: one_digit_rows must lie in [0, T]");
    uint32_t state = 12345;
    const auto next = [&state]() { return state = state * 1664525u + 1013904223u; };
    std::vector<int8_t> wq(size_t(N * K));
    for (auto& v : wq) v = static_cast<int8_t>(int(next() >> 24) % 255 - 127);
    std::vector<float> ws(size_t(N * ((K + group - 1) / group)), 0.01f), x(size_t(T * K));
    for (auto& v : x) v = float(next() >> 8) / float(1 << 23) - 1.f;
    const Q8Problem p(x.data(), T, K, wq.data(), ws.data(), N, group, one_digit_rows);
    std::vector<float> y(size_t(T * N));
    double best = 1e30;
    {
      py::gil_scoped_release release;
      for (int r = 0; r < repeats; ++r) {
        const auto start = std::chrono::steady_clock::now();
        const int64_t blocks = p.w.n_blocks, chunk = matmul_chunk(WType::Q8, blocks, threads);
#pragma omp parallel for num_threads(threads) schedule(dynamic)
        for (int64_t b0 = 0; b0 < blocks; b0 += chunk)
          kernels().matmul_q8(p.acts, p.w, b0, std::min(blocks, b0 + chunk), y.data(), N);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
    }
    return best;
  }, py::arg("T"), py::arg("K"), py::arg("N"), py::arg("group"), py::arg("one_digit_rows"), py::arg("repeats"),
     py::arg("threads") = 1,
     "Times the int8 matmul of T rows by an [N, K] matrix: the best of `repeats` calls, seconds");
  m.def("probe_read", [](const py::array_t<int64_t, py::array::c_style>& data, int threads) {
    // Sums a large array: a read-bandwidth probe. Each thread reads a contiguous slice.
    if (threads < 1 || threads > 1024) throw std::invalid_argument("probe_read: bad thread count");
    const int64_t* p = data.data();
    const int64_t n = data.size();
    int64_t total = 0;
    {
      py::gil_scoped_release release;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
      for (int64_t i = 0; i < n; ++i) total += p[i];
    }
    return total;
  }, py::arg("data"), py::arg("threads"));
  m.def("dot_f32", [](const F32Array& a, const F32Array& b) {
    if (a.ndim() != 1 || b.ndim() != 1 || a.shape(0) != b.shape(0)) throw std::invalid_argument("dot: expected two 1-D arrays of one length");
    return kernels().dot_f32(a.data(), b.data(), a.shape(0));
  });
  m.def("silu_mul", [](const F32Array& gate, const F32Array& up) {
    if (gate.ndim() != 1 || up.ndim() != 1 || gate.shape(0) != up.shape(0))
      throw std::invalid_argument("silu_mul: expected two 1-D arrays of one length");
    F32Array out(gate.shape(0));
    kernels().silu_mul(gate.data(), up.data(), out.mutable_data(), gate.shape(0));
    return out;
  }, py::arg("gate"), py::arg("up"), "silu(gate) * up");
  m.def("to_f16", [](const F32Array& x) {
    py::array_t<uint16_t> out(x.request().shape);
    const float* src = x.data();
    uint16_t* dst = out.mutable_data();
    std::vector<Half> halves(static_cast<size_t>(x.size()));
    kernels().to_f16(src, halves.data(), x.size());
    for (py::ssize_t i = 0; i < x.size(); ++i) dst[i] = halves[size_t(i)].bits;
    return out;
  }, py::arg("x"), "The f16 bits a half-precision KV cache stores for each value (nearest even, saturating)");
  m.def("from_f16", [](const py::array_t<uint16_t, py::array::c_style | py::array::forcecast>& bits) {
    F32Array out(bits.request().shape);
    for (py::ssize_t i = 0; i < bits.size(); ++i) out.mutable_data()[i] = half_to_float(Half{bits.data()[i]});
    return out;
  }, py::arg("bits"), "f16 bits back to f32 (exact)");
  m.def("attend", [](const F32Array& q, const F32Array& k, const F32Array& v, float scale, int64_t first,
                     const std::string& kv_dtype, int64_t per_token) {
    // q: [hd] for one head or [n_q, hd] for several heads of one KV group; with per_token, the heads of
    // n_q / per_token consecutive tokens, the last of which sees every position.
    if ((q.ndim() != 1 && q.ndim() != 2) || k.ndim() != 2 || v.ndim() != 2 || k.shape(1) != q.shape(q.ndim() - 1) ||
        v.shape(1) != k.shape(1) || k.shape(0) != v.shape(0) || k.shape(0) < 1)
      throw std::invalid_argument("attend: expected q [hd] or [n_q, hd], k [n, hd], v [n, hd] with n >= 1");
    const int64_t n = k.shape(0), hd = k.shape(1), n_q = q.ndim() == 2 ? q.shape(0) : 1;
    if (n_q < 1) throw std::invalid_argument("attend: no query heads");
    if (per_token == 0) per_token = n_q;
    if (per_token < 1 || n_q % per_token != 0) throw std::invalid_argument("attend: per_token must divide n_q");
    const int64_t last = n - n_q / per_token;  // the first token's
    if (first < 0 || first > last) throw std::invalid_argument("attend: first must be in [0, n - tokens]");
    if (last / kAttendChunk != (n - 1) / kAttendChunk)
      throw std::invalid_argument("attend: the tokens' last positions must lie in one chunk of positions");
    // The cache's layout: keys transposed in blocks of kKeyBlock positions (the tail block padded with
    // NaN, which must not reach the result), values as given.
    const int64_t blocks = (n + kKeyBlock - 1) / kKeyBlock;
    if (kv_dtype != "f32" && kv_dtype != "f16" && kv_dtype != "bf16")
      throw std::invalid_argument("attend: kv_dtype must be \"f32\", \"f16\" or \"bf16\"");
    if (kv_dtype == "bf16" && !kernels().attend_bf16)
      throw std::invalid_argument(std::string("attend: kv_dtype \"bf16\" needs a kernel path with a bf16 dot product, "
                                              "not ") + kernels().name);
    if (kv_dtype == "bf16" && (hd % 16 != 0 || hd > kBf16MaxHeadDim))
      throw std::invalid_argument("attend: kv_dtype \"bf16\" takes heads of a multiple of 16 up to " +
                                  std::to_string(kBf16MaxHeadDim));
    std::vector<float> kt(size_t(blocks * kKeyBlock * hd), std::numeric_limits<float>::quiet_NaN());
    for (int64_t p = 0; p < n; ++p)
      for (int64_t d = 0; d < hd; ++d) kt[(p / kKeyBlock * hd + d) * kKeyBlock + p % kKeyBlock] = k.data()[p * hd + d];
    std::vector<float> scores(size_t(kAttendHeads) * (kAttendChunk + 2 * kKeyBlock));
    std::vector<float> part(size_t(n_q * (hd + 4)));
    F32Array out(q.ndim() == 2 ? std::vector<py::ssize_t>{n_q, hd} : std::vector<py::ssize_t>{hd});
    if (kv_dtype == "bf16") {  // fast prefill's bf16 copies, made from an f32 cache as the model makes them
      std::vector<Bf16> kb(kt.size()), vb(size_t((n + 1) / 2 * 2 * hd));
      kernels().pair_bf16(kt.data(), kKeyBlock, kKeyBlock, blocks * hd, kb.data());
      kernels().pair_bf16(v.data(), hd, hd, n, vb.data());
      attend_chunked(kernels(), q.data(), n_q, kb.data(), vb.data(), first, last, per_token, hd, scale, scores.data(),
                     part.data(), out.mutable_data());
    } else if (kv_dtype == "f16") {  // the cache's f16 form of the same layout (NaN padding stays NaN)
      std::vector<Half> kh(kt.size()), vh(size_t(n * hd));
      for (size_t i = 0; i < kt.size(); ++i) kh[i] = float_to_half(kt[i]);
      for (size_t i = 0; i < vh.size(); ++i) vh[i] = float_to_half(v.data()[i]);
      attend_chunked(kernels(), q.data(), n_q, kh.data(), vh.data(), first, last, per_token, hd, scale,
                     scores.data(), part.data(), out.mutable_data());
    } else {
      attend_chunked(kernels(), q.data(), n_q, kt.data(), v.data(), first, last, per_token, hd, scale, scores.data(),
                     part.data(), out.mutable_data());
    }
    return out;
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("first") = 0, py::arg("kv_dtype") = "f32",
     py::arg("per_token") = 0,
     "softmax(scale * k[first:] @ q) @ v[first:] for one head, or for each row of q (in chunks of positions, as the "
     "model does), over a cache of kv_dtype (\"f16\": k and v rounded to f16 first; \"bf16\": fast prefill's attention, over bf16 copies, "
     "on kernel paths that have it). per_token > 0: q's rows are "
     "the heads of consecutive tokens, per_token each, causally masked: the last token sees every position, each "
     "one before it one fewer");
  m.def("axpy_f32", [](float alpha, const F32Array& x, F32Array y) {
    if (x.ndim() != 1 || y.ndim() != 1 || x.shape(0) != y.shape(0)) throw std::invalid_argument("axpy: expected two 1-D arrays of one length");
    kernels().axpy_f32(alpha, x.data(), y.mutable_data(), x.shape(0));
    return y;
  }, "y += alpha * x, in place; returns y");

  // Sampling: one call per generated token.
  using Logits = py::array_t<float, py::array::c_style | py::array::forcecast>;
  using Ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  const auto spec_of = [](float temperature, int64_t top_k, double top_p, double min_p, float penalty) {
    SamplingSpec spec;
    spec.temperature = temperature;
    spec.top_k = top_k;
    spec.top_p = top_p;
    spec.min_p = min_p;
    spec.repetition_penalty = penalty;
    return spec;
  };
  m.def("filter_logits", [spec_of](const Logits& logits, float temperature, int64_t top_k, double top_p, double min_p,
                                   float repetition_penalty, const Ids& seen) {
    if (logits.ndim() != 1 || seen.ndim() != 1) throw std::invalid_argument("filter_logits: expected 1-D logits and seen ids");
    std::vector<int64_t> ids;
    std::vector<double> probs;
    filter_logits(logits.data(), logits.shape(0), spec_of(temperature, top_k, top_p, min_p, repetition_penalty),
                  seen.data(), seen.shape(0), ids, probs);
    py::array_t<int64_t> ids_out(static_cast<py::ssize_t>(ids.size()));
    py::array_t<double> probs_out(static_cast<py::ssize_t>(probs.size()));
    std::copy(ids.begin(), ids.end(), ids_out.mutable_data());
    std::copy(probs.begin(), probs.end(), probs_out.mutable_data());
    return py::make_tuple(ids_out, probs_out);
  }, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
     py::arg("repetition_penalty"), py::arg("seen"),
     "(ids, probs): the tokens sampling may choose and their probabilities (see cpullm.sampling)");
  m.def("sample_token", [spec_of](const Logits& logits, float temperature, int64_t top_k, double top_p, double min_p,
                                  float repetition_penalty, const Ids& seen, double u) {
    if (logits.ndim() != 1 || seen.ndim() != 1) throw std::invalid_argument("sample_token: expected 1-D logits and seen ids");
    return sample_token(logits.data(), logits.shape(0), spec_of(temperature, top_k, top_p, min_p, repetition_penalty),
                        seen.data(), seen.shape(0), u);
  }, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
     py::arg("repetition_penalty"), py::arg("seen"), py::arg("u"),
     "One token: the arg-max when greedy, else drawn from filter_logits' distribution with the uniform u");

  py::class_<PyTransformer, std::shared_ptr<PyTransformer>>(m, "Transformer")
      .def(py::init(&make_transformer), py::arg("spec"), py::arg("tensors"), py::arg("on_release") = py::none(),
           "Builds the model over arrays the caller keeps (it also holds references to them). int8 matrices "
           "are copied into the kernels' packed layout; on_release(name), if given, is called for each "
           "tensor no longer needed, so its memory can be released while loading.");

  py::class_<PySequence>(m, "Sequence")
      .def(py::init([](std::shared_ptr<PyTransformer> t, const std::string& kv_dtype) {
             if (!t || !t->model) throw std::invalid_argument("Sequence: model must be a loaded Transformer, got None");
             KVType kv;
             if (kv_dtype == "f32")
               kv = KVType::F32;
             else if (kv_dtype == "f16")
               kv = KVType::F16;
             else
               throw std::invalid_argument("kv_dtype must be \"f32\" or \"f16\", got \"" + kv_dtype + "\"");
             auto ps = std::make_unique<PySequence>();
             ps->owner = std::move(t);
             ps->seq = std::make_unique<Sequence>(*ps->owner->model, kv);
             return ps;
           }), py::arg("model"), py::arg("kv_dtype") = "f32",
           "A sequence over the model, its KV cache of f32 or f16 elements")
      .def_property_readonly("kv_dtype", [](const PySequence& s) { return s.seq->kv_type() == KVType::F16 ? "f16" : "f32"; })
      .def_property("fast_prefill", [](const PySequence& s) { return s.seq->fast_prefill(); },
                    [](PySequence& s, bool on) { s.seq->set_fast_prefill(on); },
                    "One int8 digit for the activations of rows whose logits are not returned (see docs/int8.md)")
      .def_property_readonly("n_past", [](const PySequence& s) { return s.seq->n_past(); })
      .def_property_readonly("capacity", [](const PySequence& s) { return s.seq->capacity(); })
      .def("truncate", [](PySequence& s, int n) { s.seq->truncate(n); }, py::arg("n"))
      .def("reserve", [](PySequence& s, int n) { s.seq->reserve(n); }, py::arg("positions"),
           "Sizes the cache for min(positions, max_context) positions ahead of time (backed as written).")
      .def("forward", &forward, py::arg("tokens"), py::arg("all_logits"), py::arg("threads"),
           "Runs new tokens after the cached ones; returns logits [T or 1, vocab].")
      .def("feed", [](PySequence& ps, const py::object& token_array, int n_threads) {
             const TokenArray tokens = token_ids(token_array, "feed");
             const int n = static_cast<int>(tokens.shape(0));
             const int32_t* ids = tokens.data();
             py::gil_scoped_release release;
             ps.seq->forward(ids, n, nullptr, false, n_threads);
           }, py::arg("tokens"), py::arg("threads"),
           "Runs new tokens after the cached ones into the cache only (no logits; under fast prefill "
           "every one of them takes one digit).");
}
