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
};

// Raw 16-bit storage types. They carry bits only; conversion lives in the SIMD vocabulary.
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

}  // namespace attnkit
