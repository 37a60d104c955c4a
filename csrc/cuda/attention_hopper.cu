// Host side of the Hopper attention forward (attention_hopper.cuh): the TMA descriptor encoder
// and the layout check the planner calls. The launcher and the kernel are instantiated per
// head-dim bucket in attention_hopper_d*.cu. Built for sm_90a with the CUTLASS headers
// (csrc/cuda/CMakeLists.txt), and by the CPU emulator.
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

bool hopper_layout_ok(const AttentionParams& p, int64_t num_pages, int block_m, int block_n) {
  sm90::TmaDesc d;  // the descriptors the launch will build, encoded once to see they can be
  const TmaView q = q_view(p), k = kv_view(p, p.head_dim, p.k_stride, num_pages),
                v = kv_view(p, p.head_dim_v, p.v_stride, num_pages);
  return sm90::make_tma_desc(&d, p.q, q.dims, q.bs, block_m) &&
         sm90::make_tma_desc(&d, p.k, k.dims, k.bs, block_n) &&
         sm90::make_tma_desc(&d, p.v, v.dims, v.bs, block_n);
}

}  // namespace cuda
}  // namespace attnkit
