// Launchers of the attention kernel instantiations (internal to csrc/cuda/*.cu).
#pragma once
#include "attention_common.cuh"
#include "kernels.h"

namespace attnkit {
namespace cuda {

// cp.async tile loads need 16-byte aligned rows: a 16-byte aligned base and (batch, head,
// row) strides in multiples of `per16` elements (8 half values, 16 codes).
inline bool rows_aligned16(const void* ptr, const int64_t* st, int per16) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && st[0] % per16 == 0 && st[1] % per16 == 0 &&
         st[2] % per16 == 0;
}

// SIMT kernel tile (attention_simt.cu): 4 warps x 4 rows, one key per lane.
constexpr int kSimtBlockM = 16;
constexpr int kSimtBlockN = 32;

size_t simt_smem_bytes(const AttentionParams& p, size_t acc_bytes);

template <class TQ, class TKV, class Acc>
cudaError_t launch_attention_simt(const AttentionParams& p, const FwdLaunch& L,
                                  cudaStream_t stream);

// Tile shape of the tensor-core kernel per head-dim bucket (attention_mma.cuh).
template <int kD>
struct MmaShape {
  static constexpr int kHeadDim = kD;
  // Heads up to 128: 32 rows per warp, so each K/V fragment read from smem feeds two MMAs
  // (at 16 rows per warp ldmatrix bandwidth, not the tensor cores, would set the pace).
  // Above 128 the O accumulators (kD / 2 fp32 registers per row pair) need the registers.
  static constexpr int kMT = kD <= 128 ? 2 : 1;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kMT * kWarps;
  // 64 keys per tile, but 32 at head dim 128 where 2 x 16 rows x 128 fp32 O accumulators
  // plus a 64-key S tile exceed 255 registers (ptxas: 350 bytes of spills on sm_90).
  static constexpr int kBlockN = kD == 128 ? 32 : 64;
  static constexpr int kStride = kD + 8;  // smem row stride (elements)
  static constexpr size_t smem_bytes(size_t elem) {
    return size_t(kBlockM + 2 * kBlockN) * kStride * elem;
  }
  static_assert(kD % 16 == 0, "head-dim buckets are multiples of 16");
  static_assert(kBlockN <= kStride, "rare_pv stages P in the Q tile");
};

// Defined in attention_mma.cuh, instantiated per head-dim bucket in attention_fwd_d*.cu.
template <class T, int kD>
cudaError_t launch_attention_mma(const AttentionParams& p, const FwdLaunch& L,
                                 cudaStream_t stream);

// Tile shape of the Hopper kernel (attention_hopper.cuh): 3 warpgroups (a TMA producer, two
// wgmma consumers of 64 rows each), 128 query rows, kStages K/V tiles in flight. Shared memory
// holds 128B-swizzled panels of 64 columns (hopper.cuh): Q, then kStages K and kStages V tiles,
// then the mbarriers; 1 KB of slack aligns the panels. The key tile shrinks with the head dim
// so that the registers fit the consumers' 240 and the whole fits the 227 KB of an sm_90 block.
template <int kD>
struct HopperShape {
  static constexpr int kHeadDim = kD;
  static constexpr int kThreads = 3 * 128;
  static constexpr int kBlockM = 128;
  // Keys per tile: S (kBlockN / 2 fp32), P (kBlockN / 4) and O (kD / 2) live together in the
  // overlapped schedule; at 96 (D 192) and 64 (D 256) ptxas spilled (nvcc 13.0, 240 registers).
  static constexpr int kBlockN = kD <= 128 ? 128 : kD <= 192 ? 80 : 48;
  // Stages of K/V in flight: 3 where they fit the 227 KB (all but head dim 192).
  static constexpr int kStages = kD == 192 ? 2 : 3;
  static constexpr int kPanels = (kD + 63) / 64;
  static constexpr size_t kQBytes = size_t(kPanels) * kBlockM * 128;
  static constexpr size_t kKVBytes = size_t(kPanels) * kBlockN * 128;  // one K or V tile
  static constexpr size_t kBarrierBytes = (1 + 4 * kStages) * 8;
  static constexpr size_t smem_bytes(size_t) {
    return 1024 + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes;
  }
  static_assert(kD % 16 == 0 && kBlockN % 16 == 0, "wgmma k-steps of 16");
  static_assert(smem_bytes(2) <= 232448, "an sm_90 block's shared memory");
};

// Defined in attention_hopper.cu (sm_90a builds with the CUTLASS headers, and the emulator).
// hopper_layout_ok: whether the call's tensors can be described to TMA (16-byte aligned
// bases, strides in multiples of 16 bytes, below 2^40 bytes) with the kernel's boxes, checked
// when planning it; num_pages: a paged cache's pool (0: not paged).
template <class T, int kD>
cudaError_t launch_attention_hopper(const AttentionParams& p, const FwdLaunch& L,
                                    cudaStream_t stream);
bool hopper_layout_ok(const AttentionParams& p, int64_t num_pages, int block_m, int block_n);

// Tile shape of the decode kernel (attention_decode.cuh): 16 query rows (the GQA group's heads
// times the few query positions) against kTileN keys per pipeline stage, 16 keys per warp.
template <int kD>
struct DecodeShape {
  static constexpr int kHeadDim = kD;
  static constexpr int kRows = 16;
  static constexpr int kWarps = kD <= 128 ? 4 : 2;  // above 128 the O registers double
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTileN = 16 * kWarps;
  static constexpr int kBlockM = kRows, kBlockN = kTileN;  // the planner's names
  static constexpr int kStride = kD + 8;  // smem row stride (elements), as MmaShape
  // Stages in flight: about 70-80 KB of K/V per block whatever the head dim, so two blocks
  // share an SM (sm_80/90) and the whole fits the 99 KB of sm_86/sm_89.
  static constexpr int kStages = kD <= 64 ? 4 : kD <= 96 ? 3 : 2;
  static constexpr size_t kStageElems = size_t(2) * kTileN * kStride;  // a K and a V tile
  static constexpr size_t smem_bytes(size_t elem) {
    return (size_t(kRows) * kStride + kStages * kStageElems) * elem;
  }
  // The warps' fp32 O partials are merged in the stage buffers after the last tile.
  static_assert(kStages * kStageElems * 2 >= size_t(kWarps) * kRows * kD * 4, "merge buffer");

  // 8-bit caches: two stages of K and V code rows (kCodeStride bytes, 16-byte chunks), then
  // each warp's 16 keys dequantized into q's dtype (a K and a V tile of kStride rows).
  static constexpr int kCodeStages = 2;
  static constexpr int kCodeStride = kD + 16;
  static constexpr size_t kCodeStageBytes = size_t(2) * kTileN * kCodeStride;
  static constexpr size_t kWarpTileElems = size_t(2) * 16 * kStride;
  static constexpr size_t code_smem_bytes(size_t elem) {
    return size_t(kRows) * kStride * elem + kCodeStages * kCodeStageBytes +
           kWarps * kWarpTileElems * elem;
  }
  static_assert(kCodeStages * kCodeStageBytes + kWarps * kWarpTileElems * 2 >=
                    size_t(kWarps) * kRows * kD * 4,
                "merge buffer (8-bit caches)");
};

// Defined in attention_decode.cuh, instantiated per head-dim bucket in attention_fwd_d*.cu.
// TC: the cache's storage (T itself, or int8_t / f8e4m3_t codes with per-row scales).
template <class T, class TC, int kD>
cudaError_t launch_attention_decode(const AttentionParams& p, const FwdLaunch& L,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkit
