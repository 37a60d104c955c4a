// The tile layout of bf16 operands (ARCHITECTURE.md, "ISA variants"): what AMX tiles read, and
// what the avx512_bf16 variant's vdpbf16ps kernel on the same layout reads
// (gemm/ukernel_bf16.h, tiles::compute_panel), so that one attention backward (attention_bwd.cpp,
// run_item_tiles) drives both. Packing only: plain AVX-512 (F/BW) code, no tile instruction.
//   A panel (pack_a_panel): up to 32 rows, per step of 16 k pairs, rows 0..31 of 16 words each
//     (64 bytes): word w of row i in step s holds k = 32 s + 2 w and 2 w + 1; zero rows past m
//     and zero k past kc, kpp / 16 steps (kpp = ceil(kc / 2) rounded up to 16).
//   B panel: gemm/pairs.h's [kpp][32] words, rows kp..kpp zero.
// In namespace `tiles`: the avx512_bf16 variant's GEMM panel interface (ukernel_bf16.h) uses
// some of the same names for its own (unpadded) layout.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attnkit/dtype.h"
#include "gemm/pairs.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace tiles {

inline int64_t padded_pairs(int64_t kp) { return (kp + 15) / 16 * 16; }

// A: m x kc (m <= 32; element (i, k) at a[i * rs_a + k * cs_a]) -> the step-major tile layout
// above, kpp / 16 steps of 32 rows x 16 words.
inline void pack_a_panel(const bf16_t* a, int64_t rs_a, int64_t cs_a, int m, int64_t kc,
                         uint32_t* dst) {
  const int64_t steps = padded_pairs((kc + 1) / 2) / 16;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k0 = 32 * s;
    const int64_t kn = kc - k0 < 32 ? kc - k0 : 32;  // k of this step inside the matrix (may be <= 0)
    uint32_t* out = dst + s * 32 * 16;
    for (int i = 0; i < 32; ++i) {
      uint16_t* row = reinterpret_cast<uint16_t*>(out + i * 16);
      if (i >= m || kn <= 0) {
        std::memset(row, 0, 64);
        continue;
      }
      const bf16_t* src = a + i * rs_a + k0 * cs_a;
      if (cs_a == 1) {
        const __mmask32 mask = kn >= 32 ? ~__mmask32(0) : (__mmask32(1) << kn) - 1;
        _mm512_storeu_si512(row, _mm512_maskz_loadu_epi16(mask, src));
      } else {
        for (int64_t k = 0; k < 32; ++k) row[k] = k < kn ? src[k * cs_a].bits : uint16_t(0);
      }
    }
  }
}

// The same layout from fp32 rows rounded to bf16 (nearest even): m x kc at a (row stride lda),
// m <= 32. Attention's P = exp(S - m) goes to its P V tiles this way.
inline void pack_a_panel_f32(const float* a, int64_t lda, int m, int64_t kc, uint32_t* dst) {
  using V = Vec<float>;
  const int64_t steps = padded_pairs((kc + 1) / 2) / 16;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k0 = 32 * s;
    uint32_t* out = dst + s * 32 * 16;
    for (int i = 0; i < 32; ++i) {
      __m256i* row = reinterpret_cast<__m256i*>(out + i * 16);
      for (int h = 0; h < 2; ++h) {
        const int64_t kn = kc - k0 - 16 * h;  // values of this half inside the matrix
        const V x = i >= m || kn <= 0 ? V::zero()
                    : kn >= 16        ? V::load(a + i * lda + k0 + 16 * h)
                                      : V::load_partial(a + i * lda + k0 + 16 * h, int(kn));
        _mm256_storeu_si256(row + h, cvt_to_bf16_bits(x));
      }
    }
  }
}

// fp32 rows 0..kc (row stride lda, rounded to bf16) as pair panels along the rows, as
// pack_rows_pairs (gemm/pairs.h) does for bf16 rows: the B operand X of C += Y^T X when X is a
// tile of attention's P or dS (rows = query rows, columns = keys).
inline void pack_rows_pairs_f32(const float* a, int64_t lda, int64_t kc, int64_t ncols,
                                int64_t kpp, uint32_t* dst, int64_t panel_words) {
  using V = Vec<float>;
  auto half_row = [&](int64_t r, int64_t c) {  // 16 values of row r from column c, as bf16
    const int64_t n = ncols - c;
    const V x = r >= kc || n <= 0 ? V::zero()
                : n >= 16         ? V::load(a + r * lda + c)
                                  : V::load_partial(a + r * lda + c, int(n));
    return _mm512_castsi256_si512(cvt_to_bf16_bits(x));
  };
  auto row32 = [&](int64_t r, int64_t c) {
    return _mm512_inserti64x4(half_row(r, c), _mm512_castsi512_si256(half_row(r, c + 16)), 1);
  };
  for (int64_t c0 = 0; c0 < ncols; c0 += kPairPanel) {
    uint32_t* panel = dst + (c0 / kPairPanel) * panel_words;
    for (int64_t q = 0; q < kpp; ++q) interleave_pairs(row32(2 * q, c0), row32(2 * q + 1, c0), panel + q * kPairPanel);
  }
}

// A^T in tile layout: the A operand whose row i is column c0 + i of the kc x n bf16 matrix with
// rows at row(r) (so A's k runs along those rows): m = min(32, n - c0) tile rows, kpp / 16
// steps, zero past kc and past m. Built once per backward item for q^T and dO^T (scalar: it is
// small next to the item's GEMMs).
template <class RowFn>
void pack_a_transposed(RowFn&& row, int64_t kc, int64_t n, int64_t c0, int64_t kpp, uint32_t* dst) {
  for (int64_t s = 0; s < kpp / 16; ++s)
    for (int i = 0; i < 32; ++i) {
      uint16_t* out = reinterpret_cast<uint16_t*>(dst + (s * 32 + i) * 16);
      const int64_t c = c0 + i;
      for (int k = 0; k < 32; ++k) {
        const int64_t r = 32 * s + k;
        out[k] = c < n && r < kc ? row(r)[c].bits : uint16_t(0);
      }
    }
}

}  // namespace tiles
}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
