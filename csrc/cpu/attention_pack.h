// Packing K and V rows of a key block for the GEMM micro-kernel (ARCHITECTURE.md rule 5), shared
// by the attention forward and backward: rows read N lanes at a time in the compute type
// (converted or dequantized on the way), K^T / V^T panels built with N x N register transposes
// (simd/transpose.h) instead of one scalar move per element.
#pragma once
#include <cstdint>
#include <type_traits>

#include "attention_common.h"
#include "simd/scalar_cvt.h"
#include "simd/transpose.h"
#include "simd/vec.h"
#if defined(ATTNKIT_ISA_AMX) || defined(ATTNKIT_ISA_AMX_EMULATED)
#include "gemm/ukernel_amx.h"  // defines ATTNKIT_AMX_TILES
#endif

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

// amx / amx_emulated: bf16 attention runs its GEMMs on AMX tiles (kTiles); every thread of a
// parallel region that may touch them holds a TileThread (simd/amx.h's TileScope).
#if defined(ATTNKIT_AMX_TILES)
constexpr bool kTiles = true;
using TileThread = TileScope;
#else
constexpr bool kTiles = false;
struct TileThread {
  TileThread() {}  // no tiles, nothing to configure
};
#endif

// One K or V row of a key block, read N lanes at a time in the compute type T: converted from
// half precision, or dequantized (codes times the row's scale) for 8-bit caches. A null row
// (keys past the block's end) reads as zeros.
template <class T, class S>
struct KvRow {
  const S* row = nullptr;
  T scale = T(0);  // 8-bit codes only: the row's scale times CodeUnit<S>::kUnscale
  Vec<T> load(int64_t d, int n) const {
    using V = Vec<T>;
    if (!row) return V::zero();
    if constexpr (is_code<S>)
      return (n == V::N ? load_code(row + d) : load_code_partial(row + d, n)) * V::set1(scale);
    else if constexpr (std::is_same<S, T>::value)
      return n == V::N ? V::load(row + d) : V::load_partial(row + d, n);
    else
      return n == V::N ? load_cvt(row + d) : load_cvt_partial(row + d, n);
  }
};

// Key j0 + jj of kv head g in sequence s, read from K (is_v false) or V: jj counts from the
// block's first key; from jj = bn on (past the block's keys) a null row, read as zeros.
template <class T, class S>
KvRow<T, S> kv_row(const AttentionParams& p, const SeqView& s, int64_t g, int64_t j0, int64_t jj,
                   int64_t bn, bool is_v) {
  KvRow<T, S> r;
  if (jj >= bn) return r;
  const int64_t j = j0 + jj;
  r.row = typed<S>(is_v ? p.v : p.k) + kv_offset(p, s, g, j, is_v ? p.v_stride : p.k_stride);
  if constexpr (is_code<S>) {
    const float* scales = is_v ? p.v_scale : p.k_scale;
    r.scale = T(scales[kv_offset(p, s, g, j, is_v ? p.v_scale_stride : p.k_scale_stride)] *
                CodeUnit<S>::kUnscale);
  }
  return r;
}

// Non-finite tracking for packed rows: summing x - x (0 for finite x, NaN for inf/NaN) over every
// packed vector leaves a NaN exactly when some value was inf or NaN.
template <class T>
struct NonfiniteSum {
  Vec<T> acc = Vec<T>::zero();
  bool any() const { return !(acc.hsum() == T(0)); }
};

// Row r's first n values, zero-padded to npad (a multiple of N), stored N lanes at a time at
// dst(d0) for d0 = 0, N, 2N, ...; every vector is added to the non-finite sum.
template <class T, class S, class DstFn>
inline void copy_row_padded(const KvRow<T, S>& r, int64_t n, int64_t npad, NonfiniteSum<T>& nf,
                            DstFn&& dst) {
  using V = Vec<T>;
  for (int64_t d0 = 0; d0 < npad; d0 += V::N) {
    const V x = d0 < n ? r.load(d0, int(imin(V::N, n - d0))) : V::zero();
    nf.acc = nf.acc + (x - x);
    x.store(dst(d0));
  }
}

// dst[0..n) = src[0..n) in the compute type T (converted from half precision).
template <class T, class S>
inline void convert_row(const S* src, int64_t n, T* dst) {
  using V = Vec<T>;
  KvRow<T, S> r;
  r.row = src;
  for (int64_t d = 0; d < n; d += V::N) {
    const int w = int(imin(V::N, n - d));
    const V x = r.load(d, w);
    if (w == V::N)
      x.store(dst + d);
    else
      x.store_partial(dst + d, w);
  }
}

// dst[0..n) = src[0..n) * f, stored as S (rounded to nearest even for half precision, as
// from_f32).
template <class T, class S>
inline void store_row_scaled(const T* src, T f, int64_t n, S* dst) {
  using V = Vec<T>;
  const V vf = V::set1(f);
  for (int64_t d = 0; d < n; d += V::N) {
    const int w = int(imin(V::N, n - d));
    const V x = (w == V::N ? V::load(src + d) : V::load_partial(src + d, w)) * vf;
    if constexpr (std::is_same<S, T>::value) {
      if (w == V::N)
        x.store(dst + d);
      else
        x.store_partial(dst + d, w);
    } else {
      if (w == V::N)
        store_cvt(dst + d, x);
      else
        store_cvt_partial(dst + d, x, w);
    }
  }
}

// Rows 0..nrows (nrows a multiple of N; row(j) gives a KvRow, a null one reads as zeros) written
// transposed into NR-row panels: element (row j, dim d) at dst[(j / NR) * D * NR + d * NR + j % NR].
template <class T, int NR, class RowFn>
inline void pack_panels_transposed(int64_t nrows, int64_t D, T* dst, RowFn&& row) {
  using V = Vec<T>;
  constexpr int N = V::N;
  static_assert(NR % N == 0, "a panel is a whole number of N-row groups");
  for (int64_t r0 = 0; r0 < nrows; r0 += N) {
    decltype(row(r0)) rows[N];
    for (int i = 0; i < N; ++i) rows[i] = row(r0 + i);
    T* panel = dst + (r0 / NR) * D * NR + r0 % NR;
    for (int64_t d0 = 0; d0 < D; d0 += N) {
      const int n = int(imin(N, D - d0));
      V x[N];
      for (int i = 0; i < N; ++i) x[i] = rows[i].load(d0, n);
      transpose<T>(x);
      for (int t = 0; t < n; ++t) x[t].store(panel + (d0 + t) * NR);
    }
  }
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
