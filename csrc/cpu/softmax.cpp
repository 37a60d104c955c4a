// softmax along one axis. Compiled once per ISA (see vec.h).
//
// Limits (4096 x 4096 fp32, the bench case): 64 MB in + 64 MB out and one exp per element.
// The exp costs about 0.6 cycle/element per core, far under the ~4 ms the 128 MB of traffic
// take, so the kernel is memory-bound and is built to touch memory once each way:
//   pass 1  max over the chunk        (reads x from memory, which leaves it in L1)
//   pass 2  e = exp(x - max), sum     (reads x from L1, writes e to an L1 scratch)
//   pass 3  out = e / sum             (non-temporal stores when the output is large, so the
//                                      cache lines of `out` are never read: no RFO traffic)
//
// Rows longer than kChunk are cut into fixed chunks. Each chunk gets its own (max, sum) and
// leaves exp(x - max_c) in out (fp32) ; the row combines the stats in chunk order and a last
// pass multiplies by exp(max_c - M) / S (half types recompute the exp instead).
// Chunk boundaries depend only on n, so a long row split over threads gives the same bits as
// a row done by one thread (ARCHITECTURE.md rule 6).
//
// Layouts: contiguous rows take the paths above; a strided softmax axis with a contiguous
// other axis ("lanes", e.g. axis=0 of a C-contiguous matrix) runs vectorized across lanes;
// anything else gathers each chunk into scratch. Nothing is copied outside the kernel.
#include <math.h>

#include <atomic>
#include <type_traits>

#include "cache_sizes.h"
#include "common.h"
#include "debug.h"
#include "simd/math.h"
#include "simd/vec.h"
#include "threading.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace {

using VF = Vec<float>;

// 4096 fp32 = 16 KB: pass 2 re-reads the chunk from the 32 KB L1d, beside 16 KB of e.
constexpr int64_t kChunk = 4096;
// Outputs are written with non-temporal stores when input and output together fill the
// last-level cache (cache_sizes.h): they would evict each other anyway. Below that the output
// is likely read again soon from the cache, so normal stores are the better choice. Never into
// a freshly allocated output (SoftmaxParams::out_fresh): the OS zeroes each page on its first
// touch, and a stream then writes every line a second time (bench/notes/softmax.md, "softmax: long
// rows"). (A 16 MB
// fp32 output streams on a 32 MB L3, as the tuned constant did; a 64 MB one on a 260 MB L3
// stays cached.)
inline bool stream_output(int64_t out_bytes) {
  const int64_t llc = debug_llc_bytes() > 0 ? debug_llc_bytes() : cache_sizes().l3;  // debug.h
  return 2 * out_bytes >= llc;
}
// Lanes handled together by the strided-axis kernel: 4 vectors of accumulators.
constexpr int kLaneVecs = 4;

constexpr float kNegInf = -__builtin_inff();

struct ChunkStat {
  float max;
  float sum;
};

// fp32 view of x[0..n) (stride xs): x itself when it is contiguous fp32, else a converted or
// gathered copy in buf.
template <class T>
const float* chunk_as_f32(const T* x, int64_t xs, int64_t n, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    if (xs == 1) return x;
  }
  if (xs == 1) {
    int64_t i = 0;
    for (; i + VF::N <= n; i += VF::N) load_cvt(x + i).store(buf + i);
    if (i < n) load_cvt_partial(x + i, int(n - i)).store_partial(buf + i, int(n - i));
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = to_f32(x[i * xs]);
  }
  return buf;
}

float max_of(const float* p, int64_t n) {
  VF m0 = VF::set1(kNegInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 * VF::N <= n; i += 4 * VF::N) {
    m0 = max(m0, VF::load(p + i));
    m1 = max(m1, VF::load(p + i + VF::N));
    m2 = max(m2, VF::load(p + i + 2 * VF::N));
    m3 = max(m3, VF::load(p + i + 3 * VF::N));
  }
  for (; i + VF::N <= n; i += VF::N) m0 = max(m0, VF::load(p + i));
  float m = max(max(m0, m1), max(m2, m3)).hmax();
  for (; i < n; ++i) m = p[i] > m ? p[i] : m;
  // A NaN in x may or may not surface here; either way exp(x - m) turns it into a NaN sum.
  return m;
}

// e[i] = exp(p[i] - m); returns the sum of e. m is finite or NaN (never -inf, see the guard
// in chunk_stat).
float exp_and_sum(const float* p, int64_t n, float m, float* e) {
  const VF vm = VF::set1(m);
  VF s0 = VF::zero(), s1 = VF::zero();
  int64_t i = 0;
  for (; i + 2 * VF::N <= n; i += 2 * VF::N) {
    VF e0 = vexp(VF::load(p + i) - vm), e1 = vexp(VF::load(p + i + VF::N) - vm);
    e0.store(e + i);
    e1.store(e + i + VF::N);
    s0 = s0 + e0;
    s1 = s1 + e1;
  }
  for (; i + VF::N <= n; i += VF::N) {
    VF e0 = vexp(VF::load(p + i) - vm);
    e0.store(e + i);
    s0 = s0 + e0;
  }
  if (i < n) {
    const int r = int(n - i);
    VF e0 = vexp(VF::load_partial(p + i, r) - vm);
    e0 = select(VF::iota(0.0f) < VF::set1(float(r)), e0, VF::zero());
    e0.store_partial(e + i, r);
    s0 = s0 + e0;
  }
  return (s0 + s1).hsum();
}

// out[i * os] = e[i] * f, converted to T.
template <class T>
void write_scaled(const float* e, float f, T* out, int64_t os, int64_t n, bool stream) {
  const VF vf = VF::set1(f);
  if (os != 1) {
    for (int64_t i = 0; i < n; ++i) from_f32(e[i] * f, out + i * os);
    return;
  }
  int64_t i = 0;
  if constexpr (std::is_same<T, float>::value) {
    if (stream) {
      // Scalar head up to the vector alignment that non-temporal stores require.
      const uintptr_t align = sizeof(float) * VF::N;
      for (; i < n && (reinterpret_cast<uintptr_t>(out + i) % align) != 0; ++i) out[i] = e[i] * f;
      for (; i + VF::N <= n; i += VF::N) (VF::load(e + i) * vf).stream(out + i);
      for (; i < n; ++i) out[i] = e[i] * f;
      return;
    }
  }
  for (; i + VF::N <= n; i += VF::N) store_cvt(out + i, VF::load(e + i) * vf);
  if (i < n) store_cvt_partial(out + i, VF::load_partial(e + i, int(n - i)) * vf, int(n - i));
}

// (max, sum of exp(x - max)) of one chunk; leaves exp(x - max) in e.
template <class T>
ChunkStat chunk_stat(const T* x, int64_t xs, int64_t n, float* buf, float* e) {
  const float* xf = chunk_as_f32(x, xs, n, buf);
  const float m = max_of(xf, n);
  // -inf guard: a chunk whose every element is -inf contributes nothing. Without the guard,
  // exp(-inf - (-inf)) = exp(NaN) would poison the whole row.
  if (m == kNegInf) return {kNegInf, 0.0f};
  return {m, exp_and_sum(xf, n, m, e)};
}

// Row-wide max and the chunk scale factors f_c = exp(max_c - M) / S, in chunk order.
// Returns false when every element is -inf: torch gives NaN for such a row.
bool combine(ChunkStat* st, int64_t nchunks) {
  float M = kNegInf;
  for (int64_t c = 0; c < nchunks; ++c) M = st[c].max > M ? st[c].max : M;
  if (M == kNegInf) {
    bool any_nan = false;
    for (int64_t c = 0; c < nchunks; ++c) any_nan |= st[c].max != st[c].max;
    if (!any_nan) return false;
  }
  float S = 0.0f;
  for (int64_t c = 0; c < nchunks; ++c)
    if (st[c].max != kNegInf) S += st[c].sum * expf(st[c].max - M);
  const float inv = 1.0f / S;
  for (int64_t c = 0; c < nchunks; ++c)
    st[c].sum = st[c].max == kNegInf ? 0.0f : expf(st[c].max - M) * inv;  // sum now holds f_c
  return true;
}

template <class T>
void fill(T* out, int64_t os, int64_t n, float value) {
  for (int64_t i = 0; i < n; ++i) from_f32(value, out + i * os);
}

// Where pass 2 of a multi-chunk row leaves exp(x - max_c): straight in `out` when it is
// contiguous fp32 (pass 3 then only rescales it, from L2 for rows that fit there), else in
// scratch, and pass 3 recomputes it (half types would lose precision to double rounding).
template <class T>
float* exp_home(T* out, int64_t os, float* e) {
  if constexpr (std::is_same<T, float>::value) {
    if (os == 1) return out;
  }
  return e;
}

// Pass 3 of one chunk of a multi-chunk row: out = exp(x - max_c) * f_c.
template <class T>
void chunk_write(const T* x, int64_t xs, T* out, int64_t os, int64_t n, const ChunkStat& st,
                 float* buf, float* e) {
  if (st.max == kNegInf) return fill(out, os, n, 0.0f);
  float* home = exp_home(out, os, e);
  if (home != e) {  // e is already in out
    const VF f = VF::set1(st.sum);
    float* o = home;
    int64_t i = 0;
    for (; i + VF::N <= n; i += VF::N) (VF::load(o + i) * f).store(o + i);
    for (; i < n; ++i) o[i] *= st.sum;
    return;
  }
  const float* xf = chunk_as_f32(x, xs, n, buf);
  exp_and_sum(xf, n, st.max, e);
  write_scaled(e, st.sum, out, os, n, false);
}

// A whole row of at most kChunk elements.
template <class T>
void short_row(const T* x, int64_t xs, T* out, int64_t os, int64_t n, float* buf, float* e,
               bool stream) {
  // One chunk: combine() would give f = exp(0) / sum; skip its two scalar exps (per row, they
  // cost as much as the whole row's vector work at n = 128). Same bits, NaN cases included.
  const ChunkStat st = chunk_stat(x, xs, n, buf, e);
  if (st.max == kNegInf) return fill(out, os, n, __builtin_nanf(""));  // every element -inf
  write_scaled(e, 1.0f / st.sum, out, os, n, stream);
}

// Softmax along a strided axis (stride xs / os, length n) for `lanes` contiguous neighbours,
// vectorized across the lanes: per block of lanes, max over the axis, exp and sum, scale.
template <class T>
void lane_block(const T* x, int64_t xs, T* out, int64_t os, int64_t n, int lanes) {
  const int nv = (lanes + VF::N - 1) / VF::N;
  auto load = [&](const T* p, int v) {
    const int left = lanes - v * VF::N;
    return left >= VF::N ? load_cvt(p + v * VF::N) : load_cvt_partial(p + v * VF::N, left);
  };
  auto store = [&](T* p, int v, VF val) {
    const int left = lanes - v * VF::N;
    if (left >= VF::N)
      store_cvt(p + v * VF::N, val);
    else
      store_cvt_partial(p + v * VF::N, val, left);
  };
  VF m[kLaneVecs], s[kLaneVecs];
  for (int v = 0; v < nv; ++v) m[v] = VF::set1(kNegInf), s[v] = VF::zero();
  for (int64_t i = 0; i < n; ++i)
    for (int v = 0; v < nv; ++v) m[v] = max(m[v], load(x + i * xs, v));
  // A lane whose axis is all -inf gets exp(NaN) = NaN everywhere, as in torch.
  constexpr bool kStoreE = std::is_same<T, float>::value;  // half types recompute in pass 3
  for (int64_t i = 0; i < n; ++i)
    for (int v = 0; v < nv; ++v) {
      VF e = vexp(load(x + i * xs, v) - m[v]);
      if (kStoreE) store(out + i * os, v, e);
      s[v] = s[v] + e;
    }
  VF f[kLaneVecs];
  for (int v = 0; v < nv; ++v) f[v] = VF::set1(1.0f) / s[v];
  for (int64_t i = 0; i < n; ++i)
    for (int v = 0; v < nv; ++v) {
      VF e = kStoreE ? load(out + i * os, v) : vexp(load(x + i * xs, v) - m[v]);
      store(out + i * os, v, e * f[v]);
    }
}

template <class T>
Status softmax_typed(const SoftmaxParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t n = p.n;
  int64_t rows = 1;
  for (int d = 0; d < p.outer_ndim; ++d) rows *= p.outer_shape[d];
  if (rows == 0 || n == 0) return Status::ok;
  const int nt = threads_for(rows * n * 8, p.num_threads);

  // Strided softmax axis with a contiguous neighbouring axis: vectorize across that axis.
  const int last = p.outer_ndim - 1;
  if ((p.x_stride != 1 || p.out_stride != 1) && last >= 0 && p.x_outer_strides[last] == 1 &&
      p.out_outer_strides[last] == 1) {
    constexpr int64_t W = kLaneVecs * VF::N;
    const int64_t lanes = p.outer_shape[last];
    const int64_t blocks = ceil_div(lanes, W);
    const int64_t groups = rows / lanes;  // combinations of the other outer dims
    debug_record_softmax_plan({SoftmaxPath::lanes, false});
    parallel_team(nt, [&] {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < groups * blocks; ++item) {
        const int64_t g = item / blocks, l0 = (item % blocks) * W;
        const int64_t xo = unravel_offset(g, last, p.outer_shape, p.x_outer_strides) + l0;
        const int64_t oo = unravel_offset(g, last, p.outer_shape, p.out_outer_strides) + l0;
        lane_block(x + xo, p.x_stride, out + oo, p.out_stride, n, int(imin(W, lanes - l0)));
      }
    });
    return Status::ok;
  }

  const int64_t nchunks = ceil_div(n, kChunk);
  if (nchunks == 1) {
    const bool stream = std::is_same<T, float>::value && p.out_stride == 1 && !p.out_fresh &&
                        stream_output(rows * n * int64_t(sizeof(T)));
    debug_record_softmax_plan({SoftmaxPath::short_rows, stream});
    parallel_team(nt, [&] {
      alignas(64) float buf[kChunk];
      alignas(64) float e[kChunk];
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t xo = unravel_offset(r, p.outer_ndim, p.outer_shape, p.x_outer_strides);
        const int64_t oo = unravel_offset(r, p.outer_ndim, p.outer_shape, p.out_outer_strides);
        short_row(x + xo, p.x_stride, out + oo, p.out_stride, n, buf, e, stream);
      }
    });
    if (stream) stream_fence();
    return Status::ok;
  }

  // Long rows of an output large enough to stream, at least one row per thread, each fitting
  // in half the L2: each thread takes whole rows, keeps exp(x - max_c) of its row in an
  // L2-resident scratch and writes out once, with non-temporal stores. The (row, chunk) items
  // below leave exp in out and rescale it in a second pass, so for DRAM-sized data out crossed
  // the memory bus three times (read for ownership, write-back, rescale); here once
  // (bench/notes/softmax.md, "softmax: long rows"). For cache-resident data (16-64 MB) the items were
  // as fast or up to 12% faster, and into a fresh output (page faults first) 5-10% faster, so
  // they stay there. Same operations in the same order: the same bits either way, so the
  // path may depend on the thread count.
  const bool stream_long = std::is_same<T, float>::value && p.out_stride == 1 && !p.out_fresh &&
                           stream_output(rows * n * int64_t(sizeof(T)));
  if (stream_long && rows >= nt && nchunks * kChunk * int64_t(sizeof(float)) <= cache_sizes().l2 / 2) {
    debug_record_softmax_plan({SoftmaxPath::whole_rows, true});
    std::atomic<bool> failed{false};
    parallel_team(nt, [&] {
      Scratch<float> ex;  // exp(x - max_c) of one row, chunk c at c * kChunk
      Scratch<ChunkStat> st;
      if (!ex.reset(size_t(nchunks * kChunk)) || !st.reset(size_t(nchunks))) failed = true;
#pragma omp barrier
      // `failed` is only written before the barrier: all threads skip, or all run, the loop.
      if (!failed.load()) {
        alignas(64) float buf[kChunk];
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
          const T* xr = x + unravel_offset(r, p.outer_ndim, p.outer_shape, p.x_outer_strides);
          T* orow = out + unravel_offset(r, p.outer_ndim, p.outer_shape, p.out_outer_strides);
          for (int64_t c = 0; c < nchunks; ++c)
            st[c] = chunk_stat(xr + c * kChunk * p.x_stride, p.x_stride, imin(kChunk, n - c * kChunk),
                               buf, ex.get() + c * kChunk);
          if (!combine(st.get(), nchunks)) {  // every element -inf: NaN, as torch
            fill(orow, p.out_stride, n, __builtin_nanf(""));
            continue;
          }
          for (int64_t c = 0; c < nchunks; ++c) {
            const int64_t len = imin(kChunk, n - c * kChunk);
            T* oc = orow + c * kChunk * p.out_stride;
            if (st[c].max == kNegInf)
              fill(oc, p.out_stride, len, 0.0f);
            else
              write_scaled(ex.get() + c * kChunk, st[c].sum, oc, p.out_stride, len, true);
          }
        }
      }
    });
    stream_fence();
    return failed ? Status::out_of_memory : Status::ok;
  }

  // Long rows: (row, chunk) items, so even a single row spreads over all threads.
  debug_record_softmax_plan({SoftmaxPath::chunk_items, false});
  Scratch<ChunkStat> stats;
  if (!stats.reset(size_t(rows * nchunks))) return Status::out_of_memory;
  const int64_t items = rows * nchunks;
  auto chunk_of = [&](int64_t item, int64_t* xo, int64_t* oo, int64_t* len) {
    const int64_t r = item / nchunks, c = item % nchunks;
    *xo = unravel_offset(r, p.outer_ndim, p.outer_shape, p.x_outer_strides) + c * kChunk * p.x_stride;
    *oo = unravel_offset(r, p.outer_ndim, p.outer_shape, p.out_outer_strides) + c * kChunk * p.out_stride;
    *len = imin(kChunk, n - c * kChunk);
  };
  parallel_team(nt, [&] {
    alignas(64) float buf[kChunk];
    alignas(64) float e[kChunk];
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      int64_t xo, oo, len;
      chunk_of(item, &xo, &oo, &len);
      stats[item] = chunk_stat(x + xo, p.x_stride, len, buf, exp_home(out + oo, p.out_stride, e));
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      if (!combine(stats.get() + r * nchunks, nchunks))
        for (int64_t c = 0; c < nchunks; ++c) stats[r * nchunks + c] = {__builtin_nanf(""), 0.f};
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      int64_t xo, oo, len;
      chunk_of(item, &xo, &oo, &len);
      const ChunkStat& st = stats[item];
      if (st.max != st.max && st.sum == 0.f)  // all -inf row (marked above): NaN, as torch
        fill(out + oo, p.out_stride, len, __builtin_nanf(""));
      else
        chunk_write(x + xo, p.x_stride, out + oo, p.out_stride, len, st, buf, e);
    }
  });
  return Status::ok;
}

// float64: computed in double with libm's exp, one row at a time (correctness path).
Status softmax_f64(const SoftmaxParams& p) {
  const double* x = static_cast<const double*>(p.x);
  double* out = static_cast<double*>(p.out);
  int64_t rows = 1;
  for (int d = 0; d < p.outer_ndim; ++d) rows *= p.outer_shape[d];
  const int64_t n = p.n;
  if (rows == 0 || n == 0) return Status::ok;
  debug_record_softmax_plan({SoftmaxPath::f64, false});
  const int nt = threads_for(rows * n * 16, p.num_threads);
  parallel_team(nt, [&] {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const double* xr = x + unravel_offset(r, p.outer_ndim, p.outer_shape, p.x_outer_strides);
      double* orow = out + unravel_offset(r, p.outer_ndim, p.outer_shape, p.out_outer_strides);
      double m = -__builtin_inf();
      bool nan = false;
      for (int64_t i = 0; i < n; ++i) {
        const double v = xr[i * p.x_stride];
        nan |= v != v;
        m = v > m ? v : m;
      }
      if (nan) m = __builtin_nan("");
      double s = 0.0;
      // Write exp first (out may alias x: each element is read before it is written).
      for (int64_t i = 0; i < n; ++i) {
        const double e = exp(xr[i * p.x_stride] - m);
        orow[i * p.out_stride] = e;
        s += e;
      }
      const double inv = 1.0 / s;
      for (int64_t i = 0; i < n; ++i) orow[i * p.out_stride] *= inv;
    }
  });
  return Status::ok;
}

}  // namespace

Status softmax(const SoftmaxParams& p) {
  switch (p.dtype) {
    case DType::f32:
      return softmax_typed<float>(p);
    case DType::f16:
      return softmax_typed<f16_t>(p);
    case DType::bf16:
      return softmax_typed<bf16_t>(p);
    case DType::f64:
      return softmax_f64(p);
    default:
      return Status::invalid_argument;
  }
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
