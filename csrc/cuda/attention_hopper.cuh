// Attention forward for fp16 / bf16 on Hopper (sm_90a): TMA, mbarriers, wgmma, warp
// specialization (issue 12 item 1; docs/ARCHITECTURE.md, "Hopper attention forward").
//
// One block = 3 warpgroups for 128 query rows of one (batch, head) and one split of its keys:
//
//   warpgroup 0, the producer (setmaxnreg down to 40 registers; one thread works):
//     TMA: Q (128 rows) once, then for each key tile n: wait until stage n % kStages is free,
//     K[n] and V[n] into it, each with its own "full" mbarrier (transaction bytes)
//   warpgroups 1 and 2, the consumers (setmaxnreg up to 232), 64 rows each:
//     wait full_k: S = Q K^T (wgmma, both operands in smem, fp32 accumulators)
//     scores (attention_common.cuh's pipeline where the tile needs it), online softmax in
//     registers (as attention_mma.cuh: log2 units, lazy scale on plain tiles)
//     wait full_v: O += P V (wgmma, P from registers: the accumulator layout of S is the A
//     fragment layout; V MN-major in smem), then arrive on the stage's "empty" mbarrier
//   out = O / l, lse (store_row, shared with the mma.sync kernel)
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
// Not yet here (it has not run on a GPU; see bench/notes/cuda.md): ping-pong scheduling of the
// two consumers and the intra-warpgroup overlap of the next QK^T with the softmax.
#pragma once
#include "attention_kernels.h"
#include "hopper.cuh"

namespace attnkit {
namespace cuda {

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
  uint64_t* empty = full_v + kStages;

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
      sm90::mbar_init(&empty[st], 2 * 128);  // every consumer thread arrives
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer ----
    sm90::reg_dealloc<40>();
    if (tid != 0 || bi.n_begin >= bi.n_end) return;
    sm90::tma_prefetch_desc(&tq);
    sm90::tma_prefetch_desc(&tk);
    sm90::tma_prefetch_desc(&tv);
    // Coordinates (column, row, head, batch); varlen tensors are one batch of all tokens.
    const int qb = p.cu_seqlens_q ? 0 : int(bi.b), kb = p.cu_seqlens_k ? 0 : int(bi.b);
    sm90::mbar_arrive_expect_tx(bar_q, uint32_t(q_panels) * kQPanel);
    for (int pi = 0; pi < q_panels; ++pi)
      sm90::tma_load(&tq, bar_q, sQ + pi * kQPanel, 64 * pi, bi.q_tok + bi.r0, int(bi.hg), qb);
    for (int n = bi.n_begin, it = 0; n < bi.n_end; ++n, ++it) {
      const int st = it % kStages;
      if (it >= kStages) sm90::mbar_wait(&empty[st], ((it / kStages) & 1) ^ 1);
      const int row = bi.k_tok + n * kBlockN;
      unsigned char* k_dst = sK + st * S::kKVBytes;
      unsigned char* v_dst = sV + st * S::kKVBytes;
      sm90::mbar_arrive_expect_tx(&full_k[st], uint32_t(q_panels) * kKVPanel);
      for (int pi = 0; pi < q_panels; ++pi)
        sm90::tma_load(&tk, &full_k[st], k_dst + pi * kKVPanel, 64 * pi, row, int(bi.hkv), kb);
      sm90::mbar_arrive_expect_tx(&full_v[st], uint32_t(v_panels) * kKVPanel);
      for (int pi = 0; pi < v_panels; ++pi)
        sm90::tma_load(&tv, &full_v[st], v_dst + pi * kKVPanel, 64 * pi, row, int(bi.hkv), kb);
    }
    return;
  }

  // ---- consumers ----
  sm90::reg_alloc<232>();
  const int warp = (tid / 32) % 4, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = (wg - 1) * 64 + warp * 16;  // the warp's first row in the block
  const unsigned char* sQw = sQ + (wg - 1) * 64 * sm90::kPanelBytes;  // this warpgroup's rows

  float o[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) o[i] = 0.0f;
  float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.0f, 0.0f};  // log2 units
  const float scale_log2 = p.scale * kLog2e;
  const bool modifiers = p.mask || p.alibi_slopes || p.softcap > 0.0f;
  if (bi.n_begin < bi.n_end) sm90::mbar_wait(bar_q, 0);

  for (int n = bi.n_begin, it = 0; n < bi.n_end; ++n, ++it) {
    const int st = it % kStages, phase = (it / kStages) & 1;
    const unsigned char* k_tile = sK + st * S::kKVBytes;
    const unsigned char* v_tile = sV + st * S::kKVBytes;

    // ---- S = Q K^T ----
    // No branch may sit between wgmma.fence and the last wgmma of a batch (ptxas then injects
    // waits and fences): a head dim that fills the bucket runs every k-step, a shorter one
    // skips the steps past D in a copy of the loop of its own. S needs no zeros: the first
    // step overwrites it (scale-d 0).
    float s[kBlockN / 2];
    sm90::mbar_wait(&full_k[st], phase);
    auto qk = [&](auto all_steps) {
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
      qk(std::true_type());
    else
      qk(std::false_type());
    sm90::wgmma_wait<0>();
    sm90::fence_operands(s);

    // ---- score pipeline (attention_mma.cuh: plain tiles keep raw dot products) ----
    const bool inside = tile_inside(p, bi, n, kBlockN);
    const bool plain = inside && !modifiers && scale_log2 > 0.0f;
    const float mul = plain ? scale_log2 : 1.0f;
    if (!plain) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const RowScore rs = row_score(p, bi, L, bi.r0 + row0 + g + 8 * hh);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = n * kBlockN + nt * 8 + 2 * t + e;
            s[4 * nt + 2 * hh + e] = score<float>(p, bi, rs, j, s[4 * nt + 2 * hh + e]) * kLog2e;
          }
      }
    }

    // ---- online softmax; each row's 4 owners (a quad) agree on the max via shuffles ----
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = neg_inf();
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
        mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * hh], s[4 * nt + 2 * hh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx *= mul;
      const float m_new = fmaxf(row_max[hh], mx);
      const float m_use = m_new == neg_inf() ? 0.0f : m_new;  // -inf guard (attention_mma.cuh)
      const float alpha = fast_exp2(row_max[hh] - m_use);
      row_max[hh] = m_new;
      row_sum[hh] *= alpha;
#pragma unroll
      for (int vt = 0; vt < kVT; ++vt) {
        o[4 * vt + 2 * hh] *= alpha;
        o[4 * vt + 2 * hh + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = fast_exp2(fmaf(s[4 * nt + 2 * hh + e], mul, -m_use));
          s[4 * nt + 2 * hh + e] = pr;
          row_sum[hh] += pr;
        }
    }

    sm90::mbar_wait(&full_v[st], phase);
    // Tiles with forced zeros in P: a non-finite V value under a masked key must not reach O
    // (0 * NaN in the MMA). Every warp scans the whole tile, so all warps agree.
    bool rare = false;
    if (!inside || p.mask) {
      const int chunks = v_panels * kBlockN * (sm90::kPanelBytes / 16);
      for (int c = lane; c < chunks; c += 32)
        rare |= any_nonfinite8<T>(*reinterpret_cast<const uint4*>(v_tile + c * 16));
      rare = __any_sync(0xffffffffu, rare);
    }
    if (!rare) {
      // ---- O += P V ----
      // P as A fragments, all written before the fence: registers a wgmma reads must not be
      // written between wgmma.fence and the wgmma (PTX ISA, wgmma.fence).
      uint32_t pa[kBlockN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
      }
      sm90::fence_operands(o);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        sm90::wgmma_rs<T, kD>(pa[kk], sm90::desc_mn_major(v_tile + kk * 16 * sm90::kPanelBytes, kKVPanel), o);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_operands(o);
    } else {
      // ---- rare path: element by element, skipping masked keys whose P is 0 (an underflowed
      // P still multiplies its V, so a NaN there stays NaN, as torch). P is rounded to T as the
      // MMA would see it; each key's P comes from the quad lane that holds it.
      RowScore rrs[2];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) rrs[hh] = row_score(p, bi, L, bi.r0 + row0 + g + 8 * hh);
      // Key j = 8 nt + jj is held by quad lane jj / 2 (element jj % 2): a runtime loop over jj
      // and an unrolled one over nt keep every register index static (no local memory).
#pragma unroll 1
      for (int jj = 0; jj < 8; ++jj) {
        const int src = (lane & ~3) | (jj >> 1);
        const bool odd = (jj & 1) != 0;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const int j = nt * 8 + jj;
          float pr[2];
          bool skip[2];
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const float mine = odd ? s[4 * nt + 2 * hh + 1] : s[4 * nt + 2 * hh];
            pr[hh] = to_float(store_as<T>(__shfl_sync(0xffffffffu, mine, src)));
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
    }
    sm90::mbar_arrive(&empty[st]);
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

}  // namespace cuda
}  // namespace attnkit
