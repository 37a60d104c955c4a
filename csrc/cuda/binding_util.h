// Helpers of the CUDA binding (module.cpp, attention_binding.cpp): device selection, pointer
// checks, stream-ordered scratch, host uploads, cross-stream waits and error translation.
// Host compiler only; no device code.
#pragma once
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "bindings/params_from.h"
#include "bindings/tensor.h"
#include "cuda/kernels.h"

namespace attnkit {
namespace cuda_binding {
namespace py = pybind11;

// Raises RuntimeError naming the CUDA error (MemoryError for an allocation failure).
[[noreturn]] void throw_cuda(cudaError_t err, const char* fn);
inline void check_cuda(cudaError_t err, const char* fn) {
  if (err != cudaSuccess) throw_cuda(err, fn);
}

int device_count();

// Properties the planners need; raises TypeError below compute capability 8.0 (the kernels
// use cp.async, ldmatrix and bf16 mma.sync).
const cuda::DeviceInfo& device_info(int device, const char* fn);

// Raises ValueError unless t's memory is device (or managed) memory of `device`: a kernel
// reading a host pointer would fault and poison the whole CUDA context.
void check_device_ptr(const Tensor& t, int device, const char* fn, const char* arg);

// A device-array descriptor (see tensor.h), checked as above. numpy arrays are refused.
Tensor dev_tensor(py::handle obj, const char* fn, const char* arg, bool writeable, int device);

// Makes `stream` wait for the work queued so far on each of `others`.
void wait_for(cudaStream_t stream, const std::vector<uintptr_t>& others, const char* fn);

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline bool is_float(DType t) { return is_float_dtype(t); }  // bindings/params_from.h

// Runs the call on `device`, restoring the caller's current device afterwards.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* fn);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// Device memory for one call, freed on the call's stream after its kernels (stream-ordered;
// plain cudaMalloc/cudaFree on devices without memory pools).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();
  void alloc(size_t bytes, cudaStream_t stream, int device, const char* fn);
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool async_ = true;
};

// A small host numpy array (index arrays, ALiBi slopes) copied to the device for one call;
// t describes the device copy (C-contiguous).
struct Upload {
  DeviceBuffer buf;
  Tensor t;
};
void upload(Upload& u, py::handle host_array, const char* fn, const char* arg,
            cudaStream_t stream, int device);

}  // namespace cuda_binding
}  // namespace attnkit
