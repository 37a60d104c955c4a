// Pieces every attention kernel shares (forward, backward, decode): sequence addressing,
// the allowed key range of a query row, the score modifiers in their fixed order, mask
// reading, and the KV-cache append. (K/V packing is each kernel's own: attention_fwd.cpp's
// pack cache, attention_bwd.cpp's pack_block.) Per-ISA namespace (per-ISA objects only).
//
// Score pipeline for query row i and key j (one place, so every kernel agrees):
//   1. s = scale * q_i . k_j
//   2. softcap: s = softcap * tanh(s / softcap)
//   3. ALiBi:   s -= slope[b, h] * |i + off - j|
//   4. causal / window bounds and a bool mask (or a float mask's -inf) set s = -inf
//   5. a float mask is added
// off = 0 (top-left) or Sk - Sq (bottom-right); the window allows
// i + off - left <= j <= i + off + right; causal allows j <= i + off.
#pragma once
#include <math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"
#include "gemm/blocking.h"
#include "quantize.h"
#include "simd/math.h"
#include "simd/scalar_cvt.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

constexpr float kNegInfF = -__builtin_inff();

// One sequence of a (possibly varlen / paged / cache-limited) batch.
struct SeqView {
  int64_t b;
  int64_t sq, sk;        // query rows and keys of this sequence
  int64_t q_tok, k_tok;  // first token index of this sequence (varlen), else 0
  int64_t off;           // i + off is the key position aligned with query row i
};

inline SeqView seq_view(const AttentionParams& p, int64_t b) {
  SeqView s;
  s.b = b;
  if (p.cu_seqlens_q) {
    s.q_tok = p.cu_seqlens_q[b];
    s.sq = p.cu_seqlens_q[b + 1] - s.q_tok;
  } else {
    s.q_tok = 0;
    s.sq = p.seqlen_q;
  }
  if (p.cu_seqlens_k) {
    s.k_tok = p.cu_seqlens_k[b];
    s.sk = p.cu_seqlens_k[b + 1] - s.k_tok;
  } else {
    s.k_tok = 0;
    s.sk = p.seqlen_k;
  }
  if (p.seqlens_k) s.sk = p.seqlens_k[b];
  s.off = p.bottom_right ? s.sk - s.sq : 0;
  return s;
}

// Element offsets of rows (the head dim is contiguous).
inline int64_t q_offset(const AttentionParams& p, const SeqView& s, int64_t h, int64_t i) {
  return (p.cu_seqlens_q ? 0 : s.b * p.q_stride[0]) + h * p.q_stride[1] + (s.q_tok + i) * p.q_stride[2];
}
inline int64_t out_offset(const AttentionParams& p, const SeqView& s, int64_t h, int64_t i,
                          const int64_t* stride) {
  return (p.cu_seqlens_q ? 0 : s.b * stride[0]) + h * stride[1] + (s.q_tok + i) * stride[2];
}
inline int64_t kv_offset(const AttentionParams& p, const SeqView& s, int64_t g, int64_t j,
                         const int64_t* stride) {
  if (p.block_table) {
    const int64_t page = p.block_table[s.b * p.block_table_stride + j / p.page_size];
    return page * stride[0] + (j % p.page_size) * stride[2] + g * stride[1];
  }
  return (p.cu_seqlens_k ? 0 : s.b * stride[0]) + g * stride[1] + (s.k_tok + j) * stride[2];
}

// Keys row i may attend: [lo, hi] (inclusive), clipped to [0, sk). Empty when lo > hi.
struct KeyRange {
  int64_t lo, hi;
};
inline KeyRange key_range(const AttentionParams& p, const SeqView& s, int64_t i) {
  int64_t lo = 0, hi = s.sk - 1;
  const int64_t c = i + s.off;
  if (p.causal && c < hi) hi = c;
  if (p.window_right >= 0 && c + p.window_right < hi) hi = c + p.window_right;
  if (p.window_left >= 0 && c - p.window_left > lo) lo = c - p.window_left;
  return {lo, hi};
}

inline float alibi_slope(const AttentionParams& p, int64_t b, int64_t h) {
  return p.alibi_slopes ? p.alibi_slopes[b * p.alibi_stride[0] + h * p.alibi_stride[1]] : 0.0f;
}

// Mask value of (b, h, i, j) as an additive T: 0 / -inf for bool, the value for floats. T is
// the compute type of the rows (float, or double for float64 inputs, so a float64 mask is
// not rounded to float32 on the way).
template <class T>
inline T mask_value(const AttentionParams& p, int64_t off) {
  const char* m = static_cast<const char*>(p.mask);
  switch (p.mask_dtype) {
    case DType::boolean:
      return m[off] ? T(0) : -T(__builtin_inf());
    case DType::f32:
      return T(reinterpret_cast<const float*>(m)[off]);
    case DType::f64:
      return static_cast<T>(reinterpret_cast<const double*>(m)[off]);
    case DType::f16:
      return T(to_f32(reinterpret_cast<const f16_t*>(m)[off]));
    case DType::bf16:
      return T(to_f32(reinterpret_cast<const bf16_t*>(m)[off]));
    default:
      return T(0);
  }
}
inline int64_t mask_offset(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  return b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3];
}

// Fills add[0..n) with the mask of keys j0.. for row i (additive; -inf = masked out).
template <class T>
inline void mask_row(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j0,
                     int64_t n, T* add) {
  const int64_t base = mask_offset(p, b, h, i, j0), sj = p.mask_stride[3];
  if (p.mask_dtype == DType::boolean && sj == 1) {
    const uint8_t* m = static_cast<const uint8_t*>(p.mask) + base;
    for (int64_t j = 0; j < n; ++j) add[j] = m[j] ? T(0) : -T(__builtin_inf());
    return;
  }
  if (p.mask_dtype == DType::f32 && sj == 1) {
    const float* m = static_cast<const float*>(p.mask) + base;
    for (int64_t j = 0; j < n; ++j) add[j] = T(m[j]);
    return;
  }
  for (int64_t j = 0; j < n; ++j) add[j] = mask_value<T>(p, base + j * sj);
}

// True when key j is masked out for query row i of head h: outside the row's key range, or a
// bool mask's False, or a float mask's -inf. Its weight is exactly 0 and its K/V must never
// reach the row. (A key whose weight merely underflows to 0 is attended: NaN/inf in its V
// propagates, as in torch.) For the rare paths that handle non-finite K/V; not for hot loops.
inline bool key_masked(const AttentionParams& p, const SeqView& s, int64_t h, int64_t i,
                       int64_t j) {
  const KeyRange kr = key_range(p, s, i);
  if (j < kr.lo || j > kr.hi) return true;
  return p.mask && mask_value<float>(p, mask_offset(p, s.b, h, i, j)) == kNegInfF;
}

// Keys j0..j0+n of rows i0..i0+m under a bool mask: 1 + the last key any of the rows may attend
// (0: the mask excludes the whole block, which is skipped; keys past the extent are excluded for
// every row, so leaving them out changes no result). Without a bool mask, n.
inline int64_t mask_block_extent(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                                 int64_t m, int64_t j0, int64_t n) {
  if (!p.mask || p.mask_dtype != DType::boolean) return n;
  const uint8_t* base = static_cast<const uint8_t*>(p.mask);
  const int64_t si = p.mask_stride[2], sj = p.mask_stride[3];
  const int64_t rows = si == 0 ? 1 : m;  // a mask broadcast over rows needs one look
  int64_t extent = 0;
  for (int64_t i = 0; i < rows && extent < n; ++i) {
    const uint8_t* r = base + mask_offset(p, b, h, i0 + i, j0);
    for (int64_t j = n - 1; j >= extent; --j)
      if (r[j * sj]) {
        extent = j + 1;
        break;
      }
  }
  return extent;
}

// True when a bool mask excludes every key j0..j0+n of rows i0..i0+m (the block is skipped).
inline bool mask_block_empty(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                             int64_t m, int64_t j0, int64_t n) {
  return mask_block_extent(p, b, h, i0, m, j0, n) == 0;
}

template <class S>
inline const S* typed(const void* p) {
  return static_cast<const S*>(p);
}

// Calls f(sv, pos, g, src_k, src_v) for every new row of attention_with_kvcache: cache position
// pos of kv head g in sequence sv, taken from element offsets src_k / src_v of k_new / v_new.
template <class F>
inline void for_each_new_row(const AttentionParams& p, F&& f) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqView sv = seq_view(p, b);
    for (int64_t t = 0; t < p.n_new; ++t)
      for (int64_t g = 0; g < p.num_kv_heads; ++g)
        f(sv, sv.sk - p.n_new + t, g,
          b * p.k_new_stride[0] + g * p.k_new_stride[1] + t * p.k_new_stride[2],
          b * p.v_new_stride[0] + g * p.v_new_stride[1] + t * p.v_new_stride[2]);
  }
}

// 8-bit caches: the new rows (p.new_dtype: f32/f16/bf16) are quantized into the caches and
// their scales written (quantize.h).
template <class S, class C>
inline void append_quantized_rows(const AttentionParams& p) {
  C* kc = static_cast<C*>(const_cast<void*>(p.k));
  C* vc = static_cast<C*>(const_cast<void*>(p.v));
  float* ks = const_cast<float*>(p.k_scale);
  float* vs = const_cast<float*>(p.v_scale);
  const S* kn = static_cast<const S*>(p.k_new);
  const S* vn = static_cast<const S*>(p.v_new);
  for_each_new_row(p, [&](const SeqView& sv, int64_t pos, int64_t g, int64_t src_k, int64_t src_v) {
    ks[kv_offset(p, sv, g, pos, p.k_scale_stride)] =
        quantize_row(kn + src_k, p.head_dim, kc + kv_offset(p, sv, g, pos, p.k_stride));
    vs[kv_offset(p, sv, g, pos, p.v_scale_stride)] =
        quantize_row(vn + src_v, p.head_dim_v, vc + kv_offset(p, sv, g, pos, p.v_stride));
  });
}

template <class C>
inline void append_quantized_rows_from(const AttentionParams& p) {
  switch (p.new_dtype) {
    case DType::f32:
      return append_quantized_rows<float, C>(p);
    case DType::f16:
      return append_quantized_rows<f16_t, C>(p);
    case DType::bf16:
      return append_quantized_rows<bf16_t, C>(p);
    default:
      return;  // the binding accepts nothing else (params_from.cpp)
  }
}

// attention_with_kvcache: copies the n_new new k/v rows of every sequence into the caches at
// positions seqlens_k[b] - n_new .. (params.h). Raw bytes: k_new has the caches' dtype (8-bit
// caches: quantized, above). The kernels call it once (one thread), after their allocations
// succeeded and before any thread reads K/V.
inline void append_new_rows(const AttentionParams& p) {
  if (!p.k_new || p.n_new <= 0) return;
  if (p.kv_dtype == DType::i8) return append_quantized_rows_from<int8_t>(p);
  if (p.kv_dtype == DType::f8e4m3) return append_quantized_rows_from<f8e4m3_t>(p);
  const int64_t esz = p.kv_dtype == DType::f64 ? 8 : p.kv_dtype == DType::f32 ? 4 : 2;
  char* kc = static_cast<char*>(const_cast<void*>(p.k));
  char* vc = static_cast<char*>(const_cast<void*>(p.v));
  const char* kn = static_cast<const char*>(p.k_new);
  const char* vn = static_cast<const char*>(p.v_new);
  for_each_new_row(p, [&](const SeqView& sv, int64_t pos, int64_t g, int64_t src_k, int64_t src_v) {
    memcpy(kc + kv_offset(p, sv, g, pos, p.k_stride) * esz, kn + src_k * esz, size_t(p.head_dim * esz));
    memcpy(vc + kv_offset(p, sv, g, pos, p.v_stride) * esz, vn + src_v * esz, size_t(p.head_dim_v * esz));
  });
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
