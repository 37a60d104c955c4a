// bf16 x bf16 -> fp32 micro-kernel on vdpbf16ps (AVX512-BF16), and the pair ("VNNI") layout it
// reads. Only the avx512_bf16 variant includes this (ARCHITECTURE.md, "ISA variants").
//
// Pair layout: one 32-bit word holds two consecutive k of one row (A) or one column (B), the
// even k in the low half: exactly how a row-major bf16 row already sits in memory, so A rows
// can be read in place. vdpbf16ps multiplies the pairs of two words and adds both products to
// the fp32 lane (Intel SDM: two fp32 FMAs, the odd k first, round to nearest even).
//   B panel: [kp][NR] words (NR columns, kp = k / 2); an odd K's last word has a zero high half
//   A panel: [kp][MR] words (packed) or row i at a + i * rs_a words (in place)
//
// Numerics. The product of two bf16 is exact in fp32, so S = sum of exact products rounded
// once per step, as the fp32 path does (in the order k+1, k within a pair instead of k, k+1).
// vdpbf16ps ignores MXCSR: it treats subnormal inputs (bf16 with a zero exponent) as zero and
// flushes a subnormal fp32 result to zero (DAZ/FTZ). Matmul scans its inputs for subnormals
// first and takes the exact fp32 path when there are any (gemm_bf16.cpp); the flush of a running sum below 2^-126 changes that sum by less than 2^-126.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attnkit/dtype.h"
#include "simd/vec.h"

#if !defined(ATTNKIT_ISA_AVX512_BF16)
#error "ukernel_bf16.h is for the avx512_bf16 variant only"
#endif

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

// MR x NR = 12 x 32 fp32 accumulators: 24 zmm + 2 B + 1 broadcast, as the fp32 kernel.
// KCP pairs (2 KCP values of k) per pass: the B micro-panel is KCP x 32 x 4 B = 32 KB, the
// fp32 kernel's bytes; A block MC x KCP x 4 B = 144 KB of L2; B block KCP x NC x 4 B = 3 MB.
struct BlockingBf16 {
  static constexpr int MR = 12, NR = 32;
  static constexpr int64_t KCP = 256, MC = 144, NC = 3072;
};

inline uint32_t load_pair(const void* p) {  // an unaligned word (bf16 rows are 2-aligned)
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// 1 <= (bits & 0x7fff) <= 0x7f: a subnormal bf16 (zero exponent, nonzero mantissa).
inline bool bf16_subnormal(uint16_t bits) { return uint16_t((bits & 0x7fffu) - 1u) < 0x7fu; }

// Whether p[0], p[s], ..., p[(n-1) s] holds a subnormal bf16; 32 at a time when s is 1.
inline bool bf16_any_subnormal(const bf16_t* p, int64_t n, int64_t s) {
  int64_t i = 0;
  if (s == 1) {
    const __m512i magnitude = _mm512_set1_epi16(0x7fff), one = _mm512_set1_epi16(1);
    const __m512i limit = _mm512_set1_epi16(0x7f);
    __mmask32 any = 0;
    for (; i + 32 <= n; i += 32) {
      const __m512i x = _mm512_loadu_si512(p + i);
      const __m512i t = _mm512_sub_epi16(_mm512_and_si512(x, magnitude), one);
      any |= _mm512_cmplt_epu16_mask(t, limit);
    }
    if (any) return true;
  }
  bool any = false;
  for (; i < n; ++i) any |= bf16_subnormal(p[i * s].bits);
  return any;
}

// C[0:M, 0:nr] (+)= A[0:M, 0:2 kp) B[0:2 kp, 0:NR) in fp32; the contract of ukernel.h's
// ukernel (accumulate=false overwrites C without reading it).
template <int M, bool kPackedA>
inline void ukernel_bf16(int64_t kp, const uint32_t* __restrict a, int64_t rs_a,
                         const uint32_t* __restrict b, int64_t ldb, float* __restrict c,
                         int64_t ldc, bool accumulate, int nr) {
  using V = Vec<float>;
  constexpr int MR = BlockingBf16::MR;
  __m512 acc[M][2];
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < kp; ++k) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + k * ldb);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + k * ldb + 16);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      const uint32_t w = kPackedA ? a[k * MR + i] : load_pair(a + i * rs_a + k);
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(int(w));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
    float* ci = c + i * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const int w = nr - v * V::N < V::N ? nr - v * V::N : V::N;
      if (w <= 0) break;
      V x{acc[i][v]};
      if (w == V::N) {
        if (accumulate) x = x + V::load(ci + v * V::N);
        x.store(ci + v * V::N);
      } else {
        if (accumulate) x = x + V::load_partial(ci + v * V::N, w);
        x.store_partial(ci + v * V::N, w);
      }
    }
  }
}

// Runtime row count m (1..M) -> the compile-time instantiation.
template <bool kPackedA, int M = BlockingBf16::MR>
inline void ukernel_bf16_rows(int m, int64_t kp, const uint32_t* a, int64_t rs_a,
                              const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                              bool accumulate, int nr) {
  if (m == M)
    ukernel_bf16<M, kPackedA>(kp, a, rs_a, b, ldb, c, ldc, accumulate, nr);
  else if constexpr (M > 1)
    ukernel_bf16_rows<kPackedA, M - 1>(m, kp, a, rs_a, b, ldb, c, ldc, accumulate, nr);
}

// Interleave two rows of 32 bf16 (k and k+1, columns 0..31) into 32 pair words: lo holds
// columns 0..15, hi 16..31.
inline void interleave_pairs(__m512i r0, __m512i r1, uint32_t* dst) {
  alignas(64) static const uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                               37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                               11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                               53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                               27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(r0, lo, r1));
  _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(r0, hi, r1));
}

// B panel: kc x nr bf16 (element (k, j) at b[k * rs_b + j * cs_b]) -> [ceil(kc/2)][NR] words,
// columns nr..NR and the odd-k pad zero.
inline void pack_b_pairs(const bf16_t* b, int64_t rs_b, int64_t cs_b, int64_t kc, int nr,
                         uint32_t* dst) {
  constexpr int NR = BlockingBf16::NR;
  static_assert(NR == 32, "one 512-bit row of bf16 per k");
  const int64_t kp = (kc + 1) / 2;
  if (cs_b == 1) {
    const __mmask32 cols = nr >= 32 ? ~__mmask32(0) : (__mmask32(1) << nr) - 1;
    for (int64_t p = 0; p < kp; ++p) {
      const bf16_t* r = b + 2 * p * rs_b;
      const __m512i r0 = _mm512_maskz_loadu_epi16(cols, r);
      const __m512i r1 = 2 * p + 1 < kc ? _mm512_maskz_loadu_epi16(cols, r + rs_b)
                                        : _mm512_setzero_si512();
      interleave_pairs(r0, r1, dst + p * NR);
    }
    return;
  }
  for (int64_t p = 0; p < kp; ++p)
    for (int j = 0; j < NR; ++j) {
      uint16_t lo = 0, hi = 0;
      if (j < nr) {
        lo = b[2 * p * rs_b + j * cs_b].bits;
        if (2 * p + 1 < kc) hi = b[(2 * p + 1) * rs_b + j * cs_b].bits;
      }
      dst[p * NR + j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
}

// A panel: m x kc bf16 (element (i, k) at a[i * rs_a + k * cs_a]), m <= MR -> [ceil(kc/2)][MR]
// words, rows m..MR and the odd-k pad zero.
inline void pack_a_pairs(const bf16_t* a, int64_t rs_a, int64_t cs_a, int m, int64_t kc,
                         uint32_t* dst) {
  constexpr int MR = BlockingBf16::MR;
  const int64_t kp = (kc + 1) / 2;
  for (int i = 0; i < MR; ++i) {
    if (i >= m) {
      for (int64_t p = 0; p < kp; ++p) dst[p * MR + i] = 0;
      continue;
    }
    const bf16_t* row = a + i * rs_a;
    for (int64_t p = 0; p < kp; ++p) {
      const uint16_t lo = row[2 * p * cs_a].bits;
      const uint16_t hi = 2 * p + 1 < kc ? row[(2 * p + 1) * cs_a].bits : uint16_t(0);
      dst[p * MR + i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
