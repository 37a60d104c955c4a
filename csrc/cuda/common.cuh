// Device helpers every CUDA kernel shares: storage <-> compute conversions, warp reductions,
// and thin wrappers over the PTX instructions the tensor-core kernels use (cp.async,
// ldmatrix, mma.sync). Kernels include this; nothing here knows Python (ARCHITECTURE.md rule 1).
//
// ATTNKIT_CUDA_EMULATE (tests only, see csrc/cuda/emulate/): the same kernel sources are
// compiled by the host compiler and run on a CPU emulator of the CUDA execution model, so
// their index math is tested on machines without a GPU. The emulator supplies the PTX
// wrappers below and the launch / dynamic shared memory macros.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attnkit/dtype.h"
#include "attnkit/params.h"

namespace attnkit {
namespace cuda {

using half = __half;
using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double(0xfff0000000000000ll); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }
// -0.0, told apart from +0.0 (the SIMT kernel marks a masked key's P with -0.0).
__device__ __forceinline__ bool is_neg_zero(float x) { return __float_as_uint(x) == 0x80000000u; }
__device__ __forceinline__ bool is_neg_zero(double x) {
  return __double_as_longlong(x) == static_cast<long long>(0x8000000000000000ull);
}

// ---- storage types: load as the compute type, store from it ----
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
// 8-bit KV codes: the code's value (the row's scale is applied by the caller).
__device__ __forceinline__ float to_float(int8_t x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(f8e4m3_t x) {
  // e4m3fn: bias 7, no inf, S.1111.111 = NaN; subnormals m * 2^-9 (as scalar_cvt.h on the CPU)
  const uint32_t b = x.bits, sign = (b & 0x80u) << 24, e = (b >> 3) & 0xfu, m = b & 0x7u;
  if (e == 0xf && m == 0x7) return __int_as_float(0x7fc00000);
  if (e != 0) return __int_as_float(int(sign | ((e + 120u) << 23) | (m << 20)));
  return __int_as_float(int(sign | uint32_t(__float_as_int(float(m) * 0.001953125f))));
}
template <class S>
struct IsCode {
  static constexpr bool value = false;
};
template <>
struct IsCode<int8_t> {
  static constexpr bool value = true;
};
template <>
struct IsCode<f8e4m3_t> {
  static constexpr bool value = true;
};

// fp32 -> an 8-bit code, rounded to nearest even (the quantizer keeps |x| <= 127 / 448;
// e4m3 saturates beyond 448; NaN -> e4m3 NaN). Same results as the CPU's scalar_cvt.h.
__device__ __forceinline__ void store_code(float y, int8_t* q) {
  const float r = rintf(y);
  *q = static_cast<int8_t>(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
}
__device__ __forceinline__ void store_code(float y, f8e4m3_t* q) {
  const uint32_t sign = (uint32_t(__float_as_int(y)) >> 24) & 0x80u;
  const float a = fabsf(y);
  uint32_t c;
  if (!(a < 448.0f)) {  // NaN, or saturate at 448 (e4m3fn has no inf)
    c = a != a ? 0x7fu : 0x7eu;
  } else if (a < 0.015625f) {  // below 2^-6: subnormals in units of 2^-9
    c = uint32_t(rintf(a * 512.0f));
  } else {  // rebias the exponent (127 -> 7), round the low 20 mantissa bits to nearest even
    const uint32_t r = uint32_t(__float_as_int(a)) - (120u << 23);
    c = (r + 0x7ffffu + ((r >> 20) & 1u)) >> 20;
  }
  q->bits = uint8_t(sign | c);
}

template <class Acc, class S>
__device__ __forceinline__ Acc load_as(const S* p) {
  return static_cast<Acc>(to_float(*p));
}
template <>
__device__ __forceinline__ double load_as<double, double>(const double* p) {
  return *p;
}

template <class S>
__device__ __forceinline__ S store_as(float x);
template <>
__device__ __forceinline__ float store_as<float>(float x) { return x; }
template <>
__device__ __forceinline__ half store_as<half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ bf16 store_as<bf16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ double store_as<double>(float x) { return x; }

template <class S, class Acc>
__device__ __forceinline__ S store_acc(Acc x) {
  return store_as<S>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double store_acc<double, double>(double x) { return x; }

// Reads one element of a float/bool array described by a DType (masks, any float dtype).
__device__ __forceinline__ float load_dtype_as_float(const void* base, int64_t off, DType t) {
  switch (t) {
    case DType::f32:
      return static_cast<const float*>(base)[off];
    case DType::f64:
      return static_cast<float>(static_cast<const double*>(base)[off]);
    case DType::f16:
      return __half2float(static_cast<const half*>(base)[off]);
    case DType::bf16:
      return __bfloat162float(static_cast<const bf16*>(base)[off]);
    default:
      return 0.0f;
  }
}

// ---- math ----
template <class Acc>
__device__ __forceinline__ Acc warp_max(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <class Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  // Butterfly: every lane ends with the same sum, combined in the same order on every run.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

#ifndef ATTNKIT_CUDA_EMULATE
// kernel<<<grid, block, smem, stream>>>(args...); `kernel` must be a single token.
#define ATTNKIT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
// The block's dynamic shared memory as `unsigned char name[]`, 16-byte aligned.
#define ATTNKIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

// 2^x with one MUFU instruction (max rel. error ~2^-22, exact 0 for -inf, NaN stays NaN).
// Used for softmax probabilities, which fp32 storage and the 1e-5 fp32 tolerance allow.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- PTX wrappers (sm_80+) ----
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses registers; bytes beyond src_bytes are zero-filled
// (src_bytes = 0 reads nothing, so `src` only has to be some valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices; lane l passes the row address for matrix l / 8, row l % 8, and
// receives in r[m] the elements (row l / 4, cols 2 (l % 4) + {0, 1}) of matrix m.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// Transposed: r[m] holds elements (rows 2 (l % 4) + {0, 1}, col l / 4) of matrix m.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D (16x8 fp32) += A (16x16, row-major) * B (16x8, "col": each thread holds k-pairs).
// Fragment layout (g = lane / 4, t = lane % 4):
//   A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B: b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   D: d0,d1 (g, 2t..2t+1), d2,d3 (g+8, 2t..2t+1)
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<half>(float (&d)[4], const uint32_t (&a)[4],
                                                uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<bf16>(float (&d)[4], const uint32_t (&a)[4],
                                                uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // !ATTNKIT_CUDA_EMULATE

// Two floats -> one 32-bit register of two 16-bit values (lo in the low half), rounded.
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<bf16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// True if any of the 8 16-bit values in `v` is inf or NaN (exponent all ones).
template <class T>
__device__ __forceinline__ bool any_nonfinite8(uint4 v);
template <>
__device__ __forceinline__ bool any_nonfinite8<half>(uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  bool bad = false;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    bad |= ((w[i] & 0x7c00u) == 0x7c00u) | ((w[i] & 0x7c000000u) == 0x7c000000u);
  return bad;
}
template <>
__device__ __forceinline__ bool any_nonfinite8<bf16>(uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  bool bad = false;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    bad |= ((w[i] & 0x7f80u) == 0x7f80u) | ((w[i] & 0x7f800000u) == 0x7f800000u);
  return bad;
}

}  // namespace cuda
}  // namespace attnkit
