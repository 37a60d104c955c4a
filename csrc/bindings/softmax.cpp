#include <algorithm>
#include <string>

#include "attnkit/params.h"
#include "cpu/kernels.h"
#include "cpu/threading.h"
#include "ops.h"
#include "tensor.h"

namespace attnkit {
namespace {

bool is_float(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
}

void softmax_entry(py::handle x_obj, py::handle out_obj, int64_t axis) {
  const char* fn = "softmax";
  Tensor x = to_tensor(x_obj, fn, "x", false);
  Tensor out = to_tensor(out_obj, fn, "out", true);
  if (!is_float(x.dtype))
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
  if (x.numel() == 0) return;

  SoftmaxParams p;
  p.x = x.data;
  p.out = out.data;
  p.dtype = x.dtype;
  if (x.ndim == 0) {
    p.n = 1;
  } else {
    const int a = int(axis < 0 ? axis + x.ndim : axis);
    p.n = x.shape[a];
    p.x_stride = x.strides[a];
    p.out_stride = out.strides[a];
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
    p.outer_ndim = k;
    std::copy(shp, shp + k, p.outer_shape);
    std::copy(xs, xs + k, p.x_outer_strides);
    std::copy(os, os + k, p.out_outer_strides);
  }
  p.num_threads = resolve_num_threads();
  Status s;
  {
    py::gil_scoped_release release;
    s = cpu::active_kernels()->softmax(p);
  }
  check_status(s, fn);
}

}  // namespace

void bind_softmax(py::module_& m) {
  m.def("softmax", &softmax_entry, py::arg("x"), py::arg("out"), py::arg("axis"),
        "softmax(x, out, axis): writes softmax of x along axis into out (validated).");
}



}  // namespace attnkit
