// AVX-512 (F, BW, DQ, VL) implementation of the SIMD vocabulary (see vec.h). 512-bit
// registers: 16 floats or 8 doubles; masks live in k-registers. Included by vec.h inside the
// per-ISA namespace.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attnkit/dtype.h"
#include "scalar_cvt.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {


template <class T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int N = 16;
  __m512 v;

  struct Mask {
    __mmask16 m;
  };

  static inline __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static inline Vec broadcast(const float* p) { return {_mm512_set1_ps(*p)}; }
  static inline Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static inline Vec zero() { return {_mm512_setzero_ps()}; }
  inline void store(float* p) const { _mm512_storeu_ps(p, v); }
  // Non-temporal store, p aligned to 64 bytes; bypasses the cache (no read-for-ownership).
  inline void stream(float* p) const { _mm512_stream_ps(p, v); }
  static inline Vec load_partial(const float* p, int n) {
    return {_mm512_maskz_loadu_ps(tail_mask(n), p)};
  }
  inline void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, tail_mask(n), v); }

  friend inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
  friend inline Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend inline Vec fnma(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
  friend inline Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  friend inline Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  friend inline Vec abs(Vec a) { return {_mm512_abs_ps(a.v)}; }
  friend inline Mask operator<(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
  friend inline Mask operator<=(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ)}; }
  friend inline Mask operator==(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
  friend inline Mask is_nan(Vec a) { return {_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q)}; }
  friend inline Mask operator|(Mask a, Mask b) { return {static_cast<__mmask16>(a.m | b.m)}; }
  friend inline Mask operator&(Mask a, Mask b) { return {static_cast<__mmask16>(a.m & b.m)}; }
  friend inline bool any(Mask a) { return a.m != 0; }
  friend inline uint32_t lane_bits(Mask a) { return a.m; }
  friend inline Vec select(Mask m, Vec a, Vec b) { return {_mm512_mask_blend_ps(m.m, b.v, a.v)}; }

  inline float hsum() const {
    // Fixed pairwise order (not _mm512_reduce_add_ps, whose order is the compiler's choice).
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  inline float hmax() const {
    __m256 s8 = _mm256_max_ps(_mm512_castps512_ps256(v),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  inline Vec round() const {
    return {_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  // y * 2^n for integral n: one vscalefps (exact for normal results).
  static inline Vec scale_pow2(Vec y, Vec n) { return {_mm512_scalef_ps(y.v, n.v)}; }
  static inline Vec iota(float base) {
    return {_mm512_add_ps(_mm512_set1_ps(base),
                          _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))};
  }
};

template <>
struct Vec<double> {
  static constexpr int N = 8;
  __m512d v;

  struct Mask {
    __mmask8 m;
  };

  static inline __mmask8 tail_mask(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static inline Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static inline Vec broadcast(const double* p) { return {_mm512_set1_pd(*p)}; }
  static inline Vec set1(double x) { return {_mm512_set1_pd(x)}; }
  static inline Vec zero() { return {_mm512_setzero_pd()}; }
  inline void store(double* p) const { _mm512_storeu_pd(p, v); }
  static inline Vec load_partial(const double* p, int n) {
    return {_mm512_maskz_loadu_pd(tail_mask(n), p)};
  }
  inline void store_partial(double* p, int n) const { _mm512_mask_storeu_pd(p, tail_mask(n), v); }

  friend inline Vec operator+(Vec a, Vec b) { return {_mm512_add_pd(a.v, b.v)}; }
  friend inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_pd(a.v, b.v)}; }
  friend inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_pd(a.v, b.v)}; }
  friend inline Vec operator/(Vec a, Vec b) { return {_mm512_div_pd(a.v, b.v)}; }
  friend inline Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  friend inline Vec fnma(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_pd(a.v, b.v, c.v)}; }
  friend inline Vec max(Vec a, Vec b) { return {_mm512_max_pd(a.v, b.v)}; }
  friend inline Vec min(Vec a, Vec b) { return {_mm512_min_pd(a.v, b.v)}; }
  inline double hsum() const {
    __m256d s4 = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  inline double hmax() const {
    __m256d s4 = _mm256_max_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d s = _mm_max_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

inline void stream_fence() { _mm_sfence(); }

// out[0..3] = the sums of a, b, c, d's lanes (a fixed order, like hsum; not hsum's order).
// Reduces the four together: ~18 instructions instead of four hsum chains of ~7.
inline void hsum4(Vec<float> a, Vec<float> b, Vec<float> c, Vec<float> d, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a.v, b.v, 0x44), _mm512_shuffle_f32x4(a.v, b.v, 0xee));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c.v, d.v, 0x44), _mm512_shuffle_f32x4(c.v, d.v, 0xee));
  // 128-bit lanes of x: four partial sums of a, of b, of c, of d
  const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));
  const __m256 lo = _mm512_castps512_ps256(x);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
  const __m256 h1 = _mm256_hadd_ps(lo, hi);  // [a a c c | b b d d]
  const __m256 h2 = _mm256_hadd_ps(h1, h1);  // [a c a c | b d b d]
  _mm_storeu_ps(out, _mm_unpacklo_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1)));
}

// ---- storage conversions (always to/from fp32 registers) ----
inline Vec<float> load_cvt(const float* p) { return Vec<float>::load(p); }
inline Vec<float> load_cvt(const f16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline Vec<float> load_cvt(const bf16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
inline void store_cvt(float* p, Vec<float> x) { x.store(p); }
inline __m256i cvt_to_f16_bits(Vec<float> x) {
  return _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// fp32 -> bf16 with round-to-nearest-even; NaN stays a (quiet) NaN.
inline __m256i cvt_to_bf16_bits(Vec<float> x) {
  __m512i u = _mm512_castps_si512(x.v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  __mmask16 nan = _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
inline void store_cvt(f16_t* p, Vec<float> x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), cvt_to_f16_bits(x));
}
inline void store_cvt(bf16_t* p, Vec<float> x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), cvt_to_bf16_bits(x));
}

inline Vec<float> load_cvt_partial(const float* p, int n) { return Vec<float>::load_partial(p, n); }
inline Vec<float> load_cvt_partial(const f16_t* p, int n) {
  return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(Vec<float>::tail_mask(n), p))};
}
inline Vec<float> load_cvt_partial(const bf16_t* p, int n) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(Vec<float>::tail_mask(n), p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
// ---- 8-bit KV codes -> fp32 (value x CodeUnit<T>::kLoaded; see scalar_cvt.h) ----
inline Vec<float> load_code(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// 16 e4m3 codes -> the fp16 bits of value x 2^-8: sign-extend to 16 bits (bit 15 = sign), shift
// exponent and mantissa into place, clear bit 14; NaN codes get an all-ones exponent.
inline __m256i e4m3_to_f16_bits(__m128i b) {
  const __m256i w = _mm256_cvtepi8_epi16(b);
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(int16_t(0xbf80)));
  const __m256i low7 = _mm256_set1_epi16(0x7f);
  const __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(w, low7), low7);
  return _mm256_mask_mov_epi16(h, nan, _mm256_set1_epi16(0x7e00));
}
inline Vec<float> load_code(const f8e4m3_t* p) {
  return {_mm512_cvtph_ps(e4m3_to_f16_bits(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// 2N codes at once into (a, b): e4m3 widens all 32 codes in one 512-bit register, so the
// integer steps are shared by two output vectors (11 instructions instead of 16).
inline void load_code_pair(const int8_t* p, Vec<float>& a, Vec<float>& b) {
  a = load_code(p);
  b = load_code(p + 16);
}
// 32 e4m3 codes -> 2 x 16 fp32 through fp16 (as e4m3_to_f16_bits); kNanFix = false for rows
// known to hold no NaN code (the caller tested them with e4m3_row_has_nan): 8 operations per
// 32 codes instead of 11.
template <bool kNanFix>
inline void e4m3_pair(const f8e4m3_t* p, Vec<float>& a, Vec<float>& b) {
  const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  __m512i h = _mm512_and_si512(_mm512_slli_epi16(w, 7), _mm512_set1_epi16(int16_t(0xbf80)));
  if constexpr (kNanFix) {
    const __m512i low7 = _mm512_set1_epi16(0x7f);
    h = _mm512_mask_mov_epi16(h, _mm512_cmpeq_epi16_mask(_mm512_and_si512(w, low7), low7),
                              _mm512_set1_epi16(0x7e00));
  }
  a.v = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  b.v = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}
inline void load_code_pair(const f8e4m3_t* p, Vec<float>& a, Vec<float>& b) { e4m3_pair<true>(p, a, b); }
inline void load_code_pair_finite(const f8e4m3_t* p, Vec<float>& a, Vec<float>& b) { e4m3_pair<false>(p, a, b); }
constexpr bool kHasE4m3Finite = true;
inline bool e4m3_row_has_nan(const f8e4m3_t* p, int64_t n) {  // some code is S.1111.111
  const __m512i low7 = _mm512_set1_epi8(0x7f);
  __mmask64 nan = 0;
  for (int64_t c = 0; c < n; c += 64) {
    const int64_t w = n - c < 64 ? n - c : 64;
    const __m512i x = w == 64 ? _mm512_loadu_si512(p + c) : _mm512_maskz_loadu_epi8((__mmask64(1) << w) - 1, p + c);
    nan |= _mm512_cmpeq_epi8_mask(_mm512_and_si512(x, low7), low7);
  }
  return nan != 0;
}
inline Vec<float> load_code_partial(const int8_t* p, int n) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(Vec<float>::tail_mask(n), p)))};
}
inline Vec<float> load_code_partial(const f8e4m3_t* p, int n) {
  return {_mm512_cvtph_ps(e4m3_to_f16_bits(_mm_maskz_loadu_epi8(Vec<float>::tail_mask(n), p)))};
}

inline void store_cvt_partial(float* p, Vec<float> x, int n) { x.store_partial(p, n); }
inline void store_cvt_partial(f16_t* p, Vec<float> x, int n) {
  _mm256_mask_storeu_epi16(p, Vec<float>::tail_mask(n), cvt_to_f16_bits(x));
}
inline void store_cvt_partial(bf16_t* p, Vec<float> x, int n) {
  _mm256_mask_storeu_epi16(p, Vec<float>::tail_mask(n), cvt_to_bf16_bits(x));
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
