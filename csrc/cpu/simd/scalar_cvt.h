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

// float8 e4m3fn (bias 7, no inf, S.1111.111 = NaN, max 448) <-> fp32, exact / round to
// nearest even. f32_to_f8e4m3 saturates finite values beyond 448 to +-448 (the quantizer's
// scales keep |x| <= 448; saturating is what a cache wants from a rounding overshoot).
inline float f8e4m3_to_f32(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t e = (b >> 3) & 0xfu, m = b & 0x7u;
  if (e == 0xf && m == 0x7) return bits_f32(sign | 0x7fc00000u);
  if (e != 0) return bits_f32(sign | ((e + 120u) << 23) | (m << 20));
  return bits_f32(f32_bits(static_cast<float>(m) * 0.001953125f) | sign);  // m * 2^-9
}
inline uint8_t f32_to_f8e4m3(float f) {
  uint32_t x = f32_bits(f);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);  // NaN
  if (x >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 448 (or inf): saturate
  if (x < 0x3c800000u)  // below 2^-6, the smallest normal: subnormals in units of 2^-9
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(nearbyintf(bits_f32(x) * 512.0f)));
  uint32_t r = x - (120u << 23);           // rebias the exponent (127 -> 7)
  r += 0x7ffffu + ((r >> 20) & 1u);        // round the low 20 mantissa bits to nearest even
  return static_cast<uint8_t>(sign | (r >> 20));
}

inline float to_f32(float x) { return x; }
inline float to_f32(int8_t x) { return static_cast<float>(x); }
inline float to_f32(f8e4m3_t x) { return f8e4m3_to_f32(x.bits); }
inline float to_f32(f16_t x) { return f16_to_f32(x.bits); }
inline float to_f32(bf16_t x) { return bf16_to_f32(x.bits); }
inline void from_f32(float x, float* p) { *p = x; }
inline void from_f32(float x, f16_t* p) { p->bits = f32_to_f16(x); }
inline void from_f32(float x, bf16_t* p) { p->bits = f32_to_bf16(x); }

// 8-bit KV codes (int8, float8 e4m3fn). The SIMD vocabulary's load_code(p) yields
// code value * CodeUnit<T>::kLoaded: int8 exactly; e4m3 as 2^-8 x its value, because it widens
// each code to an fp16 whose exponent bias is 8 more (two integer ops and one exact F16C
// convert, independent of the DAZ flag an fp32 denormal trick would depend on). Kernels fold
// kUnscale = 1 / kLoaded into the row's scale. is_code<T> tells storage codes from floats.
template <class T>
struct CodeUnit {
  static constexpr bool is_code = false;
};
template <>
struct CodeUnit<int8_t> {
  static constexpr bool is_code = true;
  static constexpr float kLoaded = 1.0f, kUnscale = 1.0f;
};
template <>
struct CodeUnit<f8e4m3_t> {
  static constexpr bool is_code = true;
  static constexpr float kLoaded = 0.00390625f, kUnscale = 256.0f;
};
template <class T>
constexpr bool is_code = CodeUnit<T>::is_code;

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
