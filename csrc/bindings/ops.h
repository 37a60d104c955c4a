// Registration of the kernel entry points (one file per kernel family in bindings/).
#pragma once
#include <pybind11/pybind11.h>

namespace attnkit {
void bind_softmax(pybind11::module_& m);
void bind_matmul(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
}  // namespace attnkit
