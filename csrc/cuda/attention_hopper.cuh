// Attention forward for fp16 / bf16 on Hopper (sm_90a): TMA, mbarriers, wgmma, warp
// specialization (issue 12 item 1; docs/ARCHITECTURE.md, "Hopper attention forward").
//
// One block = 3 warpgroups for 128 query rows of one (batch, head) and one split of its keys:
//
//   warpgroup 0, the producer (setmaxnreg down to 24 registers; one thread works):
//     TMA: Q (128 rows) once, then for each key tile n: K[n] and V[n] into stage n % kStages
//     once the consumers have freed its K and its V ("empty" mbarriers), each with its own
//     "full" mbarrier (transaction bytes); a paged cache's tiles through the block table
//   warpgroups 1 and 2, the consumers (setmaxnreg up to 240), 64 rows each, per tile n:
//     in its turn (named barriers: the two consumers take turns issuing GEMMs, so one's
//     softmax overlaps the other's tensor-core work), issue S[n] = Q K[n]^T (wgmma, both
//     operands in smem) and O += P[n-1] V[n-1] (wgmma, P from registers: the accumulator
//     layout of S is the A fragment layout; V MN-major in smem), hand the turn over;
//     wait for S[n] only; scores (attention_common.cuh's pipeline where the tile needs it) and
//     online softmax in registers (as attention_mma.cuh: log2 units, lazy scale on plain
//     tiles) while P V runs; wait for P V, free V[n-1] (K[n] was freed once S[n] was done),
//     rescale O, pack P[n]. After the last tile, its P V.
//   out = O / l, lse (store_row, shared with the mma.sync kernel)
//
// This is FlashAttention-3's schedule (ping-pong consumers, softmax overlapped with the GEMMs
// of the same warpgroup), written here from the paper's description.
//
// Tiles are 128B-swizzled panels of 64 columns (hopper.cuh). Head dims are bucketed like the
// mma.sync kernel (64, 96, 128, 192, 256); the panels past D (or Dv) are not loaded: TMA zero-
// fills a panel's columns past the tensor's edge, the QK^T steps past D are skipped, and the
// P V columns past Dv are computed from stale smem but never stored (columns of O are
// independent). Rows past a sequence's end (varlen: the next sequence's rows; a cache: unused
// slots) are loaded but masked by score(); a non-finite V value under a masked key is kept
// out as in attention_mma.cuh (rare path: every warp scans the V tile, so the whole
// warpgroup agrees without a barrier, and all skip the wgmma).
//
// It has not run on a GPU (bench/notes/cuda.md): the planner takes it only with
// ATTNKIT_CUDA_HOPPER=1.
#pragma once
#include "attention_kernels.h"
#include "hopper.cuh"

namespace attnkit {
namespace cuda {

// Element `high` (0: the low half) of a pair of T packed in 32 bits, as float.
template <class T>
__device__ __forceinline__ float unpack_half(uint32_t w, bool high) {
  const uint16_t b = uint16_t(high ? w >> 16 : w & 0xffffu);
  T x;
  memcpy(&x, &b, 2);
  return to_float(x);
}

template <class T, int kD>
__global__ void __launch_bounds__(HopperShape<kD>::kThreads, 1)
    attention_hopper_kernel(const AttentionParams p, const FwdLaunch L,
                              const __grid_constant__ sm90::TmaDesc tq,
                              const __grid_constant__ sm90::TmaDesc tk,
                              const __grid_constant__ sm90::TmaDesc tv) {
  using S = HopperShape<kD>;
  constexpr int kBlockM = S::kBlockM, kBlockN = S::kBlockN, kStages = S::kStages;
  constexpr int kNT = kBlockN / 8;  // S column blocks of 8
  constexpr int kVT = kD / 8;       // O column blocks of 8
  constexpr uint32_t kQPanel = kBlockM * sm90::kPanelBytes;  // one 64-column panel of Q
  constexpr uint32_t kKVPanel = kBlockN * sm90::kPanelBytes;
  ATTNKIT_DYNAMIC_SMEM(smem_raw);
  unsigned char* base =
      smem_raw + (sm90::kSwizzleAtom - sm90::smem_addr(smem_raw) % sm90::kSwizzleAtom) % sm90::kSwizzleAtom;
  unsigned char* sQ = base;
  unsigned char* sK = sQ + S::kQBytes;              // kStages tiles of kKVBytes
  unsigned char* sV = sK + kStages * S::kKVBytes;   // kStages tiles of kKVBytes
  uint64_t* bars = reinterpret_cast<uint64_t*>(sV + kStages * S::kKVBytes);
  uint64_t* bar_q = bars;
  uint64_t* full_k = bars + 1;
  uint64_t* full_v = full_k + kStages;
  uint64_t* empty_k = full_v + kStages;  // K is free once S is done, V once P V is
  uint64_t* empty_v = empty_k + kStages;

  BlockInfo bi;
  if (!block_info<kBlockM, kBlockN>(p, L, bi)) return;  // block-uniform
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);
  const int q_panels = (D + 63) / 64, v_panels = (Dv + 63) / 64;
  const int tid = threadIdx.x, wg = tid / 128;

  if (tid == 0) {
    sm90::mbar_init(bar_q, 1);
    for (int st = 0; st < kStages; ++st) {
      sm90::mbar_init(&full_k[st], 1);
      sm90::mbar_init(&full_v[st], 1);
      sm90::mbar_init(&empty_k[st], 2 * 128);  // every consumer thread arrives
      sm90::mbar_init(&empty_v[st], 2 * 128);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer ----
    sm90::reg_dealloc<24>();
    if (tid != 0 || bi.n_begin >= bi.n_end) return;
    sm90::tma_prefetch_desc(&tq);
    sm90::tma_prefetch_desc(&tk);
    sm90::tma_prefetch_desc(&tv);
    // Coordinates (column, row, head, batch); varlen tensors are one batch of all tokens, a
    // paged cache is a batch of pages (a tile never straddles two: page_size % kBlockN == 0).
    const int qb = p.cu_seqlens_q ? 0 : int(bi.b);
    sm90::mbar_arrive_expect_tx(bar_q, uint32_t(q_panels) * kQPanel);
    for (int pi = 0; pi < q_panels; ++pi)
      sm90::tma_load(&tq, bar_q, sQ + pi * kQPanel, 64 * pi, bi.q_tok + bi.r0, int(bi.hg), qb);
    for (int n = bi.n_begin, it = 0; n < bi.n_end; ++n, ++it) {
      const int st = it % kStages, free_parity = ((it / kStages) & 1) ^ 1;
      int row = bi.k_tok + n * kBlockN, kb = p.cu_seqlens_k ? 0 : int(bi.b);
      if (p.block_table) {
        const int j0 = n * kBlockN;
        kb = int(p.block_table[bi.b * p.block_table_stride + j0 / p.page_size]);
        row = int(j0 % p.page_size);
      }
      unsigned char* k_dst = sK + st * S::kKVBytes;
      unsigned char* v_dst = sV + st * S::kKVBytes;
      if (it >= kStages) sm90::mbar_wait(&empty_k[st], free_parity);
      sm90::mbar_arrive_expect_tx(&full_k[st], uint32_t(q_panels) * kKVPanel);
      for (int pi = 0; pi < q_panels; ++pi)
        sm90::tma_load(&tk, &full_k[st], k_dst + pi * kKVPanel, 64 * pi, row, int(bi.hkv), kb);
      if (it >= kStages) sm90::mbar_wait(&empty_v[st], free_parity);
      sm90::mbar_arrive_expect_tx(&full_v[st], uint32_t(v_panels) * kKVPanel);
      for (int pi = 0; pi < v_panels; ++pi)
        sm90::tma_load(&tv, &full_v[st], v_dst + pi * kKVPanel, 64 * pi, row, int(bi.hkv), kb);
    }
    return;
  }

  // ---- consumers ----
  sm90::reg_alloc<240>();
  const int warp = (tid / 32) % 4, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = (wg - 1) * 64 + warp * 16;  // the warp's first row in the block
  const unsigned char* sQw = sQ + (wg - 1) * 64 * sm90::kPanelBytes;  // this warpgroup's rows

  const int cw = wg - 1;  // consumer 0 or 1
  float o[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) o[i] = 0.0f;
  float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.0f, 0.0f};  // log2 units
  const float scale_log2 = p.scale * kLog2e;
  const bool modifiers = p.mask || p.alibi_slopes || p.softcap > 0.0f;
  float s[kBlockN / 2];          // S of the newest tile, then its P (fp32)
  uint32_t pa[kBlockN / 16][4];  // P of the tile whose P V is next, as A fragments

  // S = Q K^T of the tile in stage st. No branch may sit between wgmma.fence and the last
  // wgmma of a batch (ptxas then injects waits and fences): a head dim that fills the bucket
  // runs every k-step, a shorter one skips the steps past D in a copy of the loop of its own.
  // S needs no zeros: the first step overwrites it (scale-d 0).
  auto issue_qk = [&](int st) {
    const unsigned char* k_tile = sK + st * S::kKVBytes;
    auto steps = [&](auto all_steps) {
      sm90::fence_operands(s);
      sm90::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        if (!decltype(all_steps)::value && ks * 16 >= D) break;
        const uint32_t off = (ks % 4) * 32;  // the 16-column step within the panel
        sm90::wgmma_ss<T, kBlockN>(sm90::desc_k_major(sQw + (ks / 4) * kQPanel + off),
                                   sm90::desc_k_major(k_tile + (ks / 4) * kKVPanel + off), s, ks > 0);
      }
      sm90::wgmma_commit();
    };
    if (D > kD - 16)
      steps(std::true_type());
    else
      steps(std::false_type());
  };

  // Scores and online softmax of tile n (S complete in s): s becomes P (fp32), the row state
  // moves on; returns through alpha the factor O must be scaled by before this tile's P V.
  auto softmax = [&](int n, float (&alpha)[2]) {
    const bool inside = tile_inside(p, bi, n, kBlockN);
    const bool plain = inside && !modifiers && scale_log2 > 0.0f;  // attention_mma.cuh
    const float mul = plain ? scale_log2 : 1.0f;
    if (!plain) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        score_row<kNT>(p, bi, row_score(p, bi, L, bi.r0 + row0 + g + 8 * hh), n * kBlockN, t,
                       [&](int nt, int e) -> float& { return s[4 * nt + 2 * hh + e]; });
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
      alpha[hh] = online_softmax_row<kNT>([&](int nt, int e) -> float& { return s[4 * nt + 2 * hh + e]; },
                                          mul, row_max[hh], row_sum[hh]);
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int vt = 0; vt < kVT; ++vt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        o[4 * vt + 2 * hh] *= alpha[hh];
        o[4 * vt + 2 * hh + 1] *= alpha[hh];
      }
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  // O += P V for tile n in stage st (V landed). Returns false after doing nothing if the tile
  // needs the rare path instead: P has forced zeros (a position bound or a mask) and V holds a
  // non-finite value, which 0 * NaN in the MMA would let through. Every warp scans the whole V
  // tile, so the warpgroup agrees without a barrier.
  auto issue_pv = [&](int n, int st) -> bool {
    const unsigned char* v_tile = sV + st * S::kKVBytes;
    if (!tile_inside(p, bi, n, kBlockN) || p.mask) {
      bool bad = false;
      const int chunks = v_panels * kBlockN * (sm90::kPanelBytes / 16);
      for (int c = lane; c < chunks; c += 32)
        bad |= any_nonfinite8<T>(*reinterpret_cast<const uint4*>(v_tile + c * 16));
      if (__any_sync(0xffffffffu, bad)) return false;
    }
    sm90::fence_operands(o);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      sm90::wgmma_rs<T, kD>(pa[kk], sm90::desc_mn_major(v_tile + kk * 16 * sm90::kPanelBytes, kKVPanel), o);
    sm90::wgmma_commit();
    return true;
  };
  // The rare path of tile n: element by element, skipping masked keys whose P is 0 (an
  // underflowed P still multiplies its V, so a NaN there stays NaN, as torch); P as rounded
  // to T in pa. Key j = 16 kk + jj sits in register (jj / 8) * 2 + hh of quad lane (jj % 8) / 2,
  // half jj % 2: a runtime loop over jj and an unrolled one over kk keep register indices static.
  auto rare_pv = [&](int n, int st) {
    const unsigned char* v_tile = sV + st * S::kKVBytes;
    RowScore rrs[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) rrs[hh] = row_score(p, bi, L, bi.r0 + row0 + g + 8 * hh);
#pragma unroll 1
    for (int jj = 0; jj < 16; ++jj) {
      const int src = (lane & ~3) | ((jj % 8) >> 1);
      const bool high = jj >= 8, odd = (jj & 1) != 0;
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const int j = kk * 16 + jj;
        float pr[2];
        bool skip[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const uint32_t w = __shfl_sync(0xffffffffu, high ? pa[kk][2 + hh] : pa[kk][hh], src);
          pr[hh] = unpack_half<T>(w, odd);
          skip[hh] = pr[hh] == 0.0f && key_masked(p, bi, rrs[hh], n * kBlockN + j);
        }
#pragma unroll
        for (int vt = 0; vt < kVT; ++vt) {
          const int col = vt * 8 + 2 * t;
          if (col >= Dv) break;
          // V[j][col] in the swizzled panel col / 64: byte j * 128 + (col % 64) * 2, chunk ^ j % 8.
          const uint32_t byte = uint32_t(j) * sm90::kPanelBytes + uint32_t(col % 64) * 2;
          const T* vp = reinterpret_cast<const T*>(v_tile + (col / 64) * kKVPanel +
                                                   (byte ^ ((uint32_t(j) & 7u) << 4)));
          const float v0 = to_float(vp[0]), v1 = to_float(vp[1]);
#pragma unroll
          for (int hh = 0; hh < 2; ++hh)
            if (!skip[hh]) {
              o[4 * vt + 2 * hh] += pr[hh] * v0;
              o[4 * vt + 2 * hh + 1] += pr[hh] * v1;
            }
        }
      }
    }
  };

  // The schedule (FlashAttention-3's, written here): per tile, under the scheduler barriers
  // (named barriers 1 and 2: a consumer issues its GEMMs only in its turn, so one's softmax
  // runs while the other's GEMMs do), issue S(n) = Q K(n)^T and O += P(n-1) V(n-1), hand the
  // turn over, wait for S(n) only (then K(n)'s stage is free), compute its softmax while P V
  // runs, then wait for P V (then V(n-1)'s stage is free), rescale O and pack P(n).
  const int tiles = bi.n_end - bi.n_begin;
  if (tiles > 0) {
    sm90::mbar_wait(bar_q, 0);
    if (cw == 1) sm90::named_arrive(1, 256);  // consumer 0 goes first
    for (int it = 0; it < tiles; ++it) {
      const int n = bi.n_begin + it, st = it % kStages, phase = (it / kStages) & 1;
      const int pst = (it + kStages - 1) % kStages, pphase = ((it - 1) / kStages) & 1;
      sm90::mbar_wait(&full_k[st], phase);
      sm90::named_sync(1 + cw, 256);
      issue_qk(st);
      bool pv = false;
      if (it > 0) {
        sm90::mbar_wait(&full_v[pst], pphase);
        pv = issue_pv(n - 1, pst);
        if (!pv) rare_pv(n - 1, pst);
      }
      sm90::named_arrive(2 - cw, 256);
      if (pv)
        sm90::wgmma_wait<1>();  // S(n); P V(n-1) still runs
      else
        sm90::wgmma_wait<0>();
      sm90::fence_operands(s);
      sm90::mbar_arrive(&empty_k[st]);
      float alpha[2];
      softmax(n, alpha);
      if (it > 0) {
        sm90::wgmma_wait<0>();
        sm90::fence_operands(o);
        sm90::mbar_arrive(&empty_v[pst]);
      }
      rescale_o(alpha);
      pack_p();
    }
    const int last = bi.n_end - 1, lst = (tiles - 1) % kStages, lphase = ((tiles - 1) / kStages) & 1;
    sm90::mbar_wait(&full_v[lst], lphase);
    if (issue_pv(last, lst)) {
      sm90::wgmma_wait<0>();
      sm90::fence_operands(o);
    } else {
      rare_pv(last, lst);
    }
    sm90::mbar_arrive(&empty_v[lst]);
    if (cw == 0) sm90::named_sync(1, 256);  // consumer 1's last hand-over: no arrival left pending
  }

  // ---- epilogue ----
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = row_sum[hh];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    store_row<T, kVT>(p, bi, L, row0 + g + 8 * hh, t, row_max[hh], l,
                      [&](int vt, int e) { return o[4 * vt + 2 * hh + e]; });
  }
}

// ---- host side: the TMA views of q, k, v and the launch ----

// The 4-D view (columns, rows, heads, batch) of q, k or v and its byte strides. Varlen
// tensors are one batch of all tokens; the stride of an extent-1 dim is never used, so it is
// replaced by a valid one (TMA checks every stride).
struct TmaView {
  int64_t dims[4], bs[3];
};
inline TmaView tma_view(int64_t cols, int64_t rows, int64_t heads, int64_t batch, const int64_t st[3],
                 bool varlen) {
  TmaView v;
  v.dims[0] = cols;
  v.dims[1] = rows;
  v.dims[2] = heads;
  v.dims[3] = varlen ? 1 : batch;
  const int64_t ext[3] = {v.dims[1], v.dims[2], v.dims[3]};
  const int64_t raw[3] = {st[2] * 2, st[1] * 2, st[0] * 2};
  for (int i = 0; i < 3; ++i) v.bs[i] = ext[i] > 1 ? raw[i] : 16;
  return v;
}
inline TmaView q_view(const AttentionParams& p) {
  return tma_view(p.head_dim, p.cu_seqlens_q ? p.total_q : p.seqlen_q, p.num_heads, p.batch,
                  p.q_stride, p.cu_seqlens_q != nullptr);
}
// A paged cache: (columns, rows of a page, heads, pages).
inline TmaView kv_view(const AttentionParams& p, int64_t cols, const int64_t st[3], int64_t num_pages) {
  if (num_pages > 0) return tma_view(cols, p.page_size, p.num_kv_heads, num_pages, st, false);
  return tma_view(cols, p.cu_seqlens_k ? p.total_k : p.seqlen_k, p.num_kv_heads, p.batch, st,
                  p.cu_seqlens_k != nullptr);
}

template <class T, int kD>
cudaError_t launch_attention_hopper(const AttentionParams& p, const FwdLaunch& L,
                                    cudaStream_t stream) {
  using S = HopperShape<kD>;
  sm90::TmaDesc tq, tk, tv;
  const int64_t pages = p.block_table ? L.num_pages : 0;
  const TmaView q = q_view(p), k = kv_view(p, p.head_dim, p.k_stride, pages),
                v = kv_view(p, p.head_dim_v, p.v_stride, pages);
  if (!sm90::make_tma_desc(&tq, p.q, q.dims, q.bs, S::kBlockM) ||
      !sm90::make_tma_desc(&tk, p.k, k.dims, k.bs, S::kBlockN) ||
      !sm90::make_tma_desc(&tv, p.v, v.dims, v.bs, S::kBlockN))
    return cudaErrorInvalidValue;  // the planner checked hopper_layout_ok: not expected
  auto kernel = attention_hopper_kernel<T, kD>;
  const size_t smem = S::smem_bytes(sizeof(T));
  cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(p.batch * L.head_groups), unsigned(L.num_m_blocks),
                  unsigned(L.num_splits));
  ATTNKIT_LAUNCH(kernel, grid, S::kThreads, smem, stream, p, L, tq, tk, tv);
  return cudaGetLastError();
}

// launch_attention_hopper<half, D> and <bf16, D> (the attention_hopper_d*.cu files).
#define ATTNKIT_INSTANTIATE_HOPPER(D)                                                      \
  template cudaError_t launch_attention_hopper<half, D>(const AttentionParams&,            \
                                                        const FwdLaunch&, cudaStream_t);   \
  template cudaError_t launch_attention_hopper<bf16, D>(const AttentionParams&,            \
                                                        const FwdLaunch&, cudaStream_t);

}  // namespace cuda
}  // namespace attnkit
