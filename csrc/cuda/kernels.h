// Host entry points of the CUDA kernels, called by the binding (csrc/cuda/module.cpp). Plain
// C++: the binding is compiled by the host compiler and sees no device code. Every function
// launches on `stream`, never synchronizes, and returns the first CUDA error (launch errors
// included) so the binding can raise it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "attnkit/params.h"

namespace attnkit {
namespace cuda {

constexpr int kMaxHeadDim = 256;

// What the planners need to know about the device (queried once per device by the binding).
struct DeviceInfo {
  int sm_count = 1;
  int max_smem_optin = 48 * 1024;  // bytes of dynamic shared memory a block may opt into
  int cc_major = 0, cc_minor = 0;
};

cudaError_t softmax(const SoftmaxParams& p, cudaStream_t stream);
cudaError_t gemm(const GemmParams& p, cudaStream_t stream);
// fp16/bf16 matmul on CUTLASS's sm90 collectives (gemm_sm90.cu), for sm_90 devices and the
// layouts it covers (*applied says whether it ran). Built only with the CUTLASS headers
// (cutlass_gemm_built); used by gemm() only when switched on: it has not yet run on a GPU, so
// it is off unless ATTNKIT_CUDA_CUTLASS_GEMM=1 is set when the module loads (or the setter).
cudaError_t gemm_sm90(const GemmParams& p, cudaStream_t stream, bool* applied);
bool cutlass_gemm_built();
bool cutlass_gemm_enabled();
void set_cutlass_gemm_enabled(bool on);
const char* last_gemm_kernel();  // "sm90", "mma", "simt" (or "none"): the last gemm() launch

// attention_with_kvcache: what AttentionParams does not say. AttentionParams then describes
// the cache (k/v = the caches, seqlen_k = capacity; paged: page_size, block_table_stride =
// max_blocks, k/v stride[0] = page stride); attention_fwd fills its seqlens_k (cache_seqlens
// + n_new, -1 where the metadata is invalid) and block_table (int64 copy) in scratch.
struct KvCacheArgs {
  bool active = false;
  const void* cache_seqlens = nullptr;  // (B,) int32/int64, device
  DType cache_seqlens_dtype = DType::i64;
  int64_t cache_seqlens_stride = 1;
  const void* block_table = nullptr;  // (B, max_blocks) int32/int64, device; nullptr: dense
  DType block_table_dtype = DType::i64;
  int64_t block_table_strides[2] = {0, 0};
  int64_t num_pages = 0;
  const void* k_new = nullptr;  // (B, Hkv, n_new, D) and (.., Dv) views, k/v dtype (8-bit
                                // caches: AttentionParams::new_dtype, quantized); or none
  const void* v_new = nullptr;
  int64_t n_new = 0;
  int64_t k_new_stride[3] = {0, 0, 0};
  int64_t v_new_stride[3] = {0, 0, 0};
  // The longest cache_seqlens[b] + n_new when the lengths are host data, else -1 (device
  // lengths: the planner then assumes the capacity). Split-KV sizes its splits from it.
  int64_t max_seqlen = -1;
};

// How attention_fwd will run: chosen from the shapes and the device only (never from data),
// so a given call always splits, and therefore rounds, the same way.
struct AttentionPlan {
  bool tensor_cores = false;  // fp16/bf16 mma.sync kernel, else the fp32/fp64 SIMT kernel
  int head_dim_bucket = 0;    // tensor-core kernel instantiation (64, 96, 128, 192, 256)
  int block_m = 0, block_n = 0;
  int64_t pack = 1;  // GQA heads stacked into one row block
  int64_t head_groups = 0, num_m_blocks = 0;
  // The decode kernel (attention_decode.cuh) instead of the tensor-core forward: block_m 16,
  // splits cut each sequence's actual length.
  bool decode_kernel = false;
  // The Hopper kernel (attention_hopper.cuh: TMA, wgmma, warp specialization) instead of the
  // mma.sync forward: sm_90 devices, fp16/bf16, layouts TMA can describe, no paging.
  bool hopper = false;
  int num_splits = 1;
  int64_t split_keys = 0;  // key range the splits cut (the longest sequence, or the capacity)
  size_t smem_bytes = 0;
  // Scratch (one device allocation, byte offsets, 256-aligned).
  size_t scratch_bytes = 0;
  size_t off_o_accum = 0, off_lse_accum = 0, off_seqlens = 0, off_block_table = 0;
};

// Whether the planner may choose the decode kernel. It has run only on the emulator, so it is
// off unless ATTNKIT_CUDA_DECODE=1 is set when the module loads (or the setter turns it on).
bool decode_kernel_enabled();
void set_decode_kernel_enabled(bool on);
// Whether this build has the Hopper attention forward (sm_90 among the architectures and the
// CUTLASS headers at build time), and whether the planner may choose it: it has run only on
// the emulator, so it is off unless ATTNKIT_CUDA_HOPPER=1 is set when the module loads (or
// the setter turns it on).
bool hopper_kernel_built();
bool hopper_kernel_enabled();
void set_hopper_kernel_enabled(bool on);

// Checks what the kernels support on this device and fills the plan; returns nullptr, or a
// message (without the function name) for a ValueError.
const char* attention_plan(const AttentionParams& p, const KvCacheArgs& kv,
                           const DeviceInfo& dev, AttentionPlan* plan);

// Runs the forward pass (cache update first when kv.k_new is set). `scratch` holds
// plan.scratch_bytes bytes on the device and must stay allocated until the stream reaches
// the end of this call's work (stream-ordered free is enough).
cudaError_t attention_fwd(AttentionParams p, const KvCacheArgs& kv, const AttentionPlan& plan,
                          void* scratch, cudaStream_t stream);

// Gradients of attention (attention_bwd.cu): fp16/bf16, head dims up to 128, no dropout.
// Off unless ATTNKIT_CUDA_BACKWARD=1 (it has run only on the emulator). The plan returns
// nullptr and the scratch size (float D_i per query row), or why it cannot run.
bool backward_kernel_enabled();
void set_backward_kernel_enabled(bool on);
const char* attention_bwd_plan(const AttentionBwdParams& bp, const DeviceInfo& dev,
                               size_t* scratch_bytes);
cudaError_t attention_bwd(AttentionBwdParams bp, void* scratch, cudaStream_t stream);

// attnkit.quantize_kv on device arrays: one block per row (QuantizeParams, params.h).
cudaError_t quantize_kv(const QuantizeParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkit
