// Paged decode attention for CPU float32, straight off the shared KV-cache format.
//
// One query token per sequence attends to its whole cached sequence, reading K and V through the
// block table where they lie: no gather copy, no padding, no mask. Optionally the step's new K/V
// rows are written into their slots first, so a decode layer's attention is a single call.
//
// Layouts (see kernels/kv_cache/layout.py and kernels/attention/metadata.py):
//   q            [num_seqs, num_heads, head_dim]                  float32, contiguous
//   k/v_cache    [num_blocks, block_size, num_kv_heads, head_dim]  float32, last two dims contiguous
//                (any block/slot strides: the K and V halves of a packed layer are views)
//   block_tables [num_seqs, max_blocks]                            int32, contiguous
//   seq_lens     [num_seqs]                                        int32 (the new token included)
//   k/v_new      [num_seqs, num_kv_heads, head_dim]                float32, optional
//   slot_mapping [num_seqs]                                        int64, -1 = skip, optional
//   out          [num_seqs, num_heads, head_dim]                   float32, contiguous
// Query head h reads KV head h / (num_heads / num_kv_heads), as in grouped-query attention.
//
// The math is float32 with a two-pass softmax per (sequence, KV head): scores of the group's query
// heads for every position, then max/exp/sum, then one pass over V. Work items are (sequence, KV head)
// pairs; with threads > 1 and enough K/V to read, they are shared with sleeping worker threads (a decode
// step's attention is bound by memory bandwidth, which one core does not saturate).

#include <torch/extension.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

namespace {

template <int kDim>
struct Dim {
  static constexpr int value = kDim;
};

// head_dim known at compile time for the common sizes, so the portable loops vectorise fully.
template <typename DimT>
inline float dot(const float* __restrict a, const float* __restrict b, int dim) {
  const int n = DimT::value > 0 ? DimT::value : dim;
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename DimT>
inline void axpy(float w, const float* __restrict x, float* __restrict y, int dim) {
  const int n = DimT::value > 0 ? DimT::value : dim;
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += w * x[i];
}

struct Args {
  const float* q;
  const float* k_cache;
  const float* v_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  float* out;
  int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks;
  int64_t k_block_stride, k_slot_stride, v_block_stride, v_slot_stride;
  float scale;
};

#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kHaveAvx2 = true;

// e^x for x <= 0 (scores minus their max): 2^(x log2 e) split into 2^n (exponent bits) times 2^f,
// |f| <= 1/2, with 2^f from its degree-6 Taylor polynomial (relative error below 2e-7).
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.5403530393381608e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// Sums of four 8-lane vectors, as one 4-lane vector [sum(a), sum(b), sum(c), sum(d)].
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#else
constexpr bool kHaveAvx2 = false;
#endif

// Scores of the group's query heads against `count` consecutive slots of one block:
// scores[g * len + pos + o] = scale * q_g . k_o.
template <typename DimT, bool kVector>
inline void block_scores(const float* q, const float* kb, int64_t slot_stride, int64_t count, int64_t group, int dim,
                         float scale, float* scores, int64_t len, int64_t pos) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kVector) {
    if (dim % 8 == 0) {
      const __m128 vscale = _mm_set1_ps(scale);
      int64_t o = 0;
      for (; o + 4 <= count; o += 4) {
        const float* k0 = kb + o * slot_stride;
        const float* k1 = k0 + slot_stride;
        const float* k2 = k1 + slot_stride;
        const float* k3 = k2 + slot_stride;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q + g * dim;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int i = 0; i < dim; i += 8) {
            const __m256 qv = _mm256_loadu_ps(qg + i);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
          }
          _mm_storeu_ps(scores + g * len + pos + o, _mm_mul_ps(hsum4(a0, a1, a2, a3), vscale));
        }
      }
      for (; o < count; ++o) {
        const float* kp = kb + o * slot_stride;
        for (int64_t g = 0; g < group; ++g) {
          __m256 a = _mm256_setzero_ps();
          for (int i = 0; i < dim; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * dim + i), _mm256_loadu_ps(kp + i), a);
          scores[g * len + pos + o] = hsum(a) * scale;
        }
      }
      return;
    }
  }
#endif
  for (int64_t o = 0; o < count; ++o) {
    const float* kp = kb + o * slot_stride;
    for (int64_t g = 0; g < group; ++g) scores[g * len + pos + o] = dot<DimT>(q + g * dim, kp, dim) * scale;
  }
}

// row[t] = exp(row[t] - max(row)); returns the sum.
template <bool kVector>
inline float softmax_weights(float* row, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < len; ++t) m = std::max(m, row[t]);
  float sum = 0.f;
  int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kVector) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    for (; t + 8 <= len; t += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + t), vm));
      _mm256_storeu_ps(row + t, e);
      vs = _mm256_add_ps(vs, e);
    }
    sum = hsum(vs);
  }
#endif
  for (; t < len; ++t) {
    row[t] = std::exp(row[t] - m);
    sum += row[t];
  }
  return sum;
}

// out_g = (sum_t w_g[t] v_t) / sums[g] with eight 8-lane accumulators held in registers over all positions,
// one 64-wide slice of head_dim at a time. Returns false (nothing done) when head_dim is not a multiple of 64
// or the build has no AVX2.
template <bool kVector>
inline bool weighted_values(const float* vh, const int32_t* table, int64_t block_stride, int64_t slot_stride,
                            int64_t block_size, int64_t len, int64_t group, int dim, const float* weights,
                            const float* sums, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kVector) {
    if (dim % 64 != 0) return false;
    for (int64_t g = 0; g < group; ++g) {
      const float* w = weights + g * len;
      for (int d0 = 0; d0 < dim; d0 += 64) {
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t pos = 0, b = 0; pos < len; ++b) {
          const float* vb = vh + table[b] * block_stride + d0;
          const int64_t in_block = std::min(block_size, len - pos);
          for (int64_t o = 0; o < in_block; ++o, ++pos) {
            const __m256 wv = _mm256_set1_ps(w[pos]);
            const float* vp = vb + o * slot_stride;
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(vp + 8 * j), acc[j]);
          }
        }
        const __m256 inv = _mm256_set1_ps(1.f / sums[g]);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + g * dim + d0 + 8 * j, _mm256_mul_ps(acc[j], inv));
      }
    }
    return true;
  }
#endif
  (void)vh, (void)table, (void)block_stride, (void)slot_stride, (void)block_size, (void)len, (void)group, (void)dim;
  (void)weights, (void)sums, (void)out;
  return false;
}

// Every sequence length and every block it reads checked before any work starts (workers must not throw).
void validate(const Args& a) {
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t len = a.seq_lens[s];
    TORCH_CHECK(len >= 1 && len <= a.max_blocks * a.block_size, "paged_decode_cpu: seq_lens[", s, "] = ", len,
                " is outside [1, ", a.max_blocks * a.block_size, "] (max_blocks x block_size)");
    const int32_t* table = a.block_tables + s * a.max_blocks;
    for (int64_t b = 0, used = (len + a.block_size - 1) / a.block_size; b < used; ++b) {
      TORCH_CHECK(table[b] >= 0 && table[b] < a.num_blocks, "paged_decode_cpu: block_tables[", s, ", ", b,
                  "] = ", table[b], " is not a block of the cache (", a.num_blocks, " blocks)");
    }
  }
}

// One work item: sequence s, KV head kvh, and the query heads of its group.
template <typename DimT, bool kVector>
void decode_item(const Args& a, int64_t s, int64_t kvh) {
  const int dim = static_cast<int>(a.head_dim);
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int64_t len = a.seq_lens[s];
  const int32_t* table = a.block_tables + s * a.max_blocks;
  const int64_t used_blocks = (len + a.block_size - 1) / a.block_size;
  thread_local std::vector<float> scores, acc, sums;
  scores.resize(static_cast<size_t>(group * len));
  sums.resize(static_cast<size_t>(group));
  const float* qh = a.q + (s * a.num_heads + kvh * group) * a.head_dim;
  // Pass 1: scaled scores of the group's query heads at every position, block by block.
  for (int64_t b = 0, pos = 0; b < used_blocks; ++b) {
    const int64_t in_block = std::min(a.block_size, len - pos);
    block_scores<DimT, kVector>(qh, a.k_cache + table[b] * a.k_block_stride + kvh * a.head_dim, a.k_slot_stride,
                                in_block, group, dim, a.scale, scores.data(), len, pos);
    pos += in_block;
  }
  // Softmax weights (unnormalised; divided by the sum at the end).
  for (int64_t g = 0; g < group; ++g) sums[g] = softmax_weights<kVector>(scores.data() + g * len, len);
  // Pass 2: weighted sum of V, normalised into the output.
  float* oh = a.out + (s * a.num_heads + kvh * group) * a.head_dim;
  const float* vh = a.v_cache + kvh * a.head_dim;
  if (weighted_values<kVector>(vh, table, a.v_block_stride, a.v_slot_stride, a.block_size, len, group, dim,
                               scores.data(), sums.data(), oh)) {
    return;
  }
  acc.assign(static_cast<size_t>(group * a.head_dim), 0.f);
  for (int64_t b = 0, pos = 0; b < used_blocks; ++b) {
    const float* vb = vh + table[b] * a.v_block_stride;
    const int64_t in_block = std::min(a.block_size, len - pos);
    for (int64_t o = 0; o < in_block; ++o, ++pos) {
      const float* vp = vb + o * a.v_slot_stride;
      for (int64_t g = 0; g < group; ++g) axpy<DimT>(scores[g * len + pos], vp, acc.data() + g * a.head_dim, dim);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / sums[g];
    for (int64_t i = 0; i < a.head_dim; ++i) oh[g * a.head_dim + i] = acc[g * a.head_dim + i] * inv;
  }
}

// A few worker threads that sleep between calls (no spinning: between layers the cores belong to ONNX Runtime
// or to the other ranks). Items are handed out through an atomic counter; the calling thread works too.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
    for (auto& t : threads_) t.detach();  // never joined: the pool lives as long as the process
  }

  int workers() const { return static_cast<int>(threads_.size()); }

  // Runs fn(0) .. fn(total - 1) on the caller and up to `helpers` workers. Returns false, having run nothing,
  // when another caller has the pool (two engines in one process): that caller then works alone.
  bool run(int64_t total, int helpers, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> owner(run_mu_, std::try_to_lock);
    if (!owner.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      total_ = total;
      next_.store(0);
      wanted_ = std::min(helpers, workers());
      busy_ = wanted_;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mu_);
    // Workers that have not woken up yet are not waited for: every item is taken, so their slots are void.
    busy_ -= wanted_;
    wanted_ = 0;
    done_.wait(lock, [this] { return busy_ == 0; });
    fn_ = nullptr;
    return true;
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1); i < total_; i = next_.fetch_add(1)) (*fn_)(i);
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen && wanted_ > 0; });
      seen = generation_;
      --wanted_;
      lock.unlock();
      drain();
      lock.lock();
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex run_mu_, mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t total_ = 0;
  std::atomic<int64_t> next_{0};
  int wanted_ = 0, busy_ = 0;
  uint64_t generation_ = 0;
};

Pool& pool_for(int workers) {
  // One pool per process (a forked child gets a fresh one: the parent's threads are not in it), grown on demand.
  static std::mutex mu;
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (pool == nullptr || owner != getpid() || pool->workers() < workers) {
    pool = new Pool(std::max(workers, pool != nullptr && owner == getpid() ? pool->workers() : 0));  // old one leaks
    owner = getpid();
  }
  return *pool;
}

// Below this much K/V (floats read per call), waking a worker costs more than it saves.
constexpr int64_t kParallelMinFloats = 192 * 1024;

template <typename DimT, bool kVector>
void decode(const Args& a, int threads) {
  validate(a);
  const int64_t items = a.num_seqs * a.num_kv_heads;
  int64_t floats = 0;
  for (int64_t s = 0; s < a.num_seqs; ++s) floats += 2 * a.seq_lens[s] * a.num_kv_heads * a.head_dim;
  if (threads <= 1 || items < 2 || floats < kParallelMinFloats) {
    for (int64_t i = 0; i < items; ++i) decode_item<DimT, kVector>(a, i / a.num_kv_heads, i % a.num_kv_heads);
    return;
  }
  const std::function<void(int64_t)> fn = [&a](int64_t i) {
    decode_item<DimT, kVector>(a, i / a.num_kv_heads, i % a.num_kv_heads);
  };
  const int helpers = static_cast<int>(std::min<int64_t>(threads - 1, items - 1));
  if (!pool_for(helpers).run(items, helpers, fn)) {
    for (int64_t i = 0; i < items; ++i) fn(i);
  }
}

template <bool kVector>
void dispatch_dim(const Args& a, int threads) {
  switch (a.head_dim) {
    case 64: decode<Dim<64>, kVector>(a, threads); break;
    case 128: decode<Dim<128>, kVector>(a, threads); break;
    default: decode<Dim<0>, kVector>(a, threads); break;
  }
}

void check_cache(const torch::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.device().is_cpu() && cache.scalar_type() == torch::kFloat32, "paged_decode_cpu: ", name,
              " must be a float32 CPU tensor");
  TORCH_CHECK(cache.dim() == 4, "paged_decode_cpu: ", name, " must be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == cache.size(3), "paged_decode_cpu: ", name,
              " needs contiguous [num_kv_heads, head_dim] rows");
}

// Scatter the step's new K/V rows into their cache slots (slot -1 = skip).
void write_rows(const torch::Tensor& rows, const torch::Tensor& cache, const int64_t* slots, int64_t n, const char* name) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kFloat32 && rows.is_contiguous(),
              "paged_decode_cpu: ", name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(rows.dim() == 3 && rows.size(0) == n && rows.size(1) == cache.size(2) && rows.size(2) == cache.size(3),
              "paged_decode_cpu: ", name, " must be [num_seqs, num_kv_heads, head_dim]");
  const int64_t row = cache.size(2) * cache.size(3);
  const int64_t block_size = cache.size(1);
  const int64_t num_slots = cache.size(0) * block_size;
  const float* src = rows.data_ptr<float>();
  float* dst = cache.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = slots[i];
    if (slot < 0) continue;
    TORCH_CHECK(slot < num_slots, "paged_decode_cpu: slot_mapping[", i, "] = ", slot, " is past the cache (",
                num_slots, " slots)");
    float* d = dst + (slot / block_size) * cache.stride(0) + (slot % block_size) * cache.stride(1);
    std::copy(src + i * row, src + (i + 1) * row, d);
  }
}

}  // namespace

void paged_decode_cpu(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                      const torch::Tensor& out, const c10::optional<torch::Tensor>& k_new,
                      const c10::optional<torch::Tensor>& v_new, const c10::optional<torch::Tensor>& slot_mapping,
                      bool portable, int64_t threads) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kFloat32 && q.is_contiguous() && q.dim() == 3,
              "paged_decode_cpu: q must be a contiguous float32 CPU tensor [num_seqs, num_heads, head_dim]");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.sizes() == q.sizes(),
              "paged_decode_cpu: out must be a contiguous float32 tensor shaped like q");
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "paged_decode_cpu: k_cache and v_cache differ in shape");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "paged_decode_cpu: head_dim of q and cache differ");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              "paged_decode_cpu: num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == num_seqs,
              "paged_decode_cpu: block_tables must be contiguous int32 [num_seqs, max_blocks]");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kInt32 && seq_lens.is_contiguous() && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == num_seqs,
              "paged_decode_cpu: seq_lens must be contiguous int32 [num_seqs]");
  if (slot_mapping.has_value()) {
    TORCH_CHECK(k_new.has_value() && v_new.has_value(), "paged_decode_cpu: slot_mapping needs k_new and v_new");
    const auto& slots = *slot_mapping;
    TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.dim() == 1 &&
                    slots.size(0) == num_seqs,
                "paged_decode_cpu: slot_mapping must be contiguous int64 [num_seqs]");
    write_rows(*k_new, k_cache, slots.data_ptr<int64_t>(), num_seqs, "k_new");
    write_rows(*v_new, v_cache, slots.data_ptr<int64_t>(), num_seqs, "v_new");
  }
  Args a{q.data_ptr<float>(),
         k_cache.data_ptr<float>(),
         v_cache.data_ptr<float>(),
         block_tables.data_ptr<int32_t>(),
         seq_lens.data_ptr<int32_t>(),
         out.data_ptr<float>(),
         num_seqs,
         num_heads,
         num_kv_heads,
         head_dim,
         k_cache.size(1),
         k_cache.size(0),
         block_tables.size(1),
         k_cache.stride(0),
         k_cache.stride(1),
         v_cache.stride(0),
         v_cache.stride(1),
         static_cast<float>(scale)};
  TORCH_CHECK(threads >= 1 && threads <= 256, "paged_decode_cpu: threads must be in [1, 256], got ", threads);
  if (portable || !kHaveAvx2) {
    dispatch_dim<false>(a, static_cast<int>(threads));
  } else {
    dispatch_dim<true>(a, static_cast<int>(threads));
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_cpu", &paged_decode_cpu, "Paged decode attention, float32 CPU (optionally writing new K/V first)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("scale"), py::arg("out"), py::arg("k_new") = py::none(), py::arg("v_new") = py::none(),
        py::arg("slot_mapping") = py::none(), py::arg("portable") = false, py::arg("threads") = 1,
        py::call_guard<py::gil_scoped_release>());  // other Python threads (the event loop) run meanwhile
  m.def("has_avx2", [] { return kHaveAvx2; }, "Whether the build has the AVX2/FMA loops");
}
