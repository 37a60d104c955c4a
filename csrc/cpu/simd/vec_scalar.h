// Portable implementation of the SIMD vocabulary (see vec.h): short fixed-size arrays that the
// compiler may auto-vectorize (SSE2 on x86-64, NEON on aarch64) without any -m flag. This is
// the baseline every CPU can run. Included by vec.h inside the per-ISA namespace.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attnkit/dtype.h"
#include "scalar_cvt.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {


template <class T>
struct Vec;

// Lane-wise loops over a small array; NaN rules copy x86's (see vec.h).
template <class T, int L>
struct VecArray {
  static constexpr int N = L;
  T v[L];

  struct Mask {
    bool m[L];
  };
  using Self = Vec<T>;

  static inline Self load(const T* p) {
    Self r;
    for (int i = 0; i < L; ++i) r.v[i] = p[i];
    return r;
  }
  static inline Self broadcast(const T* p) { return set1(*p); }
  static inline Self set1(T x) {
    Self r;
    for (int i = 0; i < L; ++i) r.v[i] = x;
    return r;
  }
  static inline Self zero() { return set1(T(0)); }
  inline void store(T* p) const {
    for (int i = 0; i < L; ++i) p[i] = v[i];
  }
  static inline Self load_partial(const T* p, int n) {
    Self r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = p[i];
    return r;
  }
  inline void store_partial(T* p, int n) const {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
#define ATTNKIT_LANEWISE(op)                        \
  friend inline Self operator op(Self a, Self b) {  \
    Self r;                                         \
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] op b.v[i]; \
    return r;                                       \
  }
  ATTNKIT_LANEWISE(+)
  ATTNKIT_LANEWISE(-)
  ATTNKIT_LANEWISE(*)
  ATTNKIT_LANEWISE(/)
#undef ATTNKIT_LANEWISE
  // Separate multiply and add (no contraction guarantee); fine for a baseline.
  friend inline Self fma(Self a, Self b, Self c) {
    Self r;
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  friend inline Self fnma(Self a, Self b, Self c) {
    Self r;
    for (int i = 0; i < L; ++i) r.v[i] = c.v[i] - a.v[i] * b.v[i];
    return r;
  }
  // x86 rule: if either is NaN, b is returned.
  friend inline Self max(Self a, Self b) {
    Self r;
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  friend inline Self min(Self a, Self b) {
    Self r;
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  friend inline Self abs(Self a) {
    Self r;
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] < 0 ? -a.v[i] : (a.v[i] == 0 ? T(0) : a.v[i]);
    return r;
  }
#define ATTNKIT_COMPARE(op)                         \
  friend inline Mask operator op(Self a, Self b) {  \
    Mask r;                                         \
    for (int i = 0; i < L; ++i) r.m[i] = a.v[i] op b.v[i]; \
    return r;                                       \
  }
  ATTNKIT_COMPARE(<)
  ATTNKIT_COMPARE(<=)
  ATTNKIT_COMPARE(==)
#undef ATTNKIT_COMPARE
  friend inline Mask is_nan(Self a) {
    Mask r;
    for (int i = 0; i < L; ++i) r.m[i] = a.v[i] != a.v[i];
    return r;
  }
  friend inline Mask operator|(Mask a, Mask b) {
    Mask r;
    for (int i = 0; i < L; ++i) r.m[i] = a.m[i] || b.m[i];
    return r;
  }
  friend inline Mask operator&(Mask a, Mask b) {
    Mask r;
    for (int i = 0; i < L; ++i) r.m[i] = a.m[i] && b.m[i];
    return r;
  }
  friend inline bool any(Mask a) {
    bool r = false;
    for (int i = 0; i < L; ++i) r = r || a.m[i];
    return r;
  }
  friend inline uint32_t lane_bits(Mask a) {
    uint32_t r = 0;
    for (int i = 0; i < L; ++i) r |= uint32_t(a.m[i]) << i;
    return r;
  }
  friend inline Self select(Mask m, Self a, Self b) {
    Self r;
    for (int i = 0; i < L; ++i) r.v[i] = m.m[i] ? a.v[i] : b.v[i];
    return r;
  }
  // Pairwise order, like the SIMD variants.
  inline T hsum() const {
    T t[L];
    for (int i = 0; i < L; ++i) t[i] = v[i];
    for (int w = L / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) t[i] = t[i] + t[i + w];
    return t[0];
  }
  inline T hmax() const {
    T t = v[0];
    for (int i = 1; i < L; ++i) t = t > v[i] ? t : v[i];
    return t;
  }
};

template <>
struct Vec<float> : VecArray<float, 4> {
  inline void stream(float* p) const { store(p); }
  inline Vec round() const {
    Vec r;
    for (int i = 0; i < N; ++i) r.v[i] = nearbyintf(v[i]);
    return r;
  }
  // y * 2^n for integral n in [-125, 128]: (2y) * 2^(n-1), as vec_avx2.h.
  static inline Vec scale_pow2(Vec y, Vec n) {
    Vec r;
    for (int i = 0; i < N; ++i)
      r.v[i] = (y.v[i] + y.v[i]) *
               bits_f32(static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 126) << 23);
    return r;
  }
  static inline Vec iota(float base) {
    Vec r;
    for (int i = 0; i < N; ++i) r.v[i] = base + static_cast<float>(i);
    return r;
  }
};

template <>
struct Vec<double> : VecArray<double, 2> {};

inline void stream_fence() {}

// out[0..3] = the sums of a, b, c, d's lanes.
inline void hsum4(Vec<float> a, Vec<float> b, Vec<float> c, Vec<float> d, float* out) {
  out[0] = a.hsum();
  out[1] = b.hsum();
  out[2] = c.hsum();
  out[3] = d.hsum();
}

// ---- storage conversions ----
inline Vec<float> load_cvt(const float* p) { return Vec<float>::load(p); }
inline Vec<float> load_cvt(const f16_t* p) {
  Vec<float> r;
  for (int i = 0; i < Vec<float>::N; ++i) r.v[i] = f16_to_f32(p[i].bits);
  return r;
}
inline Vec<float> load_cvt(const bf16_t* p) {
  Vec<float> r;
  for (int i = 0; i < Vec<float>::N; ++i) r.v[i] = bf16_to_f32(p[i].bits);
  return r;
}
inline void store_cvt(float* p, Vec<float> x) { x.store(p); }
inline void store_cvt(f16_t* p, Vec<float> x) {
  for (int i = 0; i < Vec<float>::N; ++i) p[i].bits = f32_to_f16(x.v[i]);
}
inline void store_cvt(bf16_t* p, Vec<float> x) {
  for (int i = 0; i < Vec<float>::N; ++i) p[i].bits = f32_to_bf16(x.v[i]);
}
// ---- 8-bit KV codes -> fp32 (value x CodeUnit<T>::kLoaded, as the SIMD variants) ----
inline Vec<float> load_code(const int8_t* p) {
  Vec<float> r;
  for (int i = 0; i < Vec<float>::N; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
constexpr bool kHasE4m3Finite = false;  // (vec_avx512.h: e4m3 rows without NaN codes)
bool e4m3_row_has_nan(const f8e4m3_t* p, int64_t n);                 // named only
void load_code_pair_finite(const f8e4m3_t* p, Vec<float>& a, Vec<float>& b);  // named only
inline Vec<float> load_code(const f8e4m3_t* p) {
  Vec<float> r;
  for (int i = 0; i < Vec<float>::N; ++i) r.v[i] = f8e4m3_to_f32(p[i].bits) * CodeUnit<f8e4m3_t>::kLoaded;
  return r;
}
template <class T>
inline void load_code_pair(const T* p, Vec<float>& a, Vec<float>& b) {
  a = load_code(p);
  b = load_code(p + Vec<float>::N);
}
template <class T>
inline Vec<float> load_code_partial(const T* p, int n) {
  T tmp[Vec<float>::N];
  std::memset(tmp, 0, sizeof(tmp));
  std::memcpy(tmp, p, sizeof(T) * n);
  return load_code(tmp);
}
template <class T>
inline Vec<float> load_cvt_partial(const T* p, int n) {
  T tmp[Vec<float>::N];
  std::memset(tmp, 0, sizeof(tmp));
  std::memcpy(tmp, p, sizeof(T) * n);
  return load_cvt(tmp);
}
template <class T>
inline void store_cvt_partial(T* p, Vec<float> x, int n) {
  T tmp[Vec<float>::N];
  store_cvt(tmp, x);
  std::memcpy(p, tmp, sizeof(T) * n);
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
