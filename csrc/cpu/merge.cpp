// attnkit.merge_attention_states: N partial attention states (out_n, lse_n) over the same query
// rows -> one (params.h, MergeParams, says what is computed). Compiled once per ISA.
//
// Limits: memory-bound. A row reads N x Dv values and N lse values, writes Dv values and one
// lse; the arithmetic is one FMA per value read plus N exp per row. The kernel touches every
// value once (NumPy's expression of the same merge makes 3-4 passes over each part and
// allocates temporaries: bench/notes/ring.md, "merge_attention_states").
//
// Per row: the weights of the non-empty parts (lse > -inf) are computed once, in part order,
// into per-thread scratch; then the row is accumulated in registers over those parts in part
// order and written once. Rows are independent and each is done by one thread the same way
// whatever the split, so results do not depend on the thread count (ARCHITECTURE.md rule 6).
// Accumulation is fp32, fp64 when outs or lses are float64 (those rows run a scalar loop).
#include <math.h>

#include <type_traits>

#include "common.h"
#include "simd/vec.h"
#include "threading.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace {

using VF = Vec<float>;

template <class T>
double to_f64(T x) {
  if constexpr (std::is_same<T, double>::value) {
    return x;
  } else {
    return static_cast<double>(to_f32(x));
  }
}

template <class T>
void from_f64(double x, T* p) {
  if constexpr (std::is_same<T, double>::value) {
    *p = x;
  } else {
    from_f32(static_cast<float>(x), p);
  }
}

template <class A>
A exp_of(A x) {
  if constexpr (std::is_same<A, double>::value) {
    return exp(x);
  } else {
    return expf(x);
  }
}

template <class A>
A log_of(A x) {
  if constexpr (std::is_same<A, double>::value) {
    return log(x);
  } else {
    return logf(x);
  }
}

// The weights of one row: p[j] = w / sum w for the k non-empty parts idx[0..k), in part order.
// Returns the row's lse; sets *k = -1 for a NaN row (a NaN or +inf lse) and *k = 0 for an
// empty one (every lse -inf).
template <class L, class A>
A row_weights(const L* lse, int64_t ls, int64_t parts, int64_t* idx, A* p, int64_t* k) {
  constexpr A kNegInf = -__builtin_inf();
  constexpr A kInf = __builtin_inf();
  A m = kNegInf;
  for (int64_t n = 0; n < parts; ++n) {
    const A x = static_cast<A>(to_f64(lse[n * ls]));
    if (x != x || x == kInf) {  // NaN, or an lse no forward produces: the row is NaN
      *k = -1;
      return x - x;  // NaN
    }
    m = x > m ? x : m;
  }
  // -inf guard: every part is empty. Without it, exp(-inf - (-inf)) = NaN.
  if (m == kNegInf) {
    *k = 0;
    return kNegInf;
  }
  int64_t kk = 0;
  A s = 0;
  for (int64_t n = 0; n < parts; ++n) {
    const A x = static_cast<A>(to_f64(lse[n * ls]));
    if (x == kNegInf) continue;  // an empty part: its out row is never read
    const A w = exp_of(x - m);   // in (0, 1]; 1 for the largest
    idx[kk] = n;
    p[kk] = w;
    s += w;
    ++kk;
  }
  const A inv = A(1) / s;  // s >= 1
  for (int64_t j = 0; j < kk; ++j) p[j] *= inv;
  *k = kk;
  return m + log_of(s);
}

// out[0..dv) = sum_j p[j] * o[idx[j] * ps + ...] in fp32 registers, part order.
template <class T>
void row_sum_f32(const T* o, int64_t ps, const int64_t* idx, const float* p, int64_t k, int64_t dv,
                 T* out) {
  int64_t d = 0;
  for (; d + 4 * VF::N <= dv; d += 4 * VF::N) {
    VF a0 = VF::zero(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < k; ++j) {
      const T* src = o + idx[j] * ps + d;
      const VF w = VF::set1(p[j]);
      a0 = fma(load_cvt(src), w, a0);
      a1 = fma(load_cvt(src + VF::N), w, a1);
      a2 = fma(load_cvt(src + 2 * VF::N), w, a2);
      a3 = fma(load_cvt(src + 3 * VF::N), w, a3);
    }
    store_cvt(out + d, a0);
    store_cvt(out + d + VF::N, a1);
    store_cvt(out + d + 2 * VF::N, a2);
    store_cvt(out + d + 3 * VF::N, a3);
  }
  for (; d + VF::N <= dv; d += VF::N) {
    VF a = VF::zero();
    for (int64_t j = 0; j < k; ++j) a = fma(load_cvt(o + idx[j] * ps + d), VF::set1(p[j]), a);
    store_cvt(out + d, a);
  }
  if (d < dv) {
    const int r = int(dv - d);
    VF a = VF::zero();
    for (int64_t j = 0; j < k; ++j)
      a = fma(load_cvt_partial(o + idx[j] * ps + d, r), VF::set1(p[j]), a);
    store_cvt_partial(out + d, a, r);
  }
}

template <class T>
void row_sum_f64(const T* o, int64_t ps, const int64_t* idx, const double* p, int64_t k,
                 int64_t dv, T* out) {
  for (int64_t d = 0; d < dv; ++d) {
    double a = 0.0;
    for (int64_t j = 0; j < k; ++j) a += p[j] * to_f64(o[idx[j] * ps + d]);
    from_f64(a, out + d);
  }
}

template <class T>
void row_fill(T* out, int64_t dv, double value) {
  for (int64_t d = 0; d < dv; ++d) from_f64(value, out + d);
}

template <class T, class L>
Status merge_typed(const MergeParams& p) {
  // float64 anywhere: accumulate in float64 (rule 6), else fp32.
  using A = typename std::conditional<std::is_same<T, double>::value || std::is_same<L, double>::value,
                                      double, float>::type;
  int64_t rows = 1;
  for (int d = 0; d < p.outer_ndim; ++d) rows *= p.outer_shape[d];
  const int nt = threads_for(rows * p.parts * p.dv, p.num_threads);
  // Scratch, sized here: per thread, one part index and one weight per part.
  Scratch<int64_t> idx_all;
  Scratch<A> w_all;
  if (!idx_all.reset(size_t(nt) * size_t(p.parts)) || !w_all.reset(size_t(nt) * size_t(p.parts)))
    return Status::out_of_memory;  // nothing written yet
  const T* outs = static_cast<const T*>(p.outs);
  const L* lses = static_cast<const L*>(p.lses);
  T* out = static_cast<T*>(p.out);
  L* lse_out = static_cast<L*>(p.lse_out);
  parallel_team(nt, [&] {
    int64_t* idx = idx_all.get() + size_t(thread_id()) * size_t(p.parts);
    A* w = w_all.get() + size_t(thread_id()) * size_t(p.parts);
    int64_t begin, end;
    split_range(rows, team_size(), thread_id(), &begin, &end);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t oo = unravel_offset(r, p.outer_ndim, p.outer_shape, p.outs_outer_strides);
      const int64_t lo = unravel_offset(r, p.outer_ndim, p.outer_shape, p.lses_outer_strides);
      T* dst = out + unravel_offset(r, p.outer_ndim, p.outer_shape, p.out_outer_strides);
      L* lse_dst = lse_out + unravel_offset(r, p.outer_ndim, p.outer_shape, p.lse_out_outer_strides);
      int64_t k = 0;
      const A lse = row_weights<L, A>(lses + lo, p.lses_part_stride, p.parts, idx, w, &k);
      // Every read of this row is done before the writes below (in-place out = part 0).
      if (k < 0) {
        row_fill(dst, p.dv, double(lse));  // NaN
      } else if (k == 0) {
        row_fill(dst, p.dv, 0.0);
      } else if constexpr (std::is_same<A, float>::value) {
        row_sum_f32(outs + oo, p.outs_part_stride, idx, w, k, p.dv, dst);
      } else {
        row_sum_f64(outs + oo, p.outs_part_stride, idx, w, k, p.dv, dst);
      }
      from_f64(double(lse), lse_dst);
    }
  });
  return Status::ok;
}

template <class T>
Status merge_lse(const MergeParams& p) {
  switch (p.lse_dtype) {
    case DType::f32:
      return merge_typed<T, float>(p);
    case DType::f64:
      return merge_typed<T, double>(p);
    default:
      return Status::invalid_argument;
  }
}

}  // namespace

Status merge_attention_states(const MergeParams& p) {
  switch (p.out_dtype) {
    case DType::f32:
      return merge_lse<float>(p);
    case DType::f64:
      return merge_lse<double>(p);
    case DType::f16:
      return merge_lse<f16_t>(p);
    case DType::bf16:
      return merge_lse<bf16_t>(p);
    default:
      return Status::invalid_argument;
  }
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
