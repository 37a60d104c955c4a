// Vectorized transcendental functions written once over the SIMD vocabulary (vec.h).
#pragma once
#include "vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

// exp(x) in fp32, about 1 ulp over the normal range (Cephes-style: x = n*ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial for e^r, then scaling by 2^n in the exponent field).
//   x < -86.64          -> exactly 0 (the true value is below 2^-125; -inf gives 0)
//   x > 88.376          -> clamped (the true value overflows fp32 soon after)
//   NaN                 -> NaN (the clamps keep NaN because x is the second operand)
inline Vec<float> vexp(Vec<float> x) {
  using V = Vec<float>;
  const V hi = V::set1(88.3762626647949f), lo = V::set1(-86.64f);
  V xc = max(lo, min(hi, x));
  V n = (xc * V::set1(1.44269504088896341f)).round();
  // r = x - n*ln2, with ln2 split in two parts so n*ln2_hi is exact.
  V r = fnma(n, V::set1(0.693359375f), xc);
  r = fnma(n, V::set1(-2.12194440e-4f), r);
  V p = V::set1(1.9875691500e-4f);
  p = fma(p, r, V::set1(1.3981999507e-3f));
  p = fma(p, r, V::set1(8.3334519073e-3f));
  p = fma(p, r, V::set1(4.1665795894e-2f));
  p = fma(p, r, V::set1(1.6666665459e-1f));
  p = fma(p, r, V::set1(5.0000001201e-1f));
  V y = fma(p * r, r, r + V::set1(1.0f));
  // y * 2^n; n may be 128 at the top of the range (scale_pow2 handles it).
  V res = V::scale_pow2(y, n);
  return select(x < lo, V::zero(), res);
}

// tanh(x) in fp32, a few ulp: an odd polynomial for |x| < 0.625 (no cancellation near 0),
// else 1 - 2 / (exp(2|x|) + 1) with the sign restored. NaN -> NaN, +-inf -> +-1.
inline Vec<float> vtanh(Vec<float> x) {
  using V = Vec<float>;
  V ax = abs(x);
  V z = x * x;
  V p = V::set1(-5.70498872745e-3f);
  p = fma(p, z, V::set1(2.06390887954e-2f));
  p = fma(p, z, V::set1(-5.37397155531e-2f));
  p = fma(p, z, V::set1(1.33314422036e-1f));
  p = fma(p, z, V::set1(-3.33332819422e-1f));
  V small = fma(p * z, x, x);
  V e = vexp(min(V::set1(40.0f), ax + ax));  // tanh(20) == 1 in fp32
  V big = V::set1(1.0f) - V::set1(2.0f) / (e + V::set1(1.0f));
  big = select(x < V::zero(), V::zero() - big, big);
  return select(ax < V::set1(0.625f), small, select(is_nan(x), x, big));
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
