// Python objects -> plain tensor descriptions, with the checks every entry point shares.
// Accepts numpy.ndarray (ml_dtypes.bfloat16 included), torch.Tensor once attnkit.torch has
// registered torch's types (register_torch), and the raw tuples the front end builds:
// (data_ptr: int, shape: tuple, strides_in_elements: tuple, dtype: str, writeable: bool).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "attnkit/dtype.h"
#include "attnkit/error.h"

namespace attnkit {
namespace py = pybind11;

constexpr int kMaxTensorDims = 16;

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[kMaxTensorDims] = {};
  int64_t strides[kMaxTensorDims] = {};  // in elements
  bool writeable = false;
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  // [lo, hi) byte range the elements can touch (empty tensors touch nothing).
  void byte_extent(uintptr_t* lo, uintptr_t* hi) const;
};

int64_t itemsize(DType t);
const char* dtype_name(DType t);
std::string shape_str(const Tensor& t);

// `fn` and `arg` name the function and argument in error messages.
Tensor to_tensor(py::handle obj, const char* fn, const char* arg, bool need_writeable);
// torch.Tensor, its strided layout and its dtypes ({torch.float32: "float32", ...}), kept for
// the life of the module: to_tensor then reads CPU tensors with the C API (data_ptr, shape,
// stride) and refuses one on another device (meta, CUDA), of another layout, nested, or of a
// dtype not in the table, before anything is written. Called by attnkit.torch at import.
void register_torch(py::handle tensor_type, py::handle strided, py::dict dtypes);

// An absent optional argument: no data, ndim -1.
inline Tensor absent_tensor() {
  Tensor t;
  t.ndim = -1;
  return t;
}

// Optional argument: None -> nullptr-data tensor with ndim -1.
Tensor to_tensor_or_none(py::handle obj, const char* fn, const char* arg, bool need_writeable);

// (data_ptr, shape, strides in elements or None when a byte stride is not a whole number of
// items, dtype name, writeable) of a numpy array: the Python front end's descriptor
// (python/attnkit/_arrays.py), built here because it is on every call's path.
py::tuple describe_numpy(py::handle a);

// True if the byte ranges of a and b intersect (a conservative "may share memory").
bool may_overlap(const Tensor& a, const Tensor& b);
bool same_view(const Tensor& a, const Tensor& b);
// True when two elements of `t` share memory (a stride-0 dimension of extent > 1, or strides
// that interleave onto one address): an output like that would be written by two threads.
// Strides sorted by size that each pass the extent of the smaller ones never overlap; other
// (interleaved) views are checked offset by offset up to 2^20 elements, refused above.
bool self_overlapping(const Tensor& t);

[[noreturn]] void throw_value(const std::string& msg);

// Throws ValueError("<fn>: <msg>") when cond is false. A macro so that msg, usually a string
// concatenation, is built only on failure: these checks run on every call, and building the
// messages eagerly cost ~5k instructions (a third of a tiny attention call).
#define ATTNKIT_REQUIRE(fn, cond, msg)                                     \
  do {                                                                     \
    if (!(cond)) ::attnkit::throw_value(std::string(fn) + ": " + (msg)); \
  } while (0)
[[noreturn]] void throw_type(const std::string& msg);
// Turns a kernel status into a Python exception.
void check_status(Status s, const char* fn);

}  // namespace attnkit
