// The edge engine's ONNX Runtime custom ops (CPU), domain hybrid_gateway, used by its single fused graph
// (edge/builder.py, layout "fused"):
//
//   PagedAttention     one decoder layer's attention on the shared paged KV cache
//   BlockQuantMatMul   y = x @ W^T with W in 4-bit (GGML Q4_0 / Q4_1) or 8-bit (Q8_0) blocks of 32
//                      (the arithmetic: edge/csrc/block_quant_gemm.h; builder option matmul="hgw")
//
// ---- PagedAttention
//
// With attention in the graph a whole step is one ONNX Runtime call, instead of a session per layer with
// Python in between. The cache is a graph input bound to the engine's own torch tensor (no copy); the op
// writes this step's K/V rows into it and reads every sequence's K/V through its block table in place,
// with the arithmetic of kernels/attention/csrc/paged_attention_cpu.h (the one the PyTorch op uses).
//
// Inputs (T = new tokens this step, S = sequences; kernels/attention/metadata.py for the length terms):
//   0 qkv          [T, (H + 2 KVH) * D] float   the fused q/k/v projection, before RoPE
//   1 cos, 2 sin   [T, D / 2] float             RoPE tables at each token's position (rotate-half)
//   3 kv_cache     [L, 2, num_blocks, block_size, KVH, D] float or float16   the whole cache; this layer's K/V are
//                                                 written (a half cache: rounded to nearest-even once rotated)
//   4 block_tables [S, max_blocks] int32
//   5 seq_lens     [S] int32                   context + new tokens
//   6 cu_seqlens_q [S + 1] int32               sequence i's new tokens are rows cu[i] .. cu[i+1] - 1
//   7 slot_mapping [T] int64                   cache slot of each new token's K/V, -1 = do not write
// Output: attn [T, H * D] float. Attributes: layer, num_heads, num_kv_heads (int), scale (float).
//
// New token j of sequence i (at position seq_len - q_len + j) attends causally to positions 0 .. its own.
// Work is split into tiles of up to kTileTokens new tokens of one sequence with all its KV heads, so a
// prefill chunk loads each K row once for several queries and every cached row is read whole; large steps run on ONNX Runtime's intra-op thread pool
// (KernelContext_ParallelFor), the cores the dense ops use. A small step (up to kNextLayerPrefetchFloats of K/V)
// then prefetches the next layer's K/V blocks, so that they arrive while the dense ops stream their weights
// rather than when that layer's attention, on one core, waits for them: 2.5% off a batch-1 step at context
// 100 and 400 (SmolLM2, alternated in one process).
//
// Every index is checked before any memory is touched; a bad one fails the run with ORT_INVALID_ARGUMENT.
//
// ---- BlockQuantMatMul
//
// Inputs: 0 x float [..., K]; 1 codes uint8 [ceil(N / 8), KB, 128] (bits 4) or [ceil(N / 8), KB, 256] (bits 8);
// 2 scales float16 [ceil(N / 8), KB, 8]; 3 mins float16 [ceil(N / 8), KB, 8] (bits 4; absent for bits 8), with
// KB = ceil(K / 32). Output: y float [..., N]. Attributes: K, N, bits. x is quantized per block to int8 once per
// call; W's 8-row tiles are split over ONNX Runtime's intra-op pool kTilesPerItem at a time.
//
// Optional prologue (attribute prologue, default 0), applied to each row of x just before it is quantized; at
// batch 1 the nodes it replaces cost more than their arithmetic (ORT dispatch, one more pass over memory each):
//   1 RMSNorm:  s = x (+ skip, input 5, the shape of x); the op multiplies s by gamma (input 4, float [K]) /
//               sqrt(mean(s^2) + epsilon) (attribute epsilon). Output 1 (optional, needs skip) = s, the residual
//               stream (what SkipSimplifiedLayerNormalization's output 3 is).
//   2 SwiGLU:   x is [..., 2K] = [gate, up]; the op uses silu(gate) * up.
//
// Optional rescoring (attribute rescore = R > 0; an LM head read at 4 bits, kept exact at 8): inputs 6 codes and
// 7 scales hold the same matrix in 8-bit blocks (the layout of bits 8). After y is computed from the 4-bit
// weights, each row's R largest outputs are found and the 8-row tiles holding them are computed again from the
// 8-bit weights, with the same quantized x and the same per-row arithmetic as an 8-bit op, so those outputs are
// bit for bit what the 8-bit matrix alone gives. A batch-1 step then streams the 4-bit head (~0.6 of the
// bytes) plus R tiles; greedy decoding picks the 8-bit head's token whenever it is among the 4-bit head's R best.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "block_quant_gemm.h"
#include "paged_attention_cpu.h"

namespace {

const OrtApi* g_api = nullptr;

constexpr int64_t kTileTokens = 8;
constexpr bool kHalfCaches = HGW_HAVE_FLOAT16;  // PagedAttention takes float16 caches too
// Below this much K/V (floats read), handing tiles to other threads costs more than it saves.
constexpr int64_t kParallelMinFloats = 192 * 1024;
// A small step's next layer K/V (up to this many floats) is prefetched when this layer's attention is done.
constexpr int64_t kNextLayerPrefetchFloats = 256 * 1024;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define HGW_ORT(expr)                                                              \
  do {                                                                             \
    if (OrtStatus* _status = (expr)) {                                             \
      const std::string _msg = g_api->GetErrorMessage(_status);                    \
      g_api->ReleaseStatus(_status);                                               \
      throw Error(_msg);                                                           \
    }                                                                              \
  } while (0)

template <typename T>
struct Input {
  T* data = nullptr;
  std::vector<int64_t> dims;
};

template <typename T>
Input<T> input(OrtKernelContext* ctx, size_t index, ONNXTensorElementDataType type, size_t ndim, const char* name,
               const char* shape, const char* op = "PagedAttention") {
  const OrtValue* value = nullptr;
  HGW_ORT(g_api->KernelContext_GetInput(ctx, index, &value));
  if (value == nullptr) throw Error(std::string(op) + ": input " + name + " is missing");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  HGW_ORT(g_api->GetTensorTypeAndShape(value, &info));
  ONNXTensorElementDataType got = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t n = 0;
  Input<T> in;
  OrtStatus* status = g_api->GetTensorElementType(info, &got);
  if (status == nullptr) status = g_api->GetDimensionsCount(info, &n);
  if (status == nullptr) {
    in.dims.resize(n);
    status = g_api->GetDimensions(info, in.dims.data(), n);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  HGW_ORT(status);
  if (got != type || (ndim != 0 && n != ndim)) throw Error(std::string(op) + ": " + name + " must be " + shape);
  void* data = nullptr;
  HGW_ORT(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  in.data = static_cast<T*>(data);
  return in;
}

std::string str(int64_t v) { return std::to_string(v); }

// out[0 : D/2] = x1 cos - x2 sin, out[D/2 : D] = x2 cos + x1 sin (rotate-half RoPE, as the reference model).
inline void rope(const float* x, const float* cos, const float* sin, int64_t half, float* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    out[i] = x1 * cos[i] - x2 * sin[i];
    out[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

struct AttentionKernel {
  static constexpr const char* kName = "PagedAttention";
  int64_t layer, num_heads, num_kv_heads;
  float scale;

  struct Item {
    int64_t seq, first, count;
  };

  template <typename T>
  struct Work {
    const AttentionKernel* kernel;
    hgw::PagedKVOf<T> kv;
    hgw::AttendFnOf<T> attend;
    const Item* items;
    const int32_t* block_tables;
    int64_t max_blocks, head_dim, group;
    const int32_t* seq_lens;
    const int32_t* cu;
    const float* q;  // rotated queries [T, H, D]
    float* out;      // [T, H, D]
  };

  template <typename T>
  static void run_item(void* data, size_t index) {
    const Work<T>& w = *static_cast<const Work<T>*>(data);
    const Item& item = w.items[index];
    const int64_t rows = item.count * w.group;  // per KV head: the tile's tokens x the group's query heads
    const int64_t heads = w.kernel->num_heads, num_kv = w.kernel->num_kv_heads;
    thread_local std::vector<const float*> q;
    thread_local std::vector<float*> out;
    thread_local std::vector<int64_t> lens;
    q.resize(num_kv * rows);
    out.resize(num_kv * rows);
    lens.resize(rows);
    const int64_t q_len = w.cu[item.seq + 1] - w.cu[item.seq];
    const int64_t context = w.seq_lens[item.seq] - q_len;
    for (int64_t j = 0; j < item.count; ++j) {
      const int64_t t = item.first + j;
      for (int64_t g = 0; g < w.group; ++g) lens[j * w.group + g] = context + (t - w.cu[item.seq]) + 1;
      for (int64_t kvh = 0; kvh < num_kv; ++kvh) {
        for (int64_t g = 0; g < w.group; ++g) {
          const int64_t r = kvh * rows + j * w.group + g;
          const int64_t offset = (t * heads + kvh * w.group + g) * w.head_dim;
          q[r] = w.q + offset;
          out[r] = w.out + offset;
        }
      }
    }
    w.attend(w.kv, hgw::Tile{w.block_tables + item.seq * w.max_blocks, 0, num_kv, rows, q.data(), out.data(),
                             lens.data()});
  }

  void compute(OrtKernelContext* ctx) const {
    const OrtValue* value = nullptr;
    HGW_ORT(g_api->KernelContext_GetInput(ctx, 3, &value));
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    if (value != nullptr) {
      OrtTensorTypeAndShapeInfo* info = nullptr;
      HGW_ORT(g_api->GetTensorTypeAndShape(value, &info));
      OrtStatus* status = g_api->GetTensorElementType(info, &type);
      g_api->ReleaseTensorTypeAndShapeInfo(info);
      HGW_ORT(status);
    }
#if HGW_HAVE_FLOAT16
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return compute_as<hgw::float16>(ctx, type);
#endif
    compute_as<float>(ctx, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);  // refuses any other type
  }

  // T: the cache's element type (float, or half where the compiler has _Float16); all arithmetic is float.
  template <typename T>
  void compute_as(OrtKernelContext* ctx, ONNXTensorElementDataType cache_type) const {
    const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const auto I32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    const auto qkv = input<float>(ctx, 0, F, 2, "qkv", "float [T, (num_heads + 2 num_kv_heads) head_dim]");
    const auto cos = input<float>(ctx, 1, F, 2, "cos", "float [T, head_dim / 2]");
    const auto sin = input<float>(ctx, 2, F, 2, "sin", "float [T, head_dim / 2]");
    const auto cache = input<T>(ctx, 3, cache_type, 6, "kv_cache",
                                kHalfCaches ? "float or float16 [num_layers, 2, num_blocks, block_size, num_kv_heads, "
                                              "head_dim]"
                                            : "float [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]");
    const auto tables = input<int32_t>(ctx, 4, I32, 2, "block_tables", "int32 [S, max_blocks]");
    const auto seq_lens = input<int32_t>(ctx, 5, I32, 1, "seq_lens", "int32 [S]");
    const auto cu = input<int32_t>(ctx, 6, I32, 1, "cu_seqlens_q", "int32 [S + 1]");
    const auto slots = input<int64_t>(ctx, 7, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 1, "slot_mapping", "int64 [T]");

    const int64_t T_ = qkv.dims[0], H = num_heads, KVH = num_kv_heads;
    const int64_t L = cache.dims[0], num_blocks = cache.dims[2], block_size = cache.dims[3], D = cache.dims[5];
    const int64_t S = seq_lens.dims[0], max_blocks = tables.dims[1], half = D / 2;
    if (cache.dims[1] != 2 || cache.dims[4] != KVH || D % 2 != 0 || layer >= L) {
      throw Error("PagedAttention: kv_cache must be [num_layers > " + str(layer) + ", 2, num_blocks, block_size, " +
                  str(KVH) + ", even head_dim]");
    }
    if (qkv.dims[1] != (H + 2 * KVH) * D) {
      throw Error("PagedAttention: qkv has " + str(qkv.dims[1]) + " columns, expected (" + str(H) + " + 2 x " +
                  str(KVH) + ") x " + str(D));
    }
    if (cos.dims[0] != T_ || cos.dims[1] != half || sin.dims != cos.dims) {
      throw Error("PagedAttention: cos and sin must be [" + str(T_) + ", " + str(half) + "]");
    }
    if (tables.dims[0] != S || cu.dims[0] != S + 1 || slots.dims[0] != T_) {
      throw Error("PagedAttention: block_tables, seq_lens, cu_seqlens_q and slot_mapping disagree on S=" + str(S) +
                  " sequences and T=" + str(T_) + " tokens");
    }
    if (S < 1 || cu.data[0] != 0 || cu.data[S] != T_) {
      throw Error("PagedAttention: cu_seqlens_q must run from 0 to T=" + str(T_));
    }
    for (int64_t i = 0; i < S; ++i) {
      const int64_t q_len = cu.data[i + 1] - cu.data[i];
      if (q_len < 1 || q_len > seq_lens.data[i]) {
        throw Error("PagedAttention: sequence " + str(i) + " has " + str(q_len) + " new tokens and seq_len " +
                    str(seq_lens.data[i]));
      }
      const std::string error = hgw::check_table(tables.data + i * max_blocks, seq_lens.data[i], max_blocks,
                                                 block_size, num_blocks, "seq_lens[" + str(i) + "]",
                                                 "block_tables[" + str(i));
      if (!error.empty()) throw Error("PagedAttention: " + error);
    }
    const int64_t num_slots = num_blocks * block_size;
    for (int64_t t = 0; t < T_; ++t) {
      if (slots.data[t] < -1 || slots.data[t] >= num_slots) {
        throw Error("PagedAttention: slot_mapping[" + str(t) + "] = " + str(slots.data[t]) + " is not a slot of the "
                    "cache (" + str(num_slots) + " slots)");
      }
    }

    const int64_t out_dims[2] = {T_, H * D};
    OrtValue* out_value = nullptr;
    HGW_ORT(g_api->KernelContext_GetOutput(ctx, 0, out_dims, 2, &out_value));
    void* out_data = nullptr;
    HGW_ORT(g_api->GetTensorMutableData(out_value, &out_data));
    if (T_ == 0) return;

    // RoPE on q (into scratch) and k (into its cache slot); v copied to its slot. All writes come first:
    // a prefill chunk's tokens read each other's K/V.
    const int64_t row = KVH * D, layer_stride = 2 * num_blocks * block_size * row;
    T* k_cache = cache.data + layer * layer_stride;
    T* v_cache = k_cache + num_blocks * block_size * row;
    thread_local std::vector<float> q_rot, k_rot;
    q_rot.resize(static_cast<size_t>(T_ * H * D));
    k_rot.resize(static_cast<size_t>(row));
    for (int64_t t = 0; t < T_; ++t) {
      const float* x = qkv.data + t * (H + 2 * KVH) * D;
      const float* c = cos.data + t * half;
      const float* s = sin.data + t * half;
      for (int64_t h = 0; h < H; ++h) rope(x + h * D, c, s, half, q_rot.data() + (t * H + h) * D);
      const int64_t slot = slots.data[t];
      if (slot < 0) continue;
      T* k_dst = k_cache + slot * row;  // [num_blocks, block_size] flatten to slots: block * bs + offset
      if constexpr (std::is_same<T, float>::value) {
        for (int64_t h = 0; h < KVH; ++h) rope(x + (H + h) * D, c, s, half, k_dst + h * D);
        std::memcpy(v_cache + slot * row, x + (H + KVH) * D, sizeof(float) * row);
      } else {  // rounded to the cache's type (nearest-even) once rotated
        for (int64_t h = 0; h < KVH; ++h) rope(x + (H + h) * D, c, s, half, k_rot.data() + h * D);
        T* v_dst = v_cache + slot * row;
        for (int64_t i = 0; i < row; ++i) {
          k_dst[i] = static_cast<T>(k_rot[i]);
          v_dst[i] = static_cast<T>(x[(H + KVH) * D + i]);
        }
      }
    }

    thread_local std::vector<Item> items;
    items.clear();
    int64_t floats = 0;
    for (int64_t i = 0; i < S; ++i) {
      for (int64_t first = cu.data[i]; first < cu.data[i + 1]; first += kTileTokens) {
        const int64_t count = std::min<int64_t>(kTileTokens, cu.data[i + 1] - first);
        const int64_t width = seq_lens.data[i] - (cu.data[i + 1] - first - count);  // the tile's last token
        items.push_back(Item{i, first, count});
        floats += 2 * width * row;
      }
    }
    const hgw::PagedKVOf<T> kv{k_cache, v_cache, block_size * row, row, block_size * row, row, block_size, D, scale};
    Work<T> work{this, kv, hgw::attend_fn<T>(D, false), items.data(), tables.data, max_blocks, D, H / KVH,
                 seq_lens.data, cu.data, q_rot.data(), static_cast<float*>(out_data)};
    if (items.size() > 1 && floats >= kParallelMinFloats) {
      HGW_ORT(g_api->KernelContext_ParallelFor(ctx, &AttentionKernel::run_item<T>, items.size(), 0, &work));
    } else {
      for (size_t i = 0; i < items.size(); ++i) run_item<T>(&work, i);
    }
#ifndef HGW_NO_NEXT_LAYER_PREFETCH
    if (layer + 1 < L && floats <= kNextLayerPrefetchFloats) {
      const T* k_next = k_cache + layer_stride;
      const T* v_next = v_cache + layer_stride;
      for (int64_t i = 0; i < S; ++i) {
        const int32_t* table = tables.data + i * max_blocks;
        for (int64_t pos = 0; pos < seq_lens.data[i]; pos += block_size) {
          const int64_t at = table[pos / block_size] * block_size * row;
          const int64_t span = std::min<int64_t>(block_size, seq_lens.data[i] - pos) * row;
          hgw::prefetch_lines(k_next + at, span, 1);
          hgw::prefetch_lines(v_next + at, span, 1);
        }
      }
    }
#endif
  }

  static size_t num_inputs() { return 8; }
  static ONNXTensorElementDataType input_type(size_t i) {
    if (i == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // kv_cache: float or float16 (checked per run)
    if (i <= 2) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (i <= 6) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  static bool input_optional(size_t) { return false; }
  static size_t num_outputs() { return 1; }
  static bool output_optional(size_t) { return false; }

  static AttentionKernel* create(const OrtApi* api, const OrtKernelInfo* info) {
    auto k = std::make_unique<AttentionKernel>();
    auto attr = [&](const char* name, int64_t* v) { HGW_ORT(api->KernelInfoGetAttribute_int64(info, name, v)); };
    attr("layer", &k->layer);
    attr("num_heads", &k->num_heads);
    attr("num_kv_heads", &k->num_kv_heads);
    HGW_ORT(api->KernelInfoGetAttribute_float(info, "scale", &k->scale));
    if (k->layer < 0 || k->num_kv_heads < 1 || k->num_heads % k->num_kv_heads != 0) {
      throw Error("PagedAttention: needs layer >= 0 and num_heads a multiple of num_kv_heads >= 1");
    }
    return k.release();
  }
};

// ---- BlockQuantMatMul's prologues, one activation row at a time

// s = x (+ skip) -> sum_out (when given); out = s * gamma / sqrt(mean(s^2) + eps).
inline void add_rms_norm_row(const float* x, const float* skip, const float* gamma, int64_t k, float eps,
                             float* sum_out, float* out) {
  const float* s = x;
  if (skip != nullptr) {
    float* dst = sum_out != nullptr ? sum_out : out;
    for (int64_t i = 0; i < k; ++i) dst[i] = x[i] + skip[i];
    s = dst;
  }
  float ss = 0.0f;
  int64_t i = 0;
#if HGW_BQ_AVX2
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (; i + 32 <= k; i += 32) {
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_loadu_ps(s + i + 8 * j);
      acc[j] = _mm256_fmadd_ps(v, v, acc[j]);
    }
  }
  ss = hgw::hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
  for (; i < k; ++i) ss += s[i] * s[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(k) + eps);
  for (i = 0; i < k; ++i) out[i] = s[i] * inv * gamma[i];
}

// out = silu(gate) * up for gu = [gate (k), up (k)]; sigmoid from e^-|g| (never overflows).
inline void swiglu_row(const float* gu, int64_t k, float* out) {
  const float* up = gu + k;
  int64_t i = 0;
#if HGW_BQ_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= k; i += 8) {
    const __m256 g = _mm256_loadu_ps(gu + i);
    const __m256 e = hgw::exp_nonpositive(_mm256_or_ps(g, sign));  // e^-|g|
    const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), g);  // g < 0 (sign bit set): e / (1 + e)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < k; ++i) {
    const float g = gu[i], e = std::exp(-std::fabs(g)), r = 1.0f / (1.0f + e);
    out[i] = g * (g < 0.0f ? e * r : r) * up[i];
  }
}

// Indices of the k largest values of row [0, n) (k <= n), in no particular order: a min-heap of the best so far,
// and a scan that only stops on a value above the heap's least (a handful per row once the heap fills).
inline void top_k(const float* row, int64_t n, int64_t k, std::vector<std::pair<float, int64_t>>& heap) {
  auto greater = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) { return a > b; };
  heap.clear();
  for (int64_t i = 0; i < k; ++i) heap.emplace_back(row[i], i);
  std::make_heap(heap.begin(), heap.end(), greater);  // heap.front() is the least kept
  auto offer = [&](int64_t i) {
    if (row[i] > heap.front().first) {
      std::pop_heap(heap.begin(), heap.end(), greater);
      heap.back() = {row[i], i};
      std::push_heap(heap.begin(), heap.end(), greater);
    }
  };
  int64_t i = k;
#if HGW_BQ_AVX2
  for (; i + 8 <= n; i += 8) {
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(heap.front().first),
                                                _CMP_GT_OQ));
    while (mask != 0) {
      offer(i + __builtin_ctz(static_cast<unsigned>(mask)));
      mask &= mask - 1;
    }
  }
#endif
  for (; i < n; ++i) offer(i);
}

struct BlockQuantMatMulKernel {
  static constexpr const char* kName = "BlockQuantMatMul";
  static constexpr int64_t kTilesPerItem = 2;           // 16 weight rows per parallel work item
  static constexpr int64_t kParallelMinMacs = 1 << 16;  // below this, one thread does it all
  static constexpr size_t kItemsPerBatch = 16;           // 256 weight rows per claim on the thread pool
  static constexpr size_t kMinBatches = 8;               // ... in at least this many claims
  static constexpr int64_t kStreamingRows = 4;           // up to this many activation rows
  enum Prologue : int64_t { kNone = 0, kRmsNorm = 1, kSwiGLU = 2 };
  int64_t k, n, bits, kb, tiles, prologue = kNone, rescore = 0;
  float epsilon = 1e-6f;

  struct Work {
    hgw::bq::Weights w;
    hgw::bq::Weights exact;  // rescore > 0: the 8-bit weights
    int64_t rescore;
    const float* x;
    float* y;
    int8_t* q;  // x quantized: codes, block scales and sums (hgw::bq::Acts)
    float* scale;
    float* sums;
    int64_t m, k, n, tiles;
    int64_t prologue, ldx;  // ldx: x's row length (2K for SwiGLU)
    const float* gamma;
    const float* skip;
    float* sum_out;
    float epsilon;
  };

  static void quantize_rows(void* data, size_t index) {  // 8 activation rows per item
    const Work& w = *static_cast<const Work*>(data);
    const int64_t m0 = static_cast<int64_t>(index) * 8, m1 = std::min<int64_t>(w.m, m0 + 8);
    if (w.prologue == kNone) {
      hgw::bq::quantize_acts(w.x, w.k, w.k, m0, m1, w.w.kb, w.q, w.scale, w.sums);
      return;
    }
    thread_local std::vector<float> row;
    row.resize(static_cast<size_t>(w.k));
    for (int64_t m = m0; m < m1; ++m) {
      if (w.prologue == kRmsNorm) {
        add_rms_norm_row(w.x + m * w.ldx, w.skip != nullptr ? w.skip + m * w.k : nullptr, w.gamma, w.k, w.epsilon,
                         w.sum_out != nullptr ? w.sum_out + m * w.k : nullptr, row.data());
      } else {
        swiglu_row(w.x + m * w.ldx, w.k, row.data());
      }
      const int64_t at = m * w.w.kb;
      hgw::bq::quantize_acts(row.data(), w.k, w.k, 0, 1, w.w.kb, w.q + at * hgw::bq::kBlock, w.scale + at, w.sums + at);
    }
  }

  static void tile_item(void* data, size_t index) {
    const Work& w = *static_cast<const Work*>(data);
    const int64_t t0 = static_cast<int64_t>(index) * kTilesPerItem, t1 = std::min<int64_t>(w.tiles, t0 + kTilesPerItem);
    alignas(32) float scratch[4 * kTilesPerItem * hgw::bq::kTile];
    hgw::bq::gemm(w.w, hgw::bq::Acts{w.q, w.scale, w.sums, w.w.kb}, 0, w.m, t0, t1, w.y, w.n, w.n, scratch);
  }

  static void rescore_row(void* data, size_t index) {
    const Work& w = *static_cast<const Work*>(data);
    const int64_t m = static_cast<int64_t>(index);
    float* row = w.y + m * w.n;
    thread_local std::vector<std::pair<float, int64_t>> best;
    top_k(row, w.n, std::min(w.rescore, w.n), best);
    thread_local std::vector<int64_t> tiles;
    tiles.clear();
    for (const auto& b : best) tiles.push_back(b.second / hgw::bq::kTile);
    std::sort(tiles.begin(), tiles.end());
    tiles.erase(std::unique(tiles.begin(), tiles.end()), tiles.end());
    alignas(32) float scratch[4 * hgw::bq::kTile];
    const hgw::bq::Acts acts{w.q, w.scale, w.sums, w.w.kb};
    for (const int64_t t : tiles) hgw::bq::gemm(w.exact, acts, m, m + 1, t, t + 1, w.y, w.n, w.n, scratch);
  }

  void compute(OrtKernelContext* ctx) const {
    const auto x = input<float>(ctx, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 0, "x", "float [..., K]", kName);
    // Shapes are spelled out only when they are wrong: this runs for every linear layer of every step.
    const auto codes = input<uint8_t>(ctx, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 3, "codes",
                                      "uint8 [N / 8 tiles, K / 32 blocks, 128 or 256]", kName);
    const auto scales = input<uint16_t>(ctx, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 3, "scales",
                                        "float16 [N / 8 tiles, K / 32 blocks, 8]", kName);
    size_t num_inputs = 0;
    HGW_ORT(g_api->KernelContext_GetInputCount(ctx, &num_inputs));
    const OrtValue* mins_value = nullptr;
    if (num_inputs > 3) HGW_ORT(g_api->KernelContext_GetInput(ctx, 3, &mins_value));
    Input<uint16_t> mins;
    if (bits == 4) {
      if (mins_value == nullptr) throw Error("BlockQuantMatMul: 4-bit weights need input 3, mins");
      mins = input<uint16_t>(ctx, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 3, "mins",
                             "float16 [N / 8 tiles, K / 32 blocks, 8]", kName);
    } else if (mins_value != nullptr) {
      throw Error("BlockQuantMatMul: 8-bit weights take no mins");
    }
    const int64_t ldx = prologue == kSwiGLU ? 2 * k : k;
    if (x.dims.empty() || x.dims.back() != ldx) {
      throw Error(prologue == kSwiGLU ? "BlockQuantMatMul: x must be float [..., 2K=" + str(ldx) + "] (SwiGLU: gate, up)"
                                      : "BlockQuantMatMul: x must be float [..., K=" + str(k) + "]");
    }
    const float* gamma = nullptr;
    const float* skip = nullptr;
    size_t num_outputs = 0;
    HGW_ORT(g_api->KernelContext_GetOutputCount(ctx, &num_outputs));
    if (prologue == kRmsNorm) {
      const auto g = input<float>(ctx, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1, "gamma", "float [K]", kName);
      if (g.dims[0] != k) throw Error("BlockQuantMatMul: gamma must be float [K=" + str(k) + "]");
      gamma = g.data;
      const OrtValue* skip_value = nullptr;
      if (num_inputs > 5) HGW_ORT(g_api->KernelContext_GetInput(ctx, 5, &skip_value));
      if (skip_value != nullptr) {
        const auto sk = input<float>(ctx, 5, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 0, "skip", "float [..., K]", kName);
        if (sk.dims != x.dims) throw Error("BlockQuantMatMul: skip must have the shape of x");
        skip = sk.data;
      }
    }
    hgw::bq::Weights exact{};
    if (rescore > 0) {
      const auto c8 = input<uint8_t>(ctx, 6, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 3, "exact_codes",
                                     "uint8 [N / 8 tiles, K / 32 blocks, 256]", kName);
      const auto s8 = input<uint16_t>(ctx, 7, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 3, "exact_scales",
                                      "float16 [N / 8 tiles, K / 32 blocks, 8]", kName);
      if (c8.dims != std::vector<int64_t>{tiles, kb, 256} || s8.dims != std::vector<int64_t>{tiles, kb, 8}) {
        throw Error("BlockQuantMatMul: rescoring needs exact_codes uint8 [" + str(tiles) + ", " + str(kb) +
                    ", 256] and exact_scales float16 [" + str(tiles) + ", " + str(kb) + ", 8] (8-bit blocks)");
      }
      exact = hgw::bq::Weights{c8.data, s8.data, nullptr, kb, 8};
    }
    if (num_outputs > 1 && skip == nullptr) {
      throw Error("BlockQuantMatMul: output 1 (x + skip) needs prologue 1 (RMSNorm) and input 5, skip");
    }
    const int64_t block_bytes = bits == 4 ? 128 : 256;
    auto is = [](const std::vector<int64_t>& dims, int64_t a, int64_t b, int64_t c) {
      return dims[0] == a && dims[1] == b && dims[2] == c;
    };
    if (!is(codes.dims, tiles, kb, block_bytes) || !is(scales.dims, tiles, kb, hgw::bq::kTile) ||
        (bits == 4 && !is(mins.dims, tiles, kb, hgw::bq::kTile))) {
      throw Error("BlockQuantMatMul: codes must be uint8 [" + str(tiles) + ", " + str(kb) + ", " + str(block_bytes) +
                  "] and scales" + (bits == 4 ? " and mins " : " ") + "float16 [" + str(tiles) + ", " + str(kb) +
                  ", 8]");
    }
    int64_t m = 1;
    for (size_t i = 0; i + 1 < x.dims.size(); ++i) m *= x.dims[i];
    std::vector<int64_t> out_dims(x.dims);
    out_dims.back() = n;
    OrtValue* out_value = nullptr;
    HGW_ORT(g_api->KernelContext_GetOutput(ctx, 0, out_dims.data(), out_dims.size(), &out_value));
    void* out_data = nullptr;
    HGW_ORT(g_api->GetTensorMutableData(out_value, &out_data));
    void* sum_data = nullptr;
    if (num_outputs > 1) {
      OrtValue* sum_value = nullptr;
      HGW_ORT(g_api->KernelContext_GetOutput(ctx, 1, x.dims.data(), x.dims.size(), &sum_value));
      HGW_ORT(g_api->GetTensorMutableData(sum_value, &sum_data));
    }
    if (m == 0) return;

    thread_local std::vector<int8_t> q;
    thread_local std::vector<float> scale, sums;
    q.resize(static_cast<size_t>(m * kb * hgw::bq::kBlock));
    scale.resize(static_cast<size_t>(m * kb));
    sums.resize(static_cast<size_t>(m * kb));
    Work work{hgw::bq::Weights{codes.data, scales.data, bits == 4 ? mins.data : nullptr, kb, static_cast<int>(bits)},
              exact, rescore, x.data, static_cast<float*>(out_data), q.data(), scale.data(), sums.data(), m, k, n, tiles,
              prologue, ldx, gamma, skip, static_cast<float*>(sum_data), epsilon};
    const bool parallel = m * n * k >= kParallelMinMacs;
    const size_t quant_items = static_cast<size_t>((m + 7) / 8);
    const size_t tile_items = static_cast<size_t>((tiles + kTilesPerItem - 1) / kTilesPerItem);
    if (parallel && quant_items > 1) {
      HGW_ORT(g_api->KernelContext_ParallelFor(ctx, &quantize_rows, quant_items, 0, &work));
    } else {
      for (size_t i = 0; i < quant_items; ++i) quantize_rows(&work, i);
    }
    if (parallel && tile_items > 1) {
      // A few activation rows stream the weights: claims of contiguous runs of kItemsPerBatch items (at least
      // kMinBatches of them, for balance) let each core read long runs (a claim per item interleaves the cores'
      // reads, and the prefetchers lose the stream): ~3% on a batch-1 step. Many rows are compute-bound, where
      // balance is all: a claim per item (0), 9% faster on a 128-token prefill than batches of 16.
      const size_t batches = m > kStreamingRows ? 0 : std::max((tile_items + kItemsPerBatch - 1) / kItemsPerBatch,
                                                              std::min(tile_items, kMinBatches));
      HGW_ORT(g_api->KernelContext_ParallelFor(ctx, &tile_item, tile_items, batches, &work));
    } else {
      for (size_t i = 0; i < tile_items; ++i) tile_item(&work, i);
    }
    if (rescore > 0) {
      if (parallel && m > 1) {
        HGW_ORT(g_api->KernelContext_ParallelFor(ctx, &rescore_row, static_cast<size_t>(m), 0, &work));
      } else {
        for (int64_t i = 0; i < m; ++i) rescore_row(&work, static_cast<size_t>(i));
      }
    }
  }

  static size_t num_inputs() { return 8; }
  static ONNXTensorElementDataType input_type(size_t i) {
    if (i == 1 || i == 6) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (i == 2 || i == 3 || i == 7) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // x, gamma, skip
  }
  static bool input_optional(size_t i) { return i >= 3; }
  static size_t num_outputs() { return 2; }
  static bool output_optional(size_t i) { return i == 1; }

  static BlockQuantMatMulKernel* create(const OrtApi* api, const OrtKernelInfo* info) {
    auto k = std::make_unique<BlockQuantMatMulKernel>();
    HGW_ORT(api->KernelInfoGetAttribute_int64(info, "K", &k->k));
    HGW_ORT(api->KernelInfoGetAttribute_int64(info, "N", &k->n));
    HGW_ORT(api->KernelInfoGetAttribute_int64(info, "bits", &k->bits));
    // Optional attributes: a missing one is an error status, released, and the default stands.
    if (OrtStatus* status = api->KernelInfoGetAttribute_int64(info, "prologue", &k->prologue)) api->ReleaseStatus(status);
    if (OrtStatus* status = api->KernelInfoGetAttribute_float(info, "epsilon", &k->epsilon)) api->ReleaseStatus(status);
    if (OrtStatus* status = api->KernelInfoGetAttribute_int64(info, "rescore", &k->rescore)) api->ReleaseStatus(status);
    if (k->k < 1 || k->n < 1 || (k->bits != 4 && k->bits != 8)) {
      throw Error("BlockQuantMatMul: needs K >= 1, N >= 1 and bits 4 or 8");
    }
    if (k->prologue < kNone || k->prologue > kSwiGLU || !(k->epsilon >= 0.0f)) {
      throw Error("BlockQuantMatMul: prologue must be 0 (none), 1 (RMSNorm) or 2 (SwiGLU), epsilon >= 0");
    }
    if (k->rescore < 0 || (k->rescore > 0 && k->bits != 4)) {
      throw Error("BlockQuantMatMul: rescore must be >= 0, and > 0 only on 4-bit weights (the 8-bit ones are inputs 6, 7)");
    }
    k->kb = (k->k + hgw::bq::kBlock - 1) / hgw::bq::kBlock;
    k->tiles = (k->n + hgw::bq::kTile - 1) / hgw::bq::kTile;
    return k.release();
  }
};

OrtStatusPtr fail(const std::exception& e) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, e.what()); }

// The OrtCustomOp function table of kernel type K (K::kName, num_inputs, input_type, input_optional, num_outputs,
// output_optional, create, compute; float outputs).
template <class K>
struct CustomOp : OrtCustomOp {
  CustomOp() {
    std::memset(static_cast<OrtCustomOp*>(this), 0, sizeof(OrtCustomOp));
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp*) { return K::kName; };
    GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
    GetInputTypeCount = [](const OrtCustomOp*) { return K::num_inputs(); };
    GetInputType = [](const OrtCustomOp*, size_t i) { return K::input_type(i); };
    GetOutputTypeCount = [](const OrtCustomOp*) { return K::num_outputs(); };
    GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return K::input_optional(i) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return K::output_optional(i) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return std::numeric_limits<int>::max(); };
    CreateKernelV2 = [](const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                        void** kernel) -> OrtStatusPtr {
      try {
        *kernel = K::create(api, info);
        return nullptr;
      } catch (const std::exception& e) {
        return fail(e);
      }
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) -> OrtStatusPtr {
      try {
        static_cast<const K*>(kernel)->compute(ctx);
        return nullptr;
      } catch (const std::exception& e) {
        return fail(e);
      }
    };
    KernelDestroy = [](void* kernel) { delete static_cast<K*>(kernel); };
  }
};

}  // namespace

extern "C" {

// Called by SessionOptions.register_custom_ops_library(path): adds the hybrid_gateway domain.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
  static std::mutex mu;
  static CustomOp<AttentionKernel> attention;
  static CustomOp<BlockQuantMatMulKernel> matmul;
  std::lock_guard<std::mutex> lock(mu);
  if (g_api == nullptr) g_api = api_base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) return nullptr;  // cannot even report: an ONNX Runtime older than these headers
  OrtCustomOpDomain* domain = nullptr;  // one per session options; lives as long as the process
  if (OrtStatus* status = g_api->CreateCustomOpDomain("hybrid_gateway", &domain)) return status;
  if (OrtStatus* status = g_api->CustomOpDomain_Add(domain, &attention)) return status;
  if (OrtStatus* status = g_api->CustomOpDomain_Add(domain, &matmul)) return status;
  return g_api->AddCustomOpDomain(options, domain);
}

// Lets the Python side check the arithmetic's loop kind without a session.
__attribute__((visibility("default"))) int hgw_has_avx2() { return hgw::kHaveAvx2 ? 1 : 0; }
__attribute__((visibility("default"))) int hgw_block_quant_simd() { return hgw::bq::kHaveAvx2 ? 1 : 0; }
__attribute__((visibility("default"))) int hgw_block_quant_vnni() { return HGW_BQ_VNNI; }

}  // extern "C"
