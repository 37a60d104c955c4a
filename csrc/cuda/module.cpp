// attnkit._cuda: the thin binding of the CUDA kernels (DESIGN rule 2). python/attnkit/
// _cuda_api.py turns device arrays (torch, CuPy, __cuda_array_interface__, DLPack) into the
// raw descriptors of csrc/bindings/tensor.h: (data_ptr, shape, strides_in_elements, dtype,
// writeable). Each entry point checks dtype, shape, strides, aliasing and that every pointer
// is device memory of the call's device, fills one params struct, releases the GIL and
// launches on the caller's stream. Launches are asynchronous: nothing here synchronizes,
// except to_host (used for the few host-side checks that need index values).
//
// Without a GPU (or driver) the module still imports: device_count() returns 0.
#include <cuda_runtime_api.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bindings/tensor.h"
#include "cuda/binding_util.h"
#include "cuda/kernels.h"

#ifndef ATTNKIT_VERSION
#define ATTNKIT_VERSION "0.0.0+unknown"
#endif
#ifndef ATTNKIT_CUDA_ARCHS
#define ATTNKIT_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using namespace attnkit;
using namespace attnkit::cuda_binding;

namespace {

// ---- softmax / matmul ----

void softmax_entry(py::handle x_o, py::handle out_o, int64_t axis, int device, uintptr_t stream,
                   std::vector<uintptr_t> wait) {
  const char* fn = "softmax";
  DeviceGuard guard(device, fn);
  device_info(device, fn);
  Tensor x = dev_tensor(x_o, fn, "x", false, device);
  Tensor out = dev_tensor(out_o, fn, "out", true, device);
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
  for (int d = 0; d < out.ndim; ++d)
    if (out.shape[d] > 1 && out.strides[d] == 0)
      throw_value("softmax: out has overlapping elements (a stride-0 dimension)");
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
    int k = 0;
    for (int d = 0; d < x.ndim; ++d) {  // outer dims in memory order of x; size-1 dims dropped
      if (d == a || x.shape[d] == 1) continue;
      if (k >= kMaxDims) throw_value("softmax: too many dimensions");
      p.outer_shape[k] = x.shape[d];
      p.x_outer_strides[k] = x.strides[d];
      p.out_outer_strides[k] = out.strides[d];
      ++k;
    }
    p.outer_ndim = k;
  }
  wait_for(as_stream(stream), wait, fn);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = cuda::softmax(p, as_stream(stream));
  }
  check_cuda(err, fn);
}

void matmul_entry(py::handle a_o, py::handle b_o, py::handle out_o, int device, uintptr_t stream,
                  std::vector<uintptr_t> wait) {
  const char* fn = "matmul";
  DeviceGuard guard(device, fn);
  device_info(device, fn);
  Tensor a = dev_tensor(a_o, fn, "a", false, device);
  Tensor b = dev_tensor(b_o, fn, "b", false, device);
  Tensor out = dev_tensor(out_o, fn, "out", true, device);
  if (!is_float(a.dtype))
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
  if (out.numel() == 0) return;
  for (int d = 0; d < nd; ++d)
    if (out.shape[d] > 1 && out.strides[d] == 0)
      throw_value("matmul: out has overlapping elements (a stride-0 dimension)");
  if (may_overlap(out, a) || may_overlap(out, b))
    throw_value("matmul: out overlaps an input (a or b); pass a separate array");
  GemmParams p;
  p.a = a.data;
  p.b = b.data;
  p.c = out.data;
  p.dtype = a.dtype;
  p.m = m;
  p.n = n;
  p.k = k;
  p.rs_a = a.strides[nd - 2];
  p.cs_a = a.strides[nd - 1];
  p.rs_b = b.strides[nd - 2];
  p.cs_b = b.strides[nd - 1];
  p.rs_c = out.strides[nd - 2];
  p.cs_c = out.strides[nd - 1];
  // Size-1 dims: any stride is as good as a unit one (keeps the vector paths for (1, K) rows).
  if (m == 1) p.rs_a = k, p.rs_c = n * p.cs_c;
  if (k == 1) p.cs_a = 1, p.rs_b = n * p.cs_b;
  if (n == 1) p.cs_b = 1, p.cs_c = 1;
  int bd = 0;
  for (int d = 0; d < nd - 2; ++d) {
    if (a.shape[d] == 1) continue;
    if (bd >= kMaxDims) throw_value("matmul: too many batch dimensions");
    p.batch_shape[bd] = a.shape[d];
    p.a_batch_strides[bd] = a.strides[d];
    p.b_batch_strides[bd] = b.strides[d];
    p.c_batch_strides[bd] = out.strides[d];
    ++bd;
  }
  p.batch_ndim = bd;
  wait_for(as_stream(stream), wait, fn);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = cuda::gemm(p, as_stream(stream));
  }
  check_cuda(err, fn);
}

}  // namespace

namespace attnkit {
namespace cuda_binding {
void bind_attention(py::module_& m);  // attention_binding.cpp
}  // namespace cuda_binding
}  // namespace attnkit

#ifndef ATTNKIT_CUDA_MODULE_NAME
#define ATTNKIT_CUDA_MODULE_NAME _cuda  // the emulator build (tests) names its copy _cuda_emu
#endif

PYBIND11_MODULE(ATTNKIT_CUDA_MODULE_NAME, m) {
  m.doc() = "attnkit CUDA kernels (internal; use the attnkit package API with device arrays)";
  m.attr("__version__") = ATTNKIT_VERSION;
  m.attr("compiled_archs") = ATTNKIT_CUDA_ARCHS;
  m.def("device_count", &device_count, "Number of visible CUDA devices (0 without a GPU or driver).");
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("driver_version", [] {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) cudaGetLastError();
    return v;
  });
  m.def("device_name", [](int device) {
    cudaDeviceProp prop;
    check_cuda(cudaGetDeviceProperties(&prop, device), "device_name");
    return std::string(prop.name);
  });
  m.def("device_capability", [](int device) {
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "device_capability");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "device_capability");
    return py::make_tuple(major, minor);
  });
  m.def("pointer_device", [](uintptr_t ptr) {
    // Device ordinal owning ptr; -1 for host or unknown memory, -2 for managed memory.
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(ptr)) != cudaSuccess) {
      cudaGetLastError();
      return -1;
    }
    if (attr.type == cudaMemoryTypeManaged) return -2;
    return attr.type == cudaMemoryTypeDevice ? attr.device : -1;
  });
  m.def("softmax", &softmax_entry, py::arg("x"), py::arg("out"), py::arg("axis"), py::arg("device"),
        py::arg("stream"), py::arg("wait_streams"), "softmax on device descriptors (validated).");
  m.def("matmul", &matmul_entry, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("device"),
        py::arg("stream"), py::arg("wait_streams"), "a @ b on device descriptors (validated).");
  attnkit::cuda_binding::bind_attention(m);
}

