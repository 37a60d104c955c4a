// Storage types understood by every kernel. Plain data only: this header is included by
// the per-ISA kernel objects, so it must not define inline functions (ODR, ARCHITECTURE.md rule 4).
#pragma once
#include <cstdint>

namespace attnkit {

enum class DType : int32_t {
  f32 = 0,
  f64 = 1,
  f16 = 2,   // IEEE binary16, raw bits
  bf16 = 3,  // bfloat16, raw bits (upper half of an fp32)
  boolean = 4,  // one byte, 0 = false
  i32 = 5,
  i64 = 6,
  // 8-bit KV-cache storage (attention_with_kvcache): each row of D codes carries one fp32 scale
  // (params.h, k_scale / v_scale); the value is code * scale.
  i8 = 7,       // int8, symmetric: scale = absmax / 127
  f8e4m3 = 8,   // float8 e4m3fn (ml_dtypes / torch float8_e4m3fn), raw bits: scale = absmax / 448
};

// Raw 16-bit storage types. They carry bits only; conversion lives in the SIMD vocabulary.
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
// float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no inf, S.1111.111 is NaN,
// largest finite 448.
struct f8e4m3_t {
  uint8_t bits;
};

}  // namespace attnkit
