// Validation of the NumPy-API arguments and the params structs built from them, shared by the
// CPU binding and the CUDA binding (both link bindings/params_from.cpp), so the two devices
// give the same errors and the same kernel descriptions.
#pragma once
#include <cstdint>

#include "attnkit/params.h"
#include "tensor.h"

namespace attnkit {

bool is_float_dtype(DType t);

// softmax(x, axis) into out. Returns false when there is nothing to compute (x is empty).
bool softmax_params(const Tensor& x, const Tensor& out, int64_t axis, SoftmaxParams* p);

// out[...] = a @ b for batch-broadcast (..., M, K) @ (..., K, N). Returns false when out is
// empty.
bool gemm_params(const Tensor& a, const Tensor& b, const Tensor& out, GemmParams* p);

}  // namespace attnkit
