// One-element conversions between the storage types and fp32, for tails and strided paths.
// Software only, so every ISA variant rounds the same way as the hardware paths
// (round to nearest even; NaN stays a quiet NaN). Lives in the per-ISA namespace (ODR).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attnkit/dtype.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
  // zero or subnormal: mant * 2^-24, exact in fp32
  float f = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return bits_f32(f32_bits(f) | sign);
}
inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u)  // inf or NaN (NaN stays quiet)
    return static_cast<uint16_t>(sign | 0x7c00u |
                                 (x > 0x7f800000u ? (0x200u | ((x >> 13) & 0x3ffu)) : 0u));
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (x < 0x38800000u) {  // below 2^-14: a half subnormal (or zero), in units of 2^-24
    uint32_t m = static_cast<uint32_t>(nearbyintf(bits_f32(x) * 16777216.0f));
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t r = x + 0xc8000fffu + ((x >> 13) & 1u);  // rebias by -112, round the low 13 bits
  return static_cast<uint16_t>(sign | (r >> 13));
}
inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if (f != f) return static_cast<uint16_t>((u | 0x400000u) >> 16);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float to_f32(float x) { return x; }
inline float to_f32(f16_t x) { return f16_to_f32(x.bits); }
inline float to_f32(bf16_t x) { return bf16_to_f32(x.bits); }
inline void from_f32(float x, float* p) { *p = x; }
inline void from_f32(float x, f16_t* p) { p->bits = f32_to_f16(x); }
inline void from_f32(float x, bf16_t* p) { p->bits = f32_to_bf16(x); }

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
