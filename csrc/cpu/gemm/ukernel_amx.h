// bf16 x bf16 -> fp32 micro-kernel on AMX tiles (the amx and amx_emulated variants;
// ARCHITECTURE.md, "ISA variants"), and the panel interface gemm_bf16.cpp drives (the same
// names as ukernel_bf16.h's, for the vdpbf16ps kernel).
//
// Micro-tile: C[32 x 32] fp32 in tiles 0..3 (2 x 2 tiles of 16 x 16), per step of 32 k two A
// tiles (rows 0..15 and 16..31, 16 x 32 bf16) and two B tiles (16 k pairs x 16 columns, pair
// layout of gemm/pairs.h), four TDPBF16PS: 32 x 32 x 32 multiply-adds per step.
//   A panel (pack_a_panel): per step of 16 k pairs, rows 0..31 of 16 words each (64 bytes),
//     zero rows past m and zero k past kc: both A tiles of a step are 2 KB in a row.
//   B panel: gemm/pairs.h's [kpp][32] words: a step's two B tiles sit at byte 0 and 64 of
//     rows of 128 bytes. Rows kp..kpp (kpp = kp rounded up to 16) are zero.
//   C: a padded fp32 workspace (rows and columns rounded up to 32), so every tile is whole.
//
// Limits (one core of a Sapphire/Emerald Rapids): TDPBF16PS does 16 x 16 x 32 multiply-adds in
// 16 cycles, i.e. 1024 FLOP per cycle, 16x the fp32 FMA units. A step's four tile products take
// 64 cycles and read 2 KB of A (from L2: 32 B per cycle) and 2 KB of B (L1); the C tiles are
// loaded and stored once per k block (KCP pairs).
#pragma once
#include <cstdint>
#include <cstring>

#include "attnkit/dtype.h"
#include "gemm/pairs.h"
#include "simd/amx.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

// KCP k pairs per pass (a multiple of 16): the B micro-panel is KCP x 128 B = 24 KB of a 48 KB
// L1d; an A micro-panel 32 x KCP x 4 B = 24 KB, the A block MC x KCP x 4 B = 384 KB of a 2 MB
// L2; the B block KCP x NC x 4 B = 3 MB. These are the values for the reference caches below
// (Sapphire / Emerald Rapids); gemm_bf16.cpp scales them to the CPU's (pair_blocks). Not tuned
// on AMX hardware yet (none was at hand).
struct BlockingAmx {
  static constexpr int MR = 32, NR = kPairPanel;
  static constexpr int64_t KCP = 192, MC = 512, NC = 4096;
  static constexpr int64_t kRefL1d = 48 << 10, kRefL2 = 2 << 20;
};
static_assert(BlockingAmx::KCP % 16 == 0 && BlockingAmx::MC % BlockingAmx::MR == 0 &&
                  BlockingAmx::NC % BlockingAmx::NR == 0,
              "AMX blocks hold whole tiles");

// ---- the panel interface of gemm_bf16.cpp ----
using PanelBlocking = BlockingAmx;
inline int64_t padded_pairs(int64_t kp) { return (kp + 15) / 16 * 16; }
inline int64_t workspace_rows(int64_t m) { return (m + 31) / 32 * 32; }
inline int64_t workspace_ld(int64_t n) { return (n + 31) / 32 * 32; }
using PanelThreadScope = TileScope;  // each thread configures its tiles for the region
constexpr bool kAInPlace = false;    // A tiles are always packed (step-major, below)
void compute_panel_in_place(int, int64_t, const uint32_t*, int64_t, const uint32_t*, float*,
                            int64_t, bool, int);  // declared for the discarded branch only

// B: kc x ncols -> panels of [kpp][32] words panel_words apart, zero past ncols and kc;
// returns whether B holds a subnormal (gemm/pairs.h).
inline bool pack_b_panels(const bf16_t* b, int64_t rs_b, int64_t cs_b, int64_t kc, int64_t ncols,
                          uint32_t* dst, int64_t panel_words) {
  return pack_b_pair_panels(b, rs_b, cs_b, kc, ncols, dst, panel_words, padded_pairs((kc + 1) / 2));
}

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

// C[0:32, 0:32] (fp32, row stride ldc floats) (+)= A B over kpp pairs (a multiple of 16);
// accumulate = false overwrites C without reading it. m and nr are the panel's real rows and
// columns: the workspace is padded, so the kernel always computes whole tiles.
inline void compute_panel(int m, int64_t kpp, const uint32_t* __restrict a,
                          const uint32_t* __restrict b, float* __restrict c, int64_t ldc,
                          bool accumulate, int nr) {
  const int64_t sc = ldc * 4;
  float* c10 = c + 16 * ldc;
  if (accumulate) {
    tile_load<0>(c, sc);
    tile_load<1>(c + 16, sc);
    tile_load<2>(c10, sc);
    tile_load<3>(c10 + 16, sc);
  } else {
    tile_zero<0>();
    tile_zero<1>();
    tile_zero<2>();
    tile_zero<3>();
  }
  for (int64_t p = 0; p < kpp; p += 16) {
    const uint32_t* as = a + p * 32;  // this step's 32 x 16 words
    const uint32_t* bs = b + p * kPairPanel;
    tile_load<4>(as, 64);
    tile_load<6>(bs, 4 * kPairPanel);
    tile_load<7>(bs + 16, 4 * kPairPanel);
    tile_dpbf16<0, 4, 6>();
    tile_dpbf16<1, 4, 7>();
    tile_load<5>(as + 16 * 16, 64);
    tile_dpbf16<2, 5, 6>();
    tile_dpbf16<3, 5, 7>();
  }
  tile_store<0>(c, sc);
  tile_store<1>(c + 16, sc);
  tile_store<2>(c10, sc);
  tile_store<3>(c10 + 16, sc);
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
