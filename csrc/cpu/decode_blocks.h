// The decode kernel's register blocks (attention_decode.cpp; docs/ARCHITECTURE.md, "Decode"):
// K/V rows of any storage type as fp32 registers, the score blocks (rows x keys of dot
// products) and the P V blocks (rows x vectors of O). Included inside each ISA's namespace;
// every function is a leaf over VF, so the kernel file keeps the item loop, the softmax pipeline
// and the scheduling.
#pragma once

#include "common.h"
#include "quantize.h"
#include "simd/code_bf16.h"
#include "simd/transpose.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace decode {

using VF = Vec<float>;
constexpr int64_t kKeyBlock = 64;  // keys scored before one softmax update (attention_decode.cpp)

// K/V elements as fp32 registers: float storage converted (load_cvt), 8-bit codes widened
// (load_code). A code row's scale (times its load unit) multiplies the row's dot products (K)
// or its P (V) instead of every element (apply_k_scales, scale_p_by_v_rows).
template <class S>
inline VF load_kv(const S* p) {
  if constexpr (is_code<S>)
    return load_code(p);
  else
    return load_cvt(p);
}
template <class S>
inline VF load_kv_partial(const S* p, int n) {
  if constexpr (is_code<S>)
    return load_code_partial(p, n);
  else
    return load_cvt_partial(p, n);
}
// Two vectors of K/V elements (2N) at p.
template <class S>
inline void load_kv_pair(const S* p, VF& a, VF& b) {
  if constexpr (is_code<S>) {
    load_code_pair(p, a, b);
  } else {
    a = load_cvt(p);
    b = load_cvt(p + VF::N);
  }
}

// Register blocks: RB query rows x 4 keys of dot products (scores), RB rows x DV vectors of O
// (P V). AVX-512 has 32 vector registers: 4 x 4 accumulators + 4 K vectors; AVX2's 16 take
// half of that. Independent accumulators hide the FMA latency (one accumulator per row, as in
// the first version, left the loops latency-bound at ~1 FMA per 4 cycles: bench/notes/decode.md).
constexpr int kScoreRows = VF::N >= 16 ? 4 : 2;
constexpr int kPvRows = VF::N >= 16 ? 4 : 2;

// One query row against one K row, unreduced: the accumulator whose lanes sum to q . k. The
// walk in address order (decode_stages.h, scores_seq) takes four of them, one head's row
// after another, then one hsum4; dot_lanes(...).hsum() is also the blocks' one-key tail.
template <class SKV>
inline VF dot_lanes(const float* q, int64_t D, const SKV* k) {
  VF a0 = VF::zero(), a1 = a0;
  int64_t d = 0;
  for (; d + 2 * VF::N <= D; d += 2 * VF::N) {
    a0 = fma(VF::load(q + d), load_kv(k + d), a0);
    a1 = fma(VF::load(q + d + VF::N), load_kv(k + d + VF::N), a1);
  }
  for (; d + VF::N <= D; d += VF::N) a0 = fma(VF::load(q + d), load_kv(k + d), a0);
  if (d < D) a1 = fma(VF::load_partial(q + d, int(D - d)), load_kv_partial(k + d, int(D - d)), a1);
  return a0 + a1;
}
// s[u * lds] = the lanes' sum of a_u, u < nu (<= 4). Each sum takes the same reduction
// whatever its place among the four (hsum4 is symmetric). Four values, not an array: an array
// filled under a run-time count went through the stack (bench/notes/decode.md, "scores in
// address order: the four sums in registers").
inline void store_sums4(VF a0, VF a1, VF a2, VF a3, int nu, float* s, int64_t lds) {
  alignas(16) float t[4];
  hsum4(a0, a1, a2, a3, t);
  for (int u = 0; u < nu; ++u) s[u * lds] = t[u];
}

// s[ri * lds + u] = q_{ri} . k_u for RB rows of q (row stride D) and four K rows.
template <int RB, class SKV>
inline void dot_block(const float* q, int64_t D, const SKV* const* k, float* s, int64_t lds) {
  VF acc[RB][4];
  for (int ri = 0; ri < RB; ++ri)
    for (int u = 0; u < 4; ++u) acc[ri][u] = VF::zero();
  int64_t d = 0;
  for (; d + 2 * VF::N <= D; d += 2 * VF::N) {
    VF kv[4], kw[4];
    for (int u = 0; u < 4; ++u) load_kv_pair(k[u] + d, kv[u], kw[u]);
    for (int ri = 0; ri < RB; ++ri) {
      const VF qv = VF::load(q + ri * D + d), qw = VF::load(q + ri * D + d + VF::N);
      for (int u = 0; u < 4; ++u) acc[ri][u] = fma(qw, kw[u], fma(qv, kv[u], acc[ri][u]));
    }
  }
  for (; d < D; d += VF::N) {
    const int w = int(imin(VF::N, D - d));
    VF kv[4];
    for (int u = 0; u < 4; ++u) kv[u] = w == VF::N ? load_kv(k[u] + d) : load_kv_partial(k[u] + d, w);
    for (int ri = 0; ri < RB; ++ri) {
      const VF qv = w == VF::N ? VF::load(q + ri * D + d) : VF::load_partial(q + ri * D + d, w);
      for (int u = 0; u < 4; ++u) acc[ri][u] = fma(qv, kv[u], acc[ri][u]);
    }
  }
  for (int ri = 0; ri < RB; ++ri) hsum4(acc[ri][0], acc[ri][1], acc[ri][2], acc[ri][3], s + ri * lds);
}

#if defined(ATTNKIT_ISA_AVX512_BF16)
// dot_block over bf16 K rows on vdpbf16ps (decode_stages.h, bf16_dots): q as bf16 rows
// (row stride ldq, zero past D), 32 values of each K row per step, two products per lane; the
// last step's K values past D load as zero.
template <int RB>
inline void dot_block_bf16(const uint16_t* q, int64_t ldq, int64_t D, const bf16_t* const* k,
                           float* s, int64_t lds) {
  __m512 acc[RB][4];
  for (int ri = 0; ri < RB; ++ri)
    for (int u = 0; u < 4; ++u) acc[ri][u] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : (__mmask32(1) << (D - d)) - 1;
    __m512bh kv[4];
    for (int u = 0; u < 4; ++u) kv[u] = (__m512bh)_mm512_maskz_loadu_epi16(m, k[u] + d);
    for (int ri = 0; ri < RB; ++ri) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + ri * ldq + d);
      for (int u = 0; u < 4; ++u) acc[ri][u] = _mm512_dpbf16_ps(acc[ri][u], qv, kv[u]);
    }
  }
  for (int ri = 0; ri < RB; ++ri)
    hsum4(VF{acc[ri][0]}, VF{acc[ri][1]}, VF{acc[ri][2]}, VF{acc[ri][3]}, s + ri * lds);
}

// dot_block over e4m3 K rows on vdpbf16ps (decode_stages.h, code_pairs; ARCHITECTURE.md,
// "e4m3 KV caches on vdpbf16ps"): q as bf16 rows as above (row stride ldq, zero past D, whole
// 64-value blocks), K's 64 codes per step looked up as bf16 (code_bf16.h), one key at a time
// (its two vectors and the 16 accumulators stay in registers beside the tables).
template <int RB, class S>
inline void dot_block_codes(const uint16_t* q, int64_t ldq, int64_t D, const S* const* k, float* s,
                            int64_t lds, const CodeBf16<S>& cb) {
  __m512 acc[RB][4];
  for (int ri = 0; ri < RB; ++ri)
    for (int u = 0; u < 4; ++u) acc[ri][u] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 64) {
    const int w = int(imin(64, D - d));
    for (int u = 0; u < 4; ++u) {
      __m512i a, b;
      cb.row(k[u] + d, w, a, b);
      for (int ri = 0; ri < RB; ++ri) {
        const uint16_t* qr = q + ri * ldq + d;
        acc[ri][u] = _mm512_dpbf16_ps(acc[ri][u], (__m512bh)_mm512_loadu_si512(qr), (__m512bh)a);
        acc[ri][u] = _mm512_dpbf16_ps(acc[ri][u], (__m512bh)_mm512_loadu_si512(qr + 32), (__m512bh)b);
      }
    }
  }
  if constexpr (RB == 4) {  // the 16 sums by one transpose-reduce (45 operations, not 4 x 18)
    VF v[16];
    for (int i = 0; i < 16; ++i) v[i].v = acc[i / 4][i % 4];
    alignas(64) float t[16];
    hsum_n(v, t);
    for (int ri = 0; ri < 4; ++ri) _mm_storeu_ps(s + ri * lds, _mm_load_ps(t + 4 * ri));
  } else {
    for (int ri = 0; ri < RB; ++ri)
      hsum4(VF{acc[ri][0]}, VF{acc[ri][1]}, VF{acc[ri][2]}, VF{acc[ri][3]}, s + ri * lds);
  }
}

// dot_lanes on vdpbf16ps: a bf16 q row (zero past D, whole 64-value blocks) against one bf16 K
// row, or one row of e4m3 codes looked up as bf16 (code_bf16.h).
inline VF dot_lanes_bf16(const uint16_t* q, int64_t D, const bf16_t* k) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : (__mmask32(1) << (D - d)) - 1;
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_maskz_loadu_epi16(m, k + d));
  }
  return VF{acc};
}
template <class S>
inline VF dot_lanes_codes(const uint16_t* q, int64_t D, const S* k, const CodeBf16<S>& cb) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 64) {
    __m512i a, b;
    cb.row(k + d, int(imin(64, D - d)), a, b);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)a);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d + 32), (__m512bh)b);
  }
  return VF{acc};
}

// O[r][d0 .. d0 + nv vectors) += sum over key pairs e of P[r][e] . (V_2e, V_2e+1) for RB rows
// on vdpbf16ps: P as rows of pair words (row stride ldp words: the bf16 of two keys' P), V as the
// two rows of each pair (v[2e], v[2e + 1]: 8-bit codes looked up in pairs, code_bf16.h). DV
// vectors (even) per block, nv <= DV of them inside the O row (its last one may hold lanes past
// Dv, which read codes as zero: `valid` values from d0 are loaded, all of them unmasked when
// kWhole). As pv_block, fewer than 8 accumulators alternate pairs between KU sets.
template <int RB, int DV, bool kWhole, class S>
inline void pv_block_pairs(const S* const* v, int64_t npairs, const uint32_t* P, int64_t ldp,
                           float* O, int64_t ldo, int64_t d0, int nv, int64_t valid,
                           const CodeBf16<S>& cb) {
  static_assert(DV % 2 == 0, "32 positions per lookup");
  constexpr int KU = RB * DV >= 8 ? 1 : 2, U = DV / 2;
  __m512 acc[KU][RB][DV];
  for (int ri = 0; ri < RB; ++ri)
    for (int i = 0; i < DV; ++i) {
      acc[0][ri][i] = i < nv ? _mm512_loadu_ps(O + ri * ldo + d0 + i * 16) : _mm512_setzero_ps();
      for (int u = 1; u < KU; ++u) acc[u][ri][i] = _mm512_setzero_ps();
    }
  __mmask32 mask[U];
  for (int h = 0; h < U; ++h) {
    const int64_t n = imax(0, imin(32, valid - 32 * h));
    mask[h] = n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
  }
  auto step = [&](int64_t e, __m512(&a)[RB][DV]) {
    __m512bh pe[RB];
    for (int ri = 0; ri < RB; ++ri) pe[ri] = (__m512bh)_mm512_set1_epi32(int(P[ri * ldp + e]));
    for (int h = 0; h < U; ++h) {
      __m512i x0, x1;
      const S *r0 = v[2 * e] + d0 + 32 * h, *r1 = v[2 * e + 1] + d0 + 32 * h;
      if constexpr (kWhole)
        cb.pair(r0, r1, x0, x1);
      else
        cb.pair(r0, r1, mask[h], x0, x1);
      for (int ri = 0; ri < RB; ++ri) {
        a[ri][2 * h] = _mm512_dpbf16_ps(a[ri][2 * h], pe[ri], (__m512bh)x0);
        a[ri][2 * h + 1] = _mm512_dpbf16_ps(a[ri][2 * h + 1], pe[ri], (__m512bh)x1);
      }
    }
  };
  int64_t e = 0;
  for (; e + KU <= npairs; e += KU)
    for (int u = 0; u < KU; ++u) step(e + u, acc[u]);
  for (; e < npairs; ++e) step(e, acc[0]);
  for (int ri = 0; ri < RB; ++ri)
    for (int i = 0; i < nv; ++i) {
      for (int u = 1; u < KU; ++u) acc[0][ri][i] = _mm512_add_ps(acc[0][ri][i], acc[u][ri][i]);
      _mm512_storeu_ps(O + ri * ldo + d0 + i * 16, acc[0][ri][i]);
    }
}

// Rows [r, r + RB) over the O row (Dvp floats, Dv values): blocks of DV vectors, the rest in one
// block of 4 or 2 vectors at most (the last vector possibly partial; a lone one rides in a block
// of 2 whose second vector is neither loaded nor stored).
template <int RB, int DV, class S>
inline void pv_rows_pairs(const S* const* v, int64_t npairs, const uint32_t* P, int64_t ldp,
                          float* O, int64_t ldo, int64_t Dv, int64_t Dvp, const CodeBf16<S>& cb) {
  int64_t d0 = 0;
  for (; d0 + DV * 16 <= Dv; d0 += DV * 16)
    pv_block_pairs<RB, DV, true>(v, npairs, P, ldp, O, ldo, d0, DV, Dv - d0, cb);
  while (d0 < Dvp) {
    const int nv = int(imin(4, (Dvp - d0) / 16));
    if (nv > 2)
      pv_block_pairs<RB, 4, false>(v, npairs, P, ldp, O, ldo, d0, nv, Dv - d0, cb);
    else
      pv_block_pairs<RB, 2, false>(v, npairs, P, ldp, O, ldo, d0, nv, Dv - d0, cb);
    d0 += 16 * nv;
  }
}
#else
// Declared for name lookup only: callers reach them under `if constexpr (kBf16Dots)` or
// `kHasCodeBf16`.
template <int RB>
void dot_block_bf16(const uint16_t* q, int64_t ldq, int64_t D, const bf16_t* const* k, float* s,
                    int64_t lds);
template <int RB, class S, class Tables>
void dot_block_codes(const uint16_t* q, int64_t ldq, int64_t D, const S* const* k, float* s,
                     int64_t lds, const Tables& cb);
VF dot_lanes_bf16(const uint16_t* q, int64_t D, const bf16_t* k);
template <class S, class Tables>
VF dot_lanes_codes(const uint16_t* q, int64_t D, const S* k, const Tables& cb);
#endif

// s[u] = q . k_u for one query row and VF::N fp32 K rows (MHA decode): one accumulator per
// key, all reduced together by hsum_n. With 4 keys per block the reductions (hsum4 and its
// latency) were half of the scores' time at D 64 (bench/notes/decode.md, "MHA decode from L2").
inline void dot_keys(const float* q, int64_t D, const float* const* k, float* s) {
  VF acc[VF::N];
  for (int u = 0; u < VF::N; ++u) acc[u] = VF::zero();
  int64_t d = 0;
  for (; d + 2 * VF::N <= D; d += 2 * VF::N) {
    const VF qv = VF::load(q + d), qw = VF::load(q + d + VF::N);
    for (int u = 0; u < VF::N; ++u)
      acc[u] = fma(qw, VF::load(k[u] + d + VF::N), fma(qv, VF::load(k[u] + d), acc[u]));
  }
  for (; d < D; d += VF::N) {
    const int w = int(imin(VF::N, D - d));
    const VF qv = VF::load_partial(q + d, w);
    for (int u = 0; u < VF::N; ++u) acc[u] = fma(qv, VF::load_partial(k[u] + d, w), acc[u]);
  }
  hsum_n(acc, s);
}

// o[0 .. Dv) += p[0] v[0] + ... + p[U-1] v[U-1] for U V rows, added in that order (o padded to
// whole vectors; the lanes past Dv add p x 0): the walk in address order (decode_stages.h,
// pv_seq), U positions of one head at a time, so that o is loaded and stored once per U keys
// rather than per key; the sums are those of U single-key passes, bit for bit.
template <int U, class SKV>
__attribute__((always_inline)) inline void pv_rows_seq(const float* p, const SKV* const* v,
                                                      int64_t Dv, float* o) {
  VF pv[U];
  for (int u = 0; u < U; ++u) pv[u] = VF::set1(p[u]);
  int64_t d = 0;
  // whole pairs of vectors, each V row's values as load_pair gives them
  auto pairs = [&](auto load_pair) {
    for (; d + 2 * VF::N <= Dv; d += 2 * VF::N) {
      VF lo = VF::load(o + d), hi = VF::load(o + d + VF::N);
      for (int u = 0; u < U; ++u) {
        VF a, b;
        load_pair(v[u] + d, a, b);
        lo = fma(pv[u], a, lo);
        hi = fma(pv[u], b, hi);
      }
      lo.store(o + d);
      hi.store(o + d + VF::N);
    }
  };
  // e4m3: rows without NaN codes (the usual case) skip load_code_pair's per-vector NaN fix,
  // after one test of their codes (fp8 MHA in cache 1.05-1.08x: bench/notes/decode.md, "e4m3
  // P V: one NaN test per row"); the same values, so the same sums
  if constexpr (std::is_same<SKV, f8e4m3_t>::value && kHasE4m3Finite) {
    bool finite = true;
    for (int u = 0; u < U; ++u) finite = finite && !e4m3_row_has_nan(v[u], Dv);
    if (finite) pairs([](const SKV* x, VF& a, VF& b) { load_code_pair_finite(x, a, b); });
  }
  pairs([](const SKV* x, VF& a, VF& b) { load_kv_pair(x, a, b); });
  for (; d < Dv; d += VF::N) {
    const int w = int(imin(VF::N, Dv - d));
    VF acc = VF::load(o + d);
    for (int u = 0; u < U; ++u)
      acc = fma(pv[u], w == VF::N ? load_kv(v[u] + d) : load_kv_partial(v[u] + d, w), acc);
    acc.store(o + d);
  }
}

// O[r][d0 .. d0 + DV vectors) += sum over the listed keys of P[r][key] V_key, for RB rows: the
// O block stays in registers across the keys (loaded and stored once per key block), each V
// vector is converted once for the RB rows. The last vector holds `last_w` valid lanes (O rows
// are padded to whole vectors; V is read only up to Dv). Each accumulator takes one FMA per
// key, so with fewer than 8 of them (two FMA ports x 4 cycles of latency) the keys alternate
// between KU sets, added at the end: a single row of D 64 ran as 4 one-vector chains at a
// quarter of the FMA rate (bench/notes/decode.md, "MHA decode from L2").
template <int RB, int DV, class SKV>
inline void pv_block(const SKV* const* vrows, const int64_t* keys, int64_t nkeys, const float* P,
                     int64_t ldp, float* O, int64_t ldo, int64_t d0, int last_w) {
  constexpr int KU = RB * DV >= 8 ? 1 : RB * DV >= 4 ? 2 : 4;
  VF acc[KU][RB][DV];
  for (int ri = 0; ri < RB; ++ri)
    for (int i = 0; i < DV; ++i) {
      acc[0][ri][i] = VF::load(O + ri * ldo + d0 + i * VF::N);
      for (int u = 1; u < KU; ++u) acc[u][ri][i] = VF::zero();
    }
  auto step = [&](int64_t j, VF(&a)[RB][DV]) {
    const SKV* v = vrows[j] + d0;
    VF x[DV];
    int i0 = 0;
    for (; i0 + 2 < DV; i0 += 2) load_kv_pair(v + i0 * VF::N, x[i0], x[i0 + 1]);
    for (int i = i0; i < DV - 1; ++i) x[i] = load_kv(v + i * VF::N);
    x[DV - 1] = last_w == VF::N ? load_kv(v + (DV - 1) * VF::N) : load_kv_partial(v + (DV - 1) * VF::N, last_w);
    for (int ri = 0; ri < RB; ++ri) {
      const VF pj = VF::broadcast(P + ri * ldp + j);
      for (int i = 0; i < DV; ++i) a[ri][i] = fma(pj, x[i], a[ri][i]);
    }
  };
  int64_t e = 0;
  for (; e + KU <= nkeys; e += KU)
    for (int u = 0; u < KU; ++u) step(keys[e + u], acc[u]);
  for (; e < nkeys; ++e) step(keys[e], acc[0]);
  for (int ri = 0; ri < RB; ++ri)
    for (int i = 0; i < DV; ++i) {
      for (int u = 1; u < KU; ++u) acc[0][ri][i] = acc[0][ri][i] + acc[u][ri][i];
      acc[0][ri][i].store(O + ri * ldo + d0 + i * VF::N);
    }
}

// Rows [r, r + RB) over every vector of Dv: DV vectors at a time, then the rest in blocks of
// 4, 2 and 1 vectors (the last one partial when Dv is not a whole number of vectors).
template <int RB, int DV, class SKV>
inline void pv_rows(const SKV* const* vrows, const int64_t* keys, int64_t nkeys, const float* P,
                    int64_t ldp, float* O, int64_t ldo, int64_t Dv) {
  int64_t d0 = 0;
  for (; d0 + DV * VF::N <= Dv; d0 += DV * VF::N)
    pv_block<RB, DV>(vrows, keys, nkeys, P, ldp, O, ldo, d0, VF::N);
  int64_t rem = ceil_div(Dv - d0, VF::N);  // vectors left: DV at most, the last one partial
  const int last_w = int(Dv - d0 - (rem - 1) * VF::N);
  if (rem == DV) return pv_block<RB, DV>(vrows, keys, nkeys, P, ldp, O, ldo, d0, last_w);
  if constexpr (DV > 4)
    if (rem >= 4) {
      pv_block<RB, 4>(vrows, keys, nkeys, P, ldp, O, ldo, d0, rem == 4 ? last_w : VF::N);
      d0 += 4 * VF::N, rem -= 4;
    }
  if constexpr (DV > 2)
    if (rem >= 2) {
      pv_block<RB, 2>(vrows, keys, nkeys, P, ldp, O, ldo, d0, rem == 2 ? last_w : VF::N);
      d0 += 2 * VF::N, rem -= 2;
    }
  if (rem == 1) pv_block<RB, 1>(vrows, keys, nkeys, P, ldp, O, ldo, d0, last_w);
}

}  // namespace decode
}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
