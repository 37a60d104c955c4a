// bf16 x bf16 -> fp32 micro-kernel on vdpbf16ps (AVX512-BF16). Only the avx512_bf16 variant
// includes this (ARCHITECTURE.md, "ISA variants").
//
// It reads the pair layout of gemm/pairs.h: vdpbf16ps multiplies the pairs of two words and
// adds both products to the fp32 lane (Intel SDM: two fp32 FMAs, the odd k first, round to
// nearest even).
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
#include "gemm/pairs.h"
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
  static constexpr int MR = 12, NR = kPairPanel;
  static constexpr int64_t KCP = 256, MC = 144, NC = 3072;
  // The caches these values are for (the fp32 kernel's reference, a Zen 4); gemm_bf16.cpp
  // scales them to the CPU's (pair_blocks).
  static constexpr int64_t kRefL1d = 32 << 10, kRefL2 = 1 << 20;
};

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

// Rows 0..m of fp32 values (row stride lds), columns 0..n, rounded to nearest-even bf16 into
// rows of pair words (row stride ldd words): word j holds columns 2j (low half) and 2j + 1, an
// odd n's last high half is zero. The A operand of ukernel_bf16<M, false>: attention's P rows.
// vcvtne2ps2bf16 flushes subnormal fp32 inputs to zero, as vdpbf16ps would read them.
inline void round_rows_to_pairs(const float* s, int64_t lds, int m, int64_t n, uint32_t* dst,
                                int64_t ldd) {
  for (int i = 0; i < m; ++i) {
    const float* si = s + i * lds;
    uint16_t* di = reinterpret_cast<uint16_t*>(dst + i * ldd);
    for (int64_t j = 0; j < n; j += 32) {
      const int64_t left = n - j;
      if (left >= 32) {
        const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(si + j + 16), _mm512_loadu_ps(si + j));
        _mm512_storeu_si512(di + j, (__m512i)x);
        continue;
      }
      const __mmask16 lo = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      const __mmask16 hi = left > 16 ? __mmask16((1u << (left - 16)) - 1) : __mmask16(0);
      const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, si + j + 16),
                                             _mm512_maskz_loadu_ps(lo, si + j));
      const int64_t words = (left + 1) / 2;  // whole pair words, the pad half zero
      _mm512_mask_storeu_epi16(di + j, __mmask32((uint64_t(1) << (2 * words)) - 1), (__m512i)x);
    }
  }
}

// ---- the panel interface of gemm_bf16.cpp (ukernel_amx.h has the same names) ----
using PanelBlocking = BlockingBf16;
inline int64_t padded_pairs(int64_t kp) { return kp; }
inline int64_t workspace_rows(int64_t m) { return m; }
inline int64_t workspace_ld(int64_t n) { return n; }
struct PanelThreadScope {
  PanelThreadScope() {}  // no per-thread state
};
inline bool pack_b_panels(const bf16_t* b, int64_t rs_b, int64_t cs_b, int64_t kc, int64_t ncols,
                          uint32_t* dst, int64_t panel_words) {
  return pack_b_pair_panels(b, rs_b, cs_b, kc, ncols, dst, panel_words, (kc + 1) / 2);
}
inline void pack_a_panel(const bf16_t* a, int64_t rs_a, int64_t cs_a, int m, int64_t kc,
                         uint32_t* dst) {
  pack_a_pairs(a, rs_a, cs_a, m, kc, dst);
}
inline void compute_panel(int m, int64_t kp, const uint32_t* a, const uint32_t* b, float* c,
                          int64_t ldc, bool accumulate, int nr) {
  ukernel_bf16_rows<true>(m, kp, a, 0, b, BlockingBf16::NR, c, ldc, accumulate, nr);
}
// A rows read in place as pair words (row i at a + i * rs_a words): no A packing. Only for
// rows of whole words (even k-blocks and row strides, unit column stride; gemm_bf16.cpp).
constexpr bool kAInPlace = true;
inline void compute_panel_in_place(int m, int64_t kp, const uint32_t* a, int64_t rs_a,
                                   const uint32_t* b, float* c, int64_t ldc, bool accumulate,
                                   int nr) {
  ukernel_bf16_rows<false>(m, kp, a, rs_a, b, BlockingBf16::NR, c, ldc, accumulate, nr);
}

// ---- the tile layout (gemm/tile_layout.h) on vdpbf16ps: the attention backward's GEMMs ----
namespace tiles {

// Rows r0..r0+M of a 32-row tile-layout A panel (a points at row r0 of step 0) times a [kpp][32]
// pair panel: C[0:M, 0:32] (+)= A B in fp32, as ukernel_bf16 (2 x 16 columns per row).
template <int M>
inline void panel_rows(int64_t kpp, const uint32_t* __restrict a, const uint32_t* __restrict b,
                       float* __restrict c, int64_t ldc, bool accumulate) {
  using V = Vec<float>;
  __m512 acc[M][2];
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < kpp; s += 16) {
    const uint32_t* as = a + s * 32;  // this step: 32 rows x 16 words
    const uint32_t* bs = b + s * kPairPanel;
#pragma GCC unroll 2
    for (int kk = 0; kk < 16; ++kk) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bs + kk * kPairPanel);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bs + kk * kPairPanel + 16);
#pragma GCC unroll 16
      for (int i = 0; i < M; ++i) {
        const __m512bh ai = (__m512bh)_mm512_set1_epi32(int(as[i * 16 + kk]));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      V x{acc[i][v]};
      if (accumulate) x = x + V::load(c + i * ldc + v * V::N);
      x.store(c + i * ldc + v * V::N);
    }
}

// C[0:32, 0:32] (fp32, row stride ldc) (+)= A B over kpp pairs (a multiple of 16), A a 32-row
// tile-layout panel, B a [kpp][32] pair panel: the contract of ukernel_amx.h's compute_panel
// (whole 32 x 32 blocks of a padded C; m and nr are not needed). Rows in register blocks of
// 12, 12 and 8.
inline void compute_panel(int /*m*/, int64_t kpp, const uint32_t* a, const uint32_t* b, float* c,
                          int64_t ldc, bool accumulate, int /*nr*/) {
  panel_rows<12>(kpp, a, b, c, ldc, accumulate);
  panel_rows<12>(kpp, a + 12 * 16, b, c + 12 * ldc, ldc, accumulate);
  panel_rows<8>(kpp, a + 24 * 16, b, c + 24 * ldc, ldc, accumulate);
}

}  // namespace tiles

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
