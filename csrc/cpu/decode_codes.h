// The decode kernel's pieces for 8-bit KV caches (attention_decode.cpp; docs/ARCHITECTURE.md,
// "int8 KV caches", "e4m3 KV caches on vdpbf16ps"): the int8 cache's quantized q rows, the V
// rows' scales folded into P, and, on avx512_bf16, O += P V over e4m3 codes on vdpbf16ps
// (pv_pairs, over decode_blocks.h's pv_rows_pairs) with q rounded to bf16 (round_q_rows).
// Included inside each ISA's namespace, like decode_blocks.h.
#pragma once

#include "common.h"
#include "decode_blocks.h"
#include "quantize.h"
#include "simd/vec.h"
#if defined(ATTNKIT_ISA_AVX512_BF16)
#include "gemm/ukernel_bf16.h"  // round_rows_to_pairs
#endif

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace decode {

// int8 caches quantize q too (ARCHITECTURE.md, "int8 KV caches"): each query row becomes int8
// codes with one fp32 scale, absmax / 127 as quantize_kv, so Q K is a sum of integer products.
// Those sums are exact in fp32 (|q k| <= 127^2, D <= kMaxQuantizedD: every partial sum below
// 2^24) and in int32 (vpdpbusd on avx512_vnni, vpmaddubsw + vpmaddwd on avx2), so every ISA computes the same scores bit for bit. Rows with a
// non-finite element keep their float values (scale 1) so NaN/inf propagate as in torch.
constexpr int64_t kMaxQuantizedD = 1024;
inline int64_t q8_stride(int64_t D) { return round_up(D, 64); }  // bytes per int8 q row

// Quantize the item's R query rows of qf in place (int8 values as floats) and into q8 / qcorr;
// qs gets each row's scale. Returns whether every row was quantized (all finite), i.e. whether
// the int8 dot products may run.
inline bool quantize_q_rows(float* qf, int64_t R, int64_t D, float* qs, int8_t* q8, int32_t* qcorr) {
  bool all_finite = true;
  const int64_t ld8 = q8_stride(D);
  for (int64_t r = 0; r < R; ++r) {
    float* q = qf + r * D;
    const float amax = row_absmax(q, D);  // quantize.h: NaN when the row holds inf or NaN
    if (amax != amax) {                   // keep the row in float, scale 1
      qs[r] = 1.0f;
      all_finite = false;
      continue;
    }
    // quantize_row's arithmetic (quantize.h), vectorized: the same IEEE division and rounding.
    const float scale = amax / 127.0f;
    qs[r] = scale > 0.0f ? scale : 0.0f;
    const VF sv = VF::set1(scale), lo = VF::set1(-127.0f), hi = VF::set1(127.0f);
    for (int64_t d = 0; d < D; d += VF::N) {
      const int w = int(imin(VF::N, D - d));
      VF c = VF::zero();
      if (scale > 0.0f) c = min(hi, max(lo, (VF::load_partial(q + d, w) / sv).round()));
      c.store_partial(q + d, w);
    }
    int32_t sum = 0;
    for (int64_t d = 0; d < D; ++d) {
      q8[r * ld8 + d] = int8_t(q[d]);
      sum += int32_t(q[d]);
    }
    for (int64_t d = D; d < ld8; ++d) q8[r * ld8 + d] = 0;
    qcorr[r] = 128 * sum;
  }
  return all_finite;
}

constexpr int64_t kPairStride = kKeyBlock / 2;  // pair words per P row (pv_pairs)

// 8-bit V, after the softmax: P[r][j] *= the scale of V row j (vs from apply_k_scales), so
// O += P V reads the codes' values as they load. A P of 0 stays 0 (a masked key: accumulate_pv's
// careful path skips it, and with it a NaN scale); a NaN scale of an attended row makes that P
// NaN, and the output with it, as a NaN in a float V row would.
inline void scale_p_by_v_rows(int64_t ng, int64_t rph, int64_t n, float* P, int64_t ldp, const float* vs) {
  const int64_t np = round_up(n, VF::N);
  for (int64_t t = 0; t < ng; ++t)
    for (int64_t r = t * rph; r < (t + 1) * rph; ++r)
      for (int64_t j = 0; j < np; j += VF::N) {
        const VF x = VF::load(P + r * ldp + j);
        select(x == VF::zero(), VF::zero(), x * VF::load(vs + t * kKeyBlock + j)).store(P + r * ldp + j);
      }
}

#if defined(ATTNKIT_ISA_AVX512_BF16)
// code_pairs: rows [rbeg, rend) of one head, O += P V over its clean keys on vdpbf16ps. Each row's
// P of the clean keys (bit j of `zero` unset), in key order, is rounded to bf16 pair words
// (pp rows), V's rows paired the same way (an odd last key pairs with itself under a P of 0:
// a clean key's row is attended by every row, so 0 x its NaN changes nothing). Returns false,
// having written nothing to O, when a nonzero P is below kPairMinP: the caller then runs the
// fp32 P V. vrows has room for one row past n.
// kPairMinP = 2^-109: vcvtne2ps2bf16 flushes a subnormal P to zero, and vdpbf16ps flushes
// subnormal products and sums; with every nonzero P at least 2^-109, each product with a
// nonzero code (|value x 2^-8| >= 2^-17) is normal, and what a flushed sum loses (< 2^-126)
// is below 2^-17 of any product (V values near 1e-38 came out as 0 with a FLT_MIN threshold).
constexpr float kPairMinP = 0x1p-109f;
template <class SKV>
inline bool pv_pairs(const SKV** vrows, int64_t n, uint64_t zero, int64_t rbeg, int64_t rend,
              const float* P, int64_t ldp, uint32_t* pp, float* O, int64_t ldo, int64_t Dv,
              const CodeBf16<SKV>& cb) {
  const __m512 tiny = _mm512_set1_ps(kPairMinP);
  auto below_min = [&](__m512 x) {  // the nonzero lanes below kPairMinP
    return _mm512_mask_cmp_ps_mask(_mm512_cmpneq_ps_mask(x, _mm512_setzero_ps()), _mm512_abs_ps(x), tiny,
                                   _CMP_LT_OQ);
  };
  const SKV* packed_rows[kKeyBlock + 1];
  const SKV** v = vrows;
  int64_t nk = n;
  if (!zero) {  // every key clean (the usual case): P rows as they are (zero past n)
    for (int64_t r = rbeg; r < rend; ++r)
      for (int64_t j = 0; j < n; j += 16)
        if (below_min(_mm512_loadu_ps(P + r * ldp + j))) return false;
    round_rows_to_pairs(P + rbeg * ldp, ldp, int(rend - rbeg), n, pp, kPairStride);
  } else {  // the clean keys' P packed in key order
    alignas(64) float packed[kKeyBlock + 16];
    for (int64_t r = rbeg; r < rend; ++r) {
      int64_t c = 0;
      __mmask16 sub = 0;
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 live = __mmask16(~(zero >> j) & (n - j >= 16 ? 0xffffu : (1u << (n - j)) - 1));
        const __m512 x = _mm512_maskz_compress_ps(live, _mm512_loadu_ps(P + r * ldp + j));
        sub |= below_min(x);
        _mm512_storeu_ps(packed + c, x);
        c += __builtin_popcount(live);
      }
      if (sub) return false;
      round_rows_to_pairs(packed, 0, 1, c, pp + (r - rbeg) * kPairStride, kPairStride);
    }
    nk = 0;
    for (int64_t j = 0; j < n; ++j)
      if (!((zero >> j) & 1)) packed_rows[nk++] = vrows[j];
    v = packed_rows;
  }
  if (nk == 0) return true;
  v[nk] = v[nk - 1];  // the odd key's partner
  const int64_t npairs = (nk + 1) / 2, Dvp = round_up(Dv, VF::N);
  int64_t r = rbeg;
  const uint32_t* pr = pp;
  for (; r + 4 <= rend; r += 4, pr += 4 * kPairStride)
    pv_rows_pairs<4, 4>(v, npairs, pr, kPairStride, O + r * ldo, ldo, Dv, Dvp, cb);
  if (rend - r == 3) pv_rows_pairs<3, 4>(v, npairs, pr, kPairStride, O + r * ldo, ldo, Dv, Dvp, cb);
  if (rend - r == 2) pv_rows_pairs<2, 4>(v, npairs, pr, kPairStride, O + r * ldo, ldo, Dv, Dvp, cb);
  if (rend - r == 1) pv_rows_pairs<1, 8>(v, npairs, pr, kPairStride, O + r * ldo, ldo, Dv, Dvp, cb);
  return true;
}
// code_pairs: one q row rounded to bf16 (nearest even, vcvtneps2bf16: a subnormal reads as 0, as
// vdpbf16ps would read it) into qb (n_qb words, zero past D) and back into q, which scores()
// reads for the keys past its blocks of four. Vectorized: a scalar loop writing both cost 10% of
// an fp8 GQA call (B1 H32/8 Sk4096, 1 thread: 16 items of 32 rows).
inline void round_q_rows(float* q, int64_t D, uint16_t* qb, int64_t n_qb) {
  for (int64_t d = 0; d < n_qb; d += 16) {
    const __mmask16 m = D - d >= 16 ? __mmask16(0xffff) : D > d ? __mmask16((1u << (D - d)) - 1) : 0;
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, q + d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + d), h);
    _mm512_mask_storeu_ps(q + d, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
}
#else
template <class SKV, class Tables>
bool pv_pairs(const SKV**, int64_t, uint64_t, int64_t, int64_t, const float*, int64_t, uint32_t*,
              float*, int64_t, int64_t, const Tables&);  // named only
void round_q_rows(float*, int64_t, uint16_t*, int64_t);  // named only
#endif

}  // namespace decode
}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
