// Host side of the Hopper attention forward (attention_hopper.cuh): TMA descriptors for q, k
// and v, the launch, and the instantiations (fp16/bf16 x the head-dim buckets). Built for
// sm_90a with the CUTLASS headers (csrc/cuda/CMakeLists.txt), and by the CPU emulator.
#include "attention_hopper.cuh"

#ifndef ATTNKIT_CUDA_EMULATE
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#endif

namespace attnkit {
namespace cuda {

namespace sm90 {

namespace {
// TMA's rules for a tiled descriptor (CUDA driver API, cuTensorMapEncodeTiled): a 16-byte
// aligned base, strides that are multiples of 16 bytes below 2^40, extents in [1, 2^32].
bool tma_ok(const void* base, const int64_t dims[4], const int64_t bs[3]) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (int i = 0; i < 4; ++i)
    if (dims[i] < 1 || dims[i] > (int64_t(1) << 32)) return false;
  for (int i = 0; i < 3; ++i)
    if (bs[i] <= 0 || bs[i] % 16 != 0 || bs[i] >= (int64_t(1) << 40)) return false;
  return true;
}
}  // namespace

#ifdef ATTNKIT_CUDA_EMULATE
bool make_tma_desc(TmaDesc* d, const void* base, const int64_t dims[4], const int64_t bs[3],
                   int box_rows) {
  if (!tma_ok(base, dims, bs) || box_rows < 1 || box_rows > 256) return false;
  d->base = base;
  for (int i = 0; i < 4; ++i) d->dims[i] = dims[i];
  d->strides[0] = 2;
  for (int i = 0; i < 3; ++i) d->strides[i + 1] = bs[i];
  d->box_rows = box_rows;
  return true;
}
#else
bool make_tma_desc(TmaDesc* d, const void* base, const int64_t dims[4], const int64_t bs[3],
                   int box_rows) {
  // The driver's encoder through the runtime (no link against libcuda: the module must import
  // on machines without a driver).
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                           cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &q);
#endif
    return e == cudaSuccess && q == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
               : nullptr;
  }();
  if (!encode || !tma_ok(base, dims, bs) || box_rows < 1 || box_rows > 256) return false;
  cuuint64_t gdim[4], gstride[3];
  for (int i = 0; i < 4; ++i) gdim[i] = cuuint64_t(dims[i]);
  for (int i = 0; i < 3; ++i) gstride[i] = cuuint64_t(bs[i]);
  const cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1};
  const cuuint32_t estride[4] = {1, 1, 1, 1};
  // 16-bit elements as raw bits (fp16 and bf16 alike); out-of-bounds elements read as zero.
  return encode(d, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), gdim, gstride, box,
                estride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
#endif

}  // namespace sm90

namespace {

// The 4-D view (columns, rows, heads, batch) of q, k or v and its byte strides. Varlen
// tensors are one batch of all tokens; the stride of an extent-1 dim is never used, so it is
// replaced by a valid one (TMA checks every stride).
struct TmaView {
  int64_t dims[4], bs[3];
};
TmaView tma_view(int64_t cols, int64_t rows, int64_t heads, int64_t batch, const int64_t st[3],
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
TmaView q_view(const AttentionParams& p) {
  return tma_view(p.head_dim, p.cu_seqlens_q ? p.total_q : p.seqlen_q, p.num_heads, p.batch,
                  p.q_stride, p.cu_seqlens_q != nullptr);
}
// A paged cache: (columns, rows of a page, heads, pages).
TmaView kv_view(const AttentionParams& p, int64_t cols, const int64_t st[3], int64_t num_pages) {
  if (num_pages > 0) return tma_view(cols, p.page_size, p.num_kv_heads, num_pages, st, false);
  return tma_view(cols, p.cu_seqlens_k ? p.total_k : p.seqlen_k, p.num_kv_heads, p.batch, st,
                  p.cu_seqlens_k != nullptr);
}

}  // namespace

bool hopper_layout_ok(const AttentionParams& p, int64_t num_pages) {
  sm90::TmaDesc d;
  const TmaView q = q_view(p), k = kv_view(p, p.head_dim, p.k_stride, num_pages),
                v = kv_view(p, p.head_dim_v, p.v_stride, num_pages);
  return sm90::make_tma_desc(&d, p.q, q.dims, q.bs, 128) &&
         sm90::make_tma_desc(&d, p.k, k.dims, k.bs, 64) &&
         sm90::make_tma_desc(&d, p.v, v.dims, v.bs, 64);
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

#define ATTNKIT_INSTANTIATE_HOPPER(D)                                                      \
  template cudaError_t launch_attention_hopper<half, D>(const AttentionParams&,            \
                                                        const FwdLaunch&, cudaStream_t);   \
  template cudaError_t launch_attention_hopper<bf16, D>(const AttentionParams&,            \
                                                        const FwdLaunch&, cudaStream_t);
ATTNKIT_INSTANTIATE_HOPPER(64)
ATTNKIT_INSTANTIATE_HOPPER(96)
ATTNKIT_INSTANTIATE_HOPPER(128)
ATTNKIT_INSTANTIATE_HOPPER(192)
ATTNKIT_INSTANTIATE_HOPPER(256)
#undef ATTNKIT_INSTANTIATE_HOPPER

}  // namespace cuda
}  // namespace attnkit
