// Small helpers every kernel object shares. Everything here is in the per-ISA namespace (ODR).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "attnkit/dtype.h"
#include "attnkit/error.h"
#include "attnkit/params.h"
#include "debug.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

constexpr size_t kScratchAlign = 64;  // one cache line; also enough for any vector load

// An owned, 64-byte aligned scratch buffer (kernels avoid std containers: their out-of-line
// template code would be shared between ISA variants, see ARCHITECTURE.md rule 4).
template <class T>
struct Scratch {
  T* ptr = nullptr;
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(ptr); }
  // False (and no buffer) when the allocation fails, or when count * sizeof(T) rounded up to
  // whole cache lines does not fit in size_t (a huge count from a wrapped size computation).
  bool reset(size_t count) {
    std::free(ptr);
    ptr = nullptr;
    if (count > (SIZE_MAX - kScratchAlign) / sizeof(T)) return false;
    const size_t bytes = (count * sizeof(T) + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
    if (debug_allocation_fails()) return false;
    ptr = static_cast<T*>(std::aligned_alloc(kScratchAlign, bytes ? bytes : kScratchAlign));
    return ptr != nullptr;
  }
  T* get() const { return ptr; }
  T& operator[](size_t i) const { return ptr[i]; }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Offset of the `index`-th element of an ndim-dimensional index space (C order).
inline int64_t unravel_offset(int64_t index, int ndim, const int64_t* shape,
                              const int64_t* strides) {
  int64_t off = 0;
  for (int d = ndim - 1; d >= 0; --d) {
    int64_t i = index % shape[d];
    index /= shape[d];
    off += i * strides[d];
  }
  return off;
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
