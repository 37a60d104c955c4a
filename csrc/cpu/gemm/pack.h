// Packing for the GEMM micro-kernel (BLIS style), with on-the-fly conversion of the storage
// type S (float, double, f16_t, bf16_t) to the compute type T (float or double).
//   B panel: kc x nr block -> [kc][NR], columns nr..NR zero-filled
//   A panel: m x kc block (m <= MR) -> [kc][MR], rows m..MR zero-filled
// Sources may have any strides; the contiguous cases are the fast ones.
#pragma once
#include <cstdint>
#include <type_traits>

#include "blocking.h"
#include "common.h"
#include "simd/scalar_cvt.h"
#include "simd/transpose.h"
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

// Packing A reads MR rows a stride apart, runs of KC values the hardware prefetchers pick up
// late: the pack loop asks for each row's data kPackAhead cache lines ahead.
constexpr int64_t kPackAhead = 8;

// NR unit-stride values of one row of B into a packed panel row.
template <class T, class S>
inline void pack_b_row(const S* src, T* d) {
  using V = Vec<T>;
  for (int j = 0; j < Blocking<T>::NR; j += V::N) {
    if constexpr (std::is_same<S, T>::value)
      V::load(src + j).store(d + j);
    else
      load_cvt(src + j).store(d + j);
  }
}

template <class T, class S>
inline void pack_b_panel(const S* b, int64_t rs_b, int64_t cs_b, int64_t kc, int nr, T* dst) {
  constexpr int NR = Blocking<T>::NR;
  if (cs_b == 1 && nr == NR) {
    for (int64_t k = 0; k < kc; ++k) pack_b_row<T, S>(b + k * rs_b, dst + k * NR);
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

// The panels of a kc x ncols block of B, one after the other (panel p at dst + p*kc*NR).
// Unit-stride rows are copied row by row across every full panel: one sequential stream per
// row, which the hardware prefetchers follow (panel by panel, each row is one 128-byte run a
// row stride from the last, which they do not: 8% of a 2048^3 product went to packing).
template <class T, class S>
inline void pack_b_block(const S* b, int64_t rs_b, int64_t cs_b, int64_t kc, int64_t ncols,
                         T* dst) {
  constexpr int NR = Blocking<T>::NR;
  const int64_t full = cs_b == 1 ? ncols / NR : 0;
  for (int64_t k = 0; full > 0 && k < kc; ++k)
    for (int64_t p = 0; p < full; ++p) pack_b_row<T, S>(b + k * rs_b + p * NR, dst + (p * kc + k) * NR);
  for (int64_t p = full; p * NR < ncols; ++p)
    pack_b_panel<T, S>(b + p * NR * cs_b, rs_b, cs_b, kc, int(imin(NR, ncols - p * NR)),
                       dst + p * kc * NR);
}

// N values of each of the m <= MR rows (row i at a + i * rs_a) into N packed k steps of MR
// values: one N x N register transpose (rows m.. are zero vectors, which zero-fill the
// panel's padding rows), then MR lanes stored per k. A scalar copy moved one element per load
// and store: ~5% of a 512^3 product at 2 threads (bench/notes/matmul.md, "A packing by
// register transposes").
template <class T>
inline void pack_a_block_t(const T* a, int64_t rs_a, int m, T* dst) {
  using V = Vec<T>;
  constexpr int MR = Blocking<T>::MR, N = V::N;
  static_assert(MR <= N, "the transpose holds the panel's rows");
  V v[N];
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) v[i] = i < m ? V::load(a + i * rs_a) : V::zero();
  transpose<T>(v);
#pragma GCC unroll 16
  for (int j = 0; j < N; ++j) v[j].store_partial(dst + j * MR, MR);
}

template <class T, class S>
inline void pack_a_panel(const S* a, int64_t rs_a, int64_t cs_a, int m, int64_t kc, T* dst) {
  constexpr int MR = Blocking<T>::MR;
  // fp32 from fp32 rows: whole lines by register transposes
  if constexpr (std::is_same<S, T>::value && std::is_same<T, float>::value &&
                Blocking<T>::MR <= Vec<T>::N && (64 / sizeof(T)) % Vec<T>::N == 0) {
    constexpr int64_t kLine = 64 / sizeof(T);
    if (cs_a == 1 && kc >= kLine) {
      const int64_t whole = kc / kLine * kLine;
      for (int64_t k0 = 0; k0 < whole; k0 += kLine) {
        const int64_t ahead = k0 + kPackAhead * kLine;
        for (int i = 0; i < m; ++i) {
          const S* row = a + i * rs_a;
          __builtin_prefetch(ahead < kc ? row + ahead : row + MR * rs_a + (ahead - kc), 0, 3);
        }
        for (int64_t k = k0; k < k0 + kLine; k += Vec<T>::N)
          pack_a_block_t<T>(a + k, rs_a, m, dst + k * MR);
      }
      for (int64_t k = whole; k < kc; ++k) {
        int i = 0;
        for (; i < m; ++i) dst[k * MR + i] = a[i * rs_a + k];
        for (; i < MR; ++i) dst[k * MR + i] = T(0);
      }
      return;
    }
  }
  if (cs_a == 1) {  // row-major: each row is contiguous along k
    // One cache line of every row at a time, the line kPackAhead lines ahead prefetched
    // (past the end of the row: the same row of the next panel, which the caller packs
    // next). Row after row, each row's misses were waited in turn: 6% of a 2048^3 product.
    constexpr int64_t kLine = 64 / sizeof(S);
    for (int64_t k0 = 0; k0 < kc; k0 += kLine) {
      const int64_t k1 = imin(kc, k0 + kLine), ahead = k0 + kPackAhead * kLine;
      for (int i = 0; i < m; ++i) {
        const S* row = a + i * rs_a;
        __builtin_prefetch(ahead < kc ? row + ahead : row + MR * rs_a + (ahead - kc), 0, 3);
        if (k1 - k0 == kLine) {  // a whole line: a fixed count, unrolled
#pragma GCC unroll 32
          for (int64_t k = k0; k < k0 + kLine; ++k) dst[k * MR + i] = load_as<T>(row + k);
        } else {
          for (int64_t k = k0; k < k1; ++k) dst[k * MR + i] = load_as<T>(row + k);
        }
      }
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
