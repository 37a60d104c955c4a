// bf16 x bf16 -> fp32 micro-kernel on AMX tiles (the amx and amx_emulated variants;
// ARCHITECTURE.md, "ISA variants"), and the panel interface gemm_bf16.cpp drives (the same
// names as ukernel_bf16.h's, for the vdpbf16ps kernel).
//
// Micro-tile: C[32 x 32] fp32 in tiles 0..3 (2 x 2 tiles of 16 x 16), per step of 32 k two A
// tiles (rows 0..15 and 16..31, 16 x 32 bf16) and two B tiles (16 k pairs x 16 columns, pair
// layout of gemm/pairs.h), four TDPBF16PS: 32 x 32 x 32 multiply-adds per step.
//   A panel and B panel: the tile layout of gemm/tile_layout.h (a step's two A tiles are 2 KB
//     in a row; its two B tiles sit at byte 0 and 64 of rows of 128 bytes).
//   C: a padded fp32 workspace (rows and columns rounded up to 32), so every tile is whole.
//
// Limits (one core of a Sapphire/Emerald Rapids): TDPBF16PS does 16 x 16 x 32 multiply-adds in
// 16 cycles, i.e. 1024 FLOP per cycle, 16x the fp32 FMA units. A step's four tile products take
// 64 cycles and read 2 KB of A and 2 KB of B (from L2 with the KCP below: 64 B per cycle at
// the unit's full rate); the C tiles are loaded and stored once per k block (KCP pairs).
#pragma once
#include <cstdint>
#include <cstring>

#include "attnkit/dtype.h"
#include "gemm/pairs.h"
#include "gemm/tile_layout.h"
#include "simd/amx.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

// KCP k pairs per pass (a multiple of 16): 1024 k, so the C tiles make a round trip through the
// fp32 workspace once per 1024 k; the B micro-panel (KCP x 128 B = 64 KB) and the A micro-panel
// (32 x KCP x 4 B = 64 KB) both stream from the L2, the A block MC x KCP x 4 B = 1 MB of a 2 MB
// L2; the B block KCP x NC x 4 B = 8 MB. Measured on an Emerald Rapids (bench/notes/amx.md,
// "matmul: deeper k blocks"): KCP 512 ran 1.05-1.16x KCP 192 (B panel in L1d, C through the
// workspace every 384 k), 384 in between, 768 slower. These are the values for the reference
// caches below (Sapphire / Emerald Rapids); gemm_bf16.cpp scales them to the CPU's (pair_blocks).
struct BlockingAmx {
  static constexpr int MR = 32, NR = kPairPanel;
  static constexpr int64_t KCP = 512, MC = 512, NC = 4096;
  static constexpr int64_t kRefL1d = 48 << 10, kRefL2 = 2 << 20;
};
static_assert(BlockingAmx::KCP % 16 == 0 && BlockingAmx::MC % BlockingAmx::MR == 0 &&
                  BlockingAmx::NC % BlockingAmx::NR == 0,
              "AMX blocks hold whole tiles");

// ---- the panel interface of gemm_bf16.cpp ----
using PanelBlocking = BlockingAmx;
using tiles::padded_pairs;
using tiles::pack_a_panel;
using tiles::pack_a_panel_f32;
using tiles::pack_rows_pairs_f32;
using tiles::pack_a_transposed;
inline int64_t workspace_rows(int64_t m) { return (m + 31) / 32 * 32; }
inline int64_t workspace_ld(int64_t n) { return (n + 31) / 32 * 32; }
using PanelThreadScope = TileScope;  // each thread configures its tiles for the region
constexpr bool kAInPlace = false;    // A tiles are always packed (gemm/tile_layout.h)
void compute_panel_in_place(int, int64_t, const uint32_t*, int64_t, const uint32_t*, float*,
                            int64_t, bool, int);  // declared for the discarded branch only

// B: kc x ncols -> panels of [kpp][32] words panel_words apart, zero past ncols and kc;
// returns whether B holds a subnormal (gemm/pairs.h).
inline bool pack_b_panels(const bf16_t* b, int64_t rs_b, int64_t cs_b, int64_t kc, int64_t ncols,
                          uint32_t* dst, int64_t panel_words) {
  return pack_b_pair_panels(b, rs_b, cs_b, kc, ncols, dst, panel_words, padded_pairs((kc + 1) / 2));
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
namespace tiles {
using ATTNKIT_ISA_NS::compute_panel;  // the tile layout's GEMM here: AMX itself
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
