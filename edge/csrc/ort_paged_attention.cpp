// hybrid_gateway::PagedAttention, an ONNX Runtime custom op (CPU): one decoder layer's attention on the
// shared paged KV cache, inside the edge engine's single fused graph (edge/builder.py, layout "fused").
//
// With attention in the graph a whole step is one ONNX Runtime call, instead of a session per layer with
// Python in between. The cache is a graph input bound to the engine's own torch tensor (no copy); the op
// writes this step's K/V rows into it and reads every sequence's K/V through its block table in place,
// with the arithmetic of kernels/attention/csrc/paged_attention_cpu.h (the one the PyTorch op uses).
//
// Inputs (T = new tokens this step, S = sequences; kernels/attention/metadata.py for the length terms):
//   0 qkv          [T, (H + 2 KVH) * D] float   the fused q/k/v projection, before RoPE
//   1 cos, 2 sin   [T, D / 2] float             RoPE tables at each token's position (rotate-half)
//   3 kv_cache     [L, 2, num_blocks, block_size, KVH, D] float   the whole cache; this layer's K/V are written
//   4 block_tables [S, max_blocks] int32
//   5 seq_lens     [S] int32                   context + new tokens
//   6 cu_seqlens_q [S + 1] int32               sequence i's new tokens are rows cu[i] .. cu[i+1] - 1
//   7 slot_mapping [T] int64                   cache slot of each new token's K/V, -1 = do not write
// Output: attn [T, H * D] float. Attributes: layer, num_heads, num_kv_heads (int), scale (float).
//
// New token j of sequence i (at position seq_len - q_len + j) attends causally to positions 0 .. its own.
// Work is split into tiles of up to kTileTokens new tokens of one sequence with all its KV heads, so a
// prefill chunk loads each K row once for several queries and every cached row is read whole; large steps run on ONNX Runtime's intra-op thread pool
// (KernelContext_ParallelFor), the cores the dense ops use.
//
// Every index is checked before any memory is touched; a bad one fails the run with ORT_INVALID_ARGUMENT.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_c_api.h>

#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "paged_attention_cpu.h"

namespace {

const OrtApi* g_api = nullptr;

constexpr int64_t kTileTokens = 8;
// Below this much K/V (floats read), handing tiles to other threads costs more than it saves.
constexpr int64_t kParallelMinFloats = 192 * 1024;

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
               const char* shape) {
  const OrtValue* value = nullptr;
  HGW_ORT(g_api->KernelContext_GetInput(ctx, index, &value));
  if (value == nullptr) throw Error(std::string("PagedAttention: input ") + name + " is missing");
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
  if (got != type || n != ndim) throw Error(std::string("PagedAttention: ") + name + " must be " + shape);
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

struct Kernel {
  int64_t layer, num_heads, num_kv_heads;
  float scale;

  struct Item {
    int64_t seq, first, count;
  };

  struct Work {
    const Kernel* kernel;
    hgw::PagedKV kv;
    hgw::AttendFn attend;
    const Item* items;
    const int32_t* block_tables;
    int64_t max_blocks, head_dim, group;
    const int32_t* seq_lens;
    const int32_t* cu;
    const float* q;  // rotated queries [T, H, D]
    float* out;      // [T, H, D]
  };

  static void run_item(void* data, size_t index) {
    const Work& w = *static_cast<const Work*>(data);
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
    const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const auto I32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    const auto qkv = input<float>(ctx, 0, F, 2, "qkv", "float [T, (num_heads + 2 num_kv_heads) head_dim]");
    const auto cos = input<float>(ctx, 1, F, 2, "cos", "float [T, head_dim / 2]");
    const auto sin = input<float>(ctx, 2, F, 2, "sin", "float [T, head_dim / 2]");
    const auto cache = input<float>(ctx, 3, F, 6, "kv_cache",
                                    "float [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]");
    const auto tables = input<int32_t>(ctx, 4, I32, 2, "block_tables", "int32 [S, max_blocks]");
    const auto seq_lens = input<int32_t>(ctx, 5, I32, 1, "seq_lens", "int32 [S]");
    const auto cu = input<int32_t>(ctx, 6, I32, 1, "cu_seqlens_q", "int32 [S + 1]");
    const auto slots = input<int64_t>(ctx, 7, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 1, "slot_mapping", "int64 [T]");

    const int64_t T = qkv.dims[0], H = num_heads, KVH = num_kv_heads;
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
    if (cos.dims[0] != T || cos.dims[1] != half || sin.dims != cos.dims) {
      throw Error("PagedAttention: cos and sin must be [" + str(T) + ", " + str(half) + "]");
    }
    if (tables.dims[0] != S || cu.dims[0] != S + 1 || slots.dims[0] != T) {
      throw Error("PagedAttention: block_tables, seq_lens, cu_seqlens_q and slot_mapping disagree on S=" + str(S) +
                  " sequences and T=" + str(T) + " tokens");
    }
    if (S < 1 || cu.data[0] != 0 || cu.data[S] != T) {
      throw Error("PagedAttention: cu_seqlens_q must run from 0 to T=" + str(T));
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
    for (int64_t t = 0; t < T; ++t) {
      if (slots.data[t] < -1 || slots.data[t] >= num_slots) {
        throw Error("PagedAttention: slot_mapping[" + str(t) + "] = " + str(slots.data[t]) + " is not a slot of the "
                    "cache (" + str(num_slots) + " slots)");
      }
    }

    const int64_t out_dims[2] = {T, H * D};
    OrtValue* out_value = nullptr;
    HGW_ORT(g_api->KernelContext_GetOutput(ctx, 0, out_dims, 2, &out_value));
    void* out_data = nullptr;
    HGW_ORT(g_api->GetTensorMutableData(out_value, &out_data));
    if (T == 0) return;

    // RoPE on q (into scratch) and k (into its cache slot); v copied to its slot. All writes come first:
    // a prefill chunk's tokens read each other's K/V.
    const int64_t row = KVH * D, layer_stride = 2 * num_blocks * block_size * row;
    float* k_cache = cache.data + layer * layer_stride;
    float* v_cache = k_cache + num_blocks * block_size * row;
    thread_local std::vector<float> q_rot;
    q_rot.resize(static_cast<size_t>(T * H * D));
    for (int64_t t = 0; t < T; ++t) {
      const float* x = qkv.data + t * (H + 2 * KVH) * D;
      const float* c = cos.data + t * half;
      const float* s = sin.data + t * half;
      for (int64_t h = 0; h < H; ++h) rope(x + h * D, c, s, half, q_rot.data() + (t * H + h) * D);
      const int64_t slot = slots.data[t];
      if (slot < 0) continue;
      float* k_dst = k_cache + slot * row;  // [num_blocks, block_size] flatten to slots: block * bs + offset
      for (int64_t h = 0; h < KVH; ++h) rope(x + (H + h) * D, c, s, half, k_dst + h * D);
      std::memcpy(v_cache + slot * row, x + (H + KVH) * D, sizeof(float) * row);
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
    const hgw::PagedKV kv{k_cache, v_cache, block_size * row, row, block_size * row, row, block_size, D, scale};
    Work work{this, kv, hgw::attend_fn(D, false), items.data(), tables.data, max_blocks, D, H / KVH,
              seq_lens.data, cu.data, q_rot.data(), static_cast<float*>(out_data)};
    if (items.size() > 1 && floats >= kParallelMinFloats) {
      HGW_ORT(g_api->KernelContext_ParallelFor(ctx, &Kernel::run_item, items.size(), 0, &work));
    } else {
      for (size_t i = 0; i < items.size(); ++i) run_item(&work, i);
    }
  }
};

OrtStatusPtr fail(const std::exception& e) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, e.what()); }

struct PagedAttentionOp : OrtCustomOp {
  PagedAttentionOp() {
    std::memset(static_cast<OrtCustomOp*>(this), 0, sizeof(OrtCustomOp));
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp*) { return "PagedAttention"; };
    GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 8; };
    GetInputType = [](const OrtCustomOp*, size_t i) {
      if (i <= 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      if (i <= 6) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
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
        auto k = new Kernel{};
        auto attr = [&](const char* name, int64_t* v) { HGW_ORT(api->KernelInfoGetAttribute_int64(info, name, v)); };
        try {
          attr("layer", &k->layer);
          attr("num_heads", &k->num_heads);
          attr("num_kv_heads", &k->num_kv_heads);
          HGW_ORT(api->KernelInfoGetAttribute_float(info, "scale", &k->scale));
          if (k->layer < 0 || k->num_kv_heads < 1 || k->num_heads % k->num_kv_heads != 0) {
            throw Error("PagedAttention: needs layer >= 0 and num_heads a multiple of num_kv_heads >= 1");
          }
        } catch (...) {
          delete k;
          throw;
        }
        *kernel = k;
        return nullptr;
      } catch (const std::exception& e) {
        return fail(e);
      }
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) -> OrtStatusPtr {
      try {
        static_cast<const Kernel*>(kernel)->compute(ctx);
        return nullptr;
      } catch (const std::exception& e) {
        return fail(e);
      }
    };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  }
};

}  // namespace

extern "C" {

// Called by SessionOptions.register_custom_ops_library(path): adds the hybrid_gateway domain.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
  static std::mutex mu;
  static PagedAttentionOp op;
  std::lock_guard<std::mutex> lock(mu);
  if (g_api == nullptr) g_api = api_base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) return nullptr;  // cannot even report: an ONNX Runtime older than these headers
  OrtCustomOpDomain* domain = nullptr;  // one per session options; lives as long as the process
  if (OrtStatus* status = g_api->CreateCustomOpDomain("hybrid_gateway", &domain)) return status;
  if (OrtStatus* status = g_api->CustomOpDomain_Add(domain, &op)) return status;
  return g_api->AddCustomOpDomain(options, domain);
}

// Lets the Python side check the arithmetic's loop kind without a session.
__attribute__((visibility("default"))) int hgw_has_avx2() { return hgw::kHaveAvx2 ? 1 : 0; }

}  // extern "C"
