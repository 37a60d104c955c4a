// Softmax along one axis on the GPU (SoftmaxParams, the same struct as the CPU kernel).
//
// Three shapes of work, picked by row length and strides:
//   warp_rows   n <= 1024: one warp per row, the row held in registers (one read, one write);
//               16-byte vector loads when rows are contiguous and aligned.
//   block_rows  n > 1024: one block per row; pass 1 keeps a running (max, sum) per thread,
//               combined across the block in a fixed tree order; pass 2 writes exp(x - max) / sum;
//               block_rows_vec is the same with 16-byte loads for contiguous aligned rows.
//   column_rows the softmax axis is strided but neighbouring rows are adjacent in memory
//               (softmax over a non-last axis): one thread per row, so a warp's loads coalesce.
// float16/bfloat16 compute in fp32, float64 in fp64. Every reduction has a fixed order, so
// results are bit-identical run to run. NaN/inf follow torch: NaN or +inf in a row, or a row
// of all -inf, gives NaN for the row; -inf entries otherwise give 0.
#include "common.cuh"
#include "kernels.h"

namespace attnkit {
namespace cuda {
namespace {

constexpr int kWarpMaxN = 1024;  // 32 values per lane in registers
constexpr int kBlockThreads = 256;

template <class Acc>
__device__ __forceinline__ Acc exp_acc(Acc x);
template <>
__device__ __forceinline__ float exp_acc<float>(float x) { return fast_exp2(x * kLog2e); }
template <>
__device__ __forceinline__ double exp_acc<double>(double x) { return exp(x); }

template <class Acc>
__device__ __forceinline__ Acc ninf() { return Acc(neg_inf()); }

// Running (max, sum of exp(x - max)) with the -inf guard: while the max is -inf, exp(x - 0)
// of -inf entries adds 0 instead of exp(-inf + inf) = NaN.
template <class Acc>
__device__ __forceinline__ void online_add(Acc& m, Acc& s, Acc x) {
  const Acc m_new = fmax(m, x);
  const Acc m_use = m_new == ninf<Acc>() ? Acc(0) : m_new;
  s = s * exp_acc(m - m_use) + exp_acc(x - m_use);
  // fmax drops NaN; keep it in the sum so the row becomes NaN.
  m = x != x ? m : m_new;
}
template <class Acc>
__device__ __forceinline__ void online_merge(Acc& m, Acc& s, Acc m2, Acc s2) {
  const Acc m_new = fmax(m, m2);
  const Acc m_use = m_new == ninf<Acc>() ? Acc(0) : m_new;
  s = s * exp_acc(m - m_use) + s2 * exp_acc(m2 - m_use);
  m = m_new;
}

__device__ __forceinline__ void row_offsets(const SoftmaxParams& p, int64_t row, int64_t& xo,
                                            int64_t& oo) {
  xo = oo = 0;
  for (int d = p.outer_ndim - 1; d >= 0; --d) {
    const int64_t idx = row % p.outer_shape[d];
    row /= p.outer_shape[d];
    xo += idx * p.x_outer_strides[d];
    oo += idx * p.out_outer_strides[d];
  }
}

template <class T, class Acc, bool kVec>
__global__ void __launch_bounds__(128) warp_rows(const SoftmaxParams p, int64_t rows) {
  constexpr int kV = kVec ? 16 / sizeof(T) : 1;  // elements per load
  constexpr int kLoads = kWarpMaxN / 32 / kV;     // loads per lane
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows;
       row += warps) {
    int64_t xo, oo;
    row_offsets(p, row, xo, oo);
    const T* x = static_cast<const T*>(p.x) + xo;
    T* out = static_cast<T*>(p.out) + oo;
    Acc v[kLoads][kV];
    Acc m = ninf<Acc>();
#pragma unroll
    for (int k = 0; k < kLoads; ++k) {
      const int64_t e0 = (int64_t(k) * 32 + lane) * kV;
      if (kVec) {
        union {
          uint4 u;
          T t[kV];
        } buf;
        if (e0 < p.n) buf.u = *reinterpret_cast<const uint4*>(x + e0);
#pragma unroll
        for (int e = 0; e < kV; ++e) v[k][e] = e0 < p.n ? load_as<Acc>(&buf.t[e]) : ninf<Acc>();
      } else {
        v[k][0] = e0 < p.n ? load_as<Acc>(x + e0 * p.x_stride) : ninf<Acc>();
      }
#pragma unroll
      for (int e = 0; e < kV; ++e) m = fmax(m, v[k][e]);
    }
    m = warp_max(m);
    Acc s = 0;
#pragma unroll
    for (int k = 0; k < kLoads; ++k)
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        v[k][e] = exp_acc(v[k][e] - m);  // padding: exp(-inf - m) = 0 unless m = -inf
        if ((int64_t(k) * 32 + lane) * kV + e < p.n) s += v[k][e];
      }
    s = warp_sum(s);
#pragma unroll
    for (int k = 0; k < kLoads; ++k) {
      const int64_t e0 = (int64_t(k) * 32 + lane) * kV;
      if (e0 >= p.n) continue;
      if (kVec) {
        union {
          uint4 u;
          T t[kV];
        } buf;
#pragma unroll
        for (int e = 0; e < kV; ++e) buf.t[e] = store_acc<T, Acc>(v[k][e] / s);
        *reinterpret_cast<uint4*>(out + e0) = buf.u;
      } else {
        out[e0 * p.out_stride] = store_acc<T, Acc>(v[k][0] / s);
      }
    }
  }
}

// Merges every thread's running (m, s) across the block in a fixed tree order; all threads
// get the row's (max, sum).
template <class Acc>
__device__ __forceinline__ void block_merge(Acc& m, Acc& s) {
  __shared__ Acc red_m[kBlockThreads], red_s[kBlockThreads];
  red_m[threadIdx.x] = m;
  red_s[threadIdx.x] = s;
  __syncthreads();
  for (int half_n = kBlockThreads / 2; half_n > 0; half_n >>= 1) {
    if (threadIdx.x < half_n) {
      Acc m1 = red_m[threadIdx.x], s1 = red_s[threadIdx.x];
      online_merge(m1, s1, red_m[threadIdx.x + half_n], red_s[threadIdx.x + half_n]);
      red_m[threadIdx.x] = m1;
      red_s[threadIdx.x] = s1;
    }
    __syncthreads();
  }
  m = red_m[0];
  s = red_s[0];
}

template <class T, class Acc>
__global__ void __launch_bounds__(kBlockThreads) block_rows(const SoftmaxParams p) {
  const int64_t row = blockIdx.x;
  int64_t xo, oo;
  row_offsets(p, row, xo, oo);
  const T* x = static_cast<const T*>(p.x) + xo;
  T* out = static_cast<T*>(p.out) + oo;
  Acc m = ninf<Acc>(), s = 0;
  for (int64_t e = threadIdx.x; e < p.n; e += kBlockThreads) online_add(m, s, load_as<Acc>(x + e * p.x_stride));
  block_merge<Acc>(m, s);
  for (int64_t e = threadIdx.x; e < p.n; e += kBlockThreads)
    out[e * p.out_stride] = store_acc<T, Acc>(exp_acc(load_as<Acc>(x + e * p.x_stride) - m) / s);
}

// block_rows for contiguous, 16-byte aligned rows whose length is a multiple of the vector
// width: 16-byte loads and stores (8 half values a load instead of one), and one exp per
// element in pass 1 (each vector's max first, then one rescale of the running sum), where
// online_add takes two. Same NaN/inf rules: fmax drops a NaN, but exp(NaN - m) carries it
// into the sum; +inf gives inf - inf = NaN; an all -inf row gives 0 / 0.
template <class T, class Acc>
__global__ void __launch_bounds__(kBlockThreads) block_rows_vec(const SoftmaxParams p) {
  constexpr int kV = 16 / sizeof(T);
  union Chunk {
    uint4 u;
    T t[kV];
  };
  const int64_t row = blockIdx.x;
  int64_t xo, oo;
  row_offsets(p, row, xo, oo);
  const uint4* x = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + xo);
  uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(p.out) + oo);
  const int64_t chunks = p.n / kV;
  Acc m = ninf<Acc>(), s = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kBlockThreads) {
    Chunk in;
    in.u = x[c];
    Acc v[kV], cm = ninf<Acc>();
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      v[e] = load_as<Acc>(&in.t[e]);
      cm = fmax(cm, v[e]);
    }
    const Acc m_new = fmax(m, cm);
    const Acc m_use = m_new == ninf<Acc>() ? Acc(0) : m_new;
    Acc cs = 0;
#pragma unroll
    for (int e = 0; e < kV; ++e) cs += exp_acc(v[e] - m_use);
    s = s * exp_acc(m - m_use) + cs;
    m = m_new;
  }
  block_merge<Acc>(m, s);
  for (int64_t c = threadIdx.x; c < chunks; c += kBlockThreads) {
    Chunk in, o;
    in.u = x[c];
#pragma unroll
    for (int e = 0; e < kV; ++e) o.t[e] = store_acc<T, Acc>(exp_acc(load_as<Acc>(&in.t[e]) - m) / s);
    out[c] = o.u;
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(256) column_rows(const SoftmaxParams p, int64_t rows) {
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    int64_t xo, oo;
    row_offsets(p, row, xo, oo);
    const T* x = static_cast<const T*>(p.x) + xo;
    T* out = static_cast<T*>(p.out) + oo;
    Acc m = ninf<Acc>(), s = 0;
    for (int64_t e = 0; e < p.n; ++e) online_add(m, s, load_as<Acc>(x + e * p.x_stride));
    for (int64_t e = 0; e < p.n; ++e)
      out[e * p.out_stride] = store_acc<T, Acc>(exp_acc(load_as<Acc>(x + e * p.x_stride) - m) / s);
  }
}

unsigned grid_for(int64_t work, int per_block) {
  const int64_t g = (work + per_block - 1) / per_block;
  return unsigned(g < 65535 * 32 ? g : 65535 * 32);  // grid-stride loops cover the rest
}

template <class T, class Acc>
cudaError_t run(const SoftmaxParams& p, cudaStream_t stream) {
  int64_t rows = 1;
  for (int d = 0; d < p.outer_ndim; ++d) rows *= p.outer_shape[d];
  if (rows == 0 || p.n == 0) return cudaSuccess;
  const bool adjacent_rows = p.outer_ndim > 0 && p.x_outer_strides[p.outer_ndim - 1] == 1 &&
                             p.out_outer_strides[p.outer_ndim - 1] == 1;
  if (p.x_stride != 1 && adjacent_rows && p.n <= 4096) {
    auto kernel = column_rows<T, Acc>;
    ATTNKIT_LAUNCH(kernel, grid_for(rows, 256), 256, 0, stream, p, rows);
    return cudaGetLastError();
  }
  // Contiguous rows, 16-byte aligned, a whole number of vectors: 16-byte loads and stores.
  constexpr int kV = 16 / sizeof(T);
  bool vec = p.x_stride == 1 && p.out_stride == 1 && p.n % kV == 0 &&
             reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
             reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  for (int d = 0; d < p.outer_ndim; ++d)
    vec = vec && p.x_outer_strides[d] % kV == 0 && p.out_outer_strides[d] % kV == 0;
  if (p.n <= kWarpMaxN) {
    auto kernel = vec ? warp_rows<T, Acc, true> : warp_rows<T, Acc, false>;
    ATTNKIT_LAUNCH(kernel, grid_for(rows, 4), 128, 0, stream, p, rows);
  } else {
    if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
    auto kernel = vec ? block_rows_vec<T, Acc> : block_rows<T, Acc>;
    ATTNKIT_LAUNCH(kernel, unsigned(rows), kBlockThreads, 0, stream, p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t softmax(const SoftmaxParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::f32:
      return run<float, float>(p, stream);
    case DType::f64:
      return run<double, double>(p, stream);
    case DType::f16:
      return run<half, float>(p, stream);
    case DType::bf16:
      return run<bf16, float>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace attnkit
