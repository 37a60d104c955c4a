// GEMM blocking per ISA and element type (docs/ARCHITECTURE.md, "GEMM"), BLIS style:
//   MR x NR   register tile of C held in accumulators by the micro-kernel (compile time)
//   KC        depth of one pass: a KC x NR micro-panel of B stays in L1 while the
//             micro-kernel walks the MR-row micro-panels of A under it
//   MC        rows of the packed A block, sized for L2
//   NC        columns of the packed B block, sized for a core's share of L3
// Register budget, vectors along N (row-major C): NR = 2 vectors, MR rows, so MR*2
// accumulators + 2 B vectors + 1 broadcast must fit the register file.
//
// KC, MC and NC are run-time values (gemm_blocks): the constants below (KC0, MC0, NC0) are the
// ones measured on the reference CPU, an AMD Zen 4 with a 32 KB L1d and a 1 MB L2
// (bench/notes/matmul.md, "matmul"); on another CPU the B micro-panel keeps its share of the L1d
// (KC scales with the L1d), the A block its share of the L2 (MC from the L2 and KC) and the
// B block its bytes (NC = NC0 * KC0 / KC). They depend on the machine, never on the thread
// count, so results stay bit-identical across thread counts (gemm.cpp).
#pragma once
#include <cstdint>

#include "cache_sizes.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

template <class T>
struct Blocking;

#if defined(ATTNKIT_ISA_AVX512)
// 32 zmm: 12x2 = 24 accumulators + 2 B + 1 broadcast (often folded into the FMA as an
// embedded {1to16} broadcast) = 27. MR=12 (not 14) keeps attention's query tiles at 48/96 rows.
template <>
struct Blocking<float> {
  static constexpr int MR = 12, NR = 32;
  // KC0 = 256: the B micro-panel is 256 x 32 x 4 B = 32 KB, all of a Zen 4 L1d, so by the
  // textbook rule 192 (24 KB) should win; measured on Zen 4 at 1 thread, 12x32x256 ran 94
  // GFLOP/s against 84 for 12x32x192 (bench/notes/matmul.md): the hardware prefetchers keep the panel
  // streaming. A block 144 x 256 x 4 B = 144 KB of L2; B block 256 x 3072 x 4 B = 3 MB of the
  // shared L3. On an Emerald Rapids (48 KB L1d, 2 MB L2) this gives KC 384, MC 192, NC 2048;
  // there KC 256..512, MC 144..576 and NC 512..3072 all ran within 10% of each other
  // (bench/notes/matmul.md, "fp32 GEMM on Emerald Rapids"): the cache budget, not a tuned value.
  static constexpr int64_t KC0 = 256, MC0 = 144, NC0 = 3072;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 12, NR = 16;
  static constexpr int64_t KC0 = 192, MC0 = 144, NC0 = 1536;  // same bytes as fp32
};
#elif defined(ATTNKIT_ISA_AVX2)
// 16 ymm: 6x2 = 12 accumulators + 2 B + 1 broadcast = 15.
template <>
struct Blocking<float> {
  // B micro-panel 256 x 16 x 4 B = 16 KB (half of L1); A block 144 x 256 x 4 B = 144 KB of L2;
  // B block 256 x 3072 x 4 B = 3 MB of L3.
  static constexpr int MR = 6, NR = 16;
  static constexpr int64_t KC0 = 256, MC0 = 144, NC0 = 3072;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 6, NR = 8;
  static constexpr int64_t KC0 = 256, MC0 = 144, NC0 = 1536;
};
#else
// Portable baseline: 4-lane float vectors (SSE2/NEON width), 4x2 = 8 accumulators.
template <>
struct Blocking<float> {
  static constexpr int MR = 4, NR = 8;
  static constexpr int64_t KC0 = 256, MC0 = 128, NC0 = 2048;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 4, NR = 4;
  static constexpr int64_t KC0 = 256, MC0 = 128, NC0 = 1024;
};
#endif

// The reference CPU of KC0 / MC0 (Zen 4); cache_sizes.h assumes these sizes when it cannot read
// the CPU's.
constexpr int64_t kRefL1d = kAssumedL1d, kRefL2 = kAssumedL2;

struct GemmBlocks {
  int64_t kc, mc, nc;
  // The shared-A order (gemm.cpp): a thread's packed B block is kc x nb, half the L2 (0 where
  // unused: the bf16 pair kernels).
  int64_t nb = 0;
};

// Blocks kc0 / mc0 / nc0, right for caches of ref_l1d / ref_l2 bytes, scaled to the caches cs
// (see the top of this file). KC stays a multiple of 16 within [kc0 / 2, 2 kc0]; MC a multiple
// of mr, at least mr; NC a multiple of nr. Also used by the bf16 pair / tile kernels
// (gemm_bf16.cpp), whose KC counts k pairs.
inline GemmBlocks scale_blocks(int64_t kc0, int64_t mc0, int64_t nc0, int mr, int nr,
                               int64_t ref_l1d, int64_t ref_l2, const CacheSizes& cs) {
  int64_t kc = kc0 * cs.l1d / ref_l1d / 16 * 16;
  kc = kc < kc0 / 2 ? kc0 / 2 : kc > 2 * kc0 ? 2 * kc0 : kc;
  int64_t mc = mc0 * kc0 * (cs.l2 / 1024) / (ref_l2 / 1024) / kc / mr * mr;
  if (mc < mr) mc = mr;
  int64_t nc = nc0 * kc0 / kc / nr * nr;
  if (nc < nr) nc = nr;
  return {kc, mc, nc};
}

template <class T>
GemmBlocks blocks_for(const CacheSizes& cs) {
  using B = Blocking<T>;
  GemmBlocks g = scale_blocks(B::KC0, B::MC0, B::NC0, B::MR, B::NR, kRefL1d, kRefL2, cs);
  g.nb = cs.l2 / 2 / (g.kc * int64_t(sizeof(T))) / B::NR * B::NR;
  if (g.nb < B::NR) g.nb = B::NR;
  return g;
}

template <class T>
const GemmBlocks& gemm_blocks() {
  static const GemmBlocks blocks = blocks_for<T>(cache_sizes());
  return blocks;
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
