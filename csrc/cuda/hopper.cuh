// The Hopper (sm_90a) primitives the warp-specialized attention kernel uses
// (attention_hopper.cuh): TMA tile loads into 128-byte-swizzled shared memory, mbarriers with
// transaction counts, named barriers, asynchronous warpgroup MMAs (wgmma) on shared-memory
// descriptors, and register reconfiguration (setmaxnreg). One small vocabulary, two implementations:
//
//   * the real build: CUTLASS / CuTe's PTX wrappers (cute::SM90::GMMA atoms, cute's TMA copy
//     ops, cutlass::arch barriers) -- the dependency the project takes for these primitives;
//   * the CPU emulator (ATTNKIT_CUDA_EMULATE): csrc/cuda/emulate/ implements the same calls with
//     the semantics the PTX ISA documents -- TMA's box copy with zero fill and the 128-byte
//     swizzle, mbarrier phases and transaction bytes, wgmma's descriptor decode, fragment
//     layouts and asynchrony (operands are read at issue and checked unchanged at the wait) --
//     so the kernel's index math, pipeline protocol and layouts are tested without a GPU.
//
// Shared-memory tiles (docs/ARCHITECTURE.md, "Hopper attention forward"): a tile of R rows by
// up to 64 * P columns of 16-bit values is P "panels" of R rows x 128 bytes, each 1024-byte
// aligned, in TMA's SWIZZLE_128B layout: the 16-byte chunk c of row r sits at chunk c ^ (r % 8).
// That is both what TMA writes with a {64, R} box and the canonical 128B-swizzled operand
// layout of wgmma, K-major (rows = M or N, 64 K values per panel) or MN-major (rows = K).
#pragma once
#include "common.cuh"

#ifndef ATTNKIT_CUDA_EMULATE
#include <cuda.h>  // CUtensorMap (the type only: the encoder is reached through the runtime)

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/arch/mma_sm90_gmma_ext.hpp>  // N not a multiple of 32 (key tiles of 80, 48)
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#endif

#include <utility>

namespace attnkit {
namespace cuda {
namespace sm90 {

constexpr int kPanelBytes = 128;  // one swizzled row of a panel: 64 16-bit values
constexpr int kSwizzleAtom = 1024;  // 8 rows: the swizzle pattern's period

#ifdef ATTNKIT_CUDA_EMULATE
using TmaDesc = ::attnkit_emu::TmaDesc;
#else
using TmaDesc = CUtensorMap;
#endif

// Host: a 4-D tiled TMA descriptor over 16-bit values, dim 0 contiguous: dims (d0, d1, d2,
// d3), byte strides of dims 1-3 (multiples of 16), a {64, box_rows, 1, 1} box, SWIZZLE_128B,
// out-of-bounds elements read as zero. Returns false if the driver rejects it.
bool make_tma_desc(TmaDesc* desc, const void* base, const int64_t dims[4],
                   const int64_t byte_strides[3], int box_rows);

// 18-bit shared-window address of p (the emulator: its offset in the block's shared memory).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#ifdef ATTNKIT_CUDA_EMULATE
  return ::attnkit_emu::smem_offset(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// wgmma shared-memory descriptors for 128B-swizzled panels (PTX ISA, "Matrix Descriptor"):
// start address >> 4 in bits 0-13, leading byte offset >> 4 in 16-29, stride byte offset >> 4
// in 32-45, base offset 0 (panels are 1024-aligned), layout type 1 (128B swizzle) in 62-63.
__device__ __forceinline__ uint64_t make_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return uint64_t((smem_addr(p) & 0x3ffff) >> 4) | (uint64_t((lbo >> 4) & 0x3fff) << 16) |
         (uint64_t((sbo >> 4) & 0x3fff) << 32) | (uint64_t(1) << 62);
}
// K-major operand (A or B): rows of M/N at 128 bytes, 8-row groups 1024 bytes apart; p points
// at the first row, at the 16-value (32-byte) K step within the panel. LBO is unused (1).
__device__ __forceinline__ uint64_t desc_k_major(const void* p) {
  return make_desc(p, 16, kSwizzleAtom);
}
// MN-major B operand (rows = K): 64 N values per panel, panels `panel_bytes` apart (LBO),
// 8-row K groups 1024 bytes apart (SBO); p points at the first K row of the step.
__device__ __forceinline__ uint64_t desc_mn_major(const void* p, uint32_t panel_bytes) {
  return make_desc(p, panel_bytes, kSwizzleAtom);
}

#ifdef ATTNKIT_CUDA_EMULATE

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) { ::attnkit_emu::mbar_init(bar, count); }
__device__ __forceinline__ void fence_barrier_init() {}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  ::attnkit_emu::mbar_arrive(bar, bytes);
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) { ::attnkit_emu::mbar_arrive(bar, 0); }
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) { ::attnkit_emu::mbar_wait(bar, parity); }
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc*) {}
__device__ __forceinline__ void tma_load(const TmaDesc* d, uint64_t* bar, void* smem, int c0, int c1, int c2,
                                         int c3) {
  ::attnkit_emu::tma_load(*d, bar, smem, c0, c1, c2, c3);
}
__device__ __forceinline__ void named_sync(int id, int threads) { ::attnkit_emu::named_barrier(id, threads, true); }
__device__ __forceinline__ void named_arrive(int id, int threads) { ::attnkit_emu::named_barrier(id, threads, false); }
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() { ::attnkit_emu::wgmma_commit(); }
template <int kKeep>
__device__ __forceinline__ void wgmma_wait() {
  ::attnkit_emu::wgmma_wait(kKeep);
}
template <int kN>
__device__ __forceinline__ void fence_operands(float (&)[kN]) {}
template <int kRegs>
__device__ __forceinline__ void reg_alloc() {}
template <int kRegs>
__device__ __forceinline__ void reg_dealloc() {}
// D (64 x N, fp32) = (accumulate ? D : 0) + A (64 x 16) B (16 x N); A and B K-major in smem.
template <class T, int kN>
__device__ __forceinline__ void wgmma_ss(uint64_t da, uint64_t db, float (&d)[kN / 2], bool accumulate) {
  ::attnkit_emu::wgmma(kN, std::is_same<T, bf16>::value, da, nullptr, db, false, d, accumulate);
}
// D += A B with A (this warp's 16 rows x 16) from registers (the mma.sync A-fragment layout)
// and B MN-major in smem.
template <class T, int kN>
__device__ __forceinline__ void wgmma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[kN / 2]) {
  ::attnkit_emu::wgmma(kN, std::is_same<T, bf16>::value, 0, a, db, true, d, true);
}

#else  // the real build: CUTLASS / CuTe

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  cutlass::arch::ClusterBarrier::init(bar, uint32_t(count));
}
__device__ __forceinline__ void fence_barrier_init() { cutlass::arch::fence_barrier_init(); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, bytes);
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) { cutlass::arch::ClusterBarrier::arrive(bar); }
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  cutlass::arch::ClusterBarrier::wait(bar, uint32_t(parity));
}
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* d) { cute::prefetch_tma_descriptor(d); }
__device__ __forceinline__ void tma_load(const TmaDesc* d, uint64_t* bar, void* smem, int c0, int c1, int c2,
                                         int c3) {
  constexpr uint64_t kEvictNormal = 0x1000000000000000ull;  // L2 cache hint: the default policy
  cute::SM90_TMA_LOAD_4D::copy(d, bar, kEvictNormal, smem, c0, c1, c2, c3);
}
// Named barriers (bar.sync / bar.arrive) among `threads` threads; ids from 1 (0 is
// __syncthreads'). CUTLASS offsets the id past the ones its own kernels reserve.
__device__ __forceinline__ void named_sync(int id, int threads) {
  cutlass::arch::NamedBarrier::sync(uint32_t(threads), uint32_t(id));
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  cutlass::arch::NamedBarrier::arrive(uint32_t(threads), uint32_t(id));
}
__device__ __forceinline__ void wgmma_fence() { cute::warpgroup_arrive(); }
__device__ __forceinline__ void wgmma_commit() { cute::warpgroup_commit_batch(); }
template <int kKeep>
__device__ __forceinline__ void wgmma_wait() {
  cute::warpgroup_wait<kKeep>();
}
// Keeps the compiler from moving reads or writes of accumulators across the asynchronous MMAs.
template <int kN>
__device__ __forceinline__ void fence_operands(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) cute::warpgroup_fence_operand(d[i]);
}
template <int kRegs>
__device__ __forceinline__ void reg_alloc() {
  cutlass::arch::warpgroup_reg_alloc<kRegs>();
}
template <int kRegs>
__device__ __forceinline__ void reg_dealloc() {
  cutlass::arch::warpgroup_reg_dealloc<kRegs>();
}

template <class T, int kN>
struct Gmma;
#define ATTNKIT_GMMA_ATOMS(N)                                                                       \
  template <>                                                                                       \
  struct Gmma<half, N> {                                                                            \
    using SS = cute::SM90::GMMA::MMA_64x##N##x16_F32F16F16_SS<cute::SM90::GMMA::Major::K,           \
                                                              cute::SM90::GMMA::Major::K>;          \
    using RS = cute::SM90::GMMA::MMA_64x##N##x16_F32F16F16_RS<cute::SM90::GMMA::Major::K,           \
                                                              cute::SM90::GMMA::Major::MN>;         \
  };                                                                                                \
  template <>                                                                                       \
  struct Gmma<bf16, N> {                                                                            \
    using SS = cute::SM90::GMMA::MMA_64x##N##x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K,         \
                                                                cute::SM90::GMMA::Major::K>;        \
    using RS = cute::SM90::GMMA::MMA_64x##N##x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K,         \
                                                                cute::SM90::GMMA::Major::MN>;       \
  };
ATTNKIT_GMMA_ATOMS(48)
ATTNKIT_GMMA_ATOMS(64)
ATTNKIT_GMMA_ATOMS(80)
ATTNKIT_GMMA_ATOMS(96)
ATTNKIT_GMMA_ATOMS(128)
ATTNKIT_GMMA_ATOMS(192)
ATTNKIT_GMMA_ATOMS(256)
#undef ATTNKIT_GMMA_ATOMS

template <class Atom, int kN, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t da, uint64_t db, float (&d)[kN / 2], bool accumulate,
                                        std::index_sequence<I...>) {
  Atom::fma(da, db, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}
template <class Atom, int kN, size_t... I>
__device__ __forceinline__ void gmma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[kN / 2],
                                        std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], db, d[I]..., cute::SM90::GMMA::ScaleOut::One);
}
template <class T, int kN>
__device__ __forceinline__ void wgmma_ss(uint64_t da, uint64_t db, float (&d)[kN / 2], bool accumulate) {
  gmma_ss<typename Gmma<T, kN>::SS, kN>(da, db, d, accumulate, std::make_index_sequence<kN / 2>());
}
template <class T, int kN>
__device__ __forceinline__ void wgmma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[kN / 2]) {
  gmma_rs<typename Gmma<T, kN>::RS, kN>(a, db, d, std::make_index_sequence<kN / 2>());
}

#endif

}  // namespace sm90
}  // namespace cuda
}  // namespace attnkit
