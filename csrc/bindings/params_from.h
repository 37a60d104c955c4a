// Validation of the NumPy-API arguments and the params structs built from them, shared by the
// CPU binding and the CUDA binding (both link bindings/params_from.cpp), so the two devices
// give the same errors and the same kernel descriptions.
#pragma once
#include <cstdint>
#include <string>

#include "attnkit/params.h"
#include "tensor.h"

namespace attnkit {

bool is_float_dtype(DType t);

// softmax(x, axis) into out. Returns false when there is nothing to compute (x is empty).
bool softmax_params(const Tensor& x, const Tensor& out, int64_t axis, SoftmaxParams* p);

// out[...] = a @ b for batch-broadcast (..., M, K) @ (..., K, N). Returns false when out is
// empty.
bool gemm_params(const Tensor& a, const Tensor& b, const Tensor& out, GemmParams* p);

// The arrays of one attention call in canonical (B, H, S, D) views (the Python front end
// made them; see docs/ARCHITECTURE.md). Optional ones have ndim == -1 (absent).
struct AttentionTensors {
  Tensor q, k, v, out;  // k/v are the caches when appending
  // lse (B, H, Sq) f32; mask (B, H, Sq, Sk); alibi (B, H) f32
  Tensor lse = absent_tensor(), mask = absent_tensor(), alibi = absent_tensor();
  // attention_with_kvcache: rows appended to the caches
  Tensor k_new = absent_tensor(), v_new = absent_tensor();
  // 8-bit caches: one float32 scale per row, canonical (B|pages, Hkv, S) views
  Tensor k_scale = absent_tensor(), v_scale = absent_tensor();
  bool paged = false;             // k/v are (pages, Hkv, page_size, D): batch need not match
  bool varlen = false;            // q/k/v are (1, H, total, D) packed sequences
  bool backward = false;          // out and lse are the forward's results (inputs here)
};

struct AttentionOptions {
  int64_t batch = 0;
  double scale = 1.0, softcap = 0.0;
  bool causal = false, bottom_right = false;
  int64_t window_left = -1, window_right = -1;
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;
};

bool is_code_dtype(DType t);  // 8-bit KV-cache codes: int8, float8_e4m3fn

// quantize_kv(x) into q (codes) and scale: x (..., D) float32/float16/bfloat16, q of x's shape
// (int8 or float8_e4m3fn), scale (...) float32. Returns false when there is nothing to do.
bool quantize_params(const std::string& fn, const Tensor& x, const Tensor& q, const Tensor& scale,
                     QuantizeParams* p);

// merge_attention_states: outs (N, ..., Sq, Dv) float, lses (N, ..., Sq) float32/float64, out
// (..., Sq, Dv) of outs' dtype, lse (..., Sq) of lses' dtype. Checks dtypes, shapes, unit-stride
// rows and aliasing (out may be exactly outs[0] and lse exactly lses[0]: in place; any other
// overlap is refused). Returns false when there is nothing to compute.
bool merge_params(const std::string& fn, const Tensor& outs, const Tensor& lses, const Tensor& out,
                  const Tensor& lse, MergeParams* p);

// Checks everything the attention kernels rely on for memory safety -- dtypes, shapes,
// unit-stride head dims, outputs that overlap inputs or each other -- and fills p but for the
// sequence description (varlen offsets, cache lengths, pages), which each device handles.
// Shared by the CPU and the CUDA bindings; every message starts with `fn`.
void attention_params(const std::string& fn, const AttentionTensors& t,
                      const AttentionOptions& o, AttentionParams* p);

// attention_backward: checks dout (out's shape and dtype), dq/dk/dv (q/k/v's shapes, unit-stride
// head dims, no overlap with an input or each other; k/v of q's dtype) and fills bp's gradient
// pointers and strides. Shared by the CPU and the CUDA bindings; messages start with `fn`.
void backward_grad_params(const std::string& fn, const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const Tensor& dout, const Tensor& dq, const Tensor& dk,
                          const Tensor& dv, AttentionBwdParams* bp);

}  // namespace attnkit
