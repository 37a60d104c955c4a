// CPU emulator of the CUDA execution model, for testing attnkit's CUDA kernels on machines
// without a GPU (tests/test_cuda_emulated.py, tools/build_cuda_emulator.sh). Force-included
// (-include) before every kernel source when ATTNKIT_CUDA_EMULATE is defined; the real
// build never sees it.
//
// Model: a launch runs its blocks one after another; the threads of a block are fibers
// (ucontext) scheduled cooperatively on one OS thread, switching only at barriers. Warp
// collectives (shuffles, votes, ldmatrix, mma.sync) exchange values through per-warp slots
// between two warp barriers, and compute exactly the fragment layouts the PTX ISA documents.
// cp.async copies are queued per thread and performed at cp.async.wait_group, so a missing
// wait or barrier reads stale shared memory here as it could on a GPU. A barrier that can
// never complete (divergent __syncthreads, a warp collective with exited lanes) aborts.
// Hopper's primitives (hopper.cuh) follow the same rules: TMA copies land at issue and complete
// their mbarrier's transaction bytes; mbarrier and named-barrier arrivals are scheduling
// points (the threads they release run before the arriving thread goes on); a wgmma reads its
// operands at issue, computes at wgmma.wait_group, and aborts if its shared-memory operands or
// its registers changed in between.
//
// What it cannot show: real concurrency (races between warps that barriers don't order are
// run in one fixed order), timing, and register / shared-memory limits.
#pragma once

#define __shared__ static  // before the CUDA headers: block-shared = one copy (blocks run in turn)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // before the threadIdx/... macros below (it names its parameters so)
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>

#define __grid_constant__

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace attnkit_emu {

struct Idx {
  unsigned x, y, z;
};
const Idx& thread_idx();
const Idx& block_idx();
const Idx& block_dim();
const Idx& grid_dim();
unsigned char* dynamic_smem();
int lane_id();

// Runs body() as every thread of every block of the grid (blocks in order).
void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body);

void sync_block();
int sync_block_or(int pred);
void sync_warp();
// Warp exchange: every lane publishes `words` 64-bit values, then reads any lane's values.
void warp_publish(const uint64_t* words, int n);
const uint64_t* warp_slot(int lane);
void warp_done_reading();

// Deferred cp.async (see above).
void cp_async(void* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int keep_pending_groups);

// ---- Hopper (sm_90) primitives behind csrc/cuda/hopper.cuh ----
// Shared memory offsets stand for shared-window addresses (the swizzle patterns depend on the
// address bits, so tiles must be 1024-aligned in offset, as on the GPU in address).
uint32_t smem_offset(const void* p);
// A 4-D tiled TMA descriptor over 16-bit values (dim 0 contiguous; byte strides of dims 1-3;
// a {64, box_rows, 1, 1} box; 128-byte swizzle; out-of-bounds elements read as zero).
struct TmaDesc {
  const void* base;
  int64_t dims[4];
  int64_t strides[4];  // bytes; strides[0] = 2
  int box_rows;
};
// mbarrier: arrival count per phase, transaction bytes; a phase completes when both reach 0.
void mbar_init(uint64_t* bar, int count);
void mbar_arrive(uint64_t* bar, uint32_t expect_tx_bytes);  // expect_tx, then one arrival
void mbar_wait(uint64_t* bar, int parity);  // until the phase of that parity has completed
// cp.async.bulk.tensor: the box at coords into smem (swizzled), then complete_tx on bar.
void tma_load(const TmaDesc& d, uint64_t* bar, void* smem, int c0, int c1, int c2, int c3);
// wgmma.mma_async m64nNk16, f32 accumulate, f16/bf16 inputs: A from the descriptor da (K-major)
// or, if a_regs, from the warp's A fragments; B from db, K-major or MN-major. The calling
// thread's slice of D (its rows and columns of the accumulator layout) is computed at
// wgmma_wait; the operands are read at issue and must be unchanged at the wait (else abort).
void wgmma(int n, bool bf16, uint64_t da, const uint32_t* a_regs, uint64_t db, bool b_mn_major, float* d,
           bool accumulate);
void wgmma_commit();
void wgmma_wait(int keep_pending_groups);
// bar.sync (wait = true) / bar.arrive on named barrier id: `threads` arrivals complete it.
void named_barrier(int id, int threads, bool wait);

template <class T>
T shfl(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  warp_publish(&w, 1);
  T out;
  std::memcpy(&out, warp_slot(src_lane & 31), sizeof(T));
  warp_done_reading();
  return out;
}

}  // namespace attnkit_emu

#define threadIdx (::attnkit_emu::thread_idx())
#define blockIdx (::attnkit_emu::block_idx())
#define blockDim (::attnkit_emu::block_dim())
#define gridDim (::attnkit_emu::grid_dim())

#define ATTNKIT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::attnkit_emu::launch(dim3(grid), dim3(block), smem, [&] { kernel(__VA_ARGS__); })
#define ATTNKIT_DYNAMIC_SMEM(name) unsigned char* name = ::attnkit_emu::dynamic_smem()

// ---- CUDA device builtins ----
inline void __syncthreads() { ::attnkit_emu::sync_block(); }
inline int __syncthreads_or(int pred) { return ::attnkit_emu::sync_block_or(pred); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::attnkit_emu::sync_warp(); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return ::attnkit_emu::shfl(v, ::attnkit_emu::lane_id() ^ mask);
}
template <class T>
T __shfl_sync(unsigned, T v, int src) {
  return ::attnkit_emu::shfl(v, src);
}
inline int __any_sync(unsigned, int pred) {
  const uint64_t w = pred != 0;
  ::attnkit_emu::warp_publish(&w, 1);
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= int(::attnkit_emu::warp_slot(l)[0]);
  ::attnkit_emu::warp_done_reading();
  return any;
}
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline int __float_as_int(float f) {
  int x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, 8);
  return d;
}
inline unsigned int __float_as_uint(float x) {
  unsigned int u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline long long __double_as_longlong(double x) {
  long long u;
  std::memcpy(&u, &x, 8);
  return u;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// ---- the PTX wrappers of csrc/cuda/common.cuh ----
namespace attnkit {
namespace cuda {

inline float fast_exp2(float x) { return std::exp2(x); }

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  ::attnkit_emu::cp_async(dst, src, src_bytes);
}
inline void cp_async_commit() { ::attnkit_emu::cp_async_commit(); }
inline void cp_async_wait_all() { ::attnkit_emu::cp_async_wait(0); }
inline void cp_async_wait_one() { ::attnkit_emu::cp_async_wait(1); }
template <int kPending>
inline void cp_async_wait() {
  ::attnkit_emu::cp_async_wait(kPending);
}

// ldmatrix .x4: lane l gives the address of row l % 8 of matrix l / 8 and receives, of each
// matrix m, elements (row l / 4, cols 2 (l % 4), +1) -- or with .trans (rows 2 (l % 4), +1;
// col l / 4). The low 16 bits hold the first element.
inline void ldmatrix_impl(uint32_t (&r)[4], const void* p, bool trans) {
  const uint64_t addr = reinterpret_cast<uintptr_t>(p);
  ::attnkit_emu::warp_publish(&addr, 1);
  const int l = ::attnkit_emu::lane_id(), g = l >> 2, t = l & 3;
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = reinterpret_cast<const uint16_t*>(::attnkit_emu::warp_slot(m * 8 + g)[0]);
      lo = row[2 * t];
      hi = row[2 * t + 1];
    } else {
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(::attnkit_emu::warp_slot(m * 8 + 2 * t)[0]);
      const uint16_t* r1 = reinterpret_cast<const uint16_t*>(::attnkit_emu::warp_slot(m * 8 + 2 * t + 1)[0]);
      lo = r0[g];
      hi = r1[g];
    }
    r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  ::attnkit_emu::warp_done_reading();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, true); }

inline float bits_to_float(uint16_t b, bool is_bf16) {
  if (is_bf16) {
    const uint32_t w = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &b, 2);
  return __half2float(h);
}

// m16n8k16, layouts as in common.cuh (g = lane / 4, t = lane % 4):
//   A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B: b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   D: d0,d1 (g, 2t..2t+1), d2,d3 (g+8, 2t..2t+1)
inline void mma_impl(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf) {
  const uint64_t w[6] = {a[0], a[1], a[2], a[3], b0, b1};
  ::attnkit_emu::warp_publish(w, 6);
  auto half_of = [](uint64_t reg, int which) { return uint16_t(which ? reg >> 16 : reg & 0xffff); };
  auto A = [&](int row, int col) {
    const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
    const int lane = (row % 8) * 4 + (col % 8) / 2;
    return bits_to_float(half_of(::attnkit_emu::warp_slot(lane)[reg], col % 2), bf);
  };
  auto B = [&](int k, int n) {
    const int reg = 4 + (k >= 8 ? 1 : 0);
    const int lane = n * 4 + (k % 8) / 2;
    return bits_to_float(half_of(::attnkit_emu::warp_slot(lane)[reg], k % 2), bf);
  };
  const int l = ::attnkit_emu::lane_id(), g = l >> 2, t = l & 3;
  float res[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    res[e] = acc;
  }
  ::attnkit_emu::warp_done_reading();
  for (int e = 0; e < 4; ++e) d[e] = res[e];
}
template <class T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_impl(d, a, b0, b1, sizeof(T) == 2 && !std::is_same<T, __half>::value);
}

}  // namespace cuda
}  // namespace attnkit
