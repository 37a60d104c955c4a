// fp16/bf16 matmul on Hopper through CUTLASS's sm90 collectives (issue 12 item 3): TMA loads
// into a multi-stage shared-memory pipeline, warp-specialized wgmma consumers, fp32
// accumulation, the persistent tile scheduler. CUTLASS supplies the building blocks
// (collective builders, GemmUniversal); the choice of shapes, layouts and when to use it is
// here. Built only with the CUTLASS headers (the nvidia-cutlass package, found by CMake) and
// for sm_90a; chosen only on an sm_90 device, for the layouts below, and only when switched on
// (it has not yet run on a GPU: cutlass_gemm_enabled, ATTNKIT_CUDA_CUTLASS_GEMM=1).
//
// Covered: A row-major (rows of K contiguous), B row-major (x @ W) or column-major (x @ W.T),
// C row-major; leading dimensions, pointers and batch strides multiples of 8 elements (16
// bytes, TMA's rule); batch dims that flatten to one stride per operand, none of them 0, except
// one B shared by a batch of contiguous A and C (folded into one product of batch * M rows).
// Everything else returns "not applied" and gemm.cu's mma.sync kernel runs.
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <cstdint>

#include "kernels.h"

namespace attnkit {
namespace cuda {
namespace {

using namespace cute;

template <class Element, class LayoutB>
struct Sm90Gemm {
  using ElementAcc = float;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutC = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // elements per 16 bytes
  // 128 x 128 output tiles, 64-deep k steps; a 1 x 2 cluster shares A tiles through TMA
  // multicast. The builders pick the stage count from the shared memory left by the epilogue
  // and the kernel schedule (warp-specialized, persistent) for these types.
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _2, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, Element, LayoutC,
      kAlign, Element, LayoutC, kAlign,
      cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element,
      LayoutB, kAlign, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// Batch strides of one operand when its batch dims flatten to one (0: broadcast); false if not.
bool flat_batch(const GemmParams& p, const int64_t* strides, int64_t* out) {
  int64_t s = 0, span = 1;
  bool first = true;
  for (int d = p.batch_ndim - 1; d >= 0; --d) {
    if (p.batch_shape[d] == 1) continue;
    if (first) {
      s = strides[d];
      first = false;
    } else if (strides[d] != s * span) {
      return false;
    }
    span *= p.batch_shape[d];
  }
  *out = s;
  return true;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <class Element, class LayoutB>
cudaError_t run(const GemmParams& p, int m, int batch, int64_t sa, int64_t sb, int64_t sc,
                int64_t ldb, cudaStream_t stream, bool* applied) {
  using G = Sm90Gemm<Element, LayoutB>;
  using Kernel = typename G::Kernel;
  const int n = int(p.n), k = int(p.k);
  const auto stride_a = typename Kernel::StrideA{p.rs_a, Int<1>{}, sa};
  typename Kernel::StrideB stride_b;
  if constexpr (std::is_same<LayoutB, cutlass::layout::RowMajor>::value)
    stride_b = typename Kernel::StrideB{Int<1>{}, ldb, sb};  // (n, k): n contiguous
  else
    stride_b = typename Kernel::StrideB{ldb, Int<1>{}, sb};  // (n, k): k contiguous
  const auto stride_c = typename Kernel::StrideC{p.rs_c, Int<1>{}, sc};
  const auto stride_d = typename Kernel::StrideD{p.rs_c, Int<1>{}, sc};
  auto* a = static_cast<const Element*>(p.a);
  auto* b = static_cast<const Element*>(p.b);
  auto* c = static_cast<Element*>(p.c);
  typename G::Device::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, batch},
      {a, stride_a, b, stride_b},
      {{1.0f, 0.0f}, c, stride_c, c, stride_d}};  // beta = 0: C is never read
  typename G::Device gemm;
  // No workspace: nothing is allocated per call (graph capture), so a configuration that
  // needs one falls back. So does one CUTLASS refuses; an error its setup left is cleared so
  // that the fallback's launch check does not report it.
  if (G::Device::get_workspace_size(args) != 0 || gemm.can_implement(args) != cutlass::Status::kSuccess)
    return cudaSuccess;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) {
    cudaGetLastError();
    return cudaSuccess;
  }
  *applied = true;
  const cutlass::Status st = gemm.run(stream);
  return st == cutlass::Status::kSuccess ? cudaGetLastError() : cudaErrorLaunchFailure;
}

}  // namespace

cudaError_t gemm_sm90(const GemmParams& p, cudaStream_t stream, bool* applied) {
  *applied = false;
  if (p.dtype != DType::f16 && p.dtype != DType::bf16) return cudaSuccess;
  if (p.m <= 0 || p.n <= 0 || p.k <= 0 || p.m >= (int64_t(1) << 31) || p.n >= (int64_t(1) << 31) ||
      p.k >= (int64_t(1) << 31))
    return cudaSuccess;
  int64_t batch = 1, sa = 0, sb = 0, sc = 0;
  for (int d = 0; d < p.batch_ndim; ++d) batch *= p.batch_shape[d];
  if (batch < 1 || batch >= (int64_t(1) << 31) || !flat_batch(p, p.a_batch_strides, &sa) ||
      !flat_batch(p, p.b_batch_strides, &sb) || !flat_batch(p, p.c_batch_strides, &sc))
    return cudaSuccess;
  const bool b_row = p.cs_b == 1, b_col = p.rs_b == 1 && !b_row;
  const int64_t ldb = b_row ? p.rs_b : p.cs_b;
  const bool ok = p.cs_a == 1 && p.rs_a % 8 == 0 && p.cs_c == 1 && p.rs_c % 8 == 0 &&
                  (b_row || b_col) && ldb % 8 == 0 && sa % 8 == 0 && sb % 8 == 0 &&
                  sc % 8 == 0 && aligned16(p.a) && aligned16(p.b) && aligned16(p.c);
  if (!ok) return cudaSuccess;
  // A batch of A and C over one shared B (x @ W with x 3-d): one product of batch * m rows when
  // A and C are contiguous over the batch; other broadcasts (a zero batch stride, which TMA
  // descriptors are not relied on to take) fall back.
  int64_t m = p.m;
  if (batch > 1 && sb == 0 && sa == p.m * p.rs_a && sc == p.m * p.rs_c && batch * p.m < (int64_t(1) << 31)) {
    m = batch * p.m;
    batch = 1;
  }
  if (batch > 1 && (sa == 0 || sb == 0 || sc == 0)) return cudaSuccess;
  const int nb = int(batch), mm = int(m);
  if (p.dtype == DType::f16)
    return b_row ? run<cutlass::half_t, cutlass::layout::RowMajor>(p, mm, nb, sa, sb, sc, ldb, stream, applied)
                 : run<cutlass::half_t, cutlass::layout::ColumnMajor>(p, mm, nb, sa, sb, sc, ldb, stream, applied);
  return b_row ? run<cutlass::bfloat16_t, cutlass::layout::RowMajor>(p, mm, nb, sa, sb, sc, ldb, stream, applied)
               : run<cutlass::bfloat16_t, cutlass::layout::ColumnMajor>(p, mm, nb, sa, sb, sc, ldb, stream, applied);
}

}  // namespace cuda
}  // namespace attnkit
