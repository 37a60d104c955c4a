// Philox4x32-10 counter-based RNG (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC'11), for attention dropout: the keep/drop decision of element (b, h, i, j) is a pure
// function of (seed, offset, b, h, i, j), so backward regenerates the forward's mask exactly
// and the result does not depend on threads or tiling.
//
// `static inline` on purpose: internal linkage gives every object (each ISA variant and the
// binding) its own copy, so no weak symbol can be shared across ISA variants (ARCHITECTURE.md rule 4).
#pragma once
#include <cstdint>

namespace attnkit {

struct Philox4 {
  uint32_t w[4];
};

static inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                    uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Dropout stream of one attention row: element j of row i of head (b, h) is kept when its
// 32-bit draw is >= threshold = round(p * 2^32).
struct DropoutRow {
  uint32_t k0, k1, c1, c2, c3, threshold;
};

static inline DropoutRow dropout_row(uint64_t seed, uint64_t offset, int64_t b, int64_t h,
                                     int64_t num_heads, int64_t i, float p) {
  DropoutRow r;
  r.k0 = uint32_t(seed);
  r.k1 = uint32_t(seed >> 32) ^ uint32_t(offset >> 32);
  r.c1 = uint32_t(i);
  r.c2 = uint32_t(b * num_heads + h);
  r.c3 = uint32_t(offset);
  const double t = double(p) * 4294967296.0;
  r.threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
  return r;
}

// keep[j - j0] for keys j0 .. j0 + n (1 = kept).
static inline void dropout_keep(const DropoutRow& r, int64_t j0, int64_t n, uint8_t* keep) {
  int64_t j = j0;
  const int64_t end = j0 + n;
  while (j < end) {
    const Philox4 x = philox4x32_10(uint32_t(j >> 2), r.c1, r.c2, r.c3, r.k0, r.k1);
    for (int64_t lane = j & 3; lane < 4 && j < end; ++lane, ++j) keep[j - j0] = x.w[lane] >= r.threshold;
  }
}

}  // namespace attnkit
