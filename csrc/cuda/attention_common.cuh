// Pieces both CUDA attention kernels share (tensor-core attention_mma.cuh, fp32/fp64
// attention_simt.cu): the grid -> work mapping, sequence addressing (dense, varlen, paged,
// per-batch key counts), the allowed key range of a block of query rows, the score pipeline
// and the epilogue. One place, so both kernels (and the CPU kernels) agree.
//
// Score pipeline for query row i and key j (as csrc/cpu/attention_common.h):
//   1. s = scale * q_i . k_j
//   2. softcap: s = softcap * tanh(s / softcap)
//   3. ALiBi:   s -= slope[b, h] * |i + off - j|
//   4. causal / window bounds and a bool mask (or a float mask's -inf) set s = -inf
//   5. a float mask is added
// off = 0 (top-left) or Sk - Sq (bottom-right), per sequence.
//
// Work mapping (grid): x = batch * head_groups + head_group, y = row block (heaviest first),
// z = split of the key range. A "row" is a (query head, query position) pair: with GQA
// packing (pack > 1) the `pack` query heads that share one kv head are stacked along the row
// dim (row = g * sq + i), so a decode step (sq = 1) still fills a 64-row tile and K/V are read
// once per kv head instead of once per query head.
#pragma once
#include <climits>

#include "common.cuh"

namespace attnkit {
namespace cuda {

struct FwdLaunch {
  int64_t pack = 1;          // query heads stacked into the row dim (1 = none)
  int64_t head_groups = 0;   // num_heads / pack
  int64_t num_m_blocks = 0;  // row blocks per (batch, head group)
  int num_splits = 1;        // key-range splits; > 1 writes partials to o_accum / lse_accum
  int64_t split_keys = 0;    // the key range the splits cut: the longest sequence's length
  bool split_own_range = false;  // splits cut each block's own key range instead (decode kernel)
  float* o_accum = nullptr;  // [split][b][h][i][dv], i < seqlen_q (the longest sequence)
  float* lse_accum = nullptr;  // [split][b][h][i]
  bool vec_loads = false;    // q/k/v rows are 16-byte aligned: cp.async tile loads
  bool vec_store = false;    // out rows are 4-byte aligned: paired 16-bit stores
  int64_t num_pages = 0;     // a paged cache's pool (the Hopper kernel's TMA bounds)
};

// What one thread block computes. Positions are int: the binding limits sequence lengths to
// 2^30 and clamps windows, so i + off +- window never overflows.
struct BlockInfo {
  int64_t b, hg, hkv;
  int sq, sk, q_tok, k_tok, off;
  int r0, nrows;       // first packed row of the block and how many exist
  int i_lo, i_hi;      // query positions the block's rows span
  int j_lo, j_hi;      // keys any row of the block may attend: [j_lo, j_hi) (empty: 0, 0)
  int n_begin, n_end;  // key tiles this block (split) visits
  bool poisoned;       // invalid cache metadata for this batch: results are NaN
};

// Fills bi for the block at blockIdx; false if the block has no rows (nothing to write).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ bool block_info(const AttentionParams& p, const FwdLaunch& L,
                                           BlockInfo& bi) {
  bi.b = blockIdx.x / L.head_groups;
  bi.hg = blockIdx.x - bi.b * L.head_groups;
  const int64_t group = p.num_heads / p.num_kv_heads;  // query heads per kv head
  bi.hkv = (bi.hg * L.pack) / group;
  const int m_block = int(L.num_m_blocks - 1 - blockIdx.y);  // long causal blocks start first
  if (p.cu_seqlens_q) {
    bi.q_tok = int(p.cu_seqlens_q[bi.b]);
    bi.sq = int(p.cu_seqlens_q[bi.b + 1]) - bi.q_tok;
  } else {
    bi.q_tok = 0;
    bi.sq = int(p.seqlen_q);
  }
  if (p.cu_seqlens_k) {
    bi.k_tok = int(p.cu_seqlens_k[bi.b]);
    bi.sk = int(p.cu_seqlens_k[bi.b + 1]) - bi.k_tok;
  } else {
    bi.k_tok = 0;
    bi.sk = int(p.seqlen_k);
  }
  bi.poisoned = false;
  if (p.seqlens_k) {
    // Cache lengths were checked on the device (kv_meta_kernel): -1 marks invalid metadata.
    const int64_t len = p.seqlens_k[bi.b];
    if (len < 0 || len > p.seqlen_k) {
      bi.poisoned = true;
      bi.sk = 0;
    } else {
      bi.sk = int(len);
    }
  }
  bi.off = p.bottom_right ? bi.sk - bi.sq : 0;
  const int rows = int(L.pack) * bi.sq;
  bi.r0 = m_block * kBlockM;
  if (bi.r0 >= rows) return false;
  bi.nrows = min(kBlockM, rows - bi.r0);
  const int r1 = bi.r0 + bi.nrows - 1;
  if (bi.r0 / bi.sq == r1 / bi.sq) {
    bi.i_lo = bi.r0 % bi.sq;
    bi.i_hi = r1 % bi.sq;
  } else {  // the block spans two packed heads: be conservative
    bi.i_lo = 0;
    bi.i_hi = bi.sq - 1;
  }
  // Keys any row of the block may attend: [j_lo, j_hi).
  int j_lo = 0, j_hi = bi.sk;
  const int c_lo = bi.i_lo + bi.off, c_hi = bi.i_hi + bi.off;
  if (p.causal) j_hi = min(j_hi, c_hi + 1);
  if (p.window_right >= 0) j_hi = min(j_hi, c_hi + int(p.window_right) + 1);
  if (p.window_left >= 0) j_lo = max(j_lo, c_lo - int(p.window_left));
  if (bi.poisoned || j_hi <= j_lo) {
    bi.n_begin = bi.n_end = 0;
    bi.j_lo = bi.j_hi = 0;
  } else {
    bi.j_lo = j_lo;
    bi.j_hi = j_hi;
    bi.n_begin = j_lo / kBlockN;
    bi.n_end = (j_hi + kBlockN - 1) / kBlockN;
  }
  if (L.num_splits > 1 && L.split_own_range) {
    // Splits cut this block's own tiles evenly: the sequence's actual length (cache_seqlens,
    // read on the device), not the cache capacity or the longest sequence. Still a function
    // of the shapes and lengths only, so every run splits, and rounds, identically.
    const int tiles = bi.n_end - bi.n_begin;
    const int per = (tiles + L.num_splits - 1) / L.num_splits;
    bi.n_begin = min(bi.n_end, bi.n_begin + int(blockIdx.z) * per);
    bi.n_end = min(bi.n_end, bi.n_begin + per);
  } else if (L.num_splits > 1) {
    // Splits cut the key range of the longest sequence evenly (a function of the shapes and
    // host-known lengths only, so every run splits, and therefore rounds, identically), then
    // intersect with the block's range.
    const int tiles = int((L.split_keys + kBlockN - 1) / kBlockN);
    const int per = (tiles + L.num_splits - 1) / L.num_splits;
    const int s0 = int(blockIdx.z) * per, s1 = min(tiles, s0 + per);
    bi.n_begin = max(bi.n_begin, s0);
    bi.n_end = min(bi.n_end, s1);
    if (bi.n_end < bi.n_begin) bi.n_end = bi.n_begin;
  }
  return true;
}

// Packed row R -> query head and position.
__device__ __forceinline__ void row_coords(const BlockInfo& bi, const FwdLaunch& L, int R,
                                           int64_t& h, int& i) {
  const int g = R / bi.sq;
  i = R - g * bi.sq;
  h = bi.hg * L.pack + g;
}

__device__ __forceinline__ int64_t q_row_offset(const AttentionParams& p, const BlockInfo& bi,
                                                int64_t h, int i) {
  return (p.cu_seqlens_q ? 0 : bi.b * p.q_stride[0]) + h * p.q_stride[1] +
         int64_t(bi.q_tok + i) * p.q_stride[2];
}
__device__ __forceinline__ int64_t out_row_offset(const AttentionParams& p, const BlockInfo& bi,
                                                  int64_t h, int i, const int64_t* stride) {
  return (p.cu_seqlens_q ? 0 : bi.b * stride[0]) + h * stride[1] +
         int64_t(bi.q_tok + i) * stride[2];
}
// Key / value row j of the block's kv head (j < sk: paged entries were validated for those).
__device__ __forceinline__ int64_t kv_row_offset(const AttentionParams& p, const BlockInfo& bi,
                                                 int j, const int64_t* stride) {
  if (p.block_table) {
    const int64_t page = p.block_table[bi.b * p.block_table_stride + j / p.page_size];
    return page * stride[0] + bi.hkv * stride[1] + int64_t(j % p.page_size) * stride[2];
  }
  return (p.cu_seqlens_k ? 0 : bi.b * stride[0]) + bi.hkv * stride[1] +
         int64_t(bi.k_tok + j) * stride[2];
}

// True if every (row, key) of key tile n is allowed by position (no causal/window edge and
// no key past sk), so the tile needs no per-element bounds.
__device__ __forceinline__ bool tile_inside(const AttentionParams& p, const BlockInfo& bi, int n,
                                            int kBlockN) {
  const int j0 = n * kBlockN, j1 = j0 + kBlockN - 1;
  if (j1 >= bi.sk) return false;
  const int c_lo = bi.i_lo + bi.off, c_hi = bi.i_hi + bi.off;
  if (p.causal && j1 > c_lo) return false;
  if (p.window_right >= 0 && j1 > c_lo + int(p.window_right)) return false;
  if (p.window_left >= 0 && j0 < c_hi - int(p.window_left)) return false;
  return true;
}

// Per-row constants of the score pipeline.
struct RowScore {
  int c;          // i + off; INT_MIN for a padding row (all scores -inf)
  float slope;    // ALiBi slope of (b, h)
  int64_t mask0;  // element offset of mask[b, h, i, 0]
};

__device__ __forceinline__ RowScore row_score(const AttentionParams& p, const BlockInfo& bi,
                                              const FwdLaunch& L, int R) {
  RowScore rs;
  if (R >= bi.r0 + bi.nrows) {
    rs.c = INT_MIN;
    rs.slope = 0.0f;
    rs.mask0 = 0;
    return rs;
  }
  int64_t h;
  int i;
  row_coords(bi, L, R, h, i);
  rs.c = i + bi.off;
  rs.slope = p.alibi_slopes ? p.alibi_slopes[bi.b * p.alibi_stride[0] + h * p.alibi_stride[1]]
                            : 0.0f;
  rs.mask0 = p.mask ? bi.b * p.mask_stride[0] + h * p.mask_stride[1] + int64_t(i) * p.mask_stride[2]
                    : 0;
  return rs;
}

// Steps 1-5 of the pipeline for one raw dot product s = q_i . k_j; returns the natural-log
// score, or -inf where key j is not allowed.
template <class Acc>
__device__ __forceinline__ Acc score(const AttentionParams& p, const BlockInfo& bi,
                                     const RowScore& rs, int j, Acc s) {
  if (rs.c == INT_MIN || j >= bi.sk) return Acc(neg_inf());
  s *= Acc(p.scale);
  if (p.softcap > 0.0f) s = Acc(p.softcap) * tanh(s / Acc(p.softcap));
  if (p.alibi_slopes) s -= Acc(rs.slope) * Acc(abs(rs.c - j));
  if (p.causal && j > rs.c) return Acc(neg_inf());
  if (p.window_left >= 0 && j < rs.c - int(p.window_left)) return Acc(neg_inf());
  if (p.window_right >= 0 && j > rs.c + int(p.window_right)) return Acc(neg_inf());
  if (p.mask) {
    const int64_t off = rs.mask0 + int64_t(j) * p.mask_stride[3];
    if (p.mask_dtype == DType::boolean) {
      if (!static_cast<const uint8_t*>(p.mask)[off]) return Acc(neg_inf());
    } else {
      Acc m;
      if (p.mask_dtype == DType::f64)
        m = Acc(static_cast<const double*>(p.mask)[off]);
      else
        m = Acc(load_dtype_as_float(p.mask, off, p.mask_dtype));
      if (m == Acc(neg_inf())) return Acc(neg_inf());
      s += m;
    }
  }
  return s;
}

// True when key j is masked out for the row (a padding row or key, causal/window bounds, a
// bool mask's False, a float mask's -inf): exactly the keys score() returns -inf for by
// position or mask. Its weight is exactly 0 and its V must never reach the row, whereas a key
// whose weight underflowed to 0 is attended (0 * NaN = NaN, as torch). For rare paths only.
__device__ __forceinline__ bool key_masked(const AttentionParams& p, const BlockInfo& bi,
                                           const RowScore& rs, int j) {
  if (rs.c == INT_MIN || j >= bi.sk) return true;
  if (p.causal && j > rs.c) return true;
  if (p.window_left >= 0 && j < rs.c - int(p.window_left)) return true;
  if (p.window_right >= 0 && j > rs.c + int(p.window_right)) return true;
  if (p.mask) {
    const int64_t off = rs.mask0 + int64_t(j) * p.mask_stride[3];
    if (p.mask_dtype == DType::boolean) return !static_cast<const uint8_t*>(p.mask)[off];
    if (p.mask_dtype == DType::f64)
      return static_cast<const double*>(p.mask)[off] == double(neg_inf());
    return load_dtype_as_float(p.mask, off, p.mask_dtype) == neg_inf();
  }
  return false;
}

// The tensor-core kernels' per-row steps on one row's share of a key tile in the mma
// accumulator layout: the quad position t holds columns nt * 8 + 2t + e (e = 0, 1) for nt <
// kNT; s(nt, e) is a reference to that score. Shared by attention_mma.cuh and
// attention_hopper.cuh.
//
// Steps 1-5 of the pipeline (log2 units) for keys j0 + nt * 8 + 2t + e.
template <int kNT, class SAt>
__device__ __forceinline__ void score_row(const AttentionParams& p, const BlockInfo& bi,
                                          const RowScore& rs, int j0, int t, SAt s) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) s(nt, e) = score<float>(p, bi, rs, j0 + nt * 8 + 2 * t + e, s(nt, e)) * kLog2e;
}

// Online softmax of the row (its 4 owners, a quad, agree on the max via shuffles): scores
// times `mul` (the lazy scale of plain tiles: mul > 0, so rounding is monotonic and the max of
// the raw scores scales to the max of the scaled ones) become P = exp2(score - m), the running
// max m and this thread's partial sum l move on. Returns alpha, the factor the row's O must be
// scaled by before this tile's P V.
template <int kNT, class SAt>
__device__ __forceinline__ float online_softmax_row(SAt s, float mul, float& row_max,
                                                    float& row_sum) {
  float mx = neg_inf();
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s(nt, 0), s(nt, 1)));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  mx *= mul;
  const float m_new = fmaxf(row_max, mx);
  // -inf guard: a row with no allowed key so far keeps m = -inf; subtracting 0 instead of -inf
  // keeps exp2(-inf - m) = 0 (not NaN) for its scores and for the rescale.
  const float m_use = m_new == neg_inf() ? 0.0f : m_new;
  const float alpha = fast_exp2(row_max - m_use);
  row_max = m_new;
  row_sum *= alpha;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float pr = fast_exp2(fmaf(s(nt, e), mul, -m_use));
      s(nt, e) = pr;
      row_sum += pr;
    }
  return alpha;
}

// Index of row (b, h, i) in the split partials.
__device__ __forceinline__ int64_t accum_row(const AttentionParams& p, const BlockInfo& bi,
                                             int64_t h, int i, int split) {
  return ((int64_t(split) * p.batch + bi.b) * p.num_heads + h) * p.seqlen_q + i;
}

// Epilogue of the tensor-core kernels for row r of the block (rows past bi.nrows are skipped),
// from the thread of quad position t (columns vt * 8 + 2t + e, the mma accumulator layout):
// out = O / l, lse = m ln2 + log l, or the split's partials. m: the row max in log2 units; l:
// the row's whole sum; o(vt, e): the thread's unnormalized O.
template <class T, int kVT, class OAt>
__device__ __forceinline__ void store_row(const AttentionParams& p, const BlockInfo& bi,
                                          const FwdLaunch& L, int r, int t, float m, float l,
                                          OAt o) {
  if (r >= bi.nrows) return;
  const int Dv = int(p.head_dim_v);
  int64_t h;
  int i;
  row_coords(bi, L, bi.r0 + r, h, i);
  // l == 0: no allowed key (fully masked row) -> output 0, lse -inf. A NaN l stays NaN.
  float inv = l == 0.0f ? 0.0f : 1.0f / l;
  float lse = l == 0.0f ? neg_inf() : m * kLn2 + logf(l);
  if (bi.poisoned) inv = lse = quiet_nan();
  if (L.num_splits == 1) {
    T* orow = static_cast<T*>(p.out) + out_row_offset(p, bi, h, i, p.out_stride);
#pragma unroll
    for (int vt = 0; vt < kVT; ++vt) {
      const int col = vt * 8 + 2 * t;
      if (col >= Dv) break;
      const float v0 = o(vt, 0) * inv, v1 = o(vt, 1) * inv;
      if (L.vec_store && col + 1 < Dv) {
        *reinterpret_cast<uint32_t*>(orow + col) = pack2<T>(v0, v1);
      } else {
        orow[col] = store_as<T>(v0);
        if (col + 1 < Dv) orow[col + 1] = store_as<T>(v1);
      }
    }
    if (p.lse && t == 0) p.lse[out_row_offset(p, bi, h, i, p.lse_stride)] = lse;
  } else {
    const int64_t ar = accum_row(p, bi, h, i, int(blockIdx.z));
    float* orow = L.o_accum + ar * Dv;
#pragma unroll
    for (int vt = 0; vt < kVT; ++vt) {
      const int col = vt * 8 + 2 * t;
      if (col >= Dv) break;
      orow[col] = o(vt, 0) * inv;
      if (col + 1 < Dv) orow[col + 1] = o(vt, 1) * inv;
    }
    if (t == 0) L.lse_accum[ar] = lse;
  }
}

}  // namespace cuda
}  // namespace attnkit
