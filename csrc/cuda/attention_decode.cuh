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
#include "attention_mma.cuh"

namespace attnkit {
namespace cuda {

template <class T, int kD>
__global__ void __launch_bounds__(DecodeShape<kD>::kThreads)
    attention_decode_kernel(const AttentionParams p, const FwdLaunch L) {
  using S = DecodeShape<kD>;
  constexpr int kWarps = S::kWarps, kThreads = S::kThreads, kRows = S::kRows;
  constexpr int kTileN = S::kTileN, kStride = S::kStride, kStages = S::kStages;
  constexpr int kVT = kD / 8;  // O n-tiles
  ATTNKIT_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sStage = sQ + kRows * kStride;
  __shared__ float red_m[kWarps][kRows], red_l[kWarps][kRows];

  BlockInfo bi;
  if (!block_info<kRows, kTileN>(p, L, bi)) return;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  const int ntiles = bi.n_end - bi.n_begin;

  // K and V rows of tile n into stage `st`; keys outside [j_lo, j_hi) are zeros.
  auto load_stage = [&](int st, int n) {
    T* dk = sStage + st * S::kStageElems;
    T* dv = dk + kTileN * kStride;
    const int j0 = n * kTileN;
    load_tile<T, kD, kTileN, kThreads>(dk, K, D, L.vec_loads, [&](int r) -> int64_t {
      const int j = j0 + r;
      return j >= bi.j_lo && j < bi.j_hi ? kv_row_offset(p, bi, j, p.k_stride) : kNoRow;
    });
    load_tile<T, kD, kTileN, kThreads>(dv, V, Dv, L.vec_loads, [&](int r) -> int64_t {
      const int j = j0 + r;
      return j >= bi.j_lo && j < bi.j_hi ? kv_row_offset(p, bi, j, p.v_stride) : kNoRow;
    });
  };

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

  const float scale_log2 = p.scale * kLog2e;
  const bool modifiers = p.alibi_slopes || p.softcap > 0.0f;  // (no mask: the plan's rule)
  RowScore rs[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) rs[hh] = row_score(p, bi, L, bi.r0 + g + 8 * hh);

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 2>();  // tile `it` has landed for this thread ...
    __syncthreads();               // ... for all, and every warp is done with tile it - 1
    {
      const int next = it + kStages - 1;  // into the stage tile it - 1 used
      if (next < ntiles) load_stage(next % kStages, bi.n_begin + next);
      cp_async_commit();
    }
    const T* sK = sStage + (it % kStages) * S::kStageElems + warp * 16 * kStride;
    const T* sV = sK + kTileN * kStride;
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
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = n16 * 16 + nt * 8 + 2 * t + e;
            s[nt][2 * hh + e] = score<float>(p, bi, rs[hh], j, s[nt][2 * hh + e]) * kLog2e;
          }
    }

    // ---- online softmax (a row's 4 owners agree on the max via shuffles) ----
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = fmaxf(fmaxf(s[0][2 * hh], s[0][2 * hh + 1]), fmaxf(s[1][2 * hh], s[1][2 * hh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx *= mul;
      const float m_new = fmaxf(row_max[hh], mx);
      const float m_use = m_new == neg_inf() ? 0.0f : m_new;  // -inf guard, as attention_mma
      const float alpha = fast_exp2(row_max[hh] - m_use);
      row_max[hh] = m_new;
      row_sum[hh] *= alpha;
#pragma unroll
      for (int vt = 0; vt < kVT; ++vt) {
        o[vt][2 * hh] *= alpha;
        o[vt][2 * hh + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = fast_exp2(fmaf(s[nt][2 * hh + e], mul, -m_use));
          s[nt][2 * hh + e] = pr;
          row_sum[hh] += pr;
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

// One (dtype, head-dim bucket) instantiation; grid (batch * head groups, 1, splits).
template <class T, int kD>
cudaError_t launch_attention_decode(const AttentionParams& p, const FwdLaunch& L,
                                    cudaStream_t stream) {
  return launch_fwd_kernel(attention_decode_kernel<T, kD>, DecodeShape<kD>::kThreads,
                           DecodeShape<kD>::smem_bytes(sizeof(T)), p, L, stream);
}

}  // namespace cuda
}  // namespace attnkit
