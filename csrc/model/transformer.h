// The forward pass over the one canonical model layout (see DESIGN.md, "One canonical model").
// Architecture differences arrive as ModelSpec fields and optional tensors; nothing here branches on
// an architecture name.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/kernels.h"

namespace cpullm {

struct ModelSpec {
  int n_layers = 0;
  int dim = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int ffn_dim = 0;
  int vocab_size = 0;
  int max_context = 0;   // hard limit on positions a sequence may hold
  int rotary_dim = 0;    // leading dims of each head that RoPE rotates (== head_dim unless partial)
  float norm_eps = 1e-5f;
  float attn_scale = 0.f;       // softmax scale; 1/sqrt(head_dim) for every supported family
  float rope_attn_factor = 1.f; // multiplies cos and sin (yarn / longrope "attention scaling")
  int group_size = 32;          // inputs per scale of int8 (Q8) matrices; a multiple of kQ8Block
  std::vector<float> inv_freq;  // [rotary_dim / 2], computed in Python exactly as transformers does
  // longrope: a second table used once a sequence holds more than rope_switch positions (empty: none).
  // The cache is re-encoded from position 0 whenever the table a sequence needs changes, as
  // transformers' generate does (see Sequence::forward).
  std::vector<float> inv_freq_long;  // [rotary_dim / 2] or empty
  int rope_switch = 0;               // positions up to which inv_freq applies
  // Sliding-window attention per layer: a query at position q sees keys at positions > q - window;
  // 0 = full causal attention. Empty = every layer full.
  std::vector<int> layer_windows;    // [n_layers] or empty
  // Mixture of experts: 0 = a dense SwiGLU FFN (w13, w2); else n_experts experts of ffn_dim each and a
  // router, n_experts_used chosen per token.
  int n_experts = 0;
  int n_experts_used = 0;
};

// A view of a tensor owned elsewhere (a memory map or an array the Python side keeps alive).
struct TensorView {
  WType type = WType::F32;
  const void* data = nullptr;
  std::vector<int64_t> shape;
};

struct Matrix {
  WType type = WType::F32;
  const void* data = nullptr;     // F32 / BF16: row-major [rows, cols]
  Q8Weights q8;                   // Q8: the packed copy the Transformer owns
  int64_t rows = 0, cols = 0;
};

// The units (output rows for f32 / bf16, 16-row blocks for Q8, in whole tiles) of one claim when n_threads
// share a matmul's `units` dynamically: about four claims per thread, so a slow thread is caught up; one
// thread takes them all as one claim.
int64_t matmul_chunk(WType type, int64_t units, int n_threads);

// Whether the system grants transparent huge pages to memory that asks for them (Linux, THP not "never").
bool huge_pages_enabled();

// Zero-filled memory of its own, 2 MiB aligned, with transparent huge pages requested where the system
// has them: memory streamed every token (weights, the KV cache) then costs one TLB entry per 2 MiB
// instead of per 4 KiB. On POSIX systems it is an anonymous mapping, so pages are backed only once
// touched and can be handed back early.
class PageArena {
 public:
  PageArena() = default;
  explicit PageArena(size_t bytes);
  ~PageArena();
  PageArena(PageArena&& other) noexcept { swap(other); }
  PageArena& operator=(PageArena&& other) noexcept {
    PageArena gone(std::move(*this));
    swap(other);
    return *this;
  }
  PageArena(const PageArena&) = delete;
  PageArena& operator=(const PageArena&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  size_t used = 0;  // for callers that carve it up
  // Hands the whole pages inside [offset, offset + bytes) back to the system; they read as zero after.
  void release(size_t offset, size_t bytes);

 private:
  void swap(PageArena& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(used, other.used);
  }
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct LayerWeights {
  const float* attn_norm = nullptr;  // [dim]
  Matrix wqkv;                       // [(n_heads + 2 * n_kv_heads) * head_dim, dim]
  const float* bqkv = nullptr;       // [(n_heads + 2 * n_kv_heads) * head_dim] or null
  Matrix wo;                         // [dim, n_heads * head_dim]
  const float* ffn_norm = nullptr;   // [dim]
  Matrix w13;                        // [2 * ffn_dim, dim]: gate rows, then up rows
  Matrix w2;                         // [dim, ffn_dim]
  // Mixture of experts (n_experts > 0; w13 / w2 above are then empty):
  Matrix router;                     // [n_experts, dim], float32
  std::vector<Matrix> expert_w13;    // n_experts x [2 * ffn_dim, dim]
  std::vector<Matrix> expert_w2;     // n_experts x [dim, ffn_dim]
  int window = 0;                    // sliding window (0 = full)
};

class Transformer {
 public:
  // Checks every tensor's presence, type and shape against the spec; throws std::invalid_argument.
  // int8 matrices are packed into the kernels' layout (a copy this object owns); `release(name)` is
  // called for each source tensor that is no longer needed once its copy exists, so the caller can let
  // go of it (the loader unmaps file pages as it goes, so loading never holds both forms of the weights).
  Transformer(ModelSpec spec, const std::map<std::string, TensorView>& tensors,
              const std::function<void(const std::string&)>& release = nullptr);

  const ModelSpec& spec() const { return spec_; }
  int qkv_dim() const { return (spec_.n_heads + 2 * spec_.n_kv_heads) * spec_.head_dim; }
  int kv_dim() const { return spec_.n_kv_heads * spec_.head_dim; }

  const Matrix& tok_embeddings() const { return tok_embeddings_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const float* norm() const { return norm_; }
  const Matrix& lm_head() const { return lm_head_; }

 private:
  Matrix matrix(const std::map<std::string, TensorView>& tensors, const std::string& name, int64_t rows,
                int64_t cols, bool required, const std::function<void(const std::string&)>& release);
  // An f32 vector of n >= 0 elements (a norm's weights, a bias), copied into the model's memory.
  const float* vector(const std::map<std::string, TensorView>& tensors, const std::string& name, int64_t n,
                      bool required, const std::function<void(const std::string&)>& release);
  // `bytes` of weight memory (64-byte aligned, on huge pages where granted) from the current chunk, or
  // from a new one.
  uint8_t* take_packed(size_t bytes);

  ModelSpec spec_;
  std::vector<PageArena> packed_;  // the chunks holding the matrices the model copied (see matrix())
  Matrix tok_embeddings_;  // [vocab, dim]
  std::vector<LayerWeights> layers_;
  const float* norm_ = nullptr;  // [dim]
  Matrix lm_head_;               // [vocab, dim]; the embedding matrix itself when tied
};

// Element type of a sequence's KV cache. f16 halves the bytes attention reads per cached position (and
// the cache's memory); every product and sum stays f32.
enum class KVType : int { F32 = 0, F16 = 1 };

// One sequence's state: its KV cache and scratch buffers. Several sequences may share a Transformer;
// a sequence must not be used by two threads at once.
class Sequence {
 public:
  explicit Sequence(const Transformer& model, KVType kv_type = KVType::F32);
  KVType kv_type() const { return kv_type_; }
  // Fast prefill (int8 weights): the rows of a forward pass whose logits are not returned (a prompt's
  // tokens but its last, which only fill the cache) take their activations with one int8 digit
  // instead of two, about half the integer work; the rows whose logits are returned, and every decoded
  // token, keep two. Off by default: it costs accuracy (docs/int8.md). MoE layers keep two digits. A
  // longrope re-encode of the whole cache (see forward) is a prefill like any other.
  bool fast_prefill() const { return fast_prefill_; }
  void set_fast_prefill(bool on) { fast_prefill_ = on; }
  int n_past() const { return n_past_; }
  int capacity() const { return capacity_; }
  // Forgets positions >= n (keeps the cached prefix [0, n)).
  void truncate(int n);
  // Sizes the cache for at least min(positions, max_context) positions now, so that a generation whose
  // length is known does not grow it (a copy of the whole cache) in the middle of decoding. The memory
  // is backed as positions are written (by whole huge pages where THP is on). Best effort: if the
  // memory is refused, nothing changes.
  void reserve(int positions);

  // Runs `n_tokens` new tokens at positions n_past .. n_past + n_tokens - 1 and appends them to the
  // cache. Writes logits for every new position ([n_tokens, vocab]) when all_logits, else for the last
  // one only ([1, vocab]). With logits null (and all_logits false) the tokens only fill the cache: no
  // LM head, and under fast prefill every row takes one digit (so a prompt fed in parts gives the same
  // cache as in one call). Validates tokens and context length first; throws std::invalid_argument.
  void forward(const int32_t* tokens, int n_tokens, float* logits, bool all_logits, int n_threads);

 private:
  // The pass itself over tokens at positions n_past .. n_past + n_tokens - 1, with logits for the last
  // n_out of them ([n_out, vocab]).
  void run(const int32_t* tokens, int n_tokens, float* logits, int n_out, int n_threads);
  // x [T, dim] += the mixture-of-experts FFN of xn [T, dim] (layer L).
  void moe(const LayerWeights& L, int64_t T, int n_threads);
  // Writes new token t's key and value (after RoPE, in qkv_) into layer l's cache, as KT.
  template <class KT>
  void store_kv(int l, int64_t t);
  // Layer l's attention for the T new tokens, whose keys and values store_kv has cached:
  // attn_ [T, n_heads * head_dim] = attention over the cache with their queries (in qkv_).
  template <class KT>
  void attention(int l, int64_t T, int n_threads);
  // Grows the cache to hold `positions` (<= max_context): at least doubling it (to 256 positions at
  // first) when it grows on demand, to `positions` alone (whole key blocks) when `exact`.
  void grow(int positions, bool exact = false);
  void ensure_scratch(int n_tokens, int n_threads);
  // y [T, w.rows] = x [T, w.cols] @ w^T, rows split across threads. For Q8 weights x is quantized
  // first (kQuantize), or already was, row by row with quantize_row (kReady).
  enum class Acts { kQuantize, kReady };
  void matmul(const float* x, int64_t T, const Matrix& w, float* y, int n_threads, Acts acts = Acts::kQuantize);
  // silu(gate) * up for each row of ffn_ [T, 2 * ffn_dim] (gate, then up): for int8 `next`, written over
  // the gate and quantized for the matmul with `next` (see quantize_row), returning null; else into
  // act_ [T, ffn_dim], returned as that matmul's input.
  const float* swiglu(int64_t T, const Matrix& next, int n_threads);
  // Sizes the quantized-activation scratch for T rows of w's input (Q8 weights; else nothing).
  void prepare_acts(int64_t T, const Matrix& w);
  // Quantizes row t of w's input for the next matmul with w (Q8 weights; else nothing); threads
  // may quantize different rows at once.
  void quantize_row(const Matrix& w, const float* row, int64_t t);

  const Transformer& model_;
  int n_past_ = 0;
  int capacity_ = 0;
  // Per layer, head-major so that attention reads each KV head's positions as one stream:
  // keys [n_kv_heads][capacity / kKeyBlock][head_dim][kKeyBlock] (transposed blocks, see kKeyBlock),
  // values [n_kv_heads][capacity][head_dim]. capacity is a multiple of kKeyBlock.
  // Both caches of every layer, layer after layer, in one arena: decode streams them like the weights,
  // and on 2 MiB pages a Zen 4 core decoded SmolLM2 after 2,000 positions 12 % faster on 1 thread and
  // 25 % on 2 (per-layer vectors on 4 KiB pages before).
  PageArena kv_;
  KVType kv_type_ = KVType::F32;
  size_t kv_bytes_ = sizeof(float);          // bytes of one cached element
  std::vector<uint8_t*> k_cache_, v_cache_;  // per layer, elements of kv_type_
  // Scratch, grown on demand and then reused: no allocation on the decode path.
  std::vector<float> x_, xn_, qkv_, attn_, ffn_, act_, rope_cos_, rope_sin_;  // act_: SwiGLU out, f32 / bf16 w2
  // Attention: per thread, scores of one chunk and attend_chunked's scratch; the chunks' outputs and
  // stats when threads split a query's chunks ([T][chunks][n_heads] x head_dim or 2).
  std::vector<float> scores_, part_, split_out_, split_stats_;
  // Fast prefill's bf16 copy of one layer's keys and values, for its one-digit rows' attention where the
  // kernel path has a bf16 dot product (see Sequence::attention), laid out as the cache is per KV head.
  std::vector<Bf16> k_bf16_, v_bf16_;
  std::vector<int8_t> xq_;   // quantized activations of the current Q8 matmul (see Q8Acts)
  std::vector<float> xq_scales_;
  std::vector<int32_t> xq_sums_;
  std::vector<int32_t> xq_shifts_;  // one-digit rows' Q8Acts::shifts and units
  std::vector<float> xq_units_;
  int scratch_tokens_ = 0;
  bool fast_prefill_ = false;
  // Rows [0, one_digit_rows_) of the current pass are quantized with one digit (see fast_prefill).
  int64_t one_digit_rows_ = 0;
  std::vector<int32_t> history_;  // the token at each cached position [n_past]
  bool long_rope_ = false;        // the cache was encoded with inv_freq_long
  // MoE scratch: router probabilities [T, n_experts], per token its chosen experts and weights
  // [T, n_experts_used], gathered inputs / outputs of one expert [T, dim], the sum of experts [T, dim].
  std::vector<float> router_, moe_in_, moe_out_, moe_acc_, route_w_;
  std::vector<int> route_e_, expert_rows_;
};

}  // namespace cpullm
