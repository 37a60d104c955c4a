// transpose(v): an N x N block held in N vectors (v[r] = row r) becomes its transpose in place
// (v[c] = column c), N = Vec<T>::N. Part of the SIMD vocabulary (vec.h); packing uses it to turn
// rows of K into the column panels the GEMM micro-kernel reads (ARCHITECTURE.md rule 5).
// hsum_n(v, out): out[r] = the sum of v[r]'s lanes for N vectors of fp32, with the same shuffles
// as the transpose but an add after each level (N - 1 adds, 30 shuffles on AVX-512 instead of
// four hsum4's 36 plus their extracts): the reduction of N dot products at once (decode).
// fp32 on AVX-512 (16 x 16) and AVX2 (8 x 8) stays in registers: 64 / 24 shuffles instead of
// N^2 scalar moves; other types and the scalar baseline go through a small array.
#pragma once

#include "vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

template <class T>
inline void transpose_via_memory(Vec<T> (&v)[Vec<T>::N]) {
  constexpr int N = Vec<T>::N;
  T a[N][N];
  for (int r = 0; r < N; ++r) v[r].store(a[r]);
  T t[N][N];
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < N; ++c) t[c][r] = a[r][c];
  for (int c = 0; c < N; ++c) v[c] = Vec<T>::load(t[c]);
}

template <class T>
inline void transpose(Vec<T> (&v)[Vec<T>::N]) {
  transpose_via_memory<T>(v);
}

#if !defined(ATTNKIT_ISA_AVX512) && !defined(ATTNKIT_ISA_AVX2)
inline void hsum_n(const Vec<float> (&v)[Vec<float>::N], float* out) {
  for (int r = 0; r < Vec<float>::N; ++r) out[r] = v[r].hsum();
}
#endif

#if defined(ATTNKIT_ISA_AVX512)
// Within each 128-bit lane L, unpacks give u[4i + c] = rows 4i..4i+3 of column 4L + c; two
// rounds of 128-bit lane shuffles then gather lane L of u[c], u[4+c], u[8+c], u[12+c].
template <>
inline void transpose<float>(Vec<float> (&v)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i].v, v[i + 1].v);
    t[i + 1] = _mm512_unpackhi_ps(v[i].v, v[i + 1].v);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 a0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);  // lanes 0, 2 of rows 0-7
    const __m512 a1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);  // lanes 1, 3
    const __m512 b0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);  // rows 8-15
    const __m512 b1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    v[c].v = _mm512_shuffle_f32x4(a0, b0, 0x88);
    v[8 + c].v = _mm512_shuffle_f32x4(a0, b0, 0xdd);
    v[4 + c].v = _mm512_shuffle_f32x4(a1, b1, 0x88);
    v[12 + c].v = _mm512_shuffle_f32x4(a1, b1, 0xdd);
  }
}

// Level 1 leaves rows (2i, 2i+1) interleaved in each 128-bit lane, level 2 rows 4m..4m+3 in
// every lane (a partial sum per lane), levels 3 and 4 add the lanes and leave them in order.
inline void hsum_n(const Vec<float> (&v)[16], float* out) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i].v, v[2 * i + 1].v),
                         _mm512_unpackhi_ps(v[2 * i].v, v[2 * i + 1].v));
  for (int m = 0; m < 4; ++m) {
    const __m512d a = _mm512_castps_pd(w[2 * m]), b = _mm512_castps_pd(w[2 * m + 1]);
    x[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xdd));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xdd)));
}
#elif defined(ATTNKIT_ISA_AVX2)
// As above with two 128-bit lanes: u[c] holds rows 0-3, u[4+c] rows 4-7 of columns c, 4+c.
template <>
inline void transpose<float>(Vec<float> (&v)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i].v, v[i + 1].v);
    t[i + 1] = _mm256_unpackhi_ps(v[i].v, v[i + 1].v);
  }
  for (int i = 0; i < 8; i += 4) {
    const __m256d t0 = _mm256_castps_pd(t[i]), t1 = _mm256_castps_pd(t[i + 1]);
    const __m256d t2 = _mm256_castps_pd(t[i + 2]), t3 = _mm256_castps_pd(t[i + 3]);
    u[i] = _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2));
    u[i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2));
    u[i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3));
    u[i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3));
  }
  for (int c = 0; c < 4; ++c) {
    v[c].v = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    v[4 + c].v = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

inline void hsum_n(const Vec<float> (&v)[8], float* out) {
  __m256 w[4], x[2];
  for (int i = 0; i < 4; ++i)
    w[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i].v, v[2 * i + 1].v),
                         _mm256_unpackhi_ps(v[2 * i].v, v[2 * i + 1].v));
  for (int m = 0; m < 2; ++m) {
    const __m256d a = _mm256_castps_pd(w[2 * m]), b = _mm256_castps_pd(w[2 * m + 1]);
    x[m] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(x[0], x[1], 0x20), _mm256_permute2f128_ps(x[0], x[1], 0x31)));
}
#endif

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
