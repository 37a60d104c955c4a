// Attention forward without tensor cores: float32 (also under float16/bfloat16 k/v) and
// float64. TF32 MMAs would be faster but round inputs to 10 mantissa bits, far outside the
// 1e-5 float32 tolerance, so this path uses FMAs, like torch's own fp32 kernels.
//
// One block = 4 warps x kRows query rows, one tile of kBlockN = 32 keys at a time: lane j
// owns key j of the tile for S = Q K^T (its K row read from smem with an odd row stride, so
// the 32 lanes hit 32 banks), and owns output dims lane + 32 k for O += P V, with P broadcast
// by shuffles. The online softmax and every mask follow attention_common.cuh. A masked-out key
// gets P = -0.0 and is skipped, so NaN/inf in masked-out V rows never reaches the output; a
// key whose P underflowed (+0.0) is attended, so its NaN V propagates, as in torch.
#include "attention_common.cuh"
#include "attention_kernels.h"

namespace attnkit {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRows = 4;  // query rows per warp
constexpr int kMaxVT = kMaxHeadDim / 32;  // output dims per lane

__device__ __forceinline__ float exp_nat(float x) { return fast_exp2(x * kLog2e); }
__device__ __forceinline__ double exp_nat(double x) { return exp(x); }

template <class TQ, class TKV, class Acc>
__global__ void __launch_bounds__(32 * kWarps)
    attention_simt_kernel(const AttentionParams p, const FwdLaunch L) {
  constexpr int kBlockM = kSimtBlockM, kBlockN = kSimtBlockN;
  static_assert(kBlockM == kWarps * kRows && kBlockN == 32, "one key per lane");
  ATTNKIT_DYNAMIC_SMEM(smem_raw);
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);
  const int kst = D | 1;  // odd stride: lane j reading row j, column d hits bank (j*kst+d)%32
  Acc* sQ = reinterpret_cast<Acc*>(smem_raw);  // [kBlockM][D]
  Acc* sK = sQ + kBlockM * D;                  // [kBlockN][kst]
  Acc* sV = sK + kBlockN * kst;                // [kBlockN][Dv]

  BlockInfo bi;
  if (!block_info<kBlockM, kBlockN>(p, L, bi)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const TQ* Q = static_cast<const TQ*>(p.q);
  const TKV* K = static_cast<const TKV*>(p.k);
  const TKV* V = static_cast<const TKV*>(p.v);

  // Each warp loads (and later reads) only its own query rows.
  RowScore rs[kRows];
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int r = warp * kRows + rr;
    rs[rr] = row_score(p, bi, L, bi.r0 + r);
    int64_t off = 0;
    if (r < bi.nrows) {
      int64_t h;
      int i;
      row_coords(bi, L, bi.r0 + r, h, i);
      off = q_row_offset(p, bi, h, i);
    }
    for (int d = lane; d < D; d += 32)
      sQ[r * D + d] = r < bi.nrows ? load_as<Acc>(Q + off + d) : Acc(0);
  }

  Acc o[kRows][kMaxVT];
  Acc m[kRows], l[kRows];  // running max (natural units); per-lane partial sum
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    m[rr] = Acc(neg_inf());
    l[rr] = Acc(0);
#pragma unroll
    for (int k = 0; k < kMaxVT; ++k) o[rr][k] = Acc(0);
  }

  for (int n = bi.n_begin; n < bi.n_end; ++n) {
    __syncthreads();  // every warp is done with the previous tile
    for (int r = warp; r < kBlockN; r += kWarps) {
      const int j = n * kBlockN + r;
      const bool valid = j < bi.sk;
      const int64_t ko = valid ? kv_row_offset(p, bi, j, p.k_stride) : 0;
      const int64_t vo = valid ? kv_row_offset(p, bi, j, p.v_stride) : 0;
      // 8-bit caches: codes times the row's scale, dequantized on the way into shared memory
      // (global memory is read in 8 bits). Float caches: a scale of 1.
      Acc ks = Acc(1), vs = Acc(1);
      if constexpr (IsCode<TKV>::value) {
        if (valid) {
          ks = Acc(p.k_scale[kv_row_offset(p, bi, j, p.k_scale_stride)]);
          vs = Acc(p.v_scale[kv_row_offset(p, bi, j, p.v_scale_stride)]);
        }
      }
      for (int d = lane; d < D; d += 32) sK[r * kst + d] = valid ? load_as<Acc>(K + ko + d) * ks : Acc(0);
      for (int d = lane; d < Dv; d += 32) sV[r * Dv + d] = valid ? load_as<Acc>(V + vo + d) * vs : Acc(0);
    }
    __syncthreads();

    Acc s[kRows];
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) s[rr] = Acc(0);
    const Acc* krow = sK + lane * kst;
    const Acc* qrow = sQ + warp * kRows * D;
#pragma unroll 4
    for (int d = 0; d < D; ++d) {
      const Acc kd = krow[d];
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) s[rr] += qrow[rr * D + d] * kd;
    }
    const int j = n * kBlockN + lane;
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) {
      const Acc sc = score<Acc>(p, bi, rs[rr], j, s[rr]);
      const Acc m_new = fmax(m[rr], warp_max(sc));
      // -inf guard: with no allowed key yet, subtract 0 so exp(-inf - m) stays 0, not NaN.
      const Acc m_use = m_new == Acc(neg_inf()) ? Acc(0) : m_new;
      const Acc alpha = exp_nat(m[rr] - m_use);
      // A -inf score is a masked key (or an -inf input): P = -0.0 marks it for the P V loop.
      s[rr] = sc == Acc(neg_inf()) ? Acc(-0.0) : exp_nat(sc - m_use);
      m[rr] = m_new;
      l[rr] = l[rr] * alpha + s[rr];
#pragma unroll
      for (int k = 0; k < kMaxVT; ++k) o[rr][k] *= alpha;
    }
#pragma unroll 2
    for (int jj = 0; jj < kBlockN; ++jj) {
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) {
        const Acc pj = __shfl_sync(0xffffffffu, s[rr], jj);
        // warp-uniform: skips masked keys (P = -0.0) and their NaN/inf V
        if (is_neg_zero(pj)) continue;
#pragma unroll
        for (int k = 0; k < kMaxVT; ++k)
          if (lane + 32 * k < Dv) o[rr][k] += pj * sV[jj * Dv + lane + 32 * k];
      }
    }
  }

  TQ* out = static_cast<TQ*>(p.out);
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const Acc lt = warp_sum(l[rr]);
    const int r = warp * kRows + rr;
    if (r >= bi.nrows) continue;
    int64_t h;
    int i;
    row_coords(bi, L, bi.r0 + r, h, i);
    // lt == 0: no allowed key -> output 0, lse -inf (a NaN sum stays NaN).
    Acc inv = lt == Acc(0) ? Acc(0) : Acc(1) / lt;
    float lse = lt == Acc(0) ? neg_inf() : float(m[rr] + log(lt));
    if (bi.poisoned) {
      inv = Acc(quiet_nan());
      lse = quiet_nan();
    }
    if (L.num_splits == 1) {
      TQ* orow = out + out_row_offset(p, bi, h, i, p.out_stride);
#pragma unroll
      for (int k = 0; k < kMaxVT; ++k)
        if (lane + 32 * k < Dv) orow[lane + 32 * k] = store_acc<TQ, Acc>(o[rr][k] * inv);
      if (p.lse && lane == 0) p.lse[out_row_offset(p, bi, h, i, p.lse_stride)] = lse;
    } else {
      const int64_t ar = accum_row(p, bi, h, i, int(blockIdx.z));
      float* orow = L.o_accum + ar * Dv;
#pragma unroll
      for (int k = 0; k < kMaxVT; ++k)
        if (lane + 32 * k < Dv) orow[lane + 32 * k] = float(o[rr][k] * inv);
      if (lane == 0) L.lse_accum[ar] = lse;
    }
  }
}

}  // namespace

size_t simt_smem_bytes(const AttentionParams& p, size_t acc_bytes) {
  const size_t D = size_t(p.head_dim), Dv = size_t(p.head_dim_v);
  return (kSimtBlockM * D + kSimtBlockN * (D | 1) + kSimtBlockN * Dv) * acc_bytes;
}

template <class TQ, class TKV, class Acc>
cudaError_t launch_attention_simt(const AttentionParams& p, const FwdLaunch& L,
                                  cudaStream_t stream) {
  const size_t smem = simt_smem_bytes(p, sizeof(Acc));
  auto kernel = attention_simt_kernel<TQ, TKV, Acc>;
  cudaError_t err =
      cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(p.batch * L.head_groups), unsigned(L.num_m_blocks),
                  unsigned(L.num_splits));
  ATTNKIT_LAUNCH(kernel, grid, 32 * kWarps, smem, stream, p, L);
  return cudaGetLastError();
}

template cudaError_t launch_attention_simt<float, float, float>(const AttentionParams&,
                                                                const FwdLaunch&, cudaStream_t);
template cudaError_t launch_attention_simt<float, half, float>(const AttentionParams&,
                                                               const FwdLaunch&, cudaStream_t);
template cudaError_t launch_attention_simt<float, bf16, float>(const AttentionParams&,
                                                               const FwdLaunch&, cudaStream_t);
template cudaError_t launch_attention_simt<double, double, double>(const AttentionParams&,
                                                                   const FwdLaunch&,
                                                                   cudaStream_t);
// 8-bit caches under float32 / float16 / bfloat16 q
#define ATTNKIT_SIMT_CODES(TQ)                                                                 \
  template cudaError_t launch_attention_simt<TQ, int8_t, float>(const AttentionParams&,       \
                                                                const FwdLaunch&, cudaStream_t); \
  template cudaError_t launch_attention_simt<TQ, f8e4m3_t, float>(const AttentionParams&,     \
                                                                  const FwdLaunch&, cudaStream_t);
ATTNKIT_SIMT_CODES(float)
ATTNKIT_SIMT_CODES(half)
ATTNKIT_SIMT_CODES(bf16)
#undef ATTNKIT_SIMT_CODES

}  // namespace cuda
}  // namespace attnkit
