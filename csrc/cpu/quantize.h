// Symmetric 8-bit quantization of one row (a (token, kv head) row of a KV cache): the codes and
// the row's fp32 scale. Used by attnkit.quantize_kv (quantize.cpp) and by the KV-cache append
// into 8-bit caches (attention_common.h). Per-ISA namespace (ODR).
//
//   int8:  scale = absmax / 127, code = round_to_nearest_even(x / scale) in [-127, 127]
//   e4m3:  scale = absmax / 448, code = e4m3(x / scale), rounded to nearest even
// A row of zeros (or so small that absmax / 127 underflows to 0) gets scale 0 and codes 0; a row
// holding inf or NaN gets scale NaN and codes 0, so attention over it gives NaN, as it would
// over the float row. The codes are computed one element at a time in software (a division
// and a rounding, both exact IEEE operations), so every ISA variant writes identical bytes.
#pragma once
#include <math.h>

#include <cstdint>

#include "attnkit/dtype.h"
#include "simd/scalar_cvt.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

template <class C>
struct CodeRange;
template <>
struct CodeRange<int8_t> {
  static constexpr float kMax = 127.0f;
};
template <>
struct CodeRange<f8e4m3_t> {
  static constexpr float kMax = 448.0f;
};

inline void store_code(float y, int8_t* q) {
  const float r = nearbyintf(y);  // |y| <= 127 up to one rounding of the division
  *q = static_cast<int8_t>(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
}
inline void store_code(float y, f8e4m3_t* q) { q->bits = f32_to_f8e4m3(y); }

// max |x| over the row; NaN when the row holds inf or NaN.
template <class S>
inline float row_absmax(const S* x, int64_t n) {
  using V = Vec<float>;
  V vmax = V::zero(), vbad = V::zero();  // vbad sums x - x: 0, or NaN once a value is not finite
  int64_t d = 0;
  for (; d + V::N <= n; d += V::N) {
    const V v = load_cvt(x + d);
    vmax = max(vmax, abs(v));
    vbad = vbad + (v - v);
  }
  if (d < n) {
    const V v = load_cvt_partial(x + d, int(n - d));  // zero lanes past n
    vmax = max(vmax, abs(v));
    vbad = vbad + (v - v);
  }
  const float bad = vbad.hsum();
  return bad == 0.0f ? vmax.hmax() : bad;
}

// Quantizes x[0..n) into q[0..n); returns the scale (value = code * scale).
template <class S, class C>
inline float quantize_row(const S* x, int64_t n, C* q) {
  const float amax = row_absmax(x, n);
  const float scale = amax / CodeRange<C>::kMax;
  if (!(scale > 0.0f)) {  // zeros, an underflowing scale, or NaN (inf/NaN in the row)
    for (int64_t d = 0; d < n; ++d) store_code(0.0f, q + d);
    return scale == scale ? 0.0f : scale;
  }
  for (int64_t d = 0; d < n; ++d) store_code(to_f32(x[d]) / scale, q + d);
  return scale;
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
