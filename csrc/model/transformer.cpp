#include "model/transformer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <limits>
#include <stdexcept>
#include <type_traits>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/dispatch.h"

namespace cpullm {

namespace {

constexpr int kMaxThreads = 1024;
// Attention scores a thread needs: Kernels::attend scores up to kAttendHeads query heads at once, over
// one chunk, which covers up to one more key block than its positions.
constexpr size_t kScoreStride = size_t(kAttendHeads) * (kAttendChunk + 2 * kKeyBlock);
// The most consecutive tokens whose query heads of one KV group attend together in a prefill (see
// Sequence::attention): about two of Kernels::attend's batches of rows (12 rows for groups of 2, 3, 4
// and 6; one token for groups of 7 and more, already a batch of their own), at most kTileTokens.
constexpr int64_t kTileTokens = 6;
int64_t tile_tokens(const ModelSpec& s) {
  return std::clamp<int64_t>(2 * kAttendHeads / (s.n_heads / s.n_kv_heads), 1, kTileTokens);
}
// A thread's attention scratch: attend_chunked's for a tile's rows, then the tile's query and output rows.
size_t attend_part_floats(const ModelSpec& s) {
  const size_t rows = size_t(tile_tokens(s) * (s.n_heads / s.n_kv_heads));
  return rows * size_t(s.head_dim + 4) + 2 * rows * size_t(s.head_dim);
}
// Refuse dimensions whose products could overflow the 64-bit index arithmetic below or that no real
// model has: a hostile config must fail here, not in an allocation or a pointer offset.
constexpr int64_t kMaxDim = int64_t(1) << 24;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

void check_spec(const ModelSpec& s) {
  auto positive = [](const char* name, int v) {
    if (v <= 0 || v > kMaxDim) fail(std::string("model spec: ") + name + " = " + std::to_string(v) + " is out of range");
  };
  positive("n_layers", s.n_layers);
  positive("dim", s.dim);
  positive("n_heads", s.n_heads);
  positive("n_kv_heads", s.n_kv_heads);
  positive("head_dim", s.head_dim);
  positive("ffn_dim", s.ffn_dim);
  positive("vocab_size", s.vocab_size);
  positive("max_context", s.max_context);
  if (s.n_heads % s.n_kv_heads != 0)
    fail("model spec: n_heads (" + std::to_string(s.n_heads) + ") is not a multiple of n_kv_heads (" +
         std::to_string(s.n_kv_heads) + ")");
  if (s.rotary_dim < 0 || s.rotary_dim > s.head_dim || s.rotary_dim % 2 != 0)
    fail("model spec: rotary_dim " + std::to_string(s.rotary_dim) + " must be even and at most head_dim " +
         std::to_string(s.head_dim));
  if (static_cast<int64_t>(s.inv_freq.size()) != s.rotary_dim / 2)
    fail("model spec: inv_freq has " + std::to_string(s.inv_freq.size()) + " entries, expected rotary_dim / 2 = " +
         std::to_string(s.rotary_dim / 2));
  if (!(s.norm_eps >= 0.f) || !std::isfinite(s.norm_eps)) fail("model spec: norm_eps must be a finite number >= 0");
  if (!(s.attn_scale > 0.f) || !std::isfinite(s.attn_scale)) fail("model spec: attn_scale must be finite and > 0");
  if (!std::isfinite(s.rope_attn_factor)) fail("model spec: rope_attn_factor must be finite");
  if (s.group_size <= 0 || s.group_size % kQ8Block != 0 || s.group_size > kQ8MaxGroup)
    fail("model spec: group_size " + std::to_string(s.group_size) + " must be a positive multiple of " +
         std::to_string(kQ8Block) + " up to " + std::to_string(kQ8MaxGroup));
  for (float f : s.inv_freq)
    if (!std::isfinite(f)) fail("model spec: inv_freq holds a non-finite value");
  if (!s.inv_freq_long.empty()) {
    if (s.inv_freq_long.size() != s.inv_freq.size())
      fail("model spec: inv_freq_long has " + std::to_string(s.inv_freq_long.size()) + " entries, expected " +
           std::to_string(s.inv_freq.size()));
    for (float f : s.inv_freq_long)
      if (!std::isfinite(f)) fail("model spec: inv_freq_long holds a non-finite value");
    if (s.rope_switch <= 0 || s.rope_switch > kMaxDim)
      fail("model spec: rope_switch " + std::to_string(s.rope_switch) + " is out of range");
  }
  if (!s.layer_windows.empty() && static_cast<int64_t>(s.layer_windows.size()) != s.n_layers)
    fail("model spec: layer_windows has " + std::to_string(s.layer_windows.size()) + " entries, expected n_layers = " +
         std::to_string(s.n_layers));
  for (int w : s.layer_windows)
    if (w < 0) fail("model spec: a sliding window must be >= 0, got " + std::to_string(w));
  if (s.n_experts < 0 || s.n_experts > 4096) fail("model spec: n_experts " + std::to_string(s.n_experts) + " is out of range");
  if (s.n_experts > 0 && (s.n_experts_used < 1 || s.n_experts_used > s.n_experts))
    fail("model spec: n_experts_used " + std::to_string(s.n_experts_used) + " must be in [1, n_experts = " +
         std::to_string(s.n_experts) + "]");
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string r = "[";
  for (size_t i = 0; i < shape.size(); ++i) r += (i ? ", " : "") + std::to_string(shape[i]);
  return r + "]";
}

const TensorView* find(const std::map<std::string, TensorView>& tensors, const std::string& name, bool required) {
  auto it = tensors.find(name);
  if (it == tensors.end()) {
    if (required) fail("tensor '" + name + "' is missing");
    return nullptr;
  }
  if (!it->second.data) fail("tensor '" + name + "' has no data");
  return &it->second;
}

void check_shape(const std::string& name, const TensorView& t, const std::vector<int64_t>& expected) {
  if (t.shape != expected)
    fail("tensor '" + name + "' has shape " + shape_str(t.shape) + ", expected " + shape_str(expected));
}

// n < 0: any shape (the caller checks it).
const float* vector_f32(const std::map<std::string, TensorView>& tensors, const std::string& name, int64_t n,
                        bool required) {
  const TensorView* t = find(tensors, name, required);
  if (!t) return nullptr;
  if (n >= 0) check_shape(name, *t, {n});
  if (t->type != WType::F32) fail("tensor '" + name + "' must be float32");
  return static_cast<const float*>(t->data);
}

// The forward pass's per-row loops, compiled for AVX-512 and AVX2 too, one chosen by the CPU at load
// time (the rest of this file is built for the baseline ISA): the same operations in the same order at
// every width, with no contraction (-ffp-contract=off), so the same bits on every path (the logits of
// SmolLM2 int8 and f32, both prefill modes and a decode step, compared bit for bit). In SSE2, rmsnorm
// and Sequence::run's own loops had been 6.3 % of a 128-token SmolLM2 fast prefill (perf, -e cpu-clock,
// docs/performance.md's sixteenth round); tools/ab_forward.py, 1 thread,
// 4 rounds: exact prefill 1,276-1,302 -> 1,347-1,387 tok/s (fast prefill within noise). GNU ifuncs
// pick the clone: glibc's loader only.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
#define CPULLM_ROW_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CPULLM_ROW_LOOP
#endif

CPULLM_ROW_LOOP void add_row(float* row, const float* other, int64_t n) {
  for (int64_t i = 0; i < n; ++i) row[i] += other[i];
}

CPULLM_ROW_LOOP void rmsnorm(const float* x, const float* weight, float* out, int64_t n, float eps) {
  // Eight independent double sums: one running sum is a chain of dependent adds (4 cycles each), which
  // was ~3 % of a prefill on one thread. The compiler vectorises separate lanes without -ffast-math
  // (the order of the sum is this code's own, the same for every path).
  constexpr int kLanes = 8;
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += double(x[i + j]) * double(x[i + j]);
  double ss = 0.0;
  for (; i < n; ++i) ss += double(x[i]) * double(x[i]);
  for (int j = 0; j < kLanes; ++j) ss += lane[j];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / double(n)) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

void embedding_row(const Matrix& emb, int64_t row, float* out) {
  const int64_t n = emb.cols;
  if (emb.type == WType::F32) {
    std::memcpy(out, static_cast<const float*>(emb.data) + row * n, sizeof(float) * n);
  } else if (emb.type == WType::Q8) {
    q8_row(emb.q8, row, out);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(emb.data) + row * n;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = uint32_t(src[i]) << 16;
      std::memcpy(out + i, &bits, sizeof(float));
    }
  }
}

// transformers' rotate_half convention: dimension i pairs with i + rotary_dim / 2.
CPULLM_ROW_LOOP void apply_rope(float* head, const float* cos, const float* sin, int half) {
  for (int i = 0; i < half; ++i) {
    const float a = head[i], b = head[i + half];
    head[i] = a * cos[i] - b * sin[i];
    head[i + half] = b * cos[i] + a * sin[i];
  }
}

// The per-token steps between the matmuls are split across threads too once there are this many tokens
// to pay for the fork (on 2 threads they were ~7 % of a 128-token prefill, run by one thread).
constexpr int64_t kPerTokenParallel = 8;
// Rows per part at least, for a prompt's int8 matmul to be split by tokens too (Sequence::matmul).
constexpr int64_t kTokenSplit = 16;

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// body(i) or body(i, thread) for i in [0, n), thread in [0, n_threads): on n_threads OpenMP threads when
// `parallel` (statically split, or claimed one at a time with Schedule::kDynamic), else in this thread
// as thread 0 without entering OpenMP at all: a region whose if() clause is false still ends in
// libgomp's barrier, a futex system call, and a decoded token passes ~480 of them on one thread.
enum class Schedule { kStatic, kDynamic };
template <Schedule kind = Schedule::kStatic, class Body>
void parallel_for(int n_threads, bool parallel, int64_t n, const Body& body) {
  const auto call = [&](int64_t i, int thread) {
    if constexpr (std::is_invocable_v<const Body&, int64_t, int>)
      body(i, thread);
    else
      body(i);
  };
  if (!parallel || n_threads < 2 || n < 2) {
    for (int64_t i = 0; i < n; ++i) call(i, 0);
  } else if constexpr (kind == Schedule::kStatic) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) call(i, thread_id());
  } else {
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) call(i, thread_id());
  }
}

}  // namespace

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
}

int64_t matmul_chunk(WType type, int64_t units, int n_threads) {
  // One thread takes the whole matrix as one claim: the Q8 driver then requests each chunk's successor
  // while it works on the chunk (q8_impl.h), which it does only within a claim.
  if (n_threads < 2) return std::max<int64_t>(units, 1);
  const int64_t min_chunk = type == WType::Q8 ? 2 : 32;
  const int64_t chunk = (units + int64_t(n_threads) * 4 - 1) / (int64_t(n_threads) * 4);
  return std::max<int64_t>(min_chunk, (chunk + min_chunk - 1) / min_chunk * min_chunk);
}

bool huge_pages_enabled() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    // "always [madvise] never": the bracketed word is the mode; an unreadable file means no THP.
    std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return false;
    char line[128] = {};
    const bool read = std::fgets(line, sizeof line, f) != nullptr;
    std::fclose(f);
    return read && std::strstr(line, "[never]") == nullptr;
  }();
  return enabled;
#else
  return false;
#endif
}

#if defined(__unix__) || defined(__APPLE__)
PageArena::PageArena(size_t bytes) {
  if (bytes == 0) return;
  if (bytes > std::numeric_limits<size_t>::max() / 2) throw std::bad_alloc();
  const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  // Over-map by one huge page and trim, so that the arena starts on a 2 MiB boundary.
  void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > start) munmap(raw, aligned - start);
  munmap(reinterpret_cast<void*>(aligned + size), start + kHugePage - aligned);  // never empty: aligned < start + 2 MiB
  data_ = reinterpret_cast<uint8_t*>(aligned);
  size_ = size;
#if defined(MADV_HUGEPAGE)
  madvise(data_, size_, MADV_HUGEPAGE);  // a request: without THP it changes nothing
#endif
}

PageArena::~PageArena() {
  if (data_) munmap(data_, size_);
}

void PageArena::release(size_t offset, size_t bytes) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  if (offset >= size_) return;
  bytes = std::min(bytes, size_ - offset);
  const size_t begin = (offset + page - 1) / page * page, end = (offset + bytes) / page * page;
  if (end > begin) madvise(data_ + begin, end - begin, MADV_DONTNEED);
}
#else
PageArena::PageArena(size_t bytes) {
  if (bytes == 0) return;
  const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  data_ = static_cast<uint8_t*>(std::calloc(size, 1));
  if (!data_) throw std::bad_alloc();
  size_ = size;
}

PageArena::~PageArena() { std::free(data_); }

void PageArena::release(size_t, size_t) {}
#endif

uint8_t* Transformer::take_packed(size_t bytes) {
  // Decode streams every weight once per token; with 4 KiB pages each page costs a TLB miss whose page
  // walk the stream waits for. 2 MiB pages took a Zen 4 core from ~23 to ~31 GB/s over SmolLM2's 151 MB
  // of packed weights (its read bandwidth), where the previous Xeon showed no difference. Chunks rather
  // than one allocation per matrix, so that small matrices share huge pages instead of each rounding up.
  constexpr size_t kChunk = size_t(64) << 20;
  bytes = (bytes + 63) / 64 * 64;
  if (packed_.empty() || packed_.back().size() - packed_.back().used < bytes)
    packed_.emplace_back(std::max(bytes, kChunk));
  PageArena& chunk = packed_.back();
  uint8_t* p = chunk.data() + chunk.used;
  chunk.used += bytes;
  return p;
}

Matrix Transformer::matrix(const std::map<std::string, TensorView>& tensors, const std::string& name, int64_t rows,
                           int64_t cols, bool required, const std::function<void(const std::string&)>& release) {
  Matrix m;
  const TensorView* t = find(tensors, name, required);
  if (!t) return m;
  check_shape(name, *t, {rows, cols});
  m.type = t->type;
  m.data = t->data;
  m.rows = rows;
  m.cols = cols;
  if (m.type != WType::Q8) {
    // f32 / bf16 matrices are read in place from the file map, unless huge pages are to be had: then
    // a copy on them decoded SmolLM2 bf16 on a Zen 4 core ~40 % faster (72 -> 102 tok/s) than 4 KiB
    // file pages, for a longer load (0.1 -> 0.2 s; a 1B model 0.3 -> 0.9 s).
    if (!huge_pages_enabled()) return m;
    const size_t bytes = size_t(rows) * size_t(cols) * (m.type == WType::BF16 ? 2 : 4);
    uint8_t* copy = take_packed(bytes);
    std::memcpy(copy, t->data, bytes);
    m.data = copy;
    if (release) release(name);
    return m;
  }
  const int64_t group = spec_.group_size;
  const Q8Weights layout = q8_layout(rows, cols, group);
  const float* scales = vector_f32(tensors, name + ".scales", -1, true);
  check_shape(name + ".scales", tensors.at(name + ".scales"), {rows, layout.n_groups});
  uint8_t* packed = take_packed(size_t(layout.block_bytes) * size_t(layout.n_blocks));
  pack_q8(static_cast<const int8_t*>(t->data), scales, layout, packed);
  m.q8 = layout;
  m.q8.data = packed;
  m.data = nullptr;
  if (release) {
    release(name);
    release(name + ".scales");
  }
  return m;
}

const float* Transformer::vector(const std::map<std::string, TensorView>& tensors, const std::string& name, int64_t n,
                                 bool required, const std::function<void(const std::string&)>& release) {
  // A copy rather than the file map in place: with large page-cache folios (Linux 6.x) one fault on a
  // norm vector mapped the whole folio around it, ~1.4 MiB of neighbouring (already packed) scales
  // each: 46 MiB of file pages resident after the 1B shape's first forward pass, for 264 KiB of norms.
  const float* in_file = vector_f32(tensors, name, n, required);
  if (!in_file) return nullptr;
  const size_t bytes = sizeof(float) * size_t(n);
  float* copy = reinterpret_cast<float*>(take_packed(bytes));
  std::memcpy(copy, in_file, bytes);
  if (release) release(name);
  return copy;
}

Transformer::Transformer(ModelSpec spec, const std::map<std::string, TensorView>& tensors,
                         const std::function<void(const std::string&)>& release)
    : spec_(std::move(spec)) {
  check_spec(spec_);
  const ModelSpec& s = spec_;
  const int64_t D = s.dim, F = s.ffn_dim, V = s.vocab_size;
  tok_embeddings_ = matrix(tensors, "tok_embeddings", V, D, true, release);
  norm_ = vector(tensors, "norm", D, true, release);
  lm_head_ = matrix(tensors, "lm_head", V, D, false, release);
  if (lm_head_.rows == 0) lm_head_ = tok_embeddings_;  // tied embeddings
  layers_.resize(s.n_layers);
  for (int l = 0; l < s.n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    LayerWeights& L = layers_[l];
    L.attn_norm = vector(tensors, p + "attn_norm", D, true, release);
    L.wqkv = matrix(tensors, p + "wqkv", qkv_dim(), D, true, release);
    L.bqkv = vector(tensors, p + "bqkv", qkv_dim(), false, release);
    L.wo = matrix(tensors, p + "wo", D, int64_t(s.n_heads) * s.head_dim, true, release);
    L.ffn_norm = vector(tensors, p + "ffn_norm", D, true, release);
    L.window = s.layer_windows.empty() ? 0 : s.layer_windows[l];
    if (s.n_experts == 0) {
      L.w13 = matrix(tensors, p + "w13", 2 * F, D, true, release);
      L.w2 = matrix(tensors, p + "w2", D, F, true, release);
      continue;
    }
    L.router = matrix(tensors, p + "router", s.n_experts, D, true, release);
    if (L.router.type != WType::F32) fail("tensor '" + p + "router' must be float32");
    for (int e = 0; e < s.n_experts; ++e) {
      const std::string q = p + "experts." + std::to_string(e) + ".";
      L.expert_w13.push_back(matrix(tensors, q + "w13", 2 * F, D, true, release));
      L.expert_w2.push_back(matrix(tensors, q + "w2", D, F, true, release));
    }
  }
}

Sequence::Sequence(const Transformer& model, KVType kv_type)
    : model_(model), kv_type_(kv_type), kv_bytes_(kv_type == KVType::F16 ? sizeof(Half) : sizeof(float)) {
  if (kv_type != KVType::F32 && kv_type != KVType::F16) fail("sequence: unknown KV cache type");
  k_cache_.resize(model.spec().n_layers);
  v_cache_.resize(model.spec().n_layers);
}

void Sequence::truncate(int n) {
  if (n < 0) fail("truncate: position count must be >= 0");
  n_past_ = std::min(n_past_, n);
  history_.resize(n_past_);
}

void Sequence::reserve(int positions) {
  if (positions < 0) fail("reserve: position count must be >= 0");
  const int n = std::min(positions, model_.spec().max_context);
  if (n <= capacity_) return;
  try {
    // A first reservation takes exactly what was asked: backed by huge pages, a cache's memory is
    // resident once its first position is written, and the on-demand rule's 256 positions are 64 more
    // than a 128 + 64-token generation needs (1B shape: 2 MiB of its f16 cache, 4 of an f32 one).
    // Later ones (a chat's next turn) keep the doubling, so that a conversation copies its cache a
    // logarithmic number of times.
    grow(n, capacity_ == 0);
  } catch (const std::bad_alloc&) {
    // A reservation is a hint: where the system refuses that much address space at once, the cache
    // keeps growing on demand (and a forward pass fails only if its own positions do not fit).
  }
}

void Sequence::grow(int positions, bool exact) {
  if (positions <= capacity_) return;
  const int max_ctx = model_.spec().max_context;
  int cap = exact ? positions : std::max(positions, std::min(max_ctx, std::max(2 * capacity_, 256)));
  cap = (cap + kKeyBlock - 1) / kKeyBlock * kKeyBlock;  // whole key blocks
  const int64_t KVH = model_.spec().n_kv_heads, hd = model_.spec().head_dim;
  // Both caches are head-major (see transformer.h), so growing moves each head's positions to its new
  // place; the cached prefix [0, n_past) is all that must survive.
  const int64_t keep = (int64_t(n_past_) + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  const size_t e = kv_bytes_;
  const size_t per_cache = size_t(cap) * KVH * hd * e;  // bytes of one layer's keys (or values)
  const size_t L = k_cache_.size();
  PageArena arena(2 * L * per_cache);
  for (size_t l = 0; l < L; ++l) {
    uint8_t* k = arena.data() + 2 * l * per_cache;
    uint8_t* v = k + per_cache;
    for (int64_t h = 0; h < KVH && capacity_ > 0; ++h) {
      std::memcpy(k + h * cap * hd * e, k_cache_[l] + h * capacity_ * hd * e, e * keep * hd);
      std::memcpy(v + h * cap * hd * e, v_cache_[l] + h * capacity_ * hd * e, e * n_past_ * hd);
    }
    // The old layer's pages go back as soon as they are copied, so that growing costs about one
    // layer more than the new cache, not the old cache whole.
    const size_t old_layer_bytes = e * 2 * size_t(capacity_) * KVH * hd;
    kv_.release(l * old_layer_bytes, old_layer_bytes);
    k_cache_[l] = k;
    v_cache_[l] = v;
  }
  kv_ = std::move(arena);
  capacity_ = cap;
}

void Sequence::ensure_scratch(int n_tokens, int n_threads) {
  const ModelSpec& s = model_.spec();
  if (n_tokens > scratch_tokens_) {
    const size_t T = size_t(n_tokens);
    x_.resize(T * s.dim);
    xn_.resize(T * s.dim);
    qkv_.resize(T * model_.qkv_dim());
    attn_.resize(T * size_t(s.n_heads) * s.head_dim);
    ffn_.resize(T * 2 * size_t(s.ffn_dim));
    rope_cos_.resize(T * size_t(s.rotary_dim / 2 + 1));
    rope_sin_.resize(T * size_t(s.rotary_dim / 2 + 1));
    scratch_tokens_ = n_tokens;
  }
  if (scores_.size() < size_t(n_threads) * kScoreStride) scores_.resize(size_t(n_threads) * kScoreStride);
  if (part_.size() < size_t(n_threads) * attend_part_floats(s)) part_.resize(size_t(n_threads) * attend_part_floats(s));
}

void Sequence::prepare_acts(int64_t T, const Matrix& w) {
  if (w.type != WType::Q8) return;
  const int64_t G = w.q8.n_groups, stride = q8_act_stride(w.cols);
  if (xq_.size() < size_t(2 * T * stride)) xq_.resize(size_t(2 * T * stride));
  if (xq_scales_.size() < size_t(T * G)) xq_scales_.resize(size_t(T * G));
  if (xq_sums_.size() < size_t(T * G)) xq_sums_.resize(size_t(T * G));
  if (xq_shifts_.size() < size_t(T * G)) xq_shifts_.resize(size_t(T * G));
  if (xq_units_.size() < size_t(T)) xq_units_.resize(size_t(T));
}

void Sequence::quantize_row(const Matrix& w, const float* row, int64_t t) {
  if (w.type != WType::Q8) return;
  const int64_t G = w.q8.n_groups, stride = q8_act_stride(w.cols);
  int8_t* q = xq_.data() + 2 * t * stride;
  quantize_q8_for_matmul(kernels(), row, w.cols, w.q8.group, stride, q, xq_scales_.data() + t * G,
                         xq_sums_.data() + t * G, t < one_digit_rows_, xq_shifts_.data() + t * G, xq_units_.data() + t);
}

const float* Sequence::swiglu(int64_t T, const Matrix& next, int n_threads) {
  const Kernels& k = kernels();
  const int64_t F = model_.spec().ffn_dim;
  float* ffn = ffn_.data();
  if (next.type == WType::Q8) {
    // The products go over their gate in place, row by row, straight into the quantizer: a [T, F]
    // buffer of their own was 4 MiB of a 128-token prefill's peak on the 1B shape (16 at 512 tokens).
    prepare_acts(T, next);
    parallel_for(n_threads, T >= kPerTokenParallel, T, [&](int64_t t) {
      float* gate = ffn + t * 2 * F;
      k.silu_mul(gate, gate + F, gate, F);
      quantize_row(next, gate, t);
    });
    return nullptr;  // the next matmul reads the quantized rows
  }
  if (act_.size() < size_t(T * F)) act_.resize(size_t(T * F));
  float* act = act_.data();
  parallel_for(n_threads, T >= kPerTokenParallel, T, [&](int64_t t) {
    k.silu_mul(ffn + t * 2 * F, ffn + t * 2 * F + F, act + t * F, F);
  });
  return act;
}

void Sequence::matmul(const float* x, int64_t T, const Matrix& w, float* y, int n_threads, Acts acts_state) {
  const Kernels& k = kernels();
  const int64_t N = w.rows, K = w.cols;
  Q8Acts acts;
  // Work is cut into chunks that threads claim dynamically: output rows for f32 / bf16, row blocks of
  // the packed layout for Q8 (so tiles stay whole).
  int64_t units = N;
  if (w.type == WType::Q8) {
    if (acts_state == Acts::kQuantize) {
      prepare_acts(T, w);
      parallel_for(n_threads, true, T, [&](int64_t t) { quantize_row(w, x + t * K, t); });
    }
    acts = q8_acts(xq_.data(), xq_scales_.data(), xq_sums_.data(), T, K, xq_shifts_.data(), xq_units_.data());
    acts.one_digit_rows = std::min(one_digit_rows_, T);
    units = w.q8.n_blocks;
  }
  // A prompt's int8 matmuls are also split by tokens, into `parts` groups of threads that each take
  // the rows their threads quantized (the per-token loops' static split) and claim row blocks of the
  // weights among themselves. Split by weight rows alone, every output row is written by every
  // thread and the next step's quantizer writes digits every thread has read: on 2 threads of Zen 4 its
  // share of a 128-token prefill went from 4.4 % (1 thread) to 10-14 %, and each thread reading all of
  // the weights (they stream from L3 or memory either way) cost less than those transfers
  // (docs/performance.md, tenth round). Capped at 2 parts: more would multiply the weights' reads and
  // were never measured.
  const int64_t parts = w.type == WType::Q8 ? std::clamp<int64_t>(T / kTokenSplit, 1, std::min(n_threads, 2)) : 1;
  const int64_t chunk = matmul_chunk(w.type, units, static_cast<int>((n_threads + parts - 1) / parts));
  const int64_t n_chunks = (units + chunk - 1) / chunk;
  const auto run_chunk = [&](const Q8Acts& part_acts, int64_t t0, int64_t c) {
    const int64_t u0 = c * chunk, u1 = std::min(units, u0 + chunk);
    switch (w.type) {
      case WType::F32: k.matmul_f32(x, T, K, static_cast<const float*>(w.data), u0, u1, y, N); break;
      case WType::BF16: k.matmul_bf16(x, T, K, static_cast<const uint16_t*>(w.data), u0, u1, y, N); break;
      case WType::Q8: k.matmul_q8(part_acts, w.q8, u0, u1, y + t0 * N, N); break;
    }
  };
  // One part (decode, short prompts, f32 / bf16 weights) is the plain split by weight rows: every thread
  // claims from the one counter, as a dynamic schedule would.
  std::atomic<int64_t> next_chunk[2] = {0, 0};
  parallel_for(n_threads, true, n_threads, [&](int64_t thread) {
    const int64_t p = thread * parts / n_threads;
    // Thread i's rows in the static split of T rows over n_threads, and the part's: its threads' rows.
    const auto first_row = [&](int64_t i) { return i * (T / n_threads) + std::min<int64_t>(i, T % n_threads); };
    const int64_t t0 = first_row((p * n_threads + parts - 1) / parts);
    const int64_t t1 = first_row(((p + 1) * n_threads + parts - 1) / parts);
    const Q8Acts part_acts = w.type == WType::Q8 ? q8_acts_rows(acts, t0, t1, w.q8.n_groups) : acts;
    for (int64_t c = next_chunk[p]++; c < n_chunks; c = next_chunk[p]++) run_chunk(part_acts, t0, c);
  });
}

void Sequence::forward(const int32_t* tokens, int n_tokens, float* logits, bool all_logits, int n_threads) {
  const ModelSpec& s = model_.spec();
  if (n_tokens <= 0) fail("forward: no tokens given");
  if (n_threads < 1 || n_threads > kMaxThreads)
    fail("forward: thread count " + std::to_string(n_threads) + " is out of range [1, " + std::to_string(kMaxThreads) + "]");
  for (int t = 0; t < n_tokens; ++t)
    if (tokens[t] < 0 || tokens[t] >= s.vocab_size)
      fail("forward: token id " + std::to_string(tokens[t]) + " is outside the vocabulary [0, " +
           std::to_string(s.vocab_size) + ")");
  if (int64_t(n_past_) + n_tokens > s.max_context)
    fail("forward: " + std::to_string(n_past_) + " cached + " + std::to_string(n_tokens) +
         " new tokens exceed the context length " + std::to_string(s.max_context));

  if (logits == nullptr && all_logits) fail("forward: all_logits needs somewhere to write them");
  const int n_out = logits == nullptr ? 0 : all_logits ? n_tokens : 1;
  const bool want_long = !s.inv_freq_long.empty() && n_past_ + n_tokens > s.rope_switch;
  if (n_past_ > 0 && want_long != long_rope_) {
    // longrope: the sequence crosses the switch length (or was cut back below it), so every cached
    // position is encoded again with the other table, as transformers' Phi-3 generate does. Results
    // then never depend on how a sequence was split into calls.
    std::vector<int32_t> all(history_.begin(), history_.begin() + n_past_);
    all.insert(all.end(), tokens, tokens + n_tokens);
    n_past_ = 0;
    history_.clear();
    long_rope_ = want_long;
    run(all.data(), static_cast<int>(all.size()), logits, n_out, n_threads);
    return;
  }
  long_rope_ = want_long;
  run(tokens, n_tokens, logits, n_out, n_threads);
}

void Sequence::run(const int32_t* tokens, int n_tokens, float* logits, int n_out_rows, int n_threads) {
  const ModelSpec& s = model_.spec();
  grow(n_past_ + n_tokens);
  ensure_scratch(n_tokens, n_threads);
  const int64_t T = n_tokens, D = s.dim, H = s.n_heads, KVH = s.n_kv_heads, hd = s.head_dim;
  const int64_t qkv_dim = model_.qkv_dim();
  const int half = s.rotary_dim / 2;
  float* x = x_.data();
  float* xn = xn_.data();
  float* qkv = qkv_.data();
  float* attn = attn_.data();
  float* ffn = ffn_.data();
  const bool per_token_parallel = n_threads > 1 && T >= kPerTokenParallel;
  one_digit_rows_ = fast_prefill_ ? T - n_out_rows : 0;
  // The per-token steps between two matmuls run as one loop over tokens: a row's residual add, norm
  // and quantization for the next matmul happen while the row is in L1, and each loop ends in one
  // barrier instead of three.
  const auto add_norm = [&](const float* residual, const float* norm_weight, const Matrix* next) {
    if (next) prepare_acts(T, *next);
    parallel_for(n_threads, per_token_parallel, T, [&](int64_t t) {
      float* row = x + t * D;
      if (residual)
        add_row(row, residual + t * D, D);
      rmsnorm(row, norm_weight, xn + t * D, D, s.norm_eps);
      if (next) quantize_row(*next, xn + t * D, t);
    });
  };

  for (int64_t t = 0; t < T; ++t) embedding_row(model_.tok_embeddings(), tokens[t], x + t * D);

  // cos/sin for each new position: the f32 product pos * inv_freq, as transformers forms it.
  const float* inv_freq = long_rope_ ? s.inv_freq_long.data() : s.inv_freq.data();
  for (int64_t t = 0; t < T; ++t) {
    const float pos = static_cast<float>(n_past_ + t);
    for (int i = 0; i < half; ++i) {
      const float f = pos * inv_freq[i];
      rope_cos_[t * half + i] = std::cos(f) * s.rope_attn_factor;
      rope_sin_[t * half + i] = std::sin(f) * s.rope_attn_factor;
    }
  }

  // The last FFN's output, not yet added to x (MoE layers add their own).
  const float* pending = nullptr;
  for (int l = 0; l < s.n_layers; ++l) {
    const LayerWeights& L = model_.layers()[l];

    add_norm(pending, L.attn_norm, &L.wqkv);
    matmul(xn, T, L.wqkv, qkv, n_threads, Acts::kReady);
    parallel_for(n_threads, per_token_parallel, T, [&](int64_t t) {
      float* row = qkv + t * qkv_dim;
      if (L.bqkv)
        add_row(row, L.bqkv, qkv_dim);
      const float* c = rope_cos_.data() + t * half;
      const float* sn = rope_sin_.data() + t * half;
      for (int64_t h = 0; h < H + KVH; ++h) apply_rope(row + h * hd, c, sn, half);
      if (kv_type_ == KVType::F16)
        store_kv<Half>(l, t);
      else
        store_kv<float>(l, t);
    });
    if (kv_type_ == KVType::F16)
      attention<Half>(l, T, n_threads);
    else
      attention<float>(l, T, n_threads);

    matmul(attn, T, L.wo, xn, n_threads);
    add_norm(xn, L.ffn_norm, s.n_experts > 0 ? nullptr : &L.w13);
    if (s.n_experts > 0) {
      moe(L, T, n_threads);
      pending = nullptr;
      continue;
    }
    matmul(xn, T, L.w13, ffn, n_threads, Acts::kReady);
    matmul(swiglu(T, L.w2, n_threads), T, L.w2, xn, n_threads, Acts::kReady);
    pending = xn;
  }

  // Only the rows whose logits are asked for go on past the last layer. Row t's residual (pending is
  // xn) is read before xn's row t - first <= t is written, so no row still to be read is overwritten.
  one_digit_rows_ = 0;  // the rows below are compacted: row r is token first + r
  const int64_t n_out = n_out_rows;
  const int64_t first = T - n_out;
  for (int64_t t = first; t < T; ++t) {
    float* row = x + t * D;
    if (pending)
      add_row(row, pending + t * D, D);
    rmsnorm(row, model_.norm(), xn + (t - first) * D, D, s.norm_eps);
  }
  if (n_out > 0) matmul(xn, n_out, model_.lm_head(), logits, n_threads);
  history_.insert(history_.end(), tokens, tokens + n_tokens);
  n_past_ += n_tokens;
}

template <class KT>
void Sequence::store_kv(int l, int64_t t) {
  const ModelSpec& s = model_.spec();
  const int64_t KVH = s.n_kv_heads, hd = s.head_dim, q_dim = int64_t(s.n_heads) * hd, kv_dim = model_.kv_dim();
  const float* row = qkv_.data() + t * model_.qkv_dim();
  const int64_t pos = n_past_ + t, cap = capacity_;
  KT* kc = reinterpret_cast<KT*>(k_cache_[l]);
  KT* vc = reinterpret_cast<KT*>(v_cache_[l]);
  for (int64_t h = 0; h < KVH; ++h) {
    const float* key = row + q_dim + h * hd;
    const float* value = row + q_dim + kv_dim + h * hd;
    KT* kt = kc + (h * cap + pos / kKeyBlock * kKeyBlock) * hd + pos % kKeyBlock;  // every kKeyBlock-th
    KT* vt = vc + (h * cap + pos) * hd;
    if constexpr (std::is_same_v<KT, Half>) {
      // Converted as vectors (one at a time, storing the cache was 1.6 % of a 512-token fast prefill in
      // `perf record`, 0.5 % so), the keys through a small buffer since they are stored kKeyBlock apart.
      const Kernels& k = kernels();
      k.to_f16(value, vt, hd);
      Half buffer[64];
      for (int64_t d0 = 0; d0 < hd; d0 += 64) {
        const int64_t n = std::min<int64_t>(64, hd - d0);
        k.to_f16(key + d0, buffer, n);
        for (int64_t d = 0; d < n; ++d) kt[(d0 + d) * kKeyBlock] = buffer[d];
      }
    } else {
      for (int64_t d = 0; d < hd; ++d) {
        kt[d * kKeyBlock] = key[d];
        vt[d] = value[d];
      }
    }
  }
}

template <class KT>
void Sequence::attention(int l, int64_t T, int n_threads) {
  const ModelSpec& s = model_.spec();
  const LayerWeights& L = model_.layers()[l];
  const Kernels& k = kernels();
  const auto attend = attend_kernel(k, static_cast<const KT*>(nullptr));
  const int64_t H = s.n_heads, KVH = s.n_kv_heads, hd = s.head_dim, group = H / KVH;
  const int64_t qkv_dim = model_.qkv_dim(), q_dim = H * hd, cap = capacity_;
  const float* qkv = qkv_.data();
  float* attn = attn_.data();
  KT* kc = reinterpret_cast<KT*>(k_cache_[l]);
  KT* vc = reinterpret_cast<KT*>(v_cache_[l]);
  // How attention splits its work (see the attention step below). A whole KV group's chunk is a unit
  // once there are about two full-chunk units per thread.
  const int64_t split_chunks = (n_past_ + T - 1) / kAttendChunk + 1;  // the most chunks one query spans
  const bool split = n_threads > 1 && T * KVH < 4 * int64_t(n_threads);
  const int64_t split_heads = T * KVH * (n_past_ + T) >= 2 * int64_t(n_threads) * kAttendChunk ? group : 1;
  const size_t part_stride = attend_part_floats(s);
  if (split) {
    const size_t slots = size_t(T * split_chunks * H);
    if (split_out_.size() < slots * hd) split_out_.resize(slots * hd);
    if (split_stats_.size() < slots * 2) split_stats_.resize(slots * 2);
  }

  // Causal grouped-query attention: query t sees cached positions [first, n_past + t], where first is
  // 0, or with a sliding window W the oldest position > n_past + t - W. The cache keeps every position.
  // With enough tokens, or one thread, a unit of work is a tile of consecutive tokens' whole KV group
  // (all their query heads then share each key and value row loaded), which walks its positions chunk
  // by chunk. With few tokens (decode) on several threads, each chunk of a token's positions is a unit
  // of its own and the chunks are folded afterwards, in the same order: whole KV groups where that
  // makes enough units, else single heads (a short cache, cheap to read again). Every query's result
  // is the same however it was grouped.
  const int64_t window = L.window;
  const auto range = [&](int64_t t) {
    const int64_t last = n_past_ + t;
    return std::make_pair(window > 0 ? std::max<int64_t>(0, last - window + 1) : 0, last);
  };
  // Fast prefill's one-digit rows, where the kernel path has a bf16 dot product, attend over bf16
  // copies of the layer's keys and values (Kernels::attend_bf16: twice the multiply-adds per
  // instruction), made here from the first position any row sees: about kv_dim / (T * n_heads * hd) of
  // the attention's own work. The rows whose logits are returned keep the cache's f32 arithmetic, and
  // so does every row of f32 or bf16 weights (fast prefill changes nothing there).
  const bool bf16 = !split && one_digit_rows_ > 0 && L.wqkv.type == WType::Q8 && k.attend_bf16 && hd % 16 == 0 &&
                    hd <= kBf16MaxHeadDim;
  if (bf16) {
    const size_t layer_elements = size_t(KVH * cap * hd);
    if (k_bf16_.size() < layer_elements) {
      k_bf16_.resize(layer_elements);
      v_bf16_.resize(layer_elements);
    }
    const int64_t from = range(0).first, positions = n_past_ + T;
    const int64_t block0 = from / kKeyBlock, blocks = (positions + kKeyBlock - 1) / kKeyBlock - block0;
    const int64_t pair0 = from / 2 * 2;
    const auto pair = pair_kernel(k, static_cast<const KT*>(nullptr));
    parallel_for(n_threads, true, 2 * KVH, [&](int64_t u) {
      const int64_t head = (u / 2) * cap * hd;
      if (u % 2 == 0) {
        const int64_t at = head + block0 * kKeyBlock * hd;
        pair(kc + at, kKeyBlock, kKeyBlock, blocks * hd, k_bf16_.data() + at);
      } else {
        const int64_t at = head + pair0 * hd;
        pair(vc + at, hd, hd, positions - pair0, v_bf16_.data() + at);
      }
    });
  }
  if (!split) {
    // A tile's tokens share their first position (tokens a sliding window has moved go one at a time)
    // and the chunk their last lies in (a tile is cut there). Tiles are made smaller where they would
    // leave fewer than about 4 units per thread, and go latest first: those see the most positions,
    // and the dynamic schedule then ends on short ones.
    const int64_t NT = std::clamp<int64_t>(T * KVH / (4 * int64_t(n_threads)), 1, tile_tokens(s));
    const int64_t n_tiles = (T + NT - 1) / NT;
    parallel_for<Schedule::kDynamic>(n_threads, true, n_tiles * KVH, [&](int64_t u, int thread) {
      const int64_t tile = n_tiles - 1 - u / KVH, kvh = u % KVH, h = kvh * group;
      float* scores = scores_.data() + size_t(thread) * kScoreStride;
      float* part = part_.data() + size_t(thread) * part_stride;
      float* tile_q = part + NT * group * (hd + 4);
      float* tile_out = tile_q + NT * group * hd;
      const KT* keys = kc + kvh * cap * hd;
      const KT* values = vc + kvh * cap * hd;
      // The tokens [t0, t1) of the tile, whose rows q are all one-digit or not.
      const auto attend_tokens = [&](const float* q, int64_t t0, int64_t t1, int64_t first, int64_t last, float* out) {
        if (bf16 && t1 <= one_digit_rows_)
          attend_chunked(k, q, (t1 - t0) * group, k_bf16_.data() + kvh * cap * hd, v_bf16_.data() + kvh * cap * hd,
                         first, last, group, hd, s.attn_scale, scores, part, out);
        else
          attend_chunked(k, q, (t1 - t0) * group, keys, values, first, last, group, hd, s.attn_scale, scores, part,
                         out);
      };
      for (int64_t t0 = tile * NT, t_end = std::min(T, t0 + NT); t0 < t_end;) {
        const auto [first, last] = range(t0);
        int64_t t1 = std::min(t_end, t0 + kAttendChunk - last % kAttendChunk);
        if (window > 0 && n_past_ + t1 > window) t1 = t0 + 1;  // the window starts past 0 there
        if (bf16 && t0 < one_digit_rows_) t1 = std::min<int64_t>(t1, one_digit_rows_);  // no tile mixes the two
        if (t1 - t0 == 1) {
          attend_tokens(qkv + t0 * qkv_dim + h * hd, t0, t1, first, last, attn + t0 * q_dim + h * hd);
        } else {
          const size_t row_bytes = sizeof(float) * size_t(group * hd);
          for (int64_t t = t0; t < t1; ++t)
            std::memcpy(tile_q + (t - t0) * group * hd, qkv + t * qkv_dim + h * hd, row_bytes);
          attend_tokens(tile_q, t0, t1, first, last, tile_out);
          for (int64_t t = t0; t < t1; ++t)
            std::memcpy(attn + t * q_dim + h * hd, tile_out + (t - t0) * group * hd, row_bytes);
        }
        t0 = t1;
      }
    });
  } else {
    const int64_t units_per_token = H / split_heads;
    parallel_for<Schedule::kDynamic>(n_threads, true, T * units_per_token * split_chunks, [&](int64_t u, int thread) {
      const int64_t t = u / (units_per_token * split_chunks), j = u % split_chunks;
      const int64_t h = (u / split_chunks % units_per_token) * split_heads, kvh = h / group;
      const auto [first, last] = range(t);
      const int64_t c = first / kAttendChunk + j;
      if (c > last / kAttendChunk) return;
      const int64_t a = std::max(first, c * kAttendChunk), b = std::min(last, c * kAttendChunk + kAttendChunk - 1);
      const size_t slot = size_t((t * split_chunks + j) * H + h);
      attend(qkv + t * qkv_dim + h * hd, split_heads, kc + kvh * cap * hd, vc + kvh * cap * hd, a, b, split_heads, hd,
             s.attn_scale, scores_.data() + size_t(thread) * kScoreStride, split_out_.data() + slot * hd,
             split_stats_.data() + slot * 2);
    });
    for (int64_t t = 0; t < T; ++t) {
      const auto [first, last] = range(t);
      const int64_t n_chunks = last / kAttendChunk - first / kAttendChunk + 1;
      for (int64_t h = 0; h < H; ++h) {
        float* o = attn + t * q_dim + h * hd;
        const size_t slot0 = size_t(t * split_chunks * H + h);
        std::memcpy(o, split_out_.data() + slot0 * hd, sizeof(float) * hd);
        float running[2] = {split_stats_[slot0 * 2], split_stats_[slot0 * 2 + 1]};
        for (int64_t j = 1; j < n_chunks; ++j) {
          const size_t slot = slot0 + size_t(j * H);
          attend_fold(o, running, split_out_.data() + slot * hd, split_stats_.data() + slot * 2, hd);
        }
      }
    }
  }
}

void Sequence::moe(const LayerWeights& L, int64_t T, int n_threads) {
  const ModelSpec& s = model_.spec();
  const int64_t D = s.dim, E = s.n_experts, K = s.n_experts_used;
  router_.resize(size_t(T * E));
  route_w_.resize(size_t(T * K));
  route_e_.resize(size_t(T * K));
  moe_in_.resize(size_t(T * D));
  moe_out_.resize(size_t(T * D));
  moe_acc_.assign(size_t(T * D), 0.f);
  expert_rows_.resize(size_t(T));
  float* xn = xn_.data();
  float* ffn = ffn_.data();
  // The experts' rows are gathered (row r is not token r), and the router's choice should not move
  // with fast prefill: every MoE matmul keeps two digits.
  const int64_t one_digit_rows = one_digit_rows_;
  one_digit_rows_ = 0;

  // Router: softmax over all experts in f32, the top K by probability (the lower index first among
  // equals), their probabilities renormalised to sum to one.
  matmul(xn, T, L.router, router_.data(), n_threads);
  for (int64_t t = 0; t < T; ++t) {
    float* p = router_.data() + t * E;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, p[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      p[e] = std::exp(p[e] - mx);
      sum += p[e];
    }
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    int* chosen = route_e_.data() + t * K;
    float* weight = route_w_.data() + t * K;
    float total = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      int best = -1;
      for (int64_t e = 0; e < E; ++e) {
        bool taken = false;
        for (int64_t i = 0; i < j; ++i) taken = taken || chosen[i] == e;
        if (!taken && (best < 0 || p[e] > p[best])) best = static_cast<int>(e);
      }
      chosen[j] = best;
      weight[j] = p[best];
      total += p[best];
    }
    for (int64_t j = 0; j < K; ++j) weight[j] /= total;
  }

  // Each expert runs once over the rows routed to it, gathered into a contiguous block; experts no
  // token chose are never read.
  for (int64_t e = 0; e < E; ++e) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < K; ++j)
        if (route_e_[t * K + j] == e) expert_rows_[n++] = static_cast<int>(t * K + j);
    if (n == 0) continue;
    for (int64_t r = 0; r < n; ++r)
      std::memcpy(moe_in_.data() + r * D, xn + (expert_rows_[r] / K) * D, sizeof(float) * D);
    matmul(moe_in_.data(), n, L.expert_w13[e], ffn, n_threads);
    matmul(swiglu(n, L.expert_w2[e], n_threads), n, L.expert_w2[e], moe_out_.data(), n_threads, Acts::kReady);
    for (int64_t r = 0; r < n; ++r) {
      const float w = route_w_[expert_rows_[r]];
      float* acc = moe_acc_.data() + (expert_rows_[r] / K) * D;
      const float* y = moe_out_.data() + r * D;
      for (int64_t i = 0; i < D; ++i) acc[i] += y[i] * w;
    }
  }
  float* x = x_.data();
  for (int64_t i = 0; i < T * D; ++i) x[i] += moe_acc_[i];
  one_digit_rows_ = one_digit_rows;
}

}  // namespace cpullm
