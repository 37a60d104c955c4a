// Attention decode on tensor cores (flash-decoding): a few query rows against a long key
// range, fp16 / bf16 (docs/ARCHITECTURE.md, "CUDA decode kernel").
//
// attention_mma.cuh gives every warp 16-32 query rows of a 64-128 row tile: a decode step has
// pack * sq rows (the GQA group's query heads at one position), so most of that tile is
// padding and one block streams its keys through one K and one V buffer. Here:
//
//   * one block = the pack * sq <= 16 rows of one (batch, head group): a single m16 tile;
//   * its keys stream through a kStages-deep cp.async pipeline of kTileN-key K and V tiles
//     (16-byte copies, paged rows through the block table), so several tiles are in flight;
//   * warp w takes keys 16 w .. 16 w + 15 of every tile: S = Q K^T (mma.sync, fp32 accum),
//     online softmax, O += P V, each warp with its own running max, sum and O;
//   * the warps' states are merged through shared memory in a fixed order at the end;
//   * splits (grid z) cut each sequence's ACTUAL length (cache_seqlens, on the device), and
//     combine_kernel (attention_launch.cu) merges their partials.
//
// The plan routes here only calls whose masked keys are masked for every row alike (sq = 1,
// or no causal/window bound, and no mask): keys outside the block's range [j_lo, j_hi) are
// zero-filled in smem, keys past a sequence's end too, so no masked V value (NaN in an unused
// cache slot) can reach an output through P = 0. attention_mma.cuh's rare_pv path is not
// needed. Scores use the same pipeline (attention_common.cuh) as every other kernel.
#pragma once
#include <type_traits>

#include "attention_mma.cuh"

namespace attnkit {
namespace cuda {

// A (kRows x kD) tile of 8-bit codes into smem rows of kStride bytes, 16 codes per chunk:
// row r from base + row_off(r) (kNoRow: zeros), columns >= ncols zero. vec: 16-byte cp.async
// (rows 16-byte aligned), else byte loads.
template <int kD, int kRows, int kThreads, int kStride, class RowOff>
__device__ __forceinline__ void load_code_tile(uint8_t* s, const uint8_t* base, int ncols, bool vec,
                                               RowOff row_off) {
  constexpr int kChunks = (kD + 15) / 16;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx - r * kChunks;
    uint8_t* dst = s + r * kStride + c * 16;
    const int64_t off = row_off(r);
    const int valid = off == kNoRow ? 0 : min(16, max(0, ncols - c * 16));
    if (vec) {
      cp_async_16(dst, valid > 0 ? base + off + c * 16 : base, valid);
    } else {
      uint32_t w[4] = {0, 0, 0, 0};
      for (int e = 0; e < valid; ++e) w[e >> 2] |= uint32_t(base[off + c * 16 + e]) << (8 * (e & 3));
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// 8 codes (8 bytes) times the row's scale, rounded to T; columns >= ncols are zero (a padded
// column meets q's zero padding in the dot product: it must not be NaN).
__device__ __forceinline__ float code_value(uint32_t byte, int8_t) {
  return float(int8_t(uint8_t(byte)));
}
__device__ __forceinline__ float code_value(uint32_t byte, f8e4m3_t) {
  f8e4m3_t c;
  c.bits = uint8_t(byte);
  return to_float(c);
}
template <class T, class TC>
__device__ __forceinline__ uint4 dequant8(uint2 raw, float scale, int col0, int ncols) {
  uint32_t w[4];
#pragma unroll
  for (int e = 0; e < 8; e += 2) {
    const uint32_t word = e < 4 ? raw.x : raw.y;
    const int sh = 8 * (e & 3);
    const float x0 = col0 + e < ncols ? code_value(word >> sh, TC()) * scale : 0.0f;
    const float x1 = col0 + e + 1 < ncols ? code_value(word >> (sh + 8), TC()) * scale : 0.0f;
    w[e >> 1] = pack2<T>(x0, x1);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <class T, class TC, int kD>
__global__ void __launch_bounds__(DecodeShape<kD>::kThreads, 2)
    attention_decode_kernel(const AttentionParams p, const FwdLaunch L) {
  using S = DecodeShape<kD>;
  // 8-bit caches (int8 / e4m3 codes, a float scale per row): code rows are staged, then each
  // warp dequantizes its 16 keys into q's dtype (warp-private K and V tiles) before the MMAs.
  constexpr bool kCodes = !std::is_same<TC, T>::value;
  constexpr int kWarps = S::kWarps, kThreads = S::kThreads, kRows = S::kRows;
  constexpr int kTileN = S::kTileN, kStride = S::kStride;
  constexpr int kStages = kCodes ? S::kCodeStages : S::kStages;
  constexpr int kVT = kD / 8;  // O n-tiles
  ATTNKIT_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sStage = sQ + kRows * kStride;
  uint8_t* sCodes = reinterpret_cast<uint8_t*>(sStage);  // kCodes: the code stages
  T* sWarpTiles = reinterpret_cast<T*>(sCodes + S::kCodeStages * S::kCodeStageBytes);
  __shared__ float red_m[kWarps][kRows], red_l[kWarps][kRows];
  __shared__ float s_scale[kWarps][32];  // kCodes: the warp's 16 K then 16 V row scales

  BlockInfo bi;
  if (!block_info<kRows, kTileN>(p, L, bi)) return;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);
  const TC* K = static_cast<const TC*>(p.k);
  const TC* V = static_cast<const TC*>(p.v);
  const int ntiles = bi.n_end - bi.n_begin;

  // K and V rows of tile n into stage `st`; keys outside [j_lo, j_hi) are zeros.
  auto load_stage = [&](int st, int n) {
    const int j0 = n * kTileN;
    auto k_row = [&](int r) -> int64_t {
      const int j = j0 + r;
      return j >= bi.j_lo && j < bi.j_hi ? kv_row_offset(p, bi, j, p.k_stride) : kNoRow;
    };
    auto v_row = [&](int r) -> int64_t {
      const int j = j0 + r;
      return j >= bi.j_lo && j < bi.j_hi ? kv_row_offset(p, bi, j, p.v_stride) : kNoRow;
    };
    if constexpr (kCodes) {
      uint8_t* dk = sCodes + st * S::kCodeStageBytes;
      uint8_t* dv = dk + kTileN * S::kCodeStride;
      const uint8_t* kb = reinterpret_cast<const uint8_t*>(K);
      const uint8_t* vb = reinterpret_cast<const uint8_t*>(V);
      load_code_tile<kD, kTileN, kThreads, S::kCodeStride>(dk, kb, D, L.vec_loads, k_row);
      load_code_tile<kD, kTileN, kThreads, S::kCodeStride>(dv, vb, Dv, L.vec_loads, v_row);
    } else {
      T* dk = sStage + st * S::kStageElems;
      load_tile<T, kD, kTileN, kThreads>(dk, K, D, L.vec_loads, k_row);
      load_tile<T, kD, kTileN, kThreads>(dk + kTileN * kStride, V, Dv, L.vec_loads, v_row);
    }
  };
  // kCodes: lane l holds the scale of key l % 16 of this warp's 16 in tile n, K (l < 16) or
  // V, loaded when the tile's codes are requested (plain loads; the codes are in flight too).
  auto load_scale = [&](int n) -> float {
    const int j = n * kTileN + warp * 16 + (lane & 15);
    if (j < bi.j_lo || j >= bi.j_hi) return 0.0f;
    return lane < 16 ? p.k_scale[kv_row_offset(p, bi, j, p.k_scale_stride)]
                     : p.v_scale[kv_row_offset(p, bi, j, p.v_scale_stride)];
  };
  float scale_next = 0.0f;

  float o[kVT][4];
  float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.0f, 0.0f};  // log2 units
#pragma unroll
  for (int vt = 0; vt < kVT; ++vt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[vt][e] = 0.0f;

  // Prologue: Q and the first kStages - 1 tiles, one commit group per tile (empty groups
  // keep the count uniform, so the wait below is a constant).
  if (ntiles > 0) {
    load_tile<T, kD, kRows, kThreads>(sQ, static_cast<const T*>(p.q), D, L.vec_loads,
                                      [&](int r) -> int64_t {
                                        if (r >= bi.nrows) return kNoRow;
                                        int64_t h;
                                        int i;
                                        row_coords(bi, L, bi.r0 + r, h, i);
                                        return q_row_offset(p, bi, h, i);
                                      });
  }
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < ntiles) load_stage(st, bi.n_begin + st);
    cp_async_commit();
  }
  if constexpr (kCodes) {
    static_assert(S::kCodeStages == 2, "one tile of scales in flight");
    if (ntiles > 0) scale_next = load_scale(bi.n_begin);
  }

  const float scale_log2 = p.scale * kLog2e;
  const bool modifiers = p.alibi_slopes || p.softcap > 0.0f;  // (no mask: the plan's rule)
  RowScore rs[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) rs[hh] = row_score(p, bi, L, bi.r0 + g + 8 * hh);

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 2>();  // tile `it` has landed for this thread ...
    __syncthreads();               // ... for all, and every warp is done with tile it - 1
    const float scale_cur = scale_next;
    {
      const int next = it + kStages - 1;  // into the stage tile it - 1 used
      if (next < ntiles) {
        load_stage(next % kStages, bi.n_begin + next);
        if constexpr (kCodes) scale_next = load_scale(bi.n_begin + next);
      }
      cp_async_commit();
    }
    const T* sK;
    const T* sV;
    if constexpr (kCodes) {
      // Dequantize this warp's 16 keys into its own K and V tiles (columns padded to 16).
      T* wk = sWarpTiles + warp * S::kWarpTileElems;
      T* wv = wk + 16 * kStride;
      const uint8_t* ck = sCodes + (it % kStages) * S::kCodeStageBytes + warp * 16 * S::kCodeStride;
      const uint8_t* cv = ck + kTileN * S::kCodeStride;
      s_scale[warp][lane] = scale_cur;
      __syncwarp();
      const int k8 = (D + 15) / 16 * 2, v8 = (Dv + 15) / 16 * 2;  // 8-column chunks
      for (int idx = lane; idx < 16 * k8; idx += 32) {
        const int r = idx / k8, c = idx - r * k8;
        *reinterpret_cast<uint4*>(wk + r * kStride + c * 8) = dequant8<T, TC>(
            *reinterpret_cast<const uint2*>(ck + r * S::kCodeStride + c * 8), s_scale[warp][r], c * 8, D);
      }
      for (int idx = lane; idx < 16 * v8; idx += 32) {
        const int r = idx / v8, c = idx - r * v8;
        *reinterpret_cast<uint4*>(wv + r * kStride + c * 8) = dequant8<T, TC>(
            *reinterpret_cast<const uint2*>(cv + r * S::kCodeStride + c * 8), s_scale[warp][16 + r], c * 8, Dv);
      }
      __syncwarp();
      sK = wk;
      sV = wv;
    } else {
      sK = sStage + (it % kStages) * S::kStageElems + warp * 16 * kStride;
      sV = sK + kTileN * kStride;
    }
    const int n16 = (bi.n_begin + it) * kWarps + warp;  // this warp's 16-key tile, globally

    // ---- S = Q K^T (16 rows x 16 keys) ----
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      if (ks * 16 >= D) break;  // zero-padded columns: skip whole k-steps
      uint32_t a[4], b[4];
      ldmatrix_x4(a, sQ + (lane & 15) * kStride + ks * 16 + (lane >> 4) * 8);
      // matrices: keys {0-7, 0-7, 8-15, 8-15} x dims ks*16 + {0-7, 8-15, 0-7, 8-15}
      ldmatrix_x4(b, sK + ((lane & 7) + (lane >> 4) * 8) * kStride + ks * 16 + ((lane >> 3) & 1) * 8);
      mma_16816<T>(s[0], a, b[0], b[1]);
      mma_16816<T>(s[1], a, b[2], b[3]);
    }

    // ---- score pipeline (as attention_mma.cuh: plain tiles keep raw dot products) ----
    const bool plain = tile_inside(p, bi, n16, 16) && !modifiers && scale_log2 > 0.0f;
    const float mul = plain ? scale_log2 : 1.0f;
    if (!plain) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        score_row<2>(p, bi, rs[hh], n16 * 16, t, [&](int nt, int e) -> float& { return s[nt][2 * hh + e]; });
    }

    // ---- online softmax (attention_common.cuh), O rescaled by its alpha ----
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float alpha = online_softmax_row<2>([&](int nt, int e) -> float& { return s[nt][2 * hh + e]; },
                                                mul, row_max[hh], row_sum[hh]);
#pragma unroll
      for (int vt = 0; vt < kVT; ++vt) {
        o[vt][2 * hh] *= alpha;
        o[vt][2 * hh + 1] *= alpha;
      }
    }

    // ---- O += P V (P from S's registers: the accumulator layout is the A layout) ----
    uint32_t a[4];
    a[0] = pack2<T>(s[0][0], s[0][1]);
    a[1] = pack2<T>(s[0][2], s[0][3]);
    a[2] = pack2<T>(s[1][0], s[1][1]);
    a[3] = pack2<T>(s[1][2], s[1][3]);
#pragma unroll
    for (int vp = 0; vp < kD / 16; ++vp) {
      if (vp * 16 >= Dv) break;
      // matrices: keys {0-7, 8-15, 0-7, 8-15} x dims vp*16 + {0-7, 0-7, 8-15, 8-15}
      uint32_t b[4];
      ldmatrix_x4_trans(b, sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + vp * 16 + (lane >> 4) * 8);
      mma_16816<T>(o[2 * vp], a, b[0], b[1]);
      mma_16816<T>(o[2 * vp + 1], a, b[2], b[3]);
    }
  }

  // ---- merge the warps' states (fixed order), then write the rows or the split partial ----
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stage buffers, which now hold fp32 O
  float* sO = reinterpret_cast<float*>(sStage);  // [warp][row][kD]
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = row_sum[hh];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = g + 8 * hh;
    if (t == 0) {
      red_m[warp][r] = row_max[hh];
      red_l[warp][r] = l;
    }
#pragma unroll
    for (int vt = 0; vt < kVT; ++vt) {
      const int col = vt * 8 + 2 * t;
      if (col >= Dv) break;
      sO[(warp * kRows + r) * kD + col] = o[vt][2 * hh];
      sO[(warp * kRows + r) * kD + col + 1] = o[vt][2 * hh + 1];  // col + 1 < kD
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  for (int idx = tid; idx < bi.nrows * Dv; idx += kThreads) {
    const int r = idx / Dv, c = idx - r * Dv;
    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_m[w][r]);
    const float m_use = mx == neg_inf() ? 0.0f : mx;
    float l = 0.0f, acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      // Skip only warps without an allowed key (l exactly 0: the max key has weight 1): one
      // whose weight underflowed still adds 0 * O, which keeps a NaN its O holds, and a row of
      // NaN scores (m stays -inf, l is NaN) stays NaN.
      if (red_l[w][r] == 0.0f) continue;
      const float wt = fast_exp2(red_m[w][r] - m_use);
      l += wt * red_l[w][r];
      acc += wt * sO[(w * kRows + r) * kD + c];
    }
    // l == 0: no allowed key (fully masked row) -> output 0, lse -inf. A NaN l stays NaN.
    float val = l == 0.0f ? 0.0f : acc * (1.0f / l);
    float lse = l == 0.0f ? neg_inf() : m_use * kLn2 + logf(l);
    if (bi.poisoned) val = lse = quiet_nan();
    int64_t h;
    int i;
    row_coords(bi, L, bi.r0 + r, h, i);
    if (L.num_splits == 1) {
      out[out_row_offset(p, bi, h, i, p.out_stride) + c] = store_as<T>(val);
      if (p.lse && c == 0) p.lse[out_row_offset(p, bi, h, i, p.lse_stride)] = lse;
    } else {
      const int64_t ar = accum_row(p, bi, h, i, int(blockIdx.z));
      L.o_accum[ar * Dv + c] = val;
      if (c == 0) L.lse_accum[ar] = lse;
    }
  }
}

// One (dtype, cache storage, head-dim bucket) instantiation; grid (batch * head groups, 1,
// splits).
template <class T, class TC, int kD>
cudaError_t launch_attention_decode(const AttentionParams& p, const FwdLaunch& L,
                                    cudaStream_t stream) {
  using S = DecodeShape<kD>;
  const size_t smem = std::is_same<TC, T>::value ? S::smem_bytes(sizeof(T)) : S::code_smem_bytes(sizeof(T));
  return launch_fwd_kernel(attention_decode_kernel<T, TC, kD>, S::kThreads, smem, p, L, stream);
}

// The decode kernel's instantiations of one head-dim bucket (the attention_fwd_d*.cu files).
#define ATTNKIT_INSTANTIATE_DECODE(D)                                                       \
  template cudaError_t launch_attention_decode<half, half, D>(const AttentionParams&,        \
                                                              const FwdLaunch&, cudaStream_t); \
  template cudaError_t launch_attention_decode<bf16, bf16, D>(const AttentionParams&,        \
                                                              const FwdLaunch&, cudaStream_t); \
  template cudaError_t launch_attention_decode<half, int8_t, D>(const AttentionParams&,      \
                                                                const FwdLaunch&, cudaStream_t); \
  template cudaError_t launch_attention_decode<bf16, int8_t, D>(const AttentionParams&,      \
                                                                const FwdLaunch&, cudaStream_t); \
  template cudaError_t launch_attention_decode<half, f8e4m3_t, D>(const AttentionParams&,    \
                                                                  const FwdLaunch&, cudaStream_t); \
  template cudaError_t launch_attention_decode<bf16, f8e4m3_t, D>(const AttentionParams&,    \
                                                                  const FwdLaunch&, cudaStream_t);

}  // namespace cuda
}  // namespace attnkit
