// int8 x int8 dot products on AVX512-VNNI (vpdpbusd) and on AVX2 (vpmaddubsw): part of the SIMD
// vocabulary (vec.h), for the avx512_vnni and avx2 variants. kHasDotI8 says whether this object
// has them. Both give the exact integer q . k, so every variant's int8 scores are the same.
//
// vpdpbusd multiplies UNSIGNED bytes by signed bytes, four per 32-bit lane, and adds the four
// products to the lane (no saturation). Signed K codes become unsigned by k ^ 0x80 = k + 128, so
//   sum_d (k_d + 128) q_d = q . k + 128 sum_d q_d,
// and each query row's correction 128 sum_d q_d (qcorr) is subtracted in the accumulator's first
// lane before any sum: every result is the exact integer q . k (|q . k| < 2^31 for D < 2^17).
#pragma once

#include <stdint.h>

#if defined(ATTNKIT_ISA_AVX512_VNNI) || defined(ATTNKIT_ISA_AVX2)
#include <immintrin.h>
#include <string.h>
#endif

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

#if defined(ATTNKIT_ISA_AVX512_VNNI)
constexpr bool kHasDotI8 = true;
using I8Acc = __m512i;  // dot_i8_lanes' accumulator

namespace dot_i8_detail {
// acc += u8 x s8, four products per 32-bit lane. Inline asm, not _mm512_dpbusd_epi32: with the
// intrinsic GCC 12 copies every accumulator through another register around each vpdpbusd (and
// spills some), ~2 extra moves per multiply in the inner loop.
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "vm"(s8));
  return acc;
}
// Lane i of the result, within each 128-bit lane: the sum of that lane's four int32 of a, b, c,
// d (i = 0..3): four horizontal sums per 128-bit lane in 6 shuffles and 3 adds.
inline __m512i sum4_in_lanes(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}
}  // namespace dot_i8_detail

// s[ri * lds + u] = float(q_ri . k_u) for RB (1 or 4) int8 query rows q + ri * ldq (zero-padded
// to whole 64-byte vectors past D) and four int8 K rows of D codes (read up to D only).
// Always inlined: as a call (GCC's choice, for its size) the argument set-up, prologue and
// vzeroupper were ~35 instructions per 4 keys and head.
template <int RB>
__attribute__((always_inline)) inline void dot_i8_block(const int8_t* q, int64_t ldq, const int32_t* qcorr,
                                                        int64_t D, const int8_t* const* k, float* s,
                                                        int64_t lds) {
  static_assert(RB == 1 || RB == 4, "dot_i8_block: 1 or 4 rows");
  const __m512i flip = _mm512_set1_epi8(int8_t(0x80));
  __m512i acc[RB][4];
  for (int ri = 0; ri < RB; ++ri) {
    const __m512i c0 = _mm512_maskz_set1_epi32(1, -qcorr[ri]);  // lane 0 only, the rest 0
    for (int u = 0; u < 4; ++u) acc[ri][u] = c0;
  }
  // One 64-byte step of every dot product (kx: the four K vectors, flipped to unsigned).
  auto step = [&](const __m512i* kx, int64_t d) __attribute__((always_inline)) {
    for (int ri = 0; ri < RB; ++ri) {
      const __m512i qv = _mm512_loadu_si512(q + ri * ldq + d);
      for (int u = 0; u < 4; ++u) acc[ri][u] = dot_i8_detail::dpbusd(acc[ri][u], kx[u], qv);
    }
  };
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    __m512i kx[4];
    for (int u = 0; u < 4; ++u) kx[u] = _mm512_xor_si512(_mm512_loadu_si512(k[u] + d), flip);
    step(kx, d);
  }
  if (d < D) {  // the tail: bytes past D load as 0 (fault-free), and meet q's zero padding
    const __mmask64 m = (1ull << (D - d)) - 1;
    __m512i kx[4];
    for (int u = 0; u < 4; ++u) kx[u] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, k[u] + d), flip);
    step(kx, d);
  }
  using dot_i8_detail::sum4_in_lanes;
  if constexpr (RB == 4) {
    // Row ri's four sums in each 128-bit lane, then the four 128-bit lanes of every row added:
    // one vector of the 16 results, row-major (row ri, key u at lane 4 ri + u).
    __m512i t[4];
    for (int ri = 0; ri < 4; ++ri) t[ri] = sum4_in_lanes(acc[ri][0], acc[ri][1], acc[ri][2], acc[ri][3]);
    const __m512i t01 = _mm512_add_epi32(_mm512_shuffle_i32x4(t[0], t[1], 0x88), _mm512_shuffle_i32x4(t[0], t[1], 0xdd));
    const __m512i t23 = _mm512_add_epi32(_mm512_shuffle_i32x4(t[2], t[3], 0x88), _mm512_shuffle_i32x4(t[2], t[3], 0xdd));
    const __m512i all = _mm512_add_epi32(_mm512_shuffle_i32x4(t01, t23, 0x88), _mm512_shuffle_i32x4(t01, t23, 0xdd));
    const __m512 f = _mm512_cvtepi32_ps(all);
    _mm_storeu_ps(s, _mm512_castps512_ps128(f));
    _mm_storeu_ps(s + lds, _mm512_extractf32x4_ps(f, 1));
    _mm_storeu_ps(s + 2 * lds, _mm512_extractf32x4_ps(f, 2));
    _mm_storeu_ps(s + 3 * lds, _mm512_extractf32x4_ps(f, 3));
  } else {
    const __m512i t = sum4_in_lanes(acc[0][0], acc[0][1], acc[0][2], acc[0][3]);
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
    const __m128i x = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_ps(s, _mm_cvtepi32_ps(x));
  }
}

// One int8 query row (q zero-padded to whole 64-byte vectors, correction qcorr) against one K row
// of D codes, unreduced: the int32 lanes sum to q . k (the walk in address order of scores_seq,
// decode_stages.h, which reads one head's row after another).
__attribute__((always_inline)) inline __m512i dot_i8_lanes(const int8_t* q, int32_t qcorr, int64_t D,
                                                           const int8_t* k) {
  const __m512i flip = _mm512_set1_epi8(int8_t(0x80));
  __m512i acc = _mm512_maskz_set1_epi32(1, -qcorr);
  int64_t d = 0;
  for (; d + 64 <= D; d += 64)
    acc = dot_i8_detail::dpbusd(acc, _mm512_xor_si512(_mm512_loadu_si512(k + d), flip), _mm512_loadu_si512(q + d));
  if (d < D) {
    const __m512i kx = _mm512_xor_si512(_mm512_maskz_loadu_epi8((1ull << (D - d)) - 1, k + d), flip);
    acc = dot_i8_detail::dpbusd(acc, kx, _mm512_loadu_si512(q + d));
  }
  return acc;
}
// s[u * lds] = float(the lanes' sum of a_u), u < nu (<= 4).
inline void store_i8_sums4(__m512i a0, __m512i a1, __m512i a2, __m512i a3, int nu, float* s, int64_t lds) {
  const __m512i t = dot_i8_detail::sum4_in_lanes(a0, a1, a2, a3);
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
  alignas(16) float f[4];
  _mm_store_ps(f, _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))));
  for (int u = 0; u < nu; ++u) s[u * lds] = f[u];
}
#elif defined(ATTNKIT_ISA_AVX2)
// AVX2 has no vpdpbusd. vpmaddubsw multiplies unsigned by signed bytes and adds pairs into
// SATURATING int16, so the unsigned operand is |k| and the signed one q with k's sign
// (vpsignb: -q where k < 0, 0 where k = 0): |k| <= 128 and |q| <= 127 (quantize_q_rows) keep
// each pair within 2 x 128 x 127 = 32512 < 2^15, exact. vpmaddwd by ones widens the pairs to
// int32. Five operations per 32 codes where widening to fp32 took twelve (pmovsxbd, cvtdq2ps
// and an FMA per 8 codes). qcorr is not needed (no offset): the argument keeps VNNI's interface.
constexpr bool kHasDotI8 = true;
using I8Acc = __m256i;

namespace dot_i8_detail {
// acc += the int32 sums of k's and q's 32 byte products, four per lane.
__attribute__((always_inline)) inline __m256i dot32(__m256i acc, __m256i k_abs, __m256i k, __m256i q) {
  const __m256i pairs = _mm256_maddubs_epi16(k_abs, _mm256_sign_epi8(q, k));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
// 32 codes of a K row from k[0..n), n < 32, zero past n (no read past the row).
inline __m256i load_tail(const int8_t* k, int64_t n) {
  alignas(32) int8_t b[32] = {};
  memcpy(b, k, size_t(n));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
}
// The four sums of a0..a3's lanes, as floats (exact: |q . k| < 2^24 for D <= kMaxQuantizedD).
inline __m128 sums4(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}
// Rows q + ri * ldq (ri < RB, RB = 1 or 2) against four K rows: s[ri * lds + u]. RB x 4
// accumulators and the four |k| fit the 16 ymm registers for RB <= 2.
template <int RB>
__attribute__((always_inline)) inline void rows_x4(const int8_t* q, int64_t ldq, int64_t D, const int8_t* const* k,
                                                   float* s, int64_t lds) {
  __m256i acc[RB][4];
  for (int ri = 0; ri < RB; ++ri)
    for (int u = 0; u < 4; ++u) acc[ri][u] = _mm256_setzero_si256();
  auto step = [&](const __m256i* kv, int64_t d) __attribute__((always_inline)) {
    __m256i ka[4];
    for (int u = 0; u < 4; ++u) ka[u] = _mm256_abs_epi8(kv[u]);
    for (int ri = 0; ri < RB; ++ri) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + ri * ldq + d));
      for (int u = 0; u < 4; ++u) acc[ri][u] = dot32(acc[ri][u], ka[u], kv[u], qv);
    }
  };
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    __m256i kv[4];
    for (int u = 0; u < 4; ++u) kv[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k[u] + d));
    step(kv, d);
  }
  if (d < D) {  // the tail: K bytes past D are 0, and so is q's padding
    __m256i kv[4];
    for (int u = 0; u < 4; ++u) kv[u] = load_tail(k[u] + d, D - d);
    step(kv, d);
  }
  for (int ri = 0; ri < RB; ++ri) _mm_storeu_ps(s + ri * lds, sums4(acc[ri][0], acc[ri][1], acc[ri][2], acc[ri][3]));
}
}  // namespace dot_i8_detail

// s[ri * lds + u] = float(q_ri . k_u) for RB (1 or 4) int8 query rows q + ri * ldq (zero-padded
// to whole 64-byte vectors past D) and four int8 K rows of D codes (read up to D only); four
// rows as two blocks of two (registers).
template <int RB>
__attribute__((always_inline)) inline void dot_i8_block(const int8_t* q, int64_t ldq, const int32_t*, int64_t D,
                                                        const int8_t* const* k, float* s, int64_t lds) {
  static_assert(RB == 1 || RB == 4, "dot_i8_block: 1 or 4 rows");
  if constexpr (RB == 1) {
    dot_i8_detail::rows_x4<1>(q, ldq, D, k, s, lds);
  } else {
    dot_i8_detail::rows_x4<2>(q, ldq, D, k, s, lds);
    dot_i8_detail::rows_x4<2>(q + 2 * ldq, ldq, D, k, s + 2 * lds, lds);
  }
}

// One int8 query row (zero-padded past D) against one K row of D codes, unreduced: the int32
// lanes sum to q . k (the walk in address order, scores_seq).
__attribute__((always_inline)) inline __m256i dot_i8_lanes(const int8_t* q, int32_t, int64_t D, const int8_t* k) {
  __m256i acc = _mm256_setzero_si256();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + d));
    acc = dot_i8_detail::dot32(acc, _mm256_abs_epi8(kv), kv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + d)));
  }
  if (d < D) {
    const __m256i kv = dot_i8_detail::load_tail(k + d, D - d);
    acc = dot_i8_detail::dot32(acc, _mm256_abs_epi8(kv), kv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + d)));
  }
  return acc;
}
// s[u * lds] = float(the lanes' sum of a_u), u < nu (<= 4).
inline void store_i8_sums4(__m256i a0, __m256i a1, __m256i a2, __m256i a3, int nu, float* s, int64_t lds) {
  alignas(16) float f[4];
  _mm_store_ps(f, dot_i8_detail::sums4(a0, a1, a2, a3));
  for (int u = 0; u < nu; ++u) s[u * lds] = f[u];
}
#else
constexpr bool kHasDotI8 = false;
// Declared for name lookup only: callers reach it under `if constexpr (kHasDotI8)`.
template <int RB>
void dot_i8_block(const int8_t* q, int64_t ldq, const int32_t* qcorr, int64_t D,
                  const int8_t* const* k, float* s, int64_t lds);
struct I8Acc {};
I8Acc dot_i8_lanes(const int8_t* q, int32_t qcorr, int64_t D, const int8_t* k);
void store_i8_sums4(I8Acc a0, I8Acc a1, I8Acc a2, I8Acc a3, int nu, float* s, int64_t lds);
#endif

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
