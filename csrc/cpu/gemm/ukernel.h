// The MR x NR register-blocked micro-kernel (ARCHITECTURE.md rule 5): one per ISA, generated from the
// SIMD vocabulary. Matmul and attention (S = Q K^T, O += P V) both run on it.
//
//   C[0:M, 0:nr] (+)= A[0:M, 0:kc] * B[0:kc, 0:NR]
//
// A is either packed (micro-panel: element (i, k) at a[k*MR + i]) or row-major with row
// stride rs_a (element (i, k) at a[i*rs_a + k]); B is NR contiguous values per k, k-th row at
// b + k*ldb (a packed panel has ldb = NR; a row-major matrix can be used in place). C is
// row-major with row stride ldc. M <= MR rows are computed (compile-time, so the M edge
// never reads A out of bounds); only the first nr <= NR columns of C are read or written.
// accumulate=false overwrites C without reading it (C may hold garbage or NaN).
#pragma once
#include <cstdint>

#include "blocking.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

template <class T, int M, bool kPackedA>
inline void ukernel(int64_t kc, const T* __restrict a, int64_t rs_a, const T* __restrict b,
                    int64_t ldb, T* __restrict c, int64_t ldc, bool accumulate, int nr) {
  using V = Vec<T>;
  constexpr int MR = Blocking<T>::MR;
  constexpr int NV = Blocking<T>::NR / V::N;
  // Every loop over i and v is fully unrolled, so the accumulators never need an address
  // (one loop left rolled makes GCC spill all of them on every k step).
  V acc[M][NV];
  // The C tile is read (or written) once, after kc steps: fetch its lines now so the
  // write-back does not wait on them (C rows are ldc apart; no hardware prefetcher follows;
  // a large C comes from L3 on every k-pass). A short pass (skinny products' k-blocks of
  // 8-16) is left to out-of-order execution, which overlaps its C loads with the next call:
  // there the prefetches were +5% instructions for no measurable gain (bench/notes/matmul.md,
  // "fp32 GEMM on Emerald Rapids").
  if (kc >= 64) {
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      __builtin_prefetch(c + i * ldc, 1, 3);
      __builtin_prefetch(c + i * ldc + Blocking<T>::NR - 1, 1, 3);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + k * ldb + v * V::N);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      const V ai = kPackedA ? V::broadcast(a + k * MR + i) : V::broadcast(a + i * rs_a + k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = fma(ai, bv[v], acc[i][v]);
    }
  }
  if (nr == Blocking<T>::NR) {
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      T* ci = c + i * ldc;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (accumulate) acc[i][v] = acc[i][v] + V::load(ci + v * V::N);
        acc[i][v].store(ci + v * V::N);
      }
    }
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
    T* ci = c + i * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int left = nr - v * V::N;
      if (left <= 0) break;
      const int w = left < V::N ? left : V::N;
      if (accumulate) acc[i][v] = acc[i][v] + V::load_partial(ci + v * V::N, w);
      acc[i][v].store_partial(ci + v * V::N, w);
    }
  }
}

// Runtime row count -> the compile-time instantiation.
template <class T, bool kPackedA>
inline void ukernel_rows(int m, int64_t kc, const T* a, int64_t rs_a, const T* b, int64_t ldb,
                         T* c, int64_t ldc, bool accumulate, int nr) {
  constexpr int MR = Blocking<T>::MR;
  static_assert(MR <= 16, "extend the switch below");
#define ATTNKIT_UK_CASE(r)                                                          \
  case r:                                                                           \
    if constexpr (r <= MR) ukernel<T, r, kPackedA>(kc, a, rs_a, b, ldb, c, ldc, accumulate, nr); \
    return;
  switch (m) {
    ATTNKIT_UK_CASE(1)
    ATTNKIT_UK_CASE(2)
    ATTNKIT_UK_CASE(3)
    ATTNKIT_UK_CASE(4)
    ATTNKIT_UK_CASE(5)
    ATTNKIT_UK_CASE(6)
    ATTNKIT_UK_CASE(7)
    ATTNKIT_UK_CASE(8)
    ATTNKIT_UK_CASE(9)
    ATTNKIT_UK_CASE(10)
    ATTNKIT_UK_CASE(11)
    ATTNKIT_UK_CASE(12)
    ATTNKIT_UK_CASE(13)
    ATTNKIT_UK_CASE(14)
    ATTNKIT_UK_CASE(15)
    ATTNKIT_UK_CASE(16)
    default:
      return;
  }
#undef ATTNKIT_UK_CASE
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
