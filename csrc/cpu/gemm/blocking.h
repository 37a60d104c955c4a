// GEMM blocking constants per ISA and element type (docs/ARCHITECTURE.md, "GEMM"), BLIS style:
//   MR x NR   register tile of C held in accumulators by the micro-kernel
//   KC        depth of one pass: a KC x NR micro-panel of B stays in L1 while the
//             micro-kernel walks the MR-row micro-panels of A under it
//   MC        rows of the packed A block, sized for L2
//   NC        columns of the packed B block, sized for L3
// Register budget, vectors along N (row-major C): NR = 2 vectors, MR rows, so MR*2
// accumulators + 2 B vectors + 1 broadcast must fit the register file.
#pragma once
#include <cstdint>

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
  // KC = 256: the B micro-panel is 256 x 32 x 4 B = 32 KB, all of a Zen 4 L1d (2/3 of an
  // Emerald Rapids 48 KB one), so by the textbook rule 192 (24 KB) should win; measured on
  // Zen 4 at 1 thread, 12x32x256 ran 94 GFLOP/s against 84 for 12x32x192 (bench/NOTES.md): the
  // hardware prefetchers keep the panel streaming. A block 144 x 256 x 4 B = 144 KB of L2;
  // B block 256 x 3072 x 4 B = 3 MB of the shared L3.
  static constexpr int64_t KC = 256, MC = 144, NC = 3072;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 12, NR = 16;
  static constexpr int64_t KC = 192, MC = 144, NC = 1536;  // same bytes as fp32
};
#elif defined(ATTNKIT_ISA_AVX2)
// 16 ymm: 6x2 = 12 accumulators + 2 B + 1 broadcast = 15.
template <>
struct Blocking<float> {
  // B micro-panel 256 x 16 x 4 B = 16 KB (half of L1); A block 144 x 256 x 4 B = 144 KB of L2;
  // B block 256 x 3072 x 4 B = 3 MB of L3.
  static constexpr int MR = 6, NR = 16;
  static constexpr int64_t KC = 256, MC = 144, NC = 3072;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 6, NR = 8;
  static constexpr int64_t KC = 256, MC = 144, NC = 1536;
};
#else
// Portable baseline: 4-lane float vectors (SSE2/NEON width), 4x2 = 8 accumulators.
template <>
struct Blocking<float> {
  static constexpr int MR = 4, NR = 8;
  static constexpr int64_t KC = 256, MC = 128, NC = 2048;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 4, NR = 4;
  static constexpr int64_t KC = 256, MC = 128, NC = 1024;
};
#endif

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
