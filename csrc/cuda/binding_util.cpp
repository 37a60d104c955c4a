// See binding_util.h.
#include "cuda/binding_util.h"

#include <pybind11/numpy.h>

#include <new>
#include <stdexcept>
#include <string>

namespace attnkit {
namespace cuda_binding {

[[noreturn]] void throw_cuda(cudaError_t err, const char* fn) {
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  if (err == cudaErrorMemoryAllocation)
    throw std::bad_alloc();
  throw std::runtime_error(std::string(fn) + ": CUDA error: " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}


int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {  // no driver / no device: not an error here
    cudaGetLastError();
    return 0;
  }
  return n;
}

DeviceGuard::DeviceGuard(int device, const char* fn) {
  check_cuda(cudaGetDevice(&prev_), fn);
  if (prev_ != device) check_cuda(cudaSetDevice(device), fn);
}
DeviceGuard::~DeviceGuard() {
  int cur = -1;
  if (prev_ >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
}

const cuda::DeviceInfo& device_info(int device, const char* fn) {
  static std::vector<cuda::DeviceInfo> cache;  // guarded by the GIL
  static std::vector<bool> known;
  if (device < 0) throw_value(std::string(fn) + ": bad device index");
  if (size_t(device) >= cache.size()) {
    cache.resize(size_t(device) + 1);
    known.resize(size_t(device) + 1, false);
  }
#ifdef ATTNKIT_CUDA_EMULATE
  known[size_t(device)] = false;  // the emulated device may change (ATTNKIT_EMU_* variables)
#endif
  if (!known[size_t(device)]) {
    cuda::DeviceInfo& d = cache[size_t(device)];
    check_cuda(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device), fn);
    check_cuda(cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), fn);
    check_cuda(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device), fn);
    check_cuda(cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, device), fn);
    known[size_t(device)] = true;
  }
  const cuda::DeviceInfo& d = cache[size_t(device)];
  if (d.cc_major < 8)
    throw py::type_error(std::string(fn) + ": attnkit's CUDA kernels need compute capability 8.0 "
                         "or newer (Ampere); this device has " + std::to_string(d.cc_major) + "." +
                         std::to_string(d.cc_minor));
  return d;
}

// A kernel that reads a host pointer faults and poisons the whole CUDA context, so every
// pointer is checked before any launch (cheap: a driver table lookup).
void check_device_ptr(const Tensor& t, int device, const char* fn, const char* arg) {
  if (t.numel() == 0) return;
  cudaPointerAttributes attr;
  const cudaError_t err = cudaPointerGetAttributes(&attr, t.data);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw_value(std::string(fn) + ": " + arg + " is not CUDA device memory");
  }
  if (attr.type == cudaMemoryTypeManaged) return;
  if (attr.type != cudaMemoryTypeDevice)
    throw_value(std::string(fn) + ": " + arg + " is not CUDA device memory (" +
                (attr.type == cudaMemoryTypeHost ? "pinned host memory" : "host memory") +
                "); move it to the device first");
  if (attr.device != device)
    throw_value(std::string(fn) + ": " + arg + " is on cuda:" + std::to_string(attr.device) +
                " but the call runs on cuda:" + std::to_string(device));
}

Tensor dev_tensor(py::handle obj, const char* fn, const char* arg, bool writeable, int device) {
  if (py::isinstance<py::array>(obj))
    throw_type(std::string(fn) + ": " + arg + " must be a CUDA device array, got numpy.ndarray");
  Tensor t = to_tensor(obj, fn, arg, writeable);
  check_device_ptr(t, device, fn, arg);
  return t;
}

void DeviceBuffer::alloc(size_t bytes, cudaStream_t stream, int device, const char* fn) {
  stream_ = stream;
  if (bytes == 0) return;
  int pools = 0;
  if (cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) {
    cudaGetLastError();
    pools = 0;
  }
  async_ = pools != 0;
  check_cuda(async_ ? cudaMallocAsync(&ptr_, bytes, stream) : cudaMalloc(&ptr_, bytes), fn);
}
DeviceBuffer::~DeviceBuffer() {
  // Without pools cudaFree synchronizes the device, which is slow but just as safe.
  if (ptr_) async_ ? cudaFreeAsync(ptr_, stream_) : cudaFree(ptr_);
}

// A small host array (index arrays, ALiBi slopes) uploaded for one call.
void upload(Upload& u, py::handle obj, const char* fn, const char* arg, cudaStream_t s,
            int device) {
  py::array a = py::array::ensure(obj, py::array::c_style | py::array::forcecast);
  if (!a) throw_type(std::string(fn) + ": " + arg + " must be an array");
  u.t = to_tensor(a, fn, arg, false);
  const size_t bytes = size_t(a.nbytes());
  u.buf.alloc(bytes, s, device, fn);
  if (bytes) check_cuda(cudaMemcpyAsync(u.buf.get(), a.data(), bytes, cudaMemcpyHostToDevice, s), fn);
  u.t.data = u.buf.get();
}

// Make `stream` wait for work already queued on other streams (CAI producers' streams).
void wait_for(cudaStream_t stream, const std::vector<uintptr_t>& others, const char* fn) {
  for (uintptr_t o : others) {
    cudaStream_t other = reinterpret_cast<cudaStream_t>(o);
    if (other == stream) continue;
    cudaEvent_t ev;
    check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), fn);
    cudaError_t err = cudaEventRecord(ev, other);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(stream, ev, 0);
    cudaEventDestroy(ev);  // released once the wait completes
    check_cuda(err, fn);
  }
}

}  // namespace cuda_binding
}  // namespace attnkit
