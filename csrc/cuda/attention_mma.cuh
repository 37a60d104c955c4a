// Attention forward for fp16 / bf16 on tensor cores, FlashAttention-2 style.
//
// One block = 4 warps = kBlockM query rows (16 * kMT rows per warp) of one (batch, head group)
// and one split of its keys. Shared memory holds the Q tile and ONE K and ONE V tile
// (kBlockN keys each); the pipeline overlaps every copy with math instead of double
// buffering, which keeps head dim 256 within the 99 KB sm_86/sm_89 limit:
//
//   Q, K[0] -> smem
//   for each key tile n:
//     V[n] -> smem (async)            overlaps  S = Q K[n]^T        (mma.sync, fp32 accum)
//     scores: scale (and the pipeline of attention_common.cuh where the tile needs it)
//     online softmax in registers: running max m, sum l, rescale O by exp2(m_old - m_new)
//     wait V[n]; K[n+1] -> smem (async) overlaps  O += P V[n]    (P reused from S's registers)
//   out = O / l, lse = m ln2 + log l
//
// The m16n8k16 accumulator layout of two adjacent S n-tiles is exactly the A-operand layout
// of a 16x16 P tile, so P never goes through shared memory. Rows of the smem tiles are padded
// by 8 elements (16 bytes): the 8 row addresses of every ldmatrix then hit distinct bank
// groups, no swizzle needed.
//
// Masked-out keys must not leak NaN/inf from V into the output (P = 0 there, but 0 * NaN =
// NaN in an MMA). Tiles that mask anything check their V tile; if it holds a non-finite value
// (rare), that tile's P V is done element by element, skipping the masked keys (see rare_pv).
// A key whose P underflowed to 0 is not skipped: its NaN reaches the row, as in torch.
#pragma once
#include "attention_kernels.h"

namespace attnkit {
namespace cuda {

constexpr int64_t kNoRow = INT64_MIN;

// Copies a (kRows x kD) tile into smem rows of stride kD + 8: row r comes from base +
// row_off(r) (kNoRow: zeros), columns >= ncols are zero. vec: 16-byte cp.async chunks (rows
// must be 16-byte aligned), else 2-byte loads. Zero fill matters: padded Q/K columns meet in
// the dot product and padded V rows meet P = 0.
template <class T, int kD, int kRows, int kThreads, class RowOff>
__device__ __forceinline__ void load_tile(T* s, const T* base, int ncols, bool vec,
                                          RowOff row_off) {
  constexpr int kChunks = kD / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx - r * kChunks;
    T* dst = s + r * (kD + 8) + c * 8;
    const int64_t off = row_off(r);
    const int valid = off == kNoRow ? 0 : min(8, max(0, ncols - c * 8));
    if (vec) {
      cp_async_16(dst, valid > 0 ? base + off + c * 8 : base, valid * 2);
    } else {
      uint32_t w[4] = {0, 0, 0, 0};
      if (valid > 0) {
        const uint16_t* src = reinterpret_cast<const uint16_t*>(base + off) + c * 8;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (e < valid) w[e >> 1] |= uint32_t(src[e]) << (16 * (e & 1));
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

template <class T, int kD>
__global__ void __launch_bounds__(MmaShape<kD>::kThreads, 1)
    attention_mma_kernel(const AttentionParams p, const FwdLaunch L) {
  using S = MmaShape<kD>;
  constexpr int kMT = S::kMT, kBlockM = S::kBlockM, kBlockN = S::kBlockN, kStride = S::kStride;
  constexpr int kThreads = S::kThreads;
  constexpr int kNT = kBlockN / 8;  // S n-tiles per m-tile
  constexpr int kVT = kD / 8;       // O n-tiles per m-tile
  ATTNKIT_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  BlockInfo bi;
  if (!block_info<kBlockM, kBlockN>(p, L, bi)) return;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);
  const int warp_row0 = warp * 16 * kMT;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);

  auto q_row = [&](int r) -> int64_t {
    if (r >= bi.nrows) return kNoRow;
    int64_t h;
    int i;
    row_coords(bi, L, bi.r0 + r, h, i);
    return q_row_offset(p, bi, h, i);
  };
  auto load_q = [&] { load_tile<T, kD, kBlockM, kThreads>(sQ, Q, D, L.vec_loads, q_row); };
  auto load_kv = [&](T* dst, const T* base, int n, int ncols, const int64_t* stride) {
    const int j0 = n * kBlockN;
    load_tile<T, kD, kBlockN, kThreads>(dst, base, ncols, L.vec_loads, [&](int r) -> int64_t {
      return j0 + r < bi.sk ? kv_row_offset(p, bi, j0 + r, stride) : kNoRow;
    });
  };

  float o[kMT][kVT][4];
  float row_max[kMT][2], row_sum[kMT][2];  // log2 units; per-thread partial sums
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int vt = 0; vt < kVT; ++vt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][vt][e] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = neg_inf();
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  if (bi.n_begin < bi.n_end) {
    load_q();
    load_kv(sK, K, bi.n_begin, D, p.k_stride);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
  }
  const float scale_log2 = p.scale * kLog2e;  // scores in log2 units: exp2 is one MUFU op
  const bool modifiers = p.mask || p.alibi_slopes || p.softcap > 0.0f;

  for (int n = bi.n_begin; n < bi.n_end; ++n) {
    load_kv(sV, V, n, Dv, p.v_stride);
    cp_async_commit();

    // ---- S = Q K^T ----
    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      if (ks * 16 >= D) break;  // zero-padded columns: skip whole k-steps
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
        ldmatrix_x4(a[mt], sQ + (warp_row0 + mt * 16 + (lane & 15)) * kStride + ks * 16 +
                               (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        // matrices: keys np*16 + {0-7, 0-7, 8-15, 8-15} x dims ks*16 + {0-7, 8-15, 0-7, 8-15}
        uint32_t b[4];
        ldmatrix_x4(b, sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * kStride + ks * 16 +
                           ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(s[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // ---- score pipeline ----
    // Plain tiles keep the raw dot products: with a positive scale, max(scale * s) = scale *
    // max(s) and exp2(scale * s - m) is one FMA (as FlashAttention-2), so `mul` is applied in
    // the softmax below. Other tiles run the full pipeline here and leave log2-unit scores.
    const bool inside = tile_inside(p, bi, n, kBlockN);
    const bool plain = inside && !modifiers && scale_log2 > 0.0f;
    const float mul = plain ? scale_log2 : 1.0f;
    if (!plain) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
          score_row<kNT>(p, bi, row_score(p, bi, L, bi.r0 + warp_row0 + mt * 16 + g + 8 * hh),
                         n * kBlockN, t, [&](int nt, int e) -> float& { return s[mt][nt][2 * hh + e]; });
    }

    // ---- online softmax (attention_common.cuh), O rescaled by its alpha ----
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float alpha = online_softmax_row<kNT>(
            [&](int nt, int e) -> float& { return s[mt][nt][2 * hh + e]; }, mul, row_max[mt][hh],
            row_sum[mt][hh]);
#pragma unroll
        for (int vt = 0; vt < kVT; ++vt) {
          o[mt][vt][2 * hh] *= alpha;
          o[mt][vt][2 * hh + 1] *= alpha;
        }
      }

    cp_async_wait_all();  // V[n] has landed ...
    __syncthreads();      // ... for every thread, and every warp is done reading K[n]
    if (n + 1 < bi.n_end) {
      load_kv(sK, K, n + 1, D, p.k_stride);
      cp_async_commit();
    }

    bool rare = false;
    if (!inside || p.mask) {  // block-uniform: P has forced zeros in this tile
      constexpr int kChunks = kD / 8;
      for (int idx = tid; idx < kBlockN * kChunks; idx += kThreads) {
        const int r = idx / kChunks, c = idx - r * kChunks;
        rare |= any_nonfinite8<T>(*reinterpret_cast<const uint4*>(sV + r * kStride + c * 8));
      }
      rare = __syncthreads_or(rare);
    }

    if (!rare) {
      // ---- O += P V ----
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int vp = 0; vp < kD / 16; ++vp) {
          if (vp * 16 >= Dv) break;
          // matrices: keys kk*16 + {0-7, 8-15, 0-7, 8-15} x dims vp*16 + {0-7, 0-7, 8-15, 8-15}
          uint32_t b[4];
          ldmatrix_x4_trans(b, sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride +
                                   vp * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<T>(o[mt][2 * vp], a[mt], b[0], b[1]);
            mma_16816<T>(o[mt][2 * vp + 1], a[mt], b[2], b[3]);
          }
        }
      }
    } else {
      // ---- rare_pv: V tile holds inf/NaN; skip masked keys (P == 0 and key_masked) so they
      // contribute nothing, while an underflowed P still multiplies its V (NaN stays NaN).
      // P (rounded to T, as the MMA would see it) is staged in the Q tile, which is then
      // reloaded. Every warp finished reading sQ before the barrier above.
      T* sP = sQ;
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
            *reinterpret_cast<uint32_t*>(sP + (warp_row0 + mt * 16 + g + 8 * hh) * kBlockN +
                                         nt * 8 + 2 * t) =
                pack2<T>(s[mt][nt][2 * hh], s[mt][nt][2 * hh + 1]);
      __syncthreads();
      RowScore rrs[kMT][2];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
          rrs[mt][hh] = row_score(p, bi, L, bi.r0 + warp_row0 + mt * 16 + g + 8 * hh);
#pragma unroll 1
      for (int j = 0; j < kBlockN; ++j) {
        float pr[kMT][2];
        bool skip[kMT][2];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            pr[mt][hh] = to_float(sP[(warp_row0 + mt * 16 + g + 8 * hh) * kBlockN + j]);
            skip[mt][hh] = pr[mt][hh] == 0.0f && key_masked(p, bi, rrs[mt][hh], n * kBlockN + j);
          }
#pragma unroll
        for (int vt = 0; vt < kVT; ++vt) {
          if (vt * 8 >= Dv) break;
          const float v0 = to_float(sV[j * kStride + vt * 8 + 2 * t]);
          const float v1 = to_float(sV[j * kStride + vt * 8 + 2 * t + 1]);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
              if (!skip[mt][hh]) {
                o[mt][vt][2 * hh] += pr[mt][hh] * v0;
                o[mt][vt][2 * hh + 1] += pr[mt][hh] * v1;
              }
        }
      }
      __syncthreads();
      load_q();
      cp_async_commit();
    }

    cp_async_wait_all();  // K[n+1] (and a reloaded Q) have landed ...
    __syncthreads();      // ... and every warp is done reading V[n]
  }

  // ---- epilogue ----
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = row_sum[mt][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      store_row<T, kVT>(p, bi, L, warp_row0 + mt * 16 + g + 8 * hh, t, row_max[mt][hh], l,
                        [&](int vt, int e) { return o[mt][vt][2 * hh + e]; });
    }
}

// Host side: opt a forward kernel into `smem` bytes of dynamic shared memory and launch it on
// grid (batch * head groups, row blocks, splits).
template <class Kernel>
cudaError_t launch_fwd_kernel(Kernel kernel, int threads, size_t smem, const AttentionParams& p,
                              const FwdLaunch& L, cudaStream_t stream) {
  cudaError_t err =
      cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(p.batch * L.head_groups), unsigned(L.num_m_blocks),
                  unsigned(L.num_splits));
  ATTNKIT_LAUNCH(kernel, grid, threads, smem, stream, p, L);
  return cudaGetLastError();
}

// One (dtype, head-dim bucket) instantiation.
template <class T, int kD>
cudaError_t launch_attention_mma(const AttentionParams& p, const FwdLaunch& L,
                                 cudaStream_t stream) {
  return launch_fwd_kernel(attention_mma_kernel<T, kD>, MmaShape<kD>::kThreads,
                           MmaShape<kD>::smem_bytes(sizeof(T)), p, L, stream);
}

// fn<half, D> and fn<bf16, D> of a launcher template (the attention_fwd_d*.cu files).
#define ATTNKIT_INSTANTIATE_FWD(fn, D)                                                       \
  template cudaError_t fn<half, D>(const AttentionParams&, const FwdLaunch&, cudaStream_t); \
  template cudaError_t fn<bf16, D>(const AttentionParams&, const FwdLaunch&, cudaStream_t);

}  // namespace cuda
}  // namespace attnkit
