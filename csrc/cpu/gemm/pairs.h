// The pair ("VNNI") layout of bf16 operands, shared by the vdpbf16ps kernel (ukernel_bf16.h,
// avx512_bf16) and the AMX tile kernel (ukernel_amx.h): one 32-bit word holds two consecutive k
// of one row (A) or one column (B), the even k in the low half: exactly how a row-major bf16
// row already sits in memory. A B panel is [kp][kPairPanel] words (kp = ceil(k / 2)): one
// 128-byte row per k pair, which is also two AMX B tiles side by side (columns 0..15 at byte 0,
// 16..31 at byte 64, row stride 128 bytes).
//
// Both instructions read subnormal bf16 inputs as zero; bf16_any_subnormal finds them so a
// caller can take the exact fp32 path instead. AVX-512 (F/BW) code only.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attnkit/dtype.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

constexpr int kPairPanel = 32;  // columns of a packed B panel: one 512-bit row of bf16 per k

inline uint32_t load_pair(const void* p) {  // an unaligned word (bf16 rows are 2-aligned)
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// 1 <= (bits & 0x7fff) <= 0x7f: a subnormal bf16 (zero exponent, nonzero mantissa).
inline bool bf16_subnormal(uint16_t bits) { return uint16_t((bits & 0x7fffu) - 1u) < 0x7fu; }

// The lanes of 32 bf16 that are subnormal (bf16_subnormal), and those the pair kernels cannot
// take as they are: subnormal (read as zero) or inf/NaN (an all-ones exponent).
inline __mmask32 bf16_subnormal_lanes(__m512i x) {
  const __m512i t = _mm512_sub_epi16(_mm512_and_si512(x, _mm512_set1_epi16(0x7fff)), _mm512_set1_epi16(1));
  return _mm512_cmplt_epu16_mask(t, _mm512_set1_epi16(0x7f));
}
inline __mmask32 bf16_unfit_lanes(__m512i x) {
  const __m512i exp_mask = _mm512_set1_epi16(0x7f80);
  return bf16_subnormal_lanes(x) | _mm512_cmpeq_epi16_mask(_mm512_and_si512(x, exp_mask), exp_mask);
}

// Whether p[0], p[s], ..., p[(n-1) s] holds a subnormal bf16; 32 at a time when s is 1.
inline bool bf16_any_subnormal(const bf16_t* p, int64_t n, int64_t s) {
  int64_t i = 0;
  if (s == 1) {
    __mmask32 any = 0;
    for (; i + 32 <= n; i += 32) any |= bf16_subnormal_lanes(_mm512_loadu_si512(p + i));
    if (any) return true;
  }
  bool any = false;
  for (; i < n; ++i) any |= bf16_subnormal(p[i * s].bits);
  return any;
}

// Whether p[0..n) holds a value the pair kernels cannot take as it is: inf or NaN (an
// all-ones exponent), or a subnormal (read as zero), 32 at a time.
inline bool bf16_any_unfit(const bf16_t* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) {  // lanes past n load as zero: not unfit
    const __mmask32 m = n - i >= 32 ? ~__mmask32(0) : (__mmask32(1) << (n - i)) - 1;
    if (bf16_unfit_lanes(_mm512_maskz_loadu_epi16(m, p + i))) return true;
  }
  return false;
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
  constexpr int NR = kPairPanel;
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

// Columns [0, ncols) of a kc-row bf16 B (element (k, j) at b[k * rs_b + j * cs_b]) as pair
// panels of kPairPanel columns: panel c at dst + c * panel_words, [kpp][32] words, pair rows
// past ceil(kc / 2) up to kpp and columns past ncols zero. With contiguous rows (cs_b = 1) the
// pair rows are walked across every panel in turn, so B is read row by row (two streams)
// rather than panel by panel down strided rows. Returns whether B holds a subnormal bf16 (which
// the pair kernels would read as zero), checked on the values as they are packed.
inline bool pack_b_pair_panels(const bf16_t* b, int64_t rs_b, int64_t cs_b, int64_t kc,
                               int64_t ncols, uint32_t* dst, int64_t panel_words, int64_t kpp) {
  constexpr int NR = kPairPanel;
  const int64_t kp = (kc + 1) / 2, panels = (ncols + NR - 1) / NR;
  bool subnormal = false;
  if (cs_b == 1) {
    __mmask32 any = 0;
    for (int64_t p = 0; p < kp; ++p) {
      const bf16_t* r = b + 2 * p * rs_b;
      const bool second = 2 * p + 1 < kc;
      for (int64_t c = 0; c < panels; ++c) {
        const int64_t nc = ncols - c * NR;
        const __mmask32 cols = nc >= NR ? ~__mmask32(0) : (__mmask32(1) << nc) - 1;
        const __m512i r0 = _mm512_maskz_loadu_epi16(cols, r + c * NR);
        const __m512i r1 = second ? _mm512_maskz_loadu_epi16(cols, r + rs_b + c * NR)
                                  : _mm512_setzero_si512();
        any |= bf16_subnormal_lanes(r0) | bf16_subnormal_lanes(r1);
        interleave_pairs(r0, r1, dst + c * panel_words + p * NR);
      }
    }
    subnormal = any != 0;
  } else {
    for (int64_t c = 0; c < panels; ++c) {
      uint32_t* panel = dst + c * panel_words;
      pack_b_pairs(b + c * NR * cs_b, rs_b, cs_b, kc, int(ncols - c * NR < NR ? ncols - c * NR : NR), panel);
      subnormal |= bf16_any_subnormal(reinterpret_cast<const bf16_t*>(panel), kp * NR * 2, 1);
    }
  }
  if (kpp > kp)
    for (int64_t c = 0; c < panels; ++c)
      std::memset(dst + c * panel_words + kp * NR, 0, size_t(kpp - kp) * NR * 4);
  return subnormal;
}

// One bf16 row of n values (null: zeros) as pair words down a panel column: dst[d * stride]
// for d < rows holds values 2d and 2d + 1 (zero past n). K^T panels are built this way, one
// key per column.
inline void pack_pair_column(const bf16_t* src, int64_t n, int64_t rows, uint32_t* dst,
                             int64_t stride) {
  const int64_t dp = (n + 1) / 2;
  for (int64_t d = 0; d < rows; ++d)
    dst[d * stride] = !src || d >= dp ? 0u
                      : 2 * d + 1 < n ? load_pair(src + 2 * d)
                                      : uint32_t(src[2 * d].bits);
}

// Rows 0..kc of bf16 (row(i): a pointer to row i's first column) as pair panels along the rows:
// panel c (columns 32c..32c+31) at dst + c * panel_words, [kpp][32] words; pair rows past
// ceil(kc / 2) up to kpp and columns past ncols zero. Returns whether the rows hold a value
// the pair kernels cannot take as it is: inf/NaN, or a subnormal (which they read as zero).
template <class RowFn>
bool pack_rows_pairs(RowFn&& row, int64_t kc, int64_t ncols, int64_t kpp, uint32_t* dst,
                     int64_t panel_words) {
  const int64_t kp = (kc + 1) / 2;
  __mmask32 unfit = 0;
  for (int64_t c0 = 0; c0 < ncols; c0 += kPairPanel) {
    const int64_t nc = ncols - c0 < kPairPanel ? ncols - c0 : kPairPanel;
    const __mmask32 cols = nc >= 32 ? ~__mmask32(0) : (__mmask32(1) << nc) - 1;
    uint32_t* panel = dst + (c0 / kPairPanel) * panel_words;
    for (int64_t q = 0; q < kp; ++q) {
      const __m512i r0 = _mm512_maskz_loadu_epi16(cols, row(2 * q) + c0);
      const __m512i r1 = 2 * q + 1 < kc ? _mm512_maskz_loadu_epi16(cols, row(2 * q + 1) + c0)
                                        : _mm512_setzero_si512();
      unfit |= bf16_unfit_lanes(r0) | bf16_unfit_lanes(r1);
      interleave_pairs(r0, r1, panel + q * kPairPanel);
    }
    std::memset(panel + kp * kPairPanel, 0, size_t(kpp - kp) * kPairPanel * 4);
  }
  return unfit != 0;
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
