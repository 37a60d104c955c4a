#include "params_from.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace attnkit {

bool is_float_dtype(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
}

bool softmax_params(const Tensor& x, const Tensor& out, int64_t axis, SoftmaxParams* p) {
  if (!is_float_dtype(x.dtype))
    throw_type(std::string("softmax: x has dtype ") + dtype_name(x.dtype) +
               "; expected float32, float64, float16 or bfloat16");
  if (out.dtype != x.dtype)
    throw_type(std::string("softmax: out has dtype ") + dtype_name(out.dtype) + " but x has " +
               dtype_name(x.dtype));
  if (out.ndim != x.ndim || !std::equal(x.shape, x.shape + x.ndim, out.shape))
    throw_value("softmax: out has shape " + shape_str(out) + " but x has " + shape_str(x));
  const int nd = std::max(x.ndim, 1);
  if (axis < -nd || axis >= nd)
    throw_value("softmax: axis " + std::to_string(axis) + " is out of range for x with " +
                std::to_string(x.ndim) + " dimension(s)");
  if (!same_view(x, out) && may_overlap(x, out))
    throw_value("softmax: out overlaps x; pass out=x (the very same array) for in place, or "
                "a separate array");
  if (x.numel() == 0) return false;
  for (int d = 0; d < out.ndim; ++d)
    if (out.shape[d] > 1 && out.strides[d] == 0)
      throw_value("softmax: out has overlapping elements (a stride-0 dimension)");
  p->x = x.data;
  p->out = out.data;
  p->dtype = x.dtype;
  if (x.ndim == 0) {
    p->n = 1;
  } else {
    const int a = int(axis < 0 ? axis + x.ndim : axis);
    p->n = x.shape[a];
    p->x_stride = x.strides[a];
    p->out_stride = out.strides[a];
    // Outer dims, largest x stride first so a contiguous neighbour ends up last (the kernel
    // vectorizes across it), merged where both x and out allow.
    int dims[kMaxTensorDims], nd_outer = 0;
    for (int d = 0; d < x.ndim; ++d)
      if (d != a && x.shape[d] > 1) dims[nd_outer++] = d;
    std::stable_sort(dims, dims + nd_outer, [&](int i, int j) {
      return std::llabs(x.strides[i]) > std::llabs(x.strides[j]);
    });
    int64_t shp[kMaxTensorDims], xs[kMaxTensorDims], os[kMaxTensorDims];
    int k = 0;
    for (int i = 0; i < nd_outer; ++i) {
      const int d = dims[i];
      if (k > 0 && xs[k - 1] == x.strides[d] * x.shape[d] &&
          os[k - 1] == out.strides[d] * x.shape[d]) {
        shp[k - 1] *= x.shape[d];
        xs[k - 1] = x.strides[d];
        os[k - 1] = out.strides[d];
        continue;
      }
      shp[k] = x.shape[d];
      xs[k] = x.strides[d];
      os[k] = out.strides[d];
      ++k;
    }
    if (k > kMaxDims)
      throw_value("softmax: x has too many non-mergeable dimensions (" + std::to_string(k + 1) +
                  "); at most " + std::to_string(kMaxDims + 1) + " are supported");
    p->outer_ndim = k;
    std::copy(shp, shp + k, p->outer_shape);
    std::copy(xs, xs + k, p->x_outer_strides);
    std::copy(os, os + k, p->out_outer_strides);
  }
  return true;
}

bool gemm_params(const Tensor& a, const Tensor& b, const Tensor& out, GemmParams* p) {
  if (!is_float_dtype(a.dtype))
    throw_type(std::string("matmul: a has dtype ") + dtype_name(a.dtype) +
               "; expected float32, float64, float16 or bfloat16");
  if (b.dtype != a.dtype)
    throw_type(std::string("matmul: a has dtype ") + dtype_name(a.dtype) + " but b has " +
               dtype_name(b.dtype) + "; convert one of them (mixed dtypes are not computed)");
  if (out.dtype != a.dtype)
    throw_type(std::string("matmul: out has dtype ") + dtype_name(out.dtype) +
               " but the operands have " + dtype_name(a.dtype));
  if (a.ndim < 2 || b.ndim != a.ndim || out.ndim != a.ndim)
    throw_value("matmul: internal shape error (a " + shape_str(a) + ", b " + shape_str(b) +
                ", out " + shape_str(out) + ")");
  const int nd = a.ndim;
  const int64_t m = a.shape[nd - 2], k = a.shape[nd - 1], n = b.shape[nd - 1];
  if (b.shape[nd - 2] != k)
    throw_value("matmul: shapes " + shape_str(a) + " and " + shape_str(b) +
                " are not aligned: a has K=" + std::to_string(k) + " but b has K=" +
                std::to_string(b.shape[nd - 2]));
  for (int d = 0; d < nd - 2; ++d)
    if (a.shape[d] != b.shape[d] || out.shape[d] != a.shape[d])
      throw_value("matmul: batch dims of " + shape_str(a) + ", " + shape_str(b) + " and out " +
                  shape_str(out) + " differ");
  if (out.shape[nd - 2] != m || out.shape[nd - 1] != n)
    throw_value("matmul: out has shape " + shape_str(out) + " but the result has (..., " +
                std::to_string(m) + ", " + std::to_string(n) + ")");
  if (out.numel() == 0) return false;
  for (int d = 0; d < nd; ++d)
    if (out.shape[d] > 1 && out.strides[d] == 0)
      throw_value("matmul: out has overlapping elements (a stride-0 dimension)");
  if (may_overlap(out, a) || may_overlap(out, b))
    throw_value("matmul: out overlaps an input (a or b); pass a separate array");

  p->a = a.data;
  p->b = b.data;
  p->c = out.data;
  p->dtype = a.dtype;
  p->m = m;
  p->n = n;
  p->k = k;
  p->rs_a = a.strides[nd - 2];
  p->cs_a = a.strides[nd - 1];
  p->rs_b = b.strides[nd - 2];
  p->cs_b = b.strides[nd - 1];
  p->rs_c = out.strides[nd - 2];
  p->cs_c = out.strides[nd - 1];
  // Size-1 dims: any stride is as good as a unit one (lets (M,1) and (1,N) views run in place).
  if (m == 1) p->rs_a = k, p->rs_c = n * p->cs_c;
  if (k == 1) p->cs_a = 1, p->rs_b = n * p->cs_b;
  if (n == 1) p->cs_b = 1, p->cs_c = 1;
  int bd = 0;
  for (int d = 0; d < nd - 2; ++d) {
    if (a.shape[d] == 1) continue;
    if (bd >= kMaxDims) throw_value("matmul: too many batch dimensions");
    p->batch_shape[bd] = a.shape[d];
    p->a_batch_strides[bd] = a.strides[d];
    p->b_batch_strides[bd] = b.strides[d];
    p->c_batch_strides[bd] = out.strides[d];
    ++bd;
  }
  p->batch_ndim = bd;
  return true;
}

void attention_operands(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        AttentionParams* p) {
  p->q = q.data;
  p->k = k.data;
  p->v = v.data;
  p->out = out.data;
  p->q_dtype = q.dtype;
  p->kv_dtype = k.dtype;
  for (int i = 0; i < 3; ++i) {
    p->q_stride[i] = q.strides[i];
    p->k_stride[i] = k.strides[i];
    p->v_stride[i] = v.strides[i];
    p->out_stride[i] = out.strides[i];
  }
}

}  // namespace attnkit
