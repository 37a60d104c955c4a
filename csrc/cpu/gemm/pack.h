// Packing for the GEMM micro-kernel (BLIS style), with on-the-fly conversion of the storage
// type S (float, double, f16_t, bf16_t) to the compute type T (float or double).
//   B panel: kc x nr block -> [kc][NR], columns nr..NR zero-filled
//   A panel: m x kc block (m <= MR) -> [kc][MR], rows m..MR zero-filled
// Sources may have any strides; the contiguous cases are the fast ones.
#pragma once
#include <cstdint>
#include <type_traits>

#include "blocking.h"
#include "simd/scalar_cvt.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

template <class T, class S>
inline T load_as(const S* p) {
  if constexpr (std::is_same<S, T>::value)
    return *p;
  else
    return static_cast<T>(to_f32(*p));
}

template <class T, class S>
inline void store_as(T v, S* p) {
  if constexpr (std::is_same<S, T>::value)
    *p = v;
  else
    from_f32(static_cast<float>(v), p);
}

template <class T, class S>
inline void pack_b_panel(const S* b, int64_t rs_b, int64_t cs_b, int64_t kc, int nr, T* dst) {
  constexpr int NR = Blocking<T>::NR;
  using V = Vec<T>;
  if (cs_b == 1 && nr == NR) {
    for (int64_t k = 0; k < kc; ++k) {
      const S* src = b + k * rs_b;
      T* d = dst + k * NR;
      if constexpr (std::is_same<S, T>::value) {
        for (int j = 0; j < NR; j += V::N) V::load(src + j).store(d + j);
      } else {
        for (int j = 0; j < NR; j += V::N) load_cvt(src + j).store(d + j);
      }
    }
    return;
  }
  if (cs_b == 1) {
    for (int64_t k = 0; k < kc; ++k) {
      int j = 0;
      for (; j < nr; ++j) dst[k * NR + j] = load_as<T>(b + k * rs_b + j);
      for (; j < NR; ++j) dst[k * NR + j] = T(0);
    }
    return;
  }
  // Strided columns (e.g. a transposed view, rs_b == 1): walk each column along k.
  for (int j = 0; j < nr; ++j) {
    const S* col = b + j * cs_b;
    for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = load_as<T>(col + k * rs_b);
  }
  for (int64_t k = 0; k < kc; ++k)
    for (int j = nr; j < NR; ++j) dst[k * NR + j] = T(0);
}

template <class T, class S>
inline void pack_a_panel(const S* a, int64_t rs_a, int64_t cs_a, int m, int64_t kc, T* dst) {
  constexpr int MR = Blocking<T>::MR;
  if (cs_a == 1) {  // row-major: each row is contiguous along k
    for (int i = 0; i < m; ++i) {
      const S* row = a + i * rs_a;
      for (int64_t k = 0; k < kc; ++k) dst[k * MR + i] = load_as<T>(row + k);
    }
  } else {
    for (int64_t k = 0; k < kc; ++k)
      for (int i = 0; i < m; ++i) dst[k * MR + i] = load_as<T>(a + i * rs_a + k * cs_a);
  }
  if (m < MR)
    for (int64_t k = 0; k < kc; ++k)
      for (int i = m; i < MR; ++i) dst[k * MR + i] = T(0);
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
