// Plain-data descriptions of every kernel call (ARCHITECTURE.md rule 1). The binding fills these from
// Python arrays; CPU and CUDA kernels read nothing else. All strides are in elements, int64.
// No inline functions here: the per-ISA objects include this header (ODR, ARCHITECTURE.md rule 4).
#pragma once
#include <cstdint>

#include "attnkit/dtype.h"

namespace attnkit {

constexpr int kMaxDims = 16;  // outer (batch) dims a kernel iterates over (numpy arrays may have more)

// softmax(x) along one axis of length n. The other axes are "outer" dims.
struct SoftmaxParams {
  const void* x = nullptr;
  void* out = nullptr;
  DType dtype = DType::f32;  // x and out share it
  int64_t n = 0;             // length of the softmax axis
  int64_t x_stride = 1;      // stride along the softmax axis
  int64_t out_stride = 1;
  int32_t outer_ndim = 0;
  int64_t outer_shape[kMaxDims] = {};
  int64_t x_outer_strides[kMaxDims] = {};
  int64_t out_outer_strides[kMaxDims] = {};
  int32_t num_threads = 1;
  // out was just allocated and never touched (its pages fault in on the first write, each one
  // zeroed by the OS): the CPU kernel then writes it with ordinary stores, never non-temporal
  // ones, which would write every line twice (the OS's zeroes, then the stream).
  bool out_fresh = false;
};

// c[batch][i][j] = sum_p a[batch][i][p] * b[batch][p][j] for a (M,K), b (K,N), c (M,N).
// Batch dims broadcast through stride 0. c never overlaps a or b (checked by the binding).
struct GemmParams {
  const void* a = nullptr;
  const void* b = nullptr;
  void* c = nullptr;
  DType dtype = DType::f32;  // a, b and c share it
  int64_t m = 0, n = 0, k = 0;
  int64_t rs_a = 0, cs_a = 0;  // row / column stride of a
  int64_t rs_b = 0, cs_b = 0;
  int64_t rs_c = 0, cs_c = 0;
  int32_t batch_ndim = 0;
  int64_t batch_shape[kMaxDims] = {};
  int64_t a_batch_strides[kMaxDims] = {};
  int64_t b_batch_strides[kMaxDims] = {};
  int64_t c_batch_strides[kMaxDims] = {};
  int32_t num_threads = 1;
};

// Scaled dot-product attention over (batch, head, seq, dim) operands, addressed by strides.
// Shapes: q (B, H, Sq, D); k (B, Hkv, Sk, D); v (B, Hkv, Sk, Dv); out (B, H, Sq, Dv);
// lse (B, H, Sq) fp32. H is a multiple of Hkv (GQA/MQA); query head h reads kv head h / (H/Hkv).
//
// Sequence addressing, one of:
//   dense:  row s of batch b is at  base + b*stride[0] + head*stride[1] + s*stride[2]
//   varlen: cu_seqlens_q/k hold B+1 token offsets; row s of sequence b is token cu[b] + s
//           (stride[0] is ignored), seqlen_q/k are the longest sequence
//   paged:  block_table (B, max_blocks) names the page of each page_size rows of k and v;
//           row s of batch b is at page block_table[b][s / page_size], row s % page_size,
//           and stride[0] of k/v is the page stride.
// seqlens_k (optional, B entries) caps the number of keys each batch attends to (kv cache).
struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // optional output, natural-log log-sum-exp of the scaled scores

  DType q_dtype = DType::f32;   // out has q's dtype
  DType kv_dtype = DType::f32;  // k and v share it; f32 q may meet f16/bf16 k/v; any float q
                                // but f64 may meet 8-bit (i8 / f8e4m3) k/v with scales below

  int64_t batch = 0, num_heads = 0, num_kv_heads = 0;
  int64_t seqlen_q = 0, seqlen_k = 0, head_dim = 0, head_dim_v = 0;

  int64_t q_stride[3] = {};  // batch, head, seq (the dim stride is 1)
  int64_t k_stride[3] = {};
  int64_t v_stride[3] = {};
  int64_t out_stride[3] = {};
  int64_t lse_stride[3] = {};

  const int64_t* cu_seqlens_q = nullptr;
  const int64_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;  // varlen: tokens in q and in k/v (CUDA TMA bounds)
  const int64_t* seqlens_k = nullptr;
  const int64_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int64_t page_size = 0;

  // attention_with_kvcache on the CPU: n_new rows of k_new / v_new, (B, Hkv, n_new, D|Dv)
  // views in k/v's dtype, are copied into the caches k/v at positions seqlens_k[b] - n_new ..
  // seqlens_k[b] - 1 before attending. The kernel does it after its scratch allocations
  // have succeeded, so a call that fails (MemoryError included) leaves the caches untouched.
  // (The CUDA path carries the same rows in cuda::KvCacheArgs.)
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  int64_t n_new = 0;
  int64_t k_new_stride[3] = {};
  int64_t v_new_stride[3] = {};
  // k_new/v_new's dtype: kv_dtype for float caches; f32/f16/bf16 for 8-bit caches, whose new
  // rows are quantized on append (codes and their scales written; csrc/cpu/quantize.h).
  DType new_dtype = DType::f32;

  // 8-bit caches (kv_dtype i8 / f8e4m3): one fp32 scale per K row and per V row; element d of
  // row (b|page, g, j) stands for code * scale. The scales are addressed like the rows, by
  // their own (batch|page, kv head, position) strides (paged caches through block_table).
  // Written on append (the caches' rows and their scales), else read only. nullptr otherwise.
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  int64_t k_scale_stride[3] = {};
  int64_t v_scale_stride[3] = {};

  // Mask indexed (b, h, i, j), stride 0 on broadcast dims. boolean: true = attend.
  // Float dtypes: added to the score; -inf entries count as masked out.
  const void* mask = nullptr;
  DType mask_dtype = DType::boolean;
  int64_t mask_stride[4] = {};

  double scale = 1.0;     // double so float64 attention is exact; fp32 kernels round it once
  double softcap = 0.0;   // 0 = off; else s = softcap * tanh(s / softcap)
  const float* alibi_slopes = nullptr;  // slope of (b, h) at b*alibi_stride[0] + h*alibi_stride[1]
  int64_t alibi_stride[2] = {};
  bool causal = false;
  bool bottom_right = false;  // causal/window alignment: offset Sk - Sq instead of 0
  int64_t window_left = -1;   // -1 = unbounded
  int64_t window_right = -1;

  // Dropout on the attention probabilities (counter-based RNG, regenerated in backward).
  double dropout_p = 0.0;  // double: a float64 call scales kept weights by 1 / (1 - p) exactly
  uint64_t dropout_seed = 0;
  uint64_t dropout_offset = 0;

  int32_t num_threads = 1;
};

// attnkit.quantize_kv: rows of n values (unit stride) -> n codes (i8 or f8e4m3) + one fp32
// scale per row (symmetric: scale = absmax / 127 for i8, absmax / 448 for f8e4m3; a row of
// zeros gets scale 0, a row holding inf/NaN gets scale NaN and codes 0). The other axes are
// outer dims, as in SoftmaxParams.
struct QuantizeParams {
  const void* x = nullptr;
  DType x_dtype = DType::f32;  // f32, f16 or bf16
  void* q = nullptr;
  DType q_dtype = DType::i8;   // i8 or f8e4m3
  float* scale = nullptr;
  int64_t n = 0;
  int32_t outer_ndim = 0;
  int64_t outer_shape[kMaxDims] = {};
  int64_t x_outer_strides[kMaxDims] = {};
  int64_t q_outer_strides[kMaxDims] = {};
  int64_t scale_outer_strides[kMaxDims] = {};
  int32_t num_threads = 1;
};

// merge_attention_states: N partial attention results over the same query rows (each from its
// own block of keys), merged through their log-sum-exp: with m = max_n lse_n and
// w_n = exp(lse_n - m), out = sum_n w_n out_n / sum_n w_n and lse = m + log(sum_n w_n).
// Rows are the positions of the (..., Sq) "outer" dims; each row holds Dv contiguous values.
// Parts with lse -inf are empty (never read); a row whose every part is empty gives 0 and -inf;
// a NaN or +inf lse makes the row NaN. out may be exactly part 0 of outs (and lse_out part 0
// of lses): a running merge in place (each row is read completely before it is written).
struct MergeParams {
  const void* outs = nullptr;
  DType out_dtype = DType::f32;  // f32, f64, f16 or bf16: outs and out
  const void* lses = nullptr;
  DType lse_dtype = DType::f32;  // f32 or f64: lses and lse_out
  void* out = nullptr;
  void* lse_out = nullptr;
  int64_t parts = 0;              // N >= 1
  int64_t dv = 0;                 // values per row (unit stride in outs and out)
  int64_t outs_part_stride = 0;   // between parts, in elements
  int64_t lses_part_stride = 0;
  int32_t outer_ndim = 0;
  int64_t outer_shape[kMaxDims] = {};
  int64_t outs_outer_strides[kMaxDims] = {};
  int64_t lses_outer_strides[kMaxDims] = {};
  int64_t out_outer_strides[kMaxDims] = {};
  int64_t lse_out_outer_strides[kMaxDims] = {};
  int32_t num_threads = 1;
};

// Gradients of attention, FlashAttention-2 style: P is recomputed from q, k and the saved lse.
// dq/dk/dv have the shapes (and their own strides) of q/k/v; out/dout that of out.
struct AttentionBwdParams {
  AttentionParams fwd;  // q, k, v, out (the forward output), lse (input here), options
  const void* dout = nullptr;
  int64_t dout_stride[3] = {};
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_stride[3] = {};
  int64_t dk_stride[3] = {};
  int64_t dv_stride[3] = {};
};

}  // namespace attnkit
