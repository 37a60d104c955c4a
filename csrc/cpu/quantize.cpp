// attnkit.quantize_kv: rows of a (..., Hkv, D) array -> 8-bit codes + one fp32 scale per row
// (quantize.h says how). Compiled once per ISA. Rows are independent: split evenly across
// threads; every row is computed the same way whatever the split (bit-identical results).
#include "attnkit/params.h"
#include "common.h"
#include "quantize.h"
#include "threading.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace {

template <class S, class C>
Status quantize_typed(const QuantizeParams& p) {
  int64_t rows = 1;
  for (int d = 0; d < p.outer_ndim; ++d) rows *= p.outer_shape[d];
  const int nt = threads_for(rows * p.n, p.num_threads);
  const S* x = static_cast<const S*>(p.x);
  C* q = static_cast<C*>(p.q);
  parallel_team(nt, [&] {
    int64_t begin, end;
    split_range(rows, team_size(), thread_id(), &begin, &end);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t xo = unravel_offset(r, p.outer_ndim, p.outer_shape, p.x_outer_strides);
      const int64_t qo = unravel_offset(r, p.outer_ndim, p.outer_shape, p.q_outer_strides);
      const int64_t so = unravel_offset(r, p.outer_ndim, p.outer_shape, p.scale_outer_strides);
      p.scale[so] = quantize_row(x + xo, p.n, q + qo);
    }
  });
  return Status::ok;
}

template <class C>
Status quantize_from(const QuantizeParams& p) {
  switch (p.x_dtype) {
    case DType::f32:
      return quantize_typed<float, C>(p);
    case DType::f16:
      return quantize_typed<f16_t, C>(p);
    case DType::bf16:
      return quantize_typed<bf16_t, C>(p);
    default:
      return Status::invalid_argument;
  }
}

}  // namespace

Status quantize_kv(const QuantizeParams& p) {
  switch (p.q_dtype) {
    case DType::i8:
      return quantize_from<int8_t>(p);
    case DType::f8e4m3:
      return quantize_from<f8e4m3_t>(p);
    default:
      return Status::invalid_argument;
  }
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
