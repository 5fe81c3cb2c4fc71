// Paged attention on CPU, float32 arithmetic, straight off the shared KV-cache format: the arithmetic core. The
// cache holds float or (where the compiler has _Float16) IEEE half elements: attend_fn<T>, PagedKVOf<T>.
//
// Header-only and free of any framework, so that every binding shares one implementation:
//   * paged_decode_cpu.cpp        the PyTorch op (kernels.attention.native), one query per sequence;
//   * edge/csrc/ort_ops.cpp       the ONNX Runtime custom op of the edge engine's fused graph,
//                                 any number of new tokens per sequence (prefill chunks too).
//
// Cache layout (kernels/kv_cache/layout.py): one layer's K (or V) is [num_blocks, block_size, num_kv_heads,
// head_dim] with the last two dims contiguous and any block/slot strides. A work item is a "tile": up to a
// few query tokens of one sequence and one or more of its KV heads, with the query heads of each KV head's
// group, i.e. `rows` query vectors per KV head, each with its own causal length (the number of cached
// positions it attends to, its own position included). Query head h reads KV head h / (num_heads /
// num_kv_heads).
//
// The math is float32 with a two-pass softmax per row: scaled scores of every row at every position (each
// K row loaded once for all rows of the tile), then max/exp/sum per row over its own length, then one pass
// over V per row, normalised at the end. Rows of one tile may have different lengths (a prefill chunk's
// tokens): scores past a row's length are computed (the keys exist: a later row of the tile reads them)
// but never used.

#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace hgw {

template <int kDim>
struct Dim {
  static constexpr int value = kDim;
};

// Cache element types: float, and IEEE half where the compiler has _Float16 (GCC 12+, Clang 15+ on x86-64 and
// AArch64). A half cache holds K and V rounded to nearest-even; all arithmetic stays float32.
#if defined(__FLT16_MAX__)
#define HGW_HAVE_FLOAT16 1
using float16 = _Float16;
#else
#define HGW_HAVE_FLOAT16 0
#endif

// head_dim known at compile time for the common sizes, so the portable loops vectorise fully.
template <typename DimT, typename T>
inline float dot(const float* __restrict a, const T* __restrict b, int dim) {
  const int n = DimT::value > 0 ? DimT::value : dim;
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * static_cast<float>(b[i]);
  return acc;
}

template <typename DimT, typename T>
inline void axpy(float w, const T* __restrict x, float* __restrict y, int dim) {
  const int n = DimT::value > 0 ? DimT::value : dim;
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += w * static_cast<float>(x[i]);
}

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

// 8 cache elements as floats (a half cache needs F16C, which every AVX2 x86 CPU has).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
#if HGW_HAVE_FLOAT16 && defined(__F16C__)
inline __m256 load8(const float16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#else
constexpr bool kHaveAvx2 = false;
#endif

// One layer's K and V halves of the paged cache (the KV head's offset is added per tile); strides in elements.
template <typename T>
struct PagedKVOf {
  const T* k;
  const T* v;
  int64_t k_block_stride, k_slot_stride, v_block_stride, v_slot_stride;
  int64_t block_size, head_dim;
  float scale;
};
using PagedKV = PagedKVOf<float>;

// A tile: query vectors of one sequence (block table `table`) for the KV heads kv_head0 .. kv_head0 + num_kv - 1,
// `rows` of them per KV head (the group's query heads times the tile's new tokens), KV-head-major. Taking every
// KV head of a sequence in one tile reads each cached slot's K and V rows whole and in order, which streams
// from DRAM several times faster than one KV head's slice at a time.
struct Tile {
  const int32_t* table;
  int64_t kv_head0, num_kv;
  int64_t rows;           // query rows per KV head
  const float* const* q;  // [num_kv * rows] -> head_dim floats
  float* const* out;      // [num_kv * rows] -> head_dim floats
  const int64_t* lens;    // [rows] causal lengths, each >= 1 (the same for every KV head)
};

// How far ahead pass 1 prefetches K, in cached positions.
constexpr int64_t kPrefetchSlots = 16;

// Prefetches the cache lines of p[0 .. count): into L1 (hint 0) or L2 (hint 1).
template <typename T>
inline void prefetch_lines(const T* p, int64_t count, int hint) {
#if defined(__AVX2__) && defined(__FMA__)
  for (int64_t i = 0; i < count; i += static_cast<int64_t>(64 / sizeof(T))) {
    if (hint == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T1);
    }
  }
#else
  (void)p, (void)count, (void)hint;
#endif
}

// Scores of every row against `count` consecutive slots of one block: scores[r * width + pos + o] = scale * q_r . k_o.
template <typename DimT, bool kVector, typename T>
inline void block_scores(const float* const* q, const T* kb, int64_t slot_stride, int64_t count, int64_t rows,
                         int dim, float scale, float* scores, int64_t width, int64_t pos) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kVector) {
    if (dim % 8 == 0) {
      const __m128 vscale = _mm_set1_ps(scale);
      int64_t o = 0;
      for (; o + 4 <= count; o += 4) {
        const T* k0 = kb + o * slot_stride;
        const T* k1 = k0 + slot_stride;
        const T* k2 = k1 + slot_stride;
        const T* k3 = k2 + slot_stride;
        for (int64_t r = 0; r < rows; ++r) {
          const float* qr = q[r];
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int i = 0; i < dim; i += 8) {
            const __m256 qv = _mm256_loadu_ps(qr + i);
            a0 = _mm256_fmadd_ps(qv, load8(k0 + i), a0);
            a1 = _mm256_fmadd_ps(qv, load8(k1 + i), a1);
            a2 = _mm256_fmadd_ps(qv, load8(k2 + i), a2);
            a3 = _mm256_fmadd_ps(qv, load8(k3 + i), a3);
          }
          _mm_storeu_ps(scores + r * width + pos + o, _mm_mul_ps(hsum4(a0, a1, a2, a3), vscale));
        }
      }
      for (; o < count; ++o) {
        const T* kp = kb + o * slot_stride;
        for (int64_t r = 0; r < rows; ++r) {
          __m256 a = _mm256_setzero_ps();
          for (int i = 0; i < dim; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + i), load8(kp + i), a);
          scores[r * width + pos + o] = hsum(a) * scale;
        }
      }
      return;
    }
  }
#endif
  for (int64_t o = 0; o < count; ++o) {
    const T* kp = kb + o * slot_stride;
    for (int64_t r = 0; r < rows; ++r) scores[r * width + pos + o] = dot<DimT>(q[r], kp, dim) * scale;
  }
}

// row[t] = exp(row[t] - max(row)) for t < len; returns the sum.
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

// out = (sum_{t < len} w[t] v_t) / sum with eight 8-lane accumulators held in registers over all positions,
// one 64-wide slice of head_dim at a time. Returns false (nothing done) when head_dim is not a multiple of 64
// or the build has no AVX2.
template <bool kVector, typename T>
inline bool weighted_values(const T* vh, const int32_t* table, int64_t block_stride, int64_t slot_stride,
                            int64_t block_size, int64_t len, int dim, const float* w, float sum, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kVector) {
    if (dim % 64 != 0) return false;
    for (int d0 = 0; d0 < dim; d0 += 64) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t pos = 0, b = 0; pos < len; ++b) {
        const T* vb = vh + table[b] * block_stride + d0;
        const int64_t in_block = std::min(block_size, len - pos);
        for (int64_t o = 0; o < in_block; ++o, ++pos) {
          const __m256 wv = _mm256_set1_ps(w[pos]);
          const T* vp = vb + o * slot_stride;
          for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(wv, load8(vp + 8 * j), acc[j]);
        }
      }
      const __m256 inv = _mm256_set1_ps(1.f / sum);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + d0 + 8 * j, _mm256_mul_ps(acc[j], inv));
    }
    return true;
  }
#endif
  (void)vh, (void)table, (void)block_stride, (void)slot_stride, (void)block_size, (void)len, (void)dim;
  (void)w, (void)sum, (void)out;
  return false;
}

// One tile: every row's softmax(q K^T * scale) V over its own causal length.
template <typename DimT, bool kVector, typename T>
void attend_tile(const PagedKVOf<T>& kv, const Tile& t) {
  const int dim = static_cast<int>(kv.head_dim);
  int64_t width = 0;
  for (int64_t r = 0; r < t.rows; ++r) width = std::max(width, t.lens[r]);
  const int64_t used_blocks = (width + kv.block_size - 1) / kv.block_size;
  const int64_t all_rows = t.num_kv * t.rows;
  // The tile's KV heads as one contiguous run of each slot's row (when the slot holds them contiguously).
  const int64_t span = (t.num_kv - 1) * kv.head_dim + kv.head_dim;
  thread_local std::vector<float> scores, acc;
  scores.resize(static_cast<size_t>(all_rows * width));
  // Pass 1: scaled scores of every row at every position up to the tile's longest row, block by block. K is
  // prefetched kPrefetchSlots positions ahead (DRAM latency outlasts a block's arithmetic), and each block's V
  // into L2 for pass 2.
  auto prefetch_k = [&](int64_t p) {
    if (p < width) {
      const T* k = kv.k + t.table[p / kv.block_size] * kv.k_block_stride + (p % kv.block_size) * kv.k_slot_stride;
      prefetch_lines(k + t.kv_head0 * kv.head_dim, span, 0);
    }
  };
  for (int64_t p = 0; p < std::min<int64_t>(kPrefetchSlots, width); ++p) prefetch_k(p);
  for (int64_t b = 0, pos = 0; b < used_blocks; ++b) {
    const int64_t in_block = std::min(kv.block_size, width - pos);
    const T* kb = kv.k + t.table[b] * kv.k_block_stride + t.kv_head0 * kv.head_dim;
    for (int64_t o = 0; o < in_block; ++o) prefetch_k(pos + o + kPrefetchSlots);
    const T* vb = kv.v + t.table[b] * kv.v_block_stride + t.kv_head0 * kv.head_dim;
    for (int64_t o = 0; o < in_block; ++o) prefetch_lines(vb + o * kv.v_slot_stride, span, 1);
    for (int64_t h = 0; h < t.num_kv; ++h) {
      block_scores<DimT, kVector, T>(t.q + h * t.rows, kb + h * kv.head_dim, kv.k_slot_stride, in_block, t.rows, dim,
                                  kv.scale, scores.data() + h * t.rows * width, width, pos);
    }
    pos += in_block;
  }
  // Per row: softmax weights over its own length (unnormalised), then the weighted sum of V, normalised.
  for (int64_t h = 0; h < t.num_kv; ++h) {
    const T* vh = kv.v + (t.kv_head0 + h) * kv.head_dim;
    for (int64_t r = 0; r < t.rows; ++r) {
      const int64_t len = t.lens[r];
      const int64_t row = h * t.rows + r;
      float* w = scores.data() + row * width;
      const float sum = softmax_weights<kVector>(w, len);
      if (weighted_values<kVector, T>(vh, t.table, kv.v_block_stride, kv.v_slot_stride, kv.block_size, len, dim, w, sum,
                                   t.out[row])) {
        continue;
      }
      acc.assign(static_cast<size_t>(dim), 0.f);
      for (int64_t b = 0, pos = 0; pos < len; ++b) {
        const T* vbh = vh + t.table[b] * kv.v_block_stride;
        const int64_t in_block = std::min(kv.block_size, len - pos);
        for (int64_t o = 0; o < in_block; ++o, ++pos) axpy<DimT>(w[pos], vbh + o * kv.v_slot_stride, acc.data(), dim);
      }
      const float inv = 1.f / sum;
      for (int i = 0; i < dim; ++i) t.out[row][i] = acc[i] * inv;
    }
  }
}

// attend_tile with head_dim and the loop kind resolved: fn(kv, tile) for the common head sizes.
template <typename T>
using AttendFnOf = void (*)(const PagedKVOf<T>&, const Tile&);
using AttendFn = AttendFnOf<float>;

template <typename T = float>
inline AttendFnOf<T> attend_fn(int64_t head_dim, bool portable) {
#if defined(__F16C__)
  constexpr bool kLoads = true;
#else
  constexpr bool kLoads = std::is_same<T, float>::value;  // load8 of a half cache needs F16C
#endif
  if constexpr (kHaveAvx2 && kLoads) {
    if (!portable) {
      switch (head_dim) {
        case 64: return &attend_tile<Dim<64>, true, T>;
        case 128: return &attend_tile<Dim<128>, true, T>;
        default: return &attend_tile<Dim<0>, true, T>;
      }
    }
  }
  switch (head_dim) {
    case 64: return &attend_tile<Dim<64>, false, T>;
    case 128: return &attend_tile<Dim<128>, false, T>;
    default: return &attend_tile<Dim<0>, false, T>;
  }
}

// "" when every block a sequence of `len` positions reads through `table` lies in the cache; else why not.
inline std::string check_table(const int32_t* table, int64_t len, int64_t max_blocks, int64_t block_size,
                               int64_t num_blocks, const std::string& len_name, const std::string& table_name) {
  if (len < 1 || len > max_blocks * block_size) {
    return len_name + " = " + std::to_string(len) + " is outside [1, " + std::to_string(max_blocks * block_size) +
           "] (max_blocks x block_size)";
  }
  for (int64_t b = 0, used = (len + block_size - 1) / block_size; b < used; ++b) {
    if (table[b] < 0 || table[b] >= num_blocks) {
      return table_name + ", " + std::to_string(b) + "] = " + std::to_string(table[b]) +
             " is not a block of the cache (" + std::to_string(num_blocks) + " blocks)";
    }
  }
  return "";
}

}  // namespace hgw
