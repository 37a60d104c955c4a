// AVX2 + FMA + F16C implementation of the SIMD vocabulary (see vec.h). 256-bit registers:
// 8 floats or 4 doubles. Included by vec.h inside the per-ISA namespace.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attnkit/dtype.h"
#include "scalar_cvt.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {


// Lane masks for partial loads and stores: kTailMask32 + 8 - n selects the first n lanes.
alignas(64) static const int32_t kTailMask32[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                     0,  0,  0,  0,  0,  0,  0,  0};

template <class T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int N = 8;
  __m256 v;

  struct Mask {
    __m256 m;
  };

  static inline Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static inline Vec broadcast(const float* p) { return {_mm256_broadcast_ss(p)}; }
  static inline Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static inline Vec zero() { return {_mm256_setzero_ps()}; }
  inline void store(float* p) const { _mm256_storeu_ps(p, v); }
  // Non-temporal store, p aligned to 32 bytes; bypasses the cache (no read-for-ownership).
  inline void stream(float* p) const { _mm256_stream_ps(p, v); }
  static inline __m256i tail_mask(int n) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailMask32 + 8 - n));
  }
  static inline Vec load_partial(const float* p, int n) {
    return {_mm256_maskload_ps(p, tail_mask(n))};
  }
  inline void store_partial(float* p, int n) const { _mm256_maskstore_ps(p, tail_mask(n), v); }

  friend inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend inline Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend inline Vec fnma(Vec a, Vec b, Vec c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; }
  friend inline Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  friend inline Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
  friend inline Vec abs(Vec a) {
    return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)};
  }
  friend inline Mask operator<(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
  friend inline Mask operator<=(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
  friend inline Mask operator==(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
  friend inline Mask is_nan(Vec a) { return {_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)}; }
  friend inline Mask operator|(Mask a, Mask b) { return {_mm256_or_ps(a.m, b.m)}; }
  friend inline Mask operator&(Mask a, Mask b) { return {_mm256_and_ps(a.m, b.m)}; }
  friend inline bool any(Mask a) { return _mm256_movemask_ps(a.m) != 0; }
  friend inline uint32_t lane_bits(Mask a) { return uint32_t(_mm256_movemask_ps(a.m)); }
  friend inline Vec select(Mask m, Vec a, Vec b) { return {_mm256_blendv_ps(b.v, a.v, m.m)}; }

  inline float hsum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  inline float hmax() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  inline Vec round() const {
    return {_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  // 2^n for integral n in [-126, 127], built directly in the exponent field.
  // y * 2^n for integral n in [-125, 128]: (2y) * 2^(n-1), 2^(n-1) built in the exponent field.
  static inline Vec scale_pow2(Vec y, Vec n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(126));
    return {_mm256_mul_ps(_mm256_add_ps(y.v, y.v), _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)))};
  }
  // lane i = base + i
  static inline Vec iota(float base) {
    return {_mm256_add_ps(_mm256_set1_ps(base), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7))};
  }
};

template <>
struct Vec<double> {
  static constexpr int N = 4;
  __m256d v;

  struct Mask {
    __m256d m;
  };

  static inline __m256i tail_mask(int n) {
    // 64-bit lanes: widen the 32-bit table entries.
    return _mm256_cvtepi32_epi64(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(kTailMask32 + 8 - n)));
  }
  static inline Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static inline Vec broadcast(const double* p) { return {_mm256_broadcast_sd(p)}; }
  static inline Vec set1(double x) { return {_mm256_set1_pd(x)}; }
  static inline Vec zero() { return {_mm256_setzero_pd()}; }
  inline void store(double* p) const { _mm256_storeu_pd(p, v); }
  static inline Vec load_partial(const double* p, int n) {
    return {_mm256_maskload_pd(p, tail_mask(n))};
  }
  inline void store_partial(double* p, int n) const { _mm256_maskstore_pd(p, tail_mask(n), v); }

  friend inline Vec operator+(Vec a, Vec b) { return {_mm256_add_pd(a.v, b.v)}; }
  friend inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_pd(a.v, b.v)}; }
  friend inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_pd(a.v, b.v)}; }
  friend inline Vec operator/(Vec a, Vec b) { return {_mm256_div_pd(a.v, b.v)}; }
  friend inline Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
  friend inline Vec fnma(Vec a, Vec b, Vec c) { return {_mm256_fnmadd_pd(a.v, b.v, c.v)}; }
  friend inline Vec max(Vec a, Vec b) { return {_mm256_max_pd(a.v, b.v)}; }
  friend inline Vec min(Vec a, Vec b) { return {_mm256_min_pd(a.v, b.v)}; }
  inline double hsum() const {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  inline double hmax() const {
    __m128d s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

inline void stream_fence() { _mm_sfence(); }

// out[0..3] = the sums of a, b, c, d's lanes (a fixed order; see vec_avx512.h).
inline void hsum4(Vec<float> a, Vec<float> b, Vec<float> c, Vec<float> d, float* out) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a.v, b.v), _mm256_hadd_ps(c.v, d.v));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}

// ---- storage conversions (always to/from fp32 registers) ----
inline Vec<float> load_cvt(const float* p) { return Vec<float>::load(p); }
inline Vec<float> load_cvt(const f16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline Vec<float> load_cvt(const bf16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
inline void store_cvt(float* p, Vec<float> x) { x.store(p); }
inline __m128i cvt_to_f16_bits(Vec<float> x) {
  return _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// fp32 -> bf16 with round-to-nearest-even; NaN stays a (quiet) NaN.
inline __m128i cvt_to_bf16_bits(Vec<float> x) {
  __m256i u = _mm256_castps_si256(x.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);
  // pack 8 x u32 (all < 2^16) into 8 x u16
  __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
  return _mm_packus_epi32(lo, hi);
}
inline void store_cvt(f16_t* p, Vec<float> x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), cvt_to_f16_bits(x));
}
inline void store_cvt(bf16_t* p, Vec<float> x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), cvt_to_bf16_bits(x));
}

// ---- 8-bit KV codes -> fp32 (value x CodeUnit<T>::kLoaded; see scalar_cvt.h) ----
inline Vec<float> load_code(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
// 8 e4m3 codes -> the fp16 bits of value x 2^-8 (as vec_avx512.h's e4m3_to_f16_bits).
inline __m128i e4m3_to_f16_bits(__m128i b) {
  const __m128i w = _mm_cvtepi8_epi16(b);
  const __m128i h = _mm_and_si128(_mm_slli_epi16(w, 7), _mm_set1_epi16(int16_t(0xbf80)));
  const __m128i low7 = _mm_set1_epi16(0x7f);
  const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(w, low7), low7);
  return _mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(0x7c00)));
}
constexpr bool kHasE4m3Finite = false;  // (vec_avx512.h: e4m3 rows without NaN codes)
bool e4m3_row_has_nan(const f8e4m3_t* p, int64_t n);                 // named only
void load_code_pair_finite(const f8e4m3_t* p, Vec<float>& a, Vec<float>& b);  // named only
inline Vec<float> load_code(const f8e4m3_t* p) {
  return {_mm256_cvtph_ps(e4m3_to_f16_bits(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
template <class T>
inline void load_code_pair(const T* p, Vec<float>& a, Vec<float>& b) {
  a = load_code(p);
  b = load_code(p + Vec<float>::N);
}
template <class T>
inline Vec<float> load_code_partial(const T* p, int n) {
  T tmp[8];
  std::memset(tmp, 0, sizeof(tmp));
  std::memcpy(tmp, p, sizeof(T) * n);
  return load_code(tmp);
}

// Partial variants go through a small stack buffer: they run once per row tail.
template <class T>
inline Vec<float> load_cvt_partial(const T* p, int n) {
  T tmp[8];
  std::memset(tmp, 0, sizeof(tmp));
  std::memcpy(tmp, p, sizeof(T) * n);
  return load_cvt(tmp);
}
inline Vec<float> load_cvt_partial(const float* p, int n) { return Vec<float>::load_partial(p, n); }
template <class T>
inline void store_cvt_partial(T* p, Vec<float> x, int n) {
  T tmp[8];
  store_cvt(tmp, x);
  std::memcpy(p, tmp, sizeof(T) * n);
}
inline void store_cvt_partial(float* p, Vec<float> x, int n) { x.store_partial(p, n); }

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
