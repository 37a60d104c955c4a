// AMX tiles (ARCHITECTURE.md, "ISA variants": amx, amx_emulated): the few tile operations the
// kernels use, either on the hardware (`amx`: AMX-TILE + AMX-BF16) or on a software model of
// the same semantics (`amx_emulated`: plain AVX-512 code, so the tile kernels are tested on any
// CPU with AVX-512 VNNI, whose kernels the variant uses for the rest; it is slow and never
// chosen by `auto`).
//
// Every kernel uses one configuration: the eight tiles tmm0..tmm7, each 16 rows of 64 bytes
// (fp32 accumulators: 16 x 16; bf16 operands: 16 rows of 32, B in pair rows of 16 columns x 2 k).
// A thread configures its tiles (TileScope) before the first tile instruction of a parallel
// region and releases them at its end, so OpenMP pools, fork and context switches never see
// stale tile state. The operating system must allow tile data first (Linux:
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), done once by dispatch.cpp).
//
// tile_dpbf16<C, A, B>() is TDPBF16PS: C[m][n] += sum over k pairs of
// A[m][2k] B[k][2n] + A[m][2k+1] B[k][2n+1] in fp32 (Intel SDM), with subnormal inputs read as
// zero and subnormal results flushed to zero whatever MXCSR says. The model follows the SDM's
// pseudocode (even and odd k summed apart by FMAs from 0, then added to C); Intel's
// intrinsics guide shows another order and the silicon need match neither bit for bit, so the
// model is a semantic check (layouts, operands, DAZ/FTZ), not a bit-exact oracle: tests
// compare both with float64 references at bf16 tolerances.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "simd/scalar_cvt.h"

#if defined(ATTNKIT_ISA_AMX) || defined(ATTNKIT_ISA_AMX_EMULATED)
#define ATTNKIT_AMX_TILES 1
#else
#error "simd/amx.h is for the amx and amx_emulated variants only"
#endif

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

constexpr int kTileRows = 16, kTileBytes = 64;  // every tile: 16 rows x 64 bytes

#if defined(ATTNKIT_ISA_AMX)
// The configuration is constant data, not stores into a local: GCC's _tile_loadconfig tells
// the compiler it reads 8 bytes, so stores of the rest of a local configuration could be
// dropped as dead (seen outside the kernels' inlining context).
struct alignas(64) TileConfig {
  uint8_t b[64];
};
constexpr TileConfig make_tile_config() {
  TileConfig c{};
  c.b[0] = 1;  // palette 1; start_row and the reserved bytes 0
  for (int t = 0; t < 8; ++t) {
    c.b[16 + 2 * t] = kTileBytes;  // colsb, little-endian 16-bit
    c.b[48 + t] = kTileRows;
  }
  return c;
}
inline void tile_configure() {
  static constexpr TileConfig kConfig = make_tile_config();
  __asm__ volatile("ldtilecfg %0" : : "m"(kConfig));
}
inline void tile_release() { _tile_release(); }
// The compilers' tile intrinsics paste the tile number into the instruction's text, so each
// operation is spelled out per tile (and per tile triple for the products the kernels use).
template <int T>
void tile_zero();
template <int T>
void tile_load(const void* p, int64_t stride_bytes);
template <int T>
void tile_store(void* p, int64_t stride_bytes);
template <int C, int A, int B>
void tile_dpbf16();
#define ATTNKIT_TILE_OPS(T)                                                            \
  template <>                                                                          \
  inline void tile_zero<T>() {                                                         \
    _tile_zero(T);                                                                     \
  }                                                                                    \
  template <>                                                                          \
  inline void tile_load<T>(const void* p, int64_t stride_bytes) {                      \
    __asm__ volatile("" : : : "memory"); /* the intrinsic declares no memory read */   \
    _tile_loadd(T, p, stride_bytes);                                                   \
  }                                                                                    \
  template <>                                                                          \
  inline void tile_store<T>(void* p, int64_t stride_bytes) {                           \
    _tile_stored(T, p, stride_bytes);                                                  \
  }
ATTNKIT_TILE_OPS(0)
ATTNKIT_TILE_OPS(1)
ATTNKIT_TILE_OPS(2)
ATTNKIT_TILE_OPS(3)
ATTNKIT_TILE_OPS(4)
ATTNKIT_TILE_OPS(5)
ATTNKIT_TILE_OPS(6)
ATTNKIT_TILE_OPS(7)
#undef ATTNKIT_TILE_OPS
#define ATTNKIT_TILE_DPBF16(C, A, B) \
  template <>                        \
  inline void tile_dpbf16<C, A, B>() { \
    _tile_dpbf16ps(C, A, B);         \
  }
ATTNKIT_TILE_DPBF16(0, 4, 6)
ATTNKIT_TILE_DPBF16(1, 4, 7)
ATTNKIT_TILE_DPBF16(2, 5, 6)
ATTNKIT_TILE_DPBF16(3, 5, 7)
#undef ATTNKIT_TILE_DPBF16
#else
// The software model: eight 1 KB tiles per thread.
struct TileFile {
  alignas(64) uint8_t t[8][kTileRows][kTileBytes];
};
inline TileFile& tile_file() {
  static thread_local TileFile f;
  return f;
}
inline void tile_configure() { std::memset(&tile_file(), 0, sizeof(TileFile)); }
inline void tile_release() {}
template <int T>
inline void tile_zero() {
  std::memset(tile_file().t[T], 0, sizeof tile_file().t[T]);
}
template <int T>
inline void tile_load(const void* p, int64_t stride_bytes) {
  for (int r = 0; r < kTileRows; ++r)
    std::memcpy(tile_file().t[T][r], static_cast<const uint8_t*>(p) + r * stride_bytes, kTileBytes);
}
template <int T>
inline void tile_store(void* p, int64_t stride_bytes) {
  for (int r = 0; r < kTileRows; ++r)
    std::memcpy(static_cast<uint8_t*>(p) + r * stride_bytes, tile_file().t[T][r], kTileBytes);
}
inline float tile_bf16_daz(uint16_t bits) {  // subnormal inputs read as (signed) zero
  return bf16_to_f32((bits & 0x7f80u) == 0 ? uint16_t(bits & 0x8000u) : bits);
}
// A subnormal fp32 as (signed) zero: results are flushed (FTZ) and C is read so (DAZ).
inline float tile_flush(float x) {
  const uint32_t w = f32_bits(x);
  return (w & 0x7f800000u) == 0 ? bits_f32(w & 0x80000000u) : x;
}
template <int C, int A, int B>
inline void tile_dpbf16() {
  TileFile& f = tile_file();
  float b[16][2][16];  // B's pair rows as floats: b[k][j][n] = B[k][2n + j]
  for (int k = 0; k < 16; ++k) {
    uint16_t row[32];
    std::memcpy(row, f.t[B][k], 64);
    for (int n = 0; n < 16; ++n) {
      b[k][0][n] = tile_bf16_daz(row[2 * n]);
      b[k][1][n] = tile_bf16_daz(row[2 * n + 1]);
    }
  }
  for (int m = 0; m < kTileRows; ++m) {
    float acc[16], even[16] = {}, odd[16] = {};
    uint16_t a[32];
    std::memcpy(acc, f.t[C][m], 64);
    std::memcpy(a, f.t[A][m], 64);
    for (int k = 0; k < 16; ++k) {
      const float a0 = tile_bf16_daz(a[2 * k]), a1 = tile_bf16_daz(a[2 * k + 1]);
      for (int n = 0; n < 16; ++n) {
        even[n] = tile_flush(__builtin_fmaf(a0, b[k][0][n], even[n]));
        odd[n] = tile_flush(__builtin_fmaf(a1, b[k][1][n], odd[n]));
      }
    }
    for (int n = 0; n < 16; ++n) acc[n] = tile_flush(tile_flush(acc[n]) + tile_flush(even[n] + odd[n]));
    std::memcpy(f.t[C][m], acc, 64);
  }
}
#endif

// A thread's tile configuration for one parallel region (see the top of this file).
struct TileScope {
  TileScope() { tile_configure(); }
  ~TileScope() { tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
