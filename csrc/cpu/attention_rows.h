// The per-row half of attention: the score pipeline (attention_common.h) applied to one row
// of a score tile, fused with the online-softmax update. Shared by the prefill tile kernel
// (attention_fwd.cpp) and the decode kernel (attention_decode.cpp), so both compute exactly
// the same thing. Per-ISA namespace.
#pragma once
#include <math.h>

#include <cstdint>

#include "attention_common.h"
#include "attnkit/philox.h"
#include "simd/math.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

// The score pipeline and online-softmax update of one row of the S tile (see
// attention_common.h for the order of operations). Returns nothing; updates m, l, the O row,
// and leaves P = exp(S - m_new) in srow[0..bn).
//
// Non-finite values: the row state carries them the way torch's softmax does. A NaN or +inf
// score among the allowed keys makes exp(s - m) NaN, so l becomes NaN and stays NaN (NaN * 0
// is NaN), and the final out = O / l and lse = m + log l are NaN. No per-element test is
// needed for that, and m need not hold the NaN (l does). The one place a NaN could be lost
// is the -inf guard below (the vectorized max may drop a NaN lane: x86 max returns its second
// operand when either is NaN, so m_new can stay -inf), so the guard looks at the lanes it
// zeroes. Masked keys are -inf before the exp and give P = 0.
// T: float, or double for float64 inputs (the mask row too, so a float64 mask keeps its
// precision).
template <class T>
struct RowCtx {
  double scale, softcap, inv_softcap, slope;  // double for the float64 path; fp32 rounds once
  double c;       // i + off
  int64_t j0, bn;
  int64_t lo, hi;  // allowed keys of this row
  bool bounds;     // some key of the block may be outside [lo, hi]
  const T* add;    // mask row (additive, -inf = masked) or nullptr
  bool float_mask;
};

// The RowCtx of query row i of head h against keys j0..j0+bn. The mask row goes to add_buf;
// fill_mask=false keeps what add_buf already holds (a mask broadcast over rows is the same
// for every row of a block).
template <class T>
inline RowCtx<T> row_ctx(const AttentionParams& p, const SeqView& s, int64_t h, int64_t i,
                         int64_t j0, int64_t bn, T* add_buf, bool fill_mask = true) {
  RowCtx<T> rc;
  rc.scale = p.scale;
  rc.softcap = p.softcap;
  rc.inv_softcap = p.softcap > 0.0 ? 1.0 / p.softcap : 0.0;
  rc.slope = alibi_slope(p, s.b, h);
  rc.float_mask = p.mask && p.mask_dtype != DType::boolean;
  const KeyRange kr = key_range(p, s, i);
  rc.lo = kr.lo;
  rc.hi = kr.hi;
  rc.j0 = j0;
  rc.bn = bn;
  rc.bounds = kr.lo > j0 || kr.hi < j0 + bn - 1;
  rc.c = double(i + s.off);
  rc.add = nullptr;
  if (p.mask) {
    if (fill_mask) mask_row(p, s.b, h, i, j0, bn, add_buf);
    rc.add = add_buf;
  }
  return rc;
}

// The -inf guard: no key allowed so far gave a finite score (m_new == -inf), so exp(s - m)
// would be exp(-inf + inf) = NaN. Such a block contributes nothing: P = 0, and m and O stay.
// A NaN lane (which the max reduction may have dropped) must still poison the row: l = NaN.
// Out of line (and cold): inlined into the row updates it grew their prologues, a measurable
// cost per call on the hot path (callgrind) for a branch that is rarely taken.
template <class T>
__attribute__((noinline, cold)) void guard_row(T* srow, int64_t bn, T* l) {
  bool nan = false;
  for (int64_t j = 0; j < bn; ++j) {
    nan |= srow[j] != srow[j];
    srow[j] = T(0);
  }
  if (nan) *l = T(__builtin_nan(""));
}

// No modifier and a positive scale: max(scale * s) = scale * max(s), and exp(scale*s - m)
// takes one FMA, so the scores are read twice instead of written back and read again.
inline bool plain_row(const RowCtx<float>& rc) {
  return rc.softcap == 0.0 && rc.slope == 0.0 && !rc.bounds && !rc.add && rc.scale > 0.0 &&
         rc.bn % Vec<float>::N == 0;
}

inline void row_update_plain(const RowCtx<float>& rc, float* srow, float* m, float* l,
                             float* orow, int64_t dvp) {
  using V = Vec<float>;
  V vmax0 = V::set1(kNegInfF), vmax1 = vmax0;
  int64_t j = 0;
  for (; j + 2 * V::N <= rc.bn; j += 2 * V::N) {
    vmax0 = max(vmax0, V::load(srow + j));
    vmax1 = max(vmax1, V::load(srow + j + V::N));
  }
  for (; j < rc.bn; j += V::N) vmax0 = max(vmax0, V::load(srow + j));
  const float m_old = *m;
  const float bmax = max(vmax0, vmax1).hmax() * float(rc.scale);
  const float m_new = bmax > m_old ? bmax : m_old;
  // No key is masked here, but every score can still be -inf (an -inf input) or NaN: the guard.
  if (m_new == kNegInfF) return guard_row(srow, rc.bn, l);
  const V vscale = V::set1(float(rc.scale)), vneg_m = V::set1(-m_new);
  V vsum0 = V::zero(), vsum1 = V::zero();
  for (j = 0; j + 2 * V::N <= rc.bn; j += 2 * V::N) {
    const V e0 = vexp(fma(V::load(srow + j), vscale, vneg_m));
    const V e1 = vexp(fma(V::load(srow + j + V::N), vscale, vneg_m));
    e0.store(srow + j);
    e1.store(srow + j + V::N);
    vsum0 = vsum0 + e0;
    vsum1 = vsum1 + e1;
  }
  for (; j < rc.bn; j += V::N) {
    const V e0 = vexp(fma(V::load(srow + j), vscale, vneg_m));
    e0.store(srow + j);
    vsum0 = vsum0 + e0;
  }
  // expf(0) is 1 exactly: the libm call is skipped for the (usual) block that leaves m as it was
  const float alpha = m_new == m_old ? 1.0f : expf(m_old - m_new);
  *l = *l * alpha + (vsum0 + vsum1).hsum();
  *m = m_new;
  if (alpha != 1.0f) {
    const V va = V::set1(alpha);
    for (int64_t d = 0; d < dvp; d += V::N) (V::load(orow + d) * va).store(orow + d);
  }
}

// Steps 1-5 of the score pipeline on srow[0..bn) (raw q.k in, final scores out); lanes past bn
// become -inf. Returns the row max (a NaN may or may not surface in it; exp() then spreads it).
inline float score_row(const RowCtx<float>& rc, float* srow) {
  using V = Vec<float>;
  const V vscale = V::set1(float(rc.scale)), ninf = V::set1(kNegInfF);
  const V vlo = V::set1(float(rc.lo - rc.j0)), vhi = V::set1(float(rc.hi - rc.j0));
  const V vc = V::set1(float(rc.c - double(rc.j0)));
  // The row's options as locals: read from rc inside the loop, the compiler reloaded and
  // re-tested them every vector (the stores to srow may alias rc as far as it knows).
  const bool softcap = rc.softcap > 0.0, alibi = rc.slope != 0.0, bounds = rc.bounds;
  const bool float_mask = rc.float_mask;
  const float* add = rc.add;
  const int64_t bn = rc.bn;
  const V vcap = V::set1(float(rc.softcap)), vinv_cap = V::set1(float(rc.inv_softcap));
  const V vslope = V::set1(float(rc.slope));
  V vmax = ninf;
  for (int64_t j = 0; j < bn; j += V::N) {
    const int w = int(imin(V::N, bn - j));
    V x = V::load(srow + j) * vscale;
    if (softcap) x = vcap * vtanh(x * vinv_cap);
    const V jv = V::iota(float(j));  // key index relative to j0
    if (alibi) x = fnma(vslope, abs(vc - jv), x);
    if (bounds) x = select((jv < vlo) | (vhi < jv), ninf, x);
    if (add) {
      const V a = w == V::N ? V::load(add + j) : V::load_partial(add + j, w);
      x = float_mask ? select(a == ninf, ninf, x + a) : select(a == ninf, ninf, x);
    }
    if (w < V::N) x = select(jv < V::set1(float(bn)), x, ninf);
    x.store(srow + j);  // the tile is padded to a whole number of vectors
    vmax = max(vmax, x);
  }
  return vmax.hmax();
}

inline void row_update(const RowCtx<float>& rc, float* srow, float* m, float* l, float* orow,
                       int64_t dvp) {
  using V = Vec<float>;
  if (plain_row(rc)) return row_update_plain(rc, srow, m, l, orow, dvp);
  const float m_old = *m;
  const float bmax = score_row(rc, srow);
  const float m_new = bmax > m_old ? bmax : m_old;
  // While every key seen so far is masked, m stays -inf: the guard.
  if (m_new == kNegInfF) return guard_row(srow, rc.bn, l);
  const V vm = V::set1(m_new);
  V vsum = V::zero();
  for (int64_t j = 0; j < rc.bn; j += V::N) {
    V e = vexp(V::load(srow + j) - vm);
    if (rc.bn - j < V::N) e = select(V::iota(float(j)) < V::set1(float(rc.bn)), e, V::zero());
    e.store(srow + j);
    vsum = vsum + e;
  }
  // 0 on the first unmasked block (m_old = -inf); expf(0) = 1 exactly, without the call
  const float alpha = m_new == m_old ? 1.0f : expf(m_old - m_new);
  *l = *l * alpha + vsum.hsum();
  *m = m_new;
  if (alpha != 1.0f) {
    const V va = V::set1(alpha);
    for (int64_t d = 0; d < dvp; d += V::N) (V::load(orow + d) * va).store(orow + d);
  }
}

// fp64 rows: the same pipeline, scalar (float64 is the correctness path, e.g. gradcheck).
inline double score_row(const RowCtx<double>& rc, double* srow) {
  double vmax = -__builtin_inf();
  for (int64_t j = 0; j < rc.bn; ++j) {
    double x = srow[j] * rc.scale;
    if (rc.softcap > 0.0) x = rc.softcap * tanh(x / rc.softcap);
    if (rc.slope != 0.0) x -= rc.slope * fabs(rc.c - double(rc.j0 + j));
    const int64_t jg = rc.j0 + j;
    if (rc.bounds && (jg < rc.lo || jg > rc.hi)) x = -__builtin_inf();
    if (rc.add) {
      const double a = rc.add[j];
      if (a == -__builtin_inf())
        x = -__builtin_inf();
      else if (rc.float_mask)
        x += a;
    }
    srow[j] = x;
    vmax = x > vmax ? x : vmax;
  }
  return vmax;
}

inline void row_update(const RowCtx<double>& rc, double* srow, double* m, double* l,
                       double* orow, int64_t dvp) {
  const double vmax = score_row(rc, srow);
  const double m_old = *m, m_new = vmax > m_old ? vmax : m_old;
  if (m_new == -__builtin_inf()) return guard_row(srow, rc.bn, l);  // as in the fp32 path
  double sum = 0.0;
  for (int64_t j = 0; j < rc.bn; ++j) {
    srow[j] = exp(srow[j] - m_new);
    sum += srow[j];
  }
  const double alpha = exp(m_old - m_new);
  *l = *l * alpha + sum;
  *m = m_new;
  if (alpha != 1.0)
    for (int64_t d = 0; d < dvp; ++d) orow[d] *= alpha;
}

// Dropout on a row of P (after the softmax update, which keeps the undropped sum in l):
// kept entries are scaled by 1 / (1 - p), dropped ones become 0.
template <class T>
inline void dropout_row_apply(const AttentionParams& p, int64_t b, int64_t h, int64_t i,
                              int64_t j0, int64_t n, T* srow, uint8_t* keep) {
  const DropoutRow dr = dropout_row(p.dropout_seed, p.dropout_offset, b, h, p.num_heads, i, float(p.dropout_p));
  dropout_keep(dr, j0, n, keep);
  const T inv = T(1) / (T(1) - T(p.dropout_p));
  for (int64_t j = 0; j < n; ++j) srow[j] = keep[j] ? srow[j] * inv : T(0);
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
