// Attention backward on tensor cores, FlashAttention-2 style, fp16 / bf16, head dims up to 128
// (docs/ARCHITECTURE.md, "CUDA backward"). P is recomputed from q, k and the forward's lse.
//
//   pre:   D_i = rowsum(dO_i * O_i)                          one warp per row, fp32
//   dK/dV: one block per (batch, kv head, 64 keys); warp w owns keys 16w..16w+15 and loops
//          over every query head of the GQA group and every query tile that can reach its
//          keys:  S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T,
//          dS^T = P^T (dP^T - D) [softcap'] scale,  dV += P^T dO,  dK += dS^T Q
//   dQ:    one block per (batch, head, 64 query rows); warp w owns 16 rows and loops over the
//          key tiles:  S = Q K^T, P, dP = dO V^T, dS,  dQ += dS K
//
// Deterministic without atomics: every gradient element is summed by one warp in a fixed order
// (dK/dV over the group's heads in order). The S^T accumulators of the dK/dV kernel have the
// rows of the A operand of dV += P^T dO, as P's do in the forward (attention_mma.cuh).
//
// Masked pairs get P = 0 and dS = 0 exactly. A non-finite value in an operand row that only
// masked pairs meet (a NaN dO row of a query the key never sees, a NaN K row outside a
// window) must not reach a gradient through 0 * NaN in an MMA: tiles with masked pairs whose
// operand tile holds inf/NaN are accumulated element by element, skipping masked pairs (the
// CPU's accumulate_unmasked). Dropout is not supported here (the binding refuses it).
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "attention_mma.cuh"

namespace attnkit {
namespace cuda {
namespace {

constexpr int kBwdWarps = 4, kBwdThreads = 32 * kBwdWarps;
constexpr int kBwdKeys = 16 * kBwdWarps;  // keys of a dK/dV block
constexpr int kBwdQ = 32;                 // query rows per dK/dV step (2 k16 steps of P^T dO)
constexpr int kBwdRows = 16 * kBwdWarps;  // query rows of a dQ block
constexpr int kBwdN = 32;                 // keys per dQ step

template <int kD>
constexpr size_t bwd_kv_smem(size_t elem) {  // K, V (64 keys), Q, dO (32 rows) + P/dS staging
  return (size_t(2) * kBwdKeys + 2 * kBwdQ) * (kD + 8) * elem + size_t(kBwdWarps) * 2 * 16 * kBwdQ * elem;
}
template <int kD>
constexpr size_t bwd_q_smem(size_t elem) {  // Q, dO (64 rows), K, V (32 keys) + dS staging
  return (size_t(2) * kBwdRows + 2 * kBwdN) * (kD + 8) * elem + size_t(kBwdWarps) * 16 * kBwdN * elem;
}

std::atomic<bool>& bwd_flag() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("ATTNKIT_CUDA_BACKWARD");
    return e && std::strcmp(e, "1") == 0;
  }()};
  return on;
}

// True if every (query, key) pair of rows [i0, i1] x keys [j0, j1] is allowed by position.
__device__ __forceinline__ bool pairs_inside(const AttentionParams& p, const BlockInfo& bi, int i0,
                                             int i1, int j0, int j1) {
  if (i1 >= bi.sq || j1 >= bi.sk || p.mask) return false;
  if (p.causal && j1 > i0 + bi.off) return false;
  if (p.window_right >= 0 && j1 > i0 + bi.off + int(p.window_right)) return false;
  if (p.window_left >= 0 && j0 < i1 + bi.off - int(p.window_left)) return false;
  return true;
}

// P and dS * scale of one (query row, key) pair from the raw dot products s = q.k and
// dp = dO.v, the row's lse (natural log) and D: the CPU's grad_row. A dead row (lse -inf) has
// P = 0; a NaN lse gives NaN on every allowed key; masked keys give exactly 0.
__device__ __forceinline__ void grad_pair(const AttentionParams& p, const BlockInfo& bi,
                                          const RowScore& rs, int j, float s, float dp, float lse,
                                          float Di, float& P, float& dS) {
  const float fin = score<float>(p, bi, rs, j, s);
  if (fin == neg_inf() || lse == neg_inf()) {
    P = dS = 0.0f;
    return;
  }
  P = lse != lse ? quiet_nan() : fast_exp2((fin - lse) * kLog2e);
  float ds = P == 0.0f ? 0.0f : P * (dp - Di);
  if (p.softcap > 0.0f && ds != 0.0f) {
    const float t = tanhf(s * p.scale / p.softcap);
    ds *= 1.0f - t * t;
  }
  dS = ds * p.scale;
}

__global__ void __launch_bounds__(128) bwd_dot_rows(const AttentionBwdParams bp, float* Di) {
  const AttentionParams& p = bp.fwd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * 4 + warp;
  if (row >= p.batch * p.num_heads * p.seqlen_q) return;
  const int64_t i = row % p.seqlen_q, h = (row / p.seqlen_q) % p.num_heads;
  const int64_t b = row / (p.seqlen_q * p.num_heads);
  const int64_t oo = b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
  const int64_t go = b * bp.dout_stride[0] + h * bp.dout_stride[1] + i * bp.dout_stride[2];
  float acc = 0.0f;
  for (int64_t d = lane; d < p.head_dim_v; d += 32) {
    if (p.q_dtype == DType::f16)
      acc += to_float(static_cast<const half*>(p.out)[oo + d]) * to_float(static_cast<const half*>(bp.dout)[go + d]);
    else
      acc += to_float(static_cast<const bf16*>(p.out)[oo + d]) * to_float(static_cast<const bf16*>(bp.dout)[go + d]);
  }
  acc = warp_sum(acc);
  if (lane == 0) Di[row] = acc;
}

// True if any 16-bit value of the (rows x kD) smem tile is inf/NaN (block-wide).
template <class T, int kD, int kRows>
__device__ __forceinline__ bool tile_nonfinite(const T* s) {
  constexpr int kChunks = kD / 8;
  bool bad = false;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kBwdThreads) {
    const int r = idx / kChunks, c = idx - r * kChunks;
    bad |= any_nonfinite8<T>(*reinterpret_cast<const uint4*>(s + r * (kD + 8) + c * 8));
  }
  return __syncthreads_or(bad);
}

// One warp: s = A1 B1^T over d < D and dp = A2 B2^T over d < Dv, A1/A2 16 rows at a1/a2,
// B1/B2 kNT * 8 rows at b1/b2 (smem tiles of kD + 8 elements a row): S and dP of either kernel.
template <class T, int kD, int kNT>
__device__ __forceinline__ void two_products(float (&s)[kNT][4], float (&dp)[kNT][4], const T* a1,
                                             const T* b1, const T* a2, const T* b2, int D, int Dv,
                                             int lane) {
  constexpr int kStride = kD + 8;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    uint32_t x1[4], x2[4];
    const bool first = ks * 16 < D, second = ks * 16 < Dv;
    const int arow = (lane & 15) * kStride + ks * 16 + (lane >> 4) * 8;
    if (first) ldmatrix_x4(x1, a1 + arow);
    if (second) ldmatrix_x4(x2, a2 + arow);
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      const int boff = (np * 16 + (lane & 7) + (lane >> 4) * 8) * kStride + ks * 16 + ((lane >> 3) & 1) * 8;
      if (first) {
        ldmatrix_x4(b, b1 + boff);
        mma_16816<T>(s[2 * np], x1, b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], x1, b[2], b[3]);
      }
      if (second) {
        ldmatrix_x4(b, b2 + boff);
        mma_16816<T>(dp[2 * np], x2, b[0], b[1]);
        mma_16816<T>(dp[2 * np + 1], x2, b[2], b[3]);
      }
    }
  }
}

// The m16k16 A fragment of k-step kk from two accumulator n-tiles (the forward's P trick).
template <class T, int kNT>
__device__ __forceinline__ void acc_to_a(const float (&x)[kNT][4], int kk, uint32_t (&a)[4]) {
  a[0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
  a[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
  a[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
  a[3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

template <class Kernel>
cudaError_t launch_bwd_kernel(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream,
                              const AttentionBwdParams& bp, const float* Di) {
  cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const AttentionParams& p = bp.fwd;
  const bool vec = rows_aligned16(p.q, p.q_stride, 8) && rows_aligned16(p.k, p.k_stride, 8) &&
                   rows_aligned16(p.v, p.v_stride, 8) && rows_aligned16(bp.dout, bp.dout_stride, 8);
  ATTNKIT_LAUNCH(kernel, grid, kBwdThreads, smem, stream, bp, Di, vec);
  return cudaGetLastError();
}

// ---- dK, dV ----
template <class T, int kD>
__global__ void __launch_bounds__(kBwdThreads, 2) bwd_dkdv_kernel(const AttentionBwdParams bp, const float* Di, bool vec) {
  constexpr int kStride = kD + 8, kVT = kD / 8, kQT = kBwdQ / 8;
  const AttentionParams& p = bp.fwd;
  ATTNKIT_DYNAMIC_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBwdKeys * kStride;
  T* sQ = sV + kBwdKeys * kStride;
  T* sdO = sQ + kBwdQ * kStride;
  T* sStage = sdO + kBwdQ * kStride;  // per warp: P^T and dS^T (16 x kBwdQ each), rare path
  __shared__ float s_lse[kBwdQ], s_D[kBwdQ];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t group = p.num_heads / p.num_kv_heads;
  BlockInfo bi{};
  bi.b = blockIdx.x / p.num_kv_heads;
  bi.hkv = blockIdx.x - bi.b * p.num_kv_heads;
  bi.sq = int(p.seqlen_q);
  bi.sk = int(p.seqlen_k);
  bi.off = p.bottom_right ? bi.sk - bi.sq : 0;
  bi.r0 = 0;  // row_score: rows are the query positions of head bi.hg (set per head below)
  bi.nrows = bi.sq;
  FwdLaunch rows;
  rows.pack = 1;
  const int j0 = int(blockIdx.y) * kBwdKeys;
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);
  const T* Q = static_cast<const T*>(p.q);
  const T* dO = static_cast<const T*>(bp.dout);

  auto key_row = [&](int r, const int64_t* st) -> int64_t {
    return j0 + r < bi.sk ? bi.b * st[0] + bi.hkv * st[1] + int64_t(j0 + r) * st[2] : kNoRow;
  };
  load_tile<T, kD, kBwdKeys, kBwdThreads>(sK, static_cast<const T*>(p.k), D, vec,
                                          [&](int r) { return key_row(r, p.k_stride); });
  load_tile<T, kD, kBwdKeys, kBwdThreads>(sV, static_cast<const T*>(p.v), Dv, vec,
                                          [&](int r) { return key_row(r, p.v_stride); });

  float dk[kVT][4], dv[kVT][4];
#pragma unroll
  for (int vt = 0; vt < kVT; ++vt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[vt][e] = dv[vt][e] = 0.0f;

  // Query rows that can meet keys [j0, j0 + 64) by position (masks are per pair, below).
  int i_begin = 0, i_end = bi.sq;
  const int j_last = min(bi.sk, j0 + kBwdKeys) - 1;
  if (p.causal) i_begin = max(i_begin, j0 - bi.off);
  if (p.window_right >= 0) i_begin = max(i_begin, j0 - bi.off - int(p.window_right));
  if (p.window_left >= 0) i_end = min(i_end, j_last - bi.off + int(p.window_left) + 1);
  const int jw = j0 + warp * 16;  // this warp's first key

  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = bi.hkv * group + hh;
    bi.hg = h;
    for (int i0 = i_begin / kBwdQ * kBwdQ; i0 < i_end; i0 += kBwdQ) {
      __syncthreads();  // every warp is done with the previous Q / dO tile
      auto q_row = [&](int r, const int64_t* st) -> int64_t {
        return i0 + r < bi.sq ? bi.b * st[0] + h * st[1] + int64_t(i0 + r) * st[2] : kNoRow;
      };
      load_tile<T, kD, kBwdQ, kBwdThreads>(sQ, Q, D, vec, [&](int r) { return q_row(r, p.q_stride); });
      load_tile<T, kD, kBwdQ, kBwdThreads>(sdO, dO, Dv, vec, [&](int r) { return q_row(r, bp.dout_stride); });
      for (int r = tid; r < kBwdQ; r += kBwdThreads) {
        const int i = i0 + r;
        const bool ok = i < bi.sq;
        s_lse[r] = ok ? p.lse[bi.b * p.lse_stride[0] + h * p.lse_stride[1] + int64_t(i) * p.lse_stride[2]] : neg_inf();
        s_D[r] = ok ? Di[(bi.b * p.num_heads + h) * p.seqlen_q + i] : 0.0f;
      }
      cp_async_commit();
      cp_async_wait_all();  // this Q / dO tile (and, the first time, K and V) has landed ...
      __syncthreads();      // ... for every thread
      const bool rare = !pairs_inside(p, bi, i0, i0 + kBwdQ - 1, j0, j0 + kBwdKeys - 1) &&
                        (tile_nonfinite<T, kD, kBwdQ>(sQ) || tile_nonfinite<T, kD, kBwdQ>(sdO));

      // S^T = K Q^T and dP^T = V dO^T: 16 keys x kBwdQ queries per warp.
      float s[kQT][4], dp[kQT][4];
      two_products<T, kD, kQT>(s, dp, sK + warp * 16 * kStride, sQ, sV + warp * 16 * kStride, sdO, D, Dv, lane);
      // P^T and dS^T in place of s and dp. Element (key g + 8 hk, query 2t + e of n-tile nt).
#pragma unroll
      for (int nt = 0; nt < kQT; ++nt)
#pragma unroll
        for (int hk = 0; hk < 2; ++hk)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = nt * 8 + 2 * t + e, j = jw + g + 8 * hk;
            float P, dS;
            const RowScore rs = row_score(p, bi, rows, i0 + r);
            grad_pair(p, bi, rs, j, s[nt][2 * hk + e], dp[nt][2 * hk + e], s_lse[r], s_D[r], P, dS);
            s[nt][2 * hk + e] = P;
            dp[nt][2 * hk + e] = dS;
          }

      if (!rare) {
        // dV += P^T dO, dK += dS^T Q: k = queries (two k16 steps), B from the row-major Q/dO
        // tiles through ldmatrix.trans (as V in the forward).
#pragma unroll
        for (int kk = 0; kk < kBwdQ / 16; ++kk) {
          uint32_t ap[4], as[4];
          acc_to_a<T, kQT>(s, kk, ap);
          acc_to_a<T, kQT>(dp, kk, as);
#pragma unroll
          for (int vp = 0; vp < kD / 16; ++vp) {
            uint32_t b[4];
            const int brow = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, bcol = vp * 16 + (lane >> 4) * 8;
            if (vp * 16 < Dv) {
              ldmatrix_x4_trans(b, sdO + brow * kStride + bcol);
              mma_16816<T>(dv[2 * vp], ap, b[0], b[1]);
              mma_16816<T>(dv[2 * vp + 1], ap, b[2], b[3]);
            }
            if (vp * 16 < D) {
              ldmatrix_x4_trans(b, sQ + brow * kStride + bcol);
              mma_16816<T>(dk[2 * vp], as, b[0], b[1]);
              mma_16816<T>(dk[2 * vp + 1], as, b[2], b[3]);
            }
          }
        }
      } else {
        // Rare: stage P^T and dS^T (rounded to T, as the MMA would see them) and accumulate
        // element by element, skipping masked pairs.
        T* sP = sStage + warp * 2 * 16 * kBwdQ;
        T* sS = sP + 16 * kBwdQ;
#pragma unroll
        for (int nt = 0; nt < kQT; ++nt)
#pragma unroll
          for (int hk = 0; hk < 2; ++hk)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              sP[(g + 8 * hk) * kBwdQ + nt * 8 + 2 * t + e] = store_as<T>(s[nt][2 * hk + e]);
              sS[(g + 8 * hk) * kBwdQ + nt * 8 + 2 * t + e] = store_as<T>(dp[nt][2 * hk + e]);
            }
        __syncwarp();
#pragma unroll 1
        for (int r = 0; r < kBwdQ; ++r) {
          const RowScore rs = row_score(p, bi, rows, i0 + r);
#pragma unroll
          for (int hk = 0; hk < 2; ++hk) {
            const int j = jw + g + 8 * hk;
            if (key_masked(p, bi, rs, j)) continue;
            const float P = to_float(sP[(g + 8 * hk) * kBwdQ + r]);
            const float dS = to_float(sS[(g + 8 * hk) * kBwdQ + r]);
#pragma unroll
            for (int vt = 0; vt < kVT; ++vt) {
              const int col = vt * 8 + 2 * t;
              dv[vt][2 * hk] += P * to_float(sdO[r * kStride + col]);
              dv[vt][2 * hk + 1] += P * to_float(sdO[r * kStride + col + 1]);
              dk[vt][2 * hk] += dS * to_float(sQ[r * kStride + col]);
              dk[vt][2 * hk + 1] += dS * to_float(sQ[r * kStride + col + 1]);
            }
          }
        }
        __syncwarp();
      }
    }
  }

  // Write this warp's 16 rows of dK and dV.
  T* gk = static_cast<T*>(bp.dk);
  T* gv = static_cast<T*>(bp.dv);
#pragma unroll
  for (int hk = 0; hk < 2; ++hk) {
    const int j = jw + g + 8 * hk;
    if (j >= bi.sk) continue;
    const int64_t ko = bi.b * bp.dk_stride[0] + bi.hkv * bp.dk_stride[1] + int64_t(j) * bp.dk_stride[2];
    const int64_t vo = bi.b * bp.dv_stride[0] + bi.hkv * bp.dv_stride[1] + int64_t(j) * bp.dv_stride[2];
#pragma unroll
    for (int vt = 0; vt < kVT; ++vt) {
      const int col = vt * 8 + 2 * t;
      if (col < D) gk[ko + col] = store_as<T>(dk[vt][2 * hk]);
      if (col + 1 < D) gk[ko + col + 1] = store_as<T>(dk[vt][2 * hk + 1]);
      if (col < Dv) gv[vo + col] = store_as<T>(dv[vt][2 * hk]);
      if (col + 1 < Dv) gv[vo + col + 1] = store_as<T>(dv[vt][2 * hk + 1]);
    }
  }
}

// ---- dQ ----
template <class T, int kD>
__global__ void __launch_bounds__(kBwdThreads, 2) bwd_dq_kernel(const AttentionBwdParams bp, const float* Di, bool vec) {
  constexpr int kStride = kD + 8, kVT = kD / 8, kNT = kBwdN / 8;
  const AttentionParams& p = bp.fwd;
  ATTNKIT_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBwdRows * kStride;
  T* sK = sdO + kBwdRows * kStride;
  T* sV = sK + kBwdN * kStride;
  T* sStage = sV + kBwdN * kStride;  // per warp: dS (16 x kBwdN), rare path

  FwdLaunch L;
  L.pack = 1;
  L.head_groups = p.num_heads;
  L.num_m_blocks = (p.seqlen_q + kBwdRows - 1) / kBwdRows;
  L.num_splits = 1;
  BlockInfo bi;
  if (!block_info<kBwdRows, kBwdN>(p, L, bi)) return;
  const int64_t h = bi.hg;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);
  const int wr0 = warp * 16;  // this warp's first row in the block

  auto q_row = [&](int r, const int64_t* st) -> int64_t {
    return r < bi.nrows ? bi.b * st[0] + h * st[1] + int64_t(bi.r0 + r) * st[2] : kNoRow;
  };
  load_tile<T, kD, kBwdRows, kBwdThreads>(sQ, static_cast<const T*>(p.q), D, vec,
                                          [&](int r) { return q_row(r, p.q_stride); });
  load_tile<T, kD, kBwdRows, kBwdThreads>(sdO, static_cast<const T*>(bp.dout), Dv, vec,
                                          [&](int r) { return q_row(r, bp.dout_stride); });
  float lse[2], Dr[2];
  RowScore rs[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = wr0 + g + 8 * hh, i = bi.r0 + r;
    rs[hh] = row_score(p, bi, L, bi.r0 + r);
    lse[hh] = r < bi.nrows ? p.lse[bi.b * p.lse_stride[0] + h * p.lse_stride[1] + int64_t(i) * p.lse_stride[2]]
                           : neg_inf();
    Dr[hh] = r < bi.nrows ? Di[(bi.b * p.num_heads + h) * p.seqlen_q + i] : 0.0f;
  }
  float dq[kVT][4];
#pragma unroll
  for (int vt = 0; vt < kVT; ++vt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[vt][e] = 0.0f;

  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  for (int n = bi.n_begin; n < bi.n_end; ++n) {
    __syncthreads();  // every warp is done with the previous K / V tile
    const int j0 = n * kBwdN;
    auto k_row = [&](int r, const int64_t* st) -> int64_t {
      return j0 + r < bi.sk ? kv_row_offset(p, bi, j0 + r, st) : kNoRow;
    };
    load_tile<T, kD, kBwdN, kBwdThreads>(sK, K, D, vec, [&](int r) { return k_row(r, p.k_stride); });
    load_tile<T, kD, kBwdN, kBwdThreads>(sV, V, Dv, vec, [&](int r) { return k_row(r, p.v_stride); });
    cp_async_commit();
    cp_async_wait_all();  // this K / V tile (and, the first time, Q and dO) has landed ...
    __syncthreads();      // ... for every thread
    const bool rare = !tile_inside(p, bi, n, kBwdN) && tile_nonfinite<T, kD, kBwdN>(sK);

    float s[kNT][4], dp[kNT][4];
    two_products<T, kD, kNT>(s, dp, sQ + wr0 * kStride, sK, sdO + wr0 * kStride, sV, D, Dv, lane);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float P, dS;
          grad_pair(p, bi, rs[hh], j0 + nt * 8 + 2 * t + e, s[nt][2 * hh + e], dp[nt][2 * hh + e], lse[hh],
                    Dr[hh], P, dS);
          dp[nt][2 * hh + e] = dS;
        }

    if (!rare) {
      // dQ += dS K: k = keys, B from the row-major K tile through ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kBwdN / 16; ++kk) {
        uint32_t as[4];
        acc_to_a<T, kNT>(dp, kk, as);
#pragma unroll
        for (int vp = 0; vp < kD / 16; ++vp) {
          if (vp * 16 >= D) break;
          uint32_t b[4];
          ldmatrix_x4_trans(b, sK + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + vp * 16 +
                                   (lane >> 4) * 8);
          mma_16816<T>(dq[2 * vp], as, b[0], b[1]);
          mma_16816<T>(dq[2 * vp + 1], as, b[2], b[3]);
        }
      }
    } else {
      T* sS = sStage + warp * 16 * kBwdN;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            sS[(g + 8 * hh) * kBwdN + nt * 8 + 2 * t + e] = store_as<T>(dp[nt][2 * hh + e]);
      __syncwarp();
#pragma unroll 1
      for (int jj = 0; jj < kBwdN; ++jj) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          if (key_masked(p, bi, rs[hh], j0 + jj)) continue;
          const float dS = to_float(sS[(g + 8 * hh) * kBwdN + jj]);
#pragma unroll
          for (int vt = 0; vt < kVT; ++vt) {
            const int col = vt * 8 + 2 * t;
            dq[vt][2 * hh] += dS * to_float(sK[jj * kStride + col]);
            dq[vt][2 * hh + 1] += dS * to_float(sK[jj * kStride + col + 1]);
          }
        }
      }
      __syncwarp();
    }
  }

  T* gq = static_cast<T*>(bp.dq);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = wr0 + g + 8 * hh;
    if (r >= bi.nrows) continue;
    const int64_t qo = bi.b * bp.dq_stride[0] + h * bp.dq_stride[1] + int64_t(bi.r0 + r) * bp.dq_stride[2];
#pragma unroll
    for (int vt = 0; vt < kVT; ++vt) {
      const int col = vt * 8 + 2 * t;
      if (col < D) gq[qo + col] = store_as<T>(dq[vt][2 * hh]);
      if (col + 1 < D) gq[qo + col + 1] = store_as<T>(dq[vt][2 * hh + 1]);
    }
  }
}

template <class T, int kD>
cudaError_t launch_bwd(const AttentionBwdParams& bp, const float* Di, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  cudaError_t err = cudaSuccess;
  if (p.seqlen_k > 0)
    err = launch_bwd_kernel(bwd_dkdv_kernel<T, kD>,
                            dim3(unsigned(p.batch * p.num_kv_heads), unsigned((p.seqlen_k + kBwdKeys - 1) / kBwdKeys)),
                            bwd_kv_smem<kD>(sizeof(T)), stream, bp, Di);
  if (err == cudaSuccess && p.seqlen_q > 0)
    err = launch_bwd_kernel(bwd_dq_kernel<T, kD>,
                            dim3(unsigned(p.batch * p.num_heads), unsigned((p.seqlen_q + kBwdRows - 1) / kBwdRows)),
                            bwd_q_smem<kD>(sizeof(T)), stream, bp, Di);
  return err;
}

template <class T>
cudaError_t launch_bwd_bucket(const AttentionBwdParams& bp, const float* Di, int bucket, cudaStream_t s) {
  switch (bucket) {
    case 64: return launch_bwd<T, 64>(bp, Di, s);
    case 96: return launch_bwd<T, 96>(bp, Di, s);
    case 128: return launch_bwd<T, 128>(bp, Di, s);
  }
  return cudaErrorInvalidValue;
}

int bwd_bucket(int64_t d) { return d <= 64 ? 64 : d <= 96 ? 96 : 128; }

}  // namespace

bool backward_kernel_enabled() { return bwd_flag().load(); }
void set_backward_kernel_enabled(bool on) { bwd_flag().store(on); }

const char* attention_bwd_plan(const AttentionBwdParams& bp, const DeviceInfo& dev, size_t* scratch_bytes) {
  const AttentionParams& p = bp.fwd;
  if (!backward_kernel_enabled())
    return "the CUDA backward has not run on a GPU yet and is off (ATTNKIT_CUDA_BACKWARD=1 turns it on)";
  if (p.q_dtype != DType::f16 && p.q_dtype != DType::bf16)
    return "the CUDA backward takes float16 or bfloat16 (use CPU arrays for float32/float64)";
  if (p.head_dim > 128 || p.head_dim_v > 128) return "the CUDA backward takes head dims up to 128";
  if (p.dropout_p != 0.0f) return "dropout is not supported on CUDA devices";
  if (p.seqlen_q >= (int64_t(1) << 30) || p.seqlen_k >= (int64_t(1) << 30))
    return "sequence lengths must be below 2^30 on CUDA devices";
  const int bucket = bwd_bucket(std::max(p.head_dim, p.head_dim_v));
  const size_t smem = bucket == 64 ? std::max(bwd_kv_smem<64>(2), bwd_q_smem<64>(2))
                      : bucket == 96 ? std::max(bwd_kv_smem<96>(2), bwd_q_smem<96>(2))
                                     : std::max(bwd_kv_smem<128>(2), bwd_q_smem<128>(2));
  if (smem > size_t(dev.max_smem_optin)) return "these head dims need more shared memory than this GPU allows";
  *scratch_bytes = size_t(p.batch * p.num_heads * p.seqlen_q) * sizeof(float);
  return nullptr;
}

cudaError_t attention_bwd(AttentionBwdParams bp, void* scratch, cudaStream_t stream) {
  AttentionParams& p = bp.fwd;
  const int64_t span = p.seqlen_q + p.seqlen_k;
  if (p.window_left > span) p.window_left = -1;
  if (p.window_right > span) p.window_right = -1;
  if (p.batch == 0 || p.num_heads == 0) return cudaSuccess;
  float* Di = static_cast<float*>(scratch);
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
  if (rows > 0) {
    ATTNKIT_LAUNCH(bwd_dot_rows, unsigned((rows + 3) / 4), 128, 0, stream, bp, Di);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int bucket = bwd_bucket(std::max(p.head_dim, p.head_dim_v));
  return p.q_dtype == DType::f16 ? launch_bwd_bucket<half>(bp, Di, bucket, stream)
                                 : launch_bwd_bucket<bf16>(bp, Di, bucket, stream);
}

}  // namespace cuda
}  // namespace attnkit
