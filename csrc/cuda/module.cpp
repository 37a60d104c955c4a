// attnkit._cuda: the thin binding of the CUDA kernels (ARCHITECTURE.md rule 2). python/attnkit/
// _cuda_backend.py turns device arrays (torch, CuPy, __cuda_array_interface__, DLPack) into the
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
#include "bindings/params_from.h"
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
  SoftmaxParams p;
  if (!softmax_params(x, out, axis, &p)) return;
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
  GemmParams p;
  if (!gemm_params(a, b, out, &p)) return;
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

