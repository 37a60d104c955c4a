// The slice of the CUDA runtime API that attnkit's binding and launchers call, for the CPU
// emulator build (linked instead of libcudart). One emulated device whose "device memory" is
// host memory, so numpy buffers can stand in for device arrays. Its SM count and shared
// memory limit come from ATTNKIT_EMU_SMS (default 4, so small problems take the split-KV path)
// and ATTNKIT_EMU_SMEM (default 101376, the sm_86 / sm_89 limit), its compute capability from
// ATTNKIT_EMU_CC (default 86; 90 with ATTNKIT_EMU_SMEM=232448 stands for an H100/H200). They are
// read at every query, so tests may change them between calls.
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

namespace {
int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : dflt;
}
}  // namespace

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = env_int("ATTNKIT_EMU_SMS", 4);
      break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = env_int("ATTNKIT_EMU_SMEM", 101376);
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = env_int("ATTNKIT_EMU_CC", 86) / 10;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = env_int("ATTNKIT_EMU_CC", 86) % 10;
      break;
    case cudaDevAttrMemoryPoolsSupported:
      *value = 1;
      break;
    default:
      *value = 0;
  }
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  std::memset(prop, 0, sizeof(*prop));
  std::strncpy(prop->name, "attnkit CPU emulator", sizeof(prop->name) - 1);
  prop->major = env_int("ATTNKIT_EMU_CC", 86) / 10;
  prop->minor = env_int("ATTNKIT_EMU_CC", 86) % 10;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes* attr, const void* ptr) {
  std::memset(attr, 0, sizeof(*attr));
  attr->type = cudaMemoryTypeDevice;  // every address counts as device memory of device 0
  attr->device = 0;
  attr->devicePointer = const_cast<void*>(ptr);
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, bytes);  // NaN bytes: a kernel reading unwritten scratch shows
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, enum cudaMemcpyKind,
                            cudaStream_t) {
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* ev, unsigned int) {
  *ev = nullptr;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }

}  // extern "C"
