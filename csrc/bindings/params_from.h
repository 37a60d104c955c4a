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

// Pointers, dtypes and (batch, head, seq) strides of attention's q, k, v and out, all 4-D
// (B, H, S, D) with a contiguous head dim (checked by the caller).
void attention_operands(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        AttentionParams* p);

}  // namespace attnkit
