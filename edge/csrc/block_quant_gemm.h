// Block-quantized matmul y = x @ W^T on CPU for the edge engine's dense layers (header-only, no framework):
// W [N, K] in blocks of 32 along K, 4-bit (value = scale * code + min, code 0..15: GGML Q4_0 / Q4_1) or 8-bit
// (value = scale * code, code -127..127: GGML Q8_0), scale and min fp16. x is quantized per block of 32 to int8
// (round to nearest even, scale = max|x| / 127), so each block's dot product is an exact integer sum; this is the
// arithmetic of llama.cpp's q4_1 x q8_1 dot and of MatMulNBits' accuracy_level 4.
//
// Why not MatMulNBits: at batch 1 the step is a stream of ~70 MB of weights, and MLAS's int4 kernels read them at
// ~15-19 GB/s on our 2-core machines where a plain read loop reaches ~23; this loop reaches ~20-21. It also takes
// Q4_1's float block mins directly, which MatMulNBits can only hold as a correction matmul after every matmul.
//
// Layout (edge/blockquant.py writes it): rows in tiles of 8 (N padded with zero rows), KB = ceil(K / 32) blocks.
//   codes   4-bit: uint8 [N / 8, KB, 4 groups, 8 rows, 4]: byte (g, r, c) = code(r, 8g + c) | code(r, 8g + 4 + c) << 4
//           8-bit: int8  [N / 8, KB, 8 groups, 8 rows, 4]: byte (g, r, c) = code(r, 4g + c)
//   scales  fp16 [N / 8, KB, 8]; mins fp16 [N / 8, KB, 8] (4-bit only)
// so one 32-byte vector holds 4 consecutive elements of each of a tile's 8 rows, and maddubs against the matching
// 4 activation bytes broadcast gives every row's partial dot product at once: per block and 8 rows, 8 maddubs
// (4-bit: summed in int16, at most 8 * 2 * 15 * 127 = 30480), one widening to int32, one convert and two FMAs
// (scale, min), and every activation row of a group of 4 reuses the unpacked codes.
//   Acts.q      int8 [M, KB * 32] (element order)
//   Acts.scale  float [M, KB]      each block's activation scale
//   Acts.sums   float [M, KB]      scale * sum of the block's int8 codes (the 4-bit mins' term)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(HGW_BQ_SCALAR)
#include <immintrin.h>
#define HGW_BQ_AVX2 1
#else
#define HGW_BQ_AVX2 0
#endif
// AVX512-VNNI (with VL for its 256-bit form, e.g. AMD Zen 4, Intel Ice Lake on): vpdpbusd multiplies u8 x s8, sums
// each 4 products into the int32 lane and accumulates, one instruction for maddubs + madd + add. The sums are the
// same integers, so the results are bit for bit those of the AVX2 loop.
#if HGW_BQ_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__) && !defined(HGW_BQ_NO_VNNI)
#define HGW_BQ_VNNI 1
#else
#define HGW_BQ_VNNI 0
#endif

namespace hgw::bq {

constexpr int64_t kBlock = 32;
constexpr bool kHaveAvx2 = HGW_BQ_AVX2;

inline float half_to_float(uint16_t h) {
#if HGW_BQ_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
#if HGW_BQ_AVX2
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
#endif
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

constexpr int64_t kTile = 8;  // weight rows per tile

struct Weights {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* mins;  // nullptr for 8-bit
  int64_t kb;            // blocks per row
  int bits;
  int64_t tile_bytes() const { return kb * (bits == 4 ? 128 : 256); }
};

struct Acts {
  const int8_t* q;
  const float* scale;
  const float* sums;
  int64_t kb;
};

// Quantize rows [m0, m1) of x [M, k] (row stride ldx) into buffers for M rows of kb blocks; elements past k are zero.
inline void quantize_acts(const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t kb, int8_t* q,
                          float* scale, float* sums) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t b = 0; b < kb; ++b) {
      const int64_t lo = b * kBlock, n = std::max<int64_t>(0, std::min<int64_t>(kBlock, k - lo));
      alignas(32) float v[kBlock] = {};
      if (n > 0) std::memcpy(v, xr + lo, sizeof(float) * n);
      int8_t* codes = q + (m * kb + b) * kBlock;
      float amax = 0.0f;
      int sum = 0;
#if HGW_BQ_AVX2
      const __m256 sign = _mm256_set1_ps(-0.0f);
      __m256 vm = _mm256_setzero_ps();
      for (int i = 0; i < kBlock; i += 8) vm = _mm256_max_ps(vm, _mm256_andnot_ps(sign, _mm256_load_ps(v + i)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      amax = _mm_cvtss_f32(h);
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m256 vid = _mm256_set1_ps(id);
      __m256i i32[4];
      for (int j = 0; j < 4; ++j) i32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(v + 8 * j), vid));
      const __m256i s = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      s4 = _mm_hadd_epi32(s4, s4);
      s4 = _mm_hadd_epi32(s4, s4);
      sum = _mm_cvtsi128_si32(s4);
      // packs work per 128-bit lane, leaving 4-byte groups in the order 0, 2, 4, 6, 1, 3, 5, 7: undo it.
      const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes),
                          _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      for (int i = 0; i < kBlock; ++i) {
        codes[i] = static_cast<int8_t>(std::nearbyint(v[i] * id));
        sum += codes[i];
      }
#endif
      const float d = amax / 127.0f;
      scale[m * kb + b] = d;
      sums[m * kb + b] = d * static_cast<float>(sum);
    }
  }
}

// Code of row r (0..7) of a tile, element i (0..31) of block b.
inline int32_t code_at(const Weights& w, int64_t tile, int64_t b, int64_t r, int64_t i) {
  const uint8_t* blk = w.codes + tile * w.tile_bytes() + b * (w.bits == 4 ? 128 : 256);
  if (w.bits == 8) return static_cast<int8_t>(blk[(i / 4) * 32 + r * 4 + i % 4]);
  const int64_t g = i / 8, c = i % 8;
  const uint8_t byte = blk[g * 32 + r * 4 + c % 4];
  return c < 4 ? (byte & 0x0F) : (byte >> 4);
}

#if HGW_BQ_AVX2
inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Tiles t0 .. t1 against activation rows m0 .. m0 + MR: out[m - m0, (t - t0) * 8 + row], row stride ldo.
template <int MR, int BITS>
void tiles_avx2(const Weights& w, const Acts& a, int64_t m0, int64_t t0, int64_t t1, float* out, int64_t ldo) {
  const int64_t kb = w.kb;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  (void)ones;  // unused with VNNI
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = w.codes + t * w.tile_bytes();
    __m256 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < kb; ++b) {
      __m256i isum[MR];
      for (int r = 0; r < MR; ++r) isum[r] = _mm256_setzero_si256();
      if (BITS == 4) {
        const uint8_t* blk = tile + b * 128;
        _mm_prefetch(reinterpret_cast<const char*>(blk + 1024), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(blk + 1024 + 64), _MM_HINT_T0);
#if HGW_BQ_VNNI
        __m256i isum_hi[MR];  // a second chain, so that the dependent vpdpbusd run two at a time
        for (int r = 0; r < MR; ++r) isum_hi[r] = _mm256_setzero_si256();
#endif
        for (int g = 0; g < 4; ++g) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + g * 32));
          const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          for (int r = 0; r < MR; ++r) {
            const int8_t* x = a.q + ((m0 + r) * kb + b) * kBlock + g * 8;
#if HGW_BQ_VNNI
            isum[r] = _mm256_dpbusd_epi32(isum[r], lo, bcast4(x));
            isum_hi[r] = _mm256_dpbusd_epi32(isum_hi[r], hi, bcast4(x + 4));
#else
            isum[r] = _mm256_add_epi16(isum[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(x)),
                                                                 _mm256_maddubs_epi16(hi, bcast4(x + 4))));
#endif
          }
        }
#if HGW_BQ_VNNI
        for (int r = 0; r < MR; ++r) isum[r] = _mm256_add_epi32(isum[r], isum_hi[r]);
#else
        for (int r = 0; r < MR; ++r) isum[r] = _mm256_madd_epi16(isum[r], ones);
#endif
      } else {
        const uint8_t* blk = tile + b * 256;
        for (int i = 0; i < 4; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(blk + 2048 + 64 * i), _MM_HINT_T0);
        }
        for (int g = 0; g < 8; ++g) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + g * 32));
          const __m256i v_abs = _mm256_abs_epi8(v);
          for (int r = 0; r < MR; ++r) {  // |w| x (x * sign w); a lane may reach 2 * 127 * 127: widen every time
            const __m256i x = _mm256_sign_epi8(bcast4(a.q + ((m0 + r) * kb + b) * kBlock + g * 4), v);
#if HGW_BQ_VNNI
            isum[r] = _mm256_dpbusd_epi32(isum[r], v_abs, x);
#else
            isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(v_abs, x), ones));
#endif
          }
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scales + (t * kb + b) * 8)));
      if (BITS == 4) {
        const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.mins + (t * kb + b) * 8)));
        for (int r = 0; r < MR; ++r) {
          const int64_t ab = (m0 + r) * kb + b;
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(d, _mm256_broadcast_ss(a.scale + ab)),
                                   acc[r]);
          acc[r] = _mm256_fmadd_ps(mn, _mm256_broadcast_ss(a.sums + ab), acc[r]);
        }
      } else {
        for (int r = 0; r < MR; ++r) {
          const __m256 s = _mm256_mul_ps(d, _mm256_broadcast_ss(a.scale + (m0 + r) * kb + b));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), s, acc[r]);
        }
      }
    }
    for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + r * ldo + (t - t0) * kTile, acc[r]);
  }
}
#endif

// The portable loop (and what the SIMD one must match up to float summation order).
inline void tiles_scalar(const Weights& w, const Acts& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1,
                         float* out, int64_t ldo) {
  const int64_t kb = w.kb;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t r = 0; r < kTile; ++r) {
      for (int64_t m = m0; m < m1; ++m) {
        float acc = 0.0f;
        for (int64_t b = 0; b < kb; ++b) {
          const int8_t* x = a.q + (m * kb + b) * kBlock;
          int32_t isum = 0;
          for (int64_t i = 0; i < kBlock; ++i) isum += code_at(w, t, b, r, i) * x[i];
          const int64_t wb = (t * kb + b) * kTile + r;
          acc += static_cast<float>(isum) * (half_to_float(w.scales[wb]) * a.scale[m * kb + b]);
          if (w.bits == 4) acc += half_to_float(w.mins[wb]) * a.sums[m * kb + b];
        }
        out[(m - m0) * ldo + (t - t0) * kTile + r] = acc;
      }
    }
  }
}

// y[m, n] (row stride ldy) for activation rows m0 .. m1 and the rows n < n_total of tiles t0 .. t1.
// scratch: 4 * (t1 - t0) * 8 floats (a group of up to 4 activation rows' results, before the copy into y).
inline void gemm(const Weights& w, const Acts& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1, float* y,
                 int64_t ldy, int64_t n_total, float* scratch) {
  const int64_t width = (t1 - t0) * kTile, n0 = t0 * kTile, n_valid = std::min(n_total - n0, width);
  for (int64_t m = m0; m < m1;) {
    const int64_t mr = std::min<int64_t>(4, m1 - m);
    // Results land in scratch [mr, width] (the last tile may hang over N), then are copied out.
    float* out = scratch;
#if HGW_BQ_AVX2
    auto run = [&](auto tag) {
      constexpr int MR = decltype(tag)::value;
      if (w.bits == 4) {
        tiles_avx2<MR, 4>(w, a, m, t0, t1, out, width);
      } else {
        tiles_avx2<MR, 8>(w, a, m, t0, t1, out, width);
      }
    };
    switch (mr) {
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      default: run(std::integral_constant<int, 1>{}); break;
    }
#else
    tiles_scalar(w, a, m, m + mr, t0, t1, out, width);
#endif
    for (int64_t r = 0; r < mr; ++r) std::memcpy(y + (m + r) * ldy + n0, scratch + r * width, sizeof(float) * n_valid);
    m += mr;
  }
}

}  // namespace hgw::bq
