// The decode kernel's per-key-block stages (attention_decode.cpp runs them for each work item;
// docs/ARCHITECTURE.md, "Decode", "Decode walks"): the block's row offsets, the scores over the
// head-by-head walk (`scores`, with the software prefetches) and over the walk in address order
// (`scores_seq`), the 8-bit K scales, and O += P V for both walks (`accumulate_pv`, `pv_seq`),
// with the dtype choices they share (which variant scores on vdpbf16ps, looks e4m3 codes up as
// bf16). Included inside each ISA's namespace, like decode_blocks.h.
#pragma once

#include <type_traits>

#include "attention_common.h"
#include "common.h"
#include "decode_blocks.h"
#include "decode_codes.h"
#include "quantize.h"
#include "simd/dot_i8.h"
#include "simd/vec.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace decode {

// avx512_bf16 (ARCHITECTURE.md, "ISA variants"): bf16 q over a bf16 cache scores on vdpbf16ps,
// q's bf16 rows against the cache's rows as they are (no conversion, two products per lane);
// the products of two bf16 are exact in fp32, so only the order of the sums changes. Its
// attention_fwd sends only that pair of dtypes here.
#if defined(ATTNKIT_ISA_AVX512_BF16)
constexpr bool kBf16Dots = true;
#else
constexpr bool kBf16Dots = false;
#endif
template <class SQ, class SKV>
constexpr bool bf16_dots = kBf16Dots && std::is_same<SQ, bf16_t>::value && std::is_same<SKV, bf16_t>::value;
// avx512_bf16 over e4m3 caches (ARCHITECTURE.md, "e4m3 KV caches on vdpbf16ps"): the codes are
// looked up as bf16 (code_bf16.h, exact), q is rounded to bf16 for the scores and P (times the
// V rows' scales) for O += P V, both on vdpbf16ps (the walk in address order, pv_seq, keeps
// P V in fp32). A head's key block whose P holds a value below kPairMinP takes the fp32 P V
// instead (flushed subnormals: pv_pairs). int8 caches
// stay on avx512_vnni's kernel: the same lookups for int8 P V measured no faster
// (bench/notes/decode.md, "e4m3 decode on vdpbf16ps").
// fp32 caches with one query row per KV head: the walk in address order on variants narrower
// than AVX-512 (avx2, scalar), the head-by-head walk (`dot_keys`, no prefetch) on the AVX-512
// ones. The vector width is not the cause (a replay of the loads alone read alike with 8 or 16
// keys per reduction); it stands for the machines each walk was measured on: on a Zen 4 whose
// VM hides AVX-512 (avx2) address order ran B1-8 H4-32 Sk 512-8192 1.3-2.1x faster at 2 threads
// and 1.5x in cache at one; on Zen 5 (avx512_bf16) 0.98x from DRAM and 0.91x in cache
// (bench/notes/decode.md, "fp32 MHA decode in address order on AVX2").
constexpr bool kFloatInAddressOrder = VF::N < 16;
template <class SKV>
constexpr bool code_pairs = kHasCodeBf16 && std::is_same<SKV, f8e4m3_t>::value;
template <class SQ, class SKV>
constexpr bool bf16_q = bf16_dots<SQ, SKV> || code_pairs<SKV>;
inline int64_t qb_stride(int64_t D) { return round_up(D, 64); }  // bf16 per q row (bf16_q)
struct NoCodeTables {};
template <class SKV>  // the lookup tables in registers, where code_pairs
using CodeTables = typename std::conditional<code_pairs<SKV>, CodeBf16<SKV>, NoCodeTables>::type;

// Element offsets of one key block's rows at kv head 0 (row (g, j) is at off[j] + g * stride[1]):
// derived once per block (pages, batches, varlen), so the loops below only add.
struct BlockRows {
  int64_t k[kKeyBlock], v[kKeyBlock], ks[kKeyBlock], vs[kKeyBlock];
};

template <class SKV>
inline void block_rows(const AttentionParams& p, const SeqView& sv, int64_t j0, int64_t n,
                       BlockRows& br) {
  if (!p.block_table) {  // one stride per position: kv_offset's arithmetic once per block
    const int64_t k0 = kv_offset(p, sv, 0, j0, p.k_stride), v0 = kv_offset(p, sv, 0, j0, p.v_stride);
    int64_t ks0 = 0, vs0 = 0;
    if constexpr (is_code<SKV>) {
      ks0 = kv_offset(p, sv, 0, j0, p.k_scale_stride);
      vs0 = kv_offset(p, sv, 0, j0, p.v_scale_stride);
    }
    for (int64_t j = 0; j < n; ++j) {
      br.k[j] = k0 + j * p.k_stride[2];
      br.v[j] = v0 + j * p.v_stride[2];
      if constexpr (is_code<SKV>) {
        br.ks[j] = ks0 + j * p.k_scale_stride[2];
        br.vs[j] = vs0 + j * p.v_scale_stride[2];
      }
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    br.k[j] = kv_offset(p, sv, 0, j0 + j, p.k_stride);
    br.v[j] = kv_offset(p, sv, 0, j0 + j, p.v_stride);
    if constexpr (is_code<SKV>) {
      br.ks[j] = kv_offset(p, sv, 0, j0 + j, p.k_scale_stride);
      br.vs[j] = kv_offset(p, sv, 0, j0 + j, p.v_scale_stride);
    }
  }
}

constexpr int64_t kPrefetchKeys = 16;  // K rows fetched this many positions ahead

// Every cache line of a K/V row of `bytes` (>= 1) into L1. Two lines unrolled: an 8-bit row of
// D <= 128 takes no loop (the loop's compare and branch per line were ~10% of the int8
// decode's instructions, bench/notes/decode.md).
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  __builtin_prefetch(p, 0, 3);
  if (bytes > 64) __builtin_prefetch(p + 64, 0, 3);
  for (int64_t b = 128; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// Rows of the item: for each of its KV heads g0 + t, G heads x sq queries, rows_per_head each.
// s[r][j] = q_r . k_j (code values for 8-bit caches: apply_code_scales scales them) for keys
// j0..j0+n, every head of the item, reading position by position: four keys at a time, each
// loaded K vector used by a block of rows (GQA) and each loaded q vector by four keys; with one
// row per KV head, VF::N keys at a time (dot_keys).
// q8 / qcorr (int8 caches on a CPU with dot_i8.h, every row quantized; else null): the rows'
// int8 codes, whose integer dot products equal those of qf's integer-valued floats exactly.
template <class SKV>
void scores(const AttentionParams& p, const SeqView& sv, int64_t g0, int64_t ng, int64_t rph,
            int64_t j0, int64_t n, int64_t k_end, const BlockRows& br, const float* qf,
            const int8_t* q8, const int32_t* qcorr, const uint16_t* qb, float* s, int64_t lds) {
  const int64_t D = p.head_dim;
  const int64_t v_bytes = p.head_dim_v * int64_t(sizeof(SKV)), k_bytes = D * int64_t(sizeof(SKV));
  const SKV* K = typed<SKV>(p.k);
  const char* V = static_cast<const char*>(p.v);
  // fp32 rows with one query row per kv head (MHA decode): no software prefetch. There each
  // row is 8 lines, the 16 prefetches per key and head compete with 16 loads for the load
  // ports, and the hardware prefetchers follow the rows anyway: without them B1 H32 D128 ran
  // 1.1-1.3x faster at Sk 512, 4096 and 32768 (from DRAM), while the same change made fp32 GQA
  // 1.3-1.4x, fp16 MHA 1.6-1.7x and int8 MHA 1.4x slower (Emerald Rapids, 2 threads;
  // bench/notes/decode.md, "no prefetch for fp32 MHA").
  const bool prefetch = !(std::is_same<SKV, float>::value && rph == 1);
  const CodeTables<SKV> cb{};
  // ahead[u]: offset (at kv head 0) of the K row kPrefetchKeys positions after key j + u, -1
  // past the item's keys or without prefetching; derived once for every head.
  auto ahead_rows = [&](int64_t j, int nk, int64_t* ahead) {
    for (int u = 0; u < nk; ++u) {
      const int64_t ja = j0 + j + u + kPrefetchKeys;
      ahead[u] = prefetch && ja < k_end ? kv_offset(p, sv, 0, ja, p.k_stride) : -1;
    }
  };
  // K rows of keys j..j+nk of head g into k[]. accumulate_pv walks V head by head (a stride of
  // Hkv rows in a position-major cache, which the hardware prefetchers do not follow): fetch
  // the block's V rows now, in position order, while K streams; and K kPrefetchKeys positions
  // ahead (the walk visits Hkv heads of a few positions at a time, an order they follow only
  // partly).
  const int64_t ks1 = p.k_stride[1], vs1 = p.v_stride[1];  // (hoisted: p may alias the stores)
  auto key_rows = [&](int64_t j, int nk, int64_t g, const int64_t* ahead, const SKV** k) {
    const SKV* Kg = K + g * ks1;
    const char* Vg = V + g * vs1 * int64_t(sizeof(SKV));
    for (int u = 0; u < nk; ++u) {
      k[u] = Kg + br.k[j + u];
      if (!prefetch) continue;
      prefetch_row(Vg + br.v[j + u] * int64_t(sizeof(SKV)), v_bytes);
      if (ahead[u] >= 0) prefetch_row(reinterpret_cast<const char*>(Kg + ahead[u]), k_bytes);
    }
  };
  int64_t j = 0;
  // One query row per KV head of fp32 rows (MHA decode, no prefetches): VF::N keys per
  // reduction (dot_keys). Half-precision and 8-bit rows keep the 4-key groups below: in groups of
  // VF::N keys their prefetches came in bursts (128 per head for fp16 D 128) and fp16 MHA ran
  // 3-6% slower (bench/notes/decode.md, "MHA decode from L2").
  if constexpr (std::is_same<SKV, float>::value)
    if (rph == 1)
      for (; j + VF::N <= n; j += VF::N)
        for (int64_t t = 0; t < ng; ++t) {
          const float* k[VF::N];
          key_rows(j, VF::N, g0 + t, nullptr, k);  // (no prefetches: `ahead` is not read)
          dot_keys(qf + t * D, D, k, s + t * lds + j);
        }
  for (; j + 4 <= n; j += 4) {
    int64_t ahead[4];
    ahead_rows(j, 4, ahead);
    for (int64_t t = 0; t < ng; ++t) {
      const SKV* k[4];
      key_rows(j, 4, g0 + t, ahead, k);
      const int64_t rend = (t + 1) * rph;
      int64_t r = t * rph;
      if constexpr (kBf16Dots && std::is_same<SKV, bf16_t>::value) {
        if (qb) {  // bf16 q rows (bf16_dots)
          const int64_t ldb = qb_stride(D);
          for (; r + kScoreRows <= rend; r += kScoreRows)
            dot_block_bf16<kScoreRows>(qb + r * ldb, ldb, D, k, s + r * lds + j, lds);
          for (; r < rend; ++r) dot_block_bf16<1>(qb + r * ldb, ldb, D, k, s + r * lds + j, lds);
          continue;
        }
      }
      if constexpr (code_pairs<SKV>) {  // bf16 q rows over e4m3 codes
        const int64_t ldb = qb_stride(D);
        for (; r + kScoreRows <= rend; r += kScoreRows)
          dot_block_codes<kScoreRows>(qb + r * ldb, ldb, D, k, s + r * lds + j, lds, cb);
        for (; r < rend; ++r) dot_block_codes<1>(qb + r * ldb, ldb, D, k, s + r * lds + j, lds, cb);
        continue;
      }
      if constexpr (kHasDotI8 && std::is_same<SKV, int8_t>::value) {
        if (q8) {
          const int64_t ld8 = q8_stride(D);
          for (; r + 4 <= rend; r += 4) dot_i8_block<4>(q8 + r * ld8, ld8, qcorr + r, D, k, s + r * lds + j, lds);
          for (; r < rend; ++r) dot_i8_block<1>(q8 + r * ld8, ld8, qcorr + r, D, k, s + r * lds + j, lds);
          continue;
        }
      }
      for (; r + kScoreRows <= rend; r += kScoreRows)
        dot_block<kScoreRows>(qf + r * D, D, k, s + r * lds + j, lds);
      // the rows left (G = 3: SmolLM2, G = 6) in one block, so each K vector is loaded once
      if constexpr (kScoreRows > 3)
        if (rend - r == 3) dot_block<3>(qf + r * D, D, k, s + r * lds + j, lds), r += 3;
      if constexpr (kScoreRows > 2)
        if (rend - r == 2) dot_block<2>(qf + r * D, D, k, s + r * lds + j, lds), r += 2;
      if (r < rend) dot_block<1>(qf + r * D, D, k, s + r * lds + j, lds);
    }
  }
  for (; j < n; ++j)  // the last few keys of a sequence, one at a time
    for (int64_t t = 0; t < ng; ++t) {
      const SKV* krow = K + br.k[j] + (g0 + t) * p.k_stride[1];
      for (int64_t r = t * rph; r < (t + 1) * rph; ++r) s[r * lds + j] = dot_lanes(qf + r * D, D, krow).hsum();
    }
}

// One query row per KV head over a cache whose heads lie side by side in each position
// (position-major, paged): s[t][j] for the item's heads t, position by position, four heads at
// a time (dot_lanes, one row after another), so K is read in address order. No software prefetch: the hardware
// prefetchers follow one ascending stream at the full read rate, where the head-by-head walk
// of `scores` (one stride of Hkv rows per head, with prefetches) read 30-40% slower from DRAM
// (ARCHITECTURE.md, "decode walks"; bench/notes/decode.md, "MHA decode in address order").
template <class SKV>
void scores_seq(const AttentionParams& p, int64_t g0, int64_t ng, int64_t n, const BlockRows& br,
                const float* qf, const int8_t* q8, const int32_t* qcorr, const uint16_t* qb, float* s,
                int64_t lds) {
  const int64_t D = p.head_dim, ks1 = p.k_stride[1], ldb = qb_stride(D), ld8 = q8_stride(D);
  const SKV* K = typed<SKV>(p.k) + g0 * ks1;
  const CodeTables<SKV> cb{};
  for (int64_t j = 0; j < n; ++j) {
    const SKV* kj = K + br.k[j];
    // Four heads at a time, the last four padded with zero sums: every head's score takes the
    // same reduction wherever it falls, so results do not depend on how the heads are grouped
    // into items (which follows the thread count).
    for (int64_t t = 0; t < ng; t += 4) {
      const int nu = int(imin(4, ng - t));
      float* st = s + t * lds + j;
      // Head t + u's unreduced dot product, zero past the item's heads; the four are named
      // values, not an array indexed under nu (which went through the stack: fp8 MHA 1.08x)
      if constexpr (kHasDotI8 && std::is_same<SKV, int8_t>::value)
        if (q8) {
          auto acc = [&](int u) {
            return u < nu ? dot_i8_lanes(q8 + (t + u) * ld8, qcorr[t + u], D, kj + (t + u) * ks1) : I8Acc{};
          };
          const I8Acc a0 = acc(0), a1 = acc(1), a2 = acc(2), a3 = acc(3);  // (in address order)
          store_i8_sums4(a0, a1, a2, a3, nu, st, lds);
          continue;
        }
      auto acc = [&](int u) {
        const SKV* kr = kj + (t + u) * ks1;
        if (u >= nu) return VF::zero();
        if constexpr (code_pairs<SKV>)
          return dot_lanes_codes(qb + (t + u) * ldb, D, kr, cb);
        else if constexpr (kBf16Dots && std::is_same<SKV, bf16_t>::value)
          return qb ? dot_lanes_bf16(qb + (t + u) * ldb, D, kr) : dot_lanes(qf + (t + u) * D, D, kr);
        else
          return dot_lanes(qf + (t + u) * D, D, kr);
      };
      // declared one after another: as arguments of one call, GCC evaluated them right to left,
      // and the rows read in descending order broke the hardware prefetchers' ascending stream
      // (fp8 from DRAM 1.7x slower)
      const VF a0 = acc(0), a1 = acc(1), a2 = acc(2), a3 = acc(3);
      store_sums4(a0, a1, a2, a3, nu, st, lds);
    }
  }
}

// 8-bit caches, before the softmax: S[r][j] *= the scale of K row j (times its load unit), then
// (int8) the scale qs[r] of q row r; the V rows' scales go to vs[t * kKeyBlock + j] for
// scale_p_by_v_rows. Lanes past n get 0 (the row pipeline sets them to -inf).
template <class SKV>
void apply_k_scales(const AttentionParams& p, int64_t g0, int64_t ng, int64_t rph, int64_t n,
                    const BlockRows& br, const float* qs, float* S, int64_t lds, float* vs) {
  const int64_t np = round_up(n, VF::N);  // S rows are kKeyBlock long: whole vectors
  alignas(64) float ks[kKeyBlock];
  for (int64_t j = n; j < np; ++j) ks[j] = 0.0f;
  for (int64_t t = 0; t < ng; ++t) {
    const int64_t g = g0 + t;
    float* vt = vs + t * kKeyBlock;
    const float* kg = p.k_scale + g * p.k_scale_stride[1];  // (hoisted: p may alias the stores)
    const float* vg = p.v_scale + g * p.v_scale_stride[1];
    for (int64_t j = 0; j < n; ++j) {
      ks[j] = kg[br.ks[j]] * CodeUnit<SKV>::kUnscale;
      vt[j] = vg[br.vs[j]] * CodeUnit<SKV>::kUnscale;
    }
    for (int64_t j = n; j < np; ++j) vt[j] = 0.0f;
    for (int64_t r = t * rph; r < (t + 1) * rph; ++r) {
      // (S * ks) * qs, one pass; 1 (exact) where q is not quantized
      const VF sq = VF::set1(std::is_same<SKV, int8_t>::value ? qs[r] : 1.0f);
      for (int64_t j = 0; j < np; j += VF::N)
        (VF::load(S + r * lds + j) * VF::load(ks + j) * sq).store(S + r * lds + j);
    }
  }
}

// Query row r of an item: KV head g0 + r / (G * sq), query head (g0 + r / (G*sq)) * G + ...
struct RowId {
  int64_t h, i;
};
inline RowId row_id(int64_t g0, int64_t G, int64_t sq, int64_t r) {
  const int64_t rph = G * sq;
  return {(g0 + r / rph) * G + (r % rph) / sq, r % sq};
}

// One position of one KV head into rows [rbeg, rend), skipping rows whose P is 0. When the V
// vector holds inf/NaN, a zero P is skipped only where the key is masked out for the row
// (an underflowed weight still attends it: 0 * NaN = NaN, as in torch); rows of the item are
// row_id(g0, G, sq, r), needed for that rare check only.
template <class SKV>
void accumulate_one(const AttentionParams& p, const SeqView& sv, int64_t g0, const SKV* vrow,
                    int64_t rbeg, int64_t rend, int64_t pos, const float* P, int64_t ldp,
                    int64_t j, float* O, int64_t ldo) {
  const int64_t Dv = p.head_dim_v;
  const int64_t G = p.num_heads / p.num_kv_heads;
  for (int64_t d = 0; d < Dv; d += VF::N) {
    const int w = int(imin(VF::N, Dv - d));
    const VF vv = w == VF::N ? load_kv(vrow + d) : load_kv_partial(vrow + d, w);
    const bool nonfinite = any(is_nan(vv - vv));  // inf - inf and NaN - NaN are NaN
    for (int64_t r = rbeg; r < rend; ++r) {
      const float pr = P[r * ldp + j];
      if (pr == 0.0f) {
        if (!nonfinite) continue;
        const RowId id = row_id(g0, G, sv.sq, r);
        if (key_masked(p, sv, id.h, id.i, pos)) continue;
      }
      float* o = O + r * ldo + d;
      fma(VF::set1(pr), vv, VF::load(o)).store(o);
    }
  }
}

// O[r] += sum_j P[r][j] V_j, head by head. Keys whose P is nonzero in every row of their head
// run through register blocks (pv_block); a key with a zero P in some row (masked there) takes
// the careful path that skips those rows, so NaN/inf in a masked-out V row never reaches them.
// (int8 codes are always finite and their scale is folded into P, so a zero P adds exactly 0:
// int8 caches need no careful path.) The order of the sums depends on P's zeros only, never
// on the thread count.
template <class SKV>
void accumulate_pv(const AttentionParams& p, const SeqView& sv, int64_t g0, int64_t ng,
                   int64_t rph, int64_t j0, int64_t n, const BlockRows& br, const float* P,
                   int64_t ldp, float* O, int64_t ldo, uint32_t* pp) {
  constexpr bool finite_codes = std::is_same<SKV, int8_t>::value;
  constexpr int RB = kPvRows, DV1 = VF::N >= 16 ? 8 : 4, DVB = 4;
  const int64_t Dv = p.head_dim_v;
  const SKV* Vm = typed<SKV>(p.v);
  const SKV* vrows[kKeyBlock + 1];
  int64_t clean[kKeyBlock], careful[kKeyBlock];
  const CodeTables<SKV> cb{};
  for (int64_t t = 0; t < ng; ++t) {
    const int64_t rbeg = t * rph, rend = rbeg + rph, vg = (g0 + t) * p.v_stride[1];
    // bit j: key j has a zero P in some row of the head (P rows are kKeyBlock long, whole vectors)
    static_assert(kKeyBlock <= 64 && kKeyBlock % 16 == 0, "one bit per key of a block");
    uint64_t zero = 0;
    if constexpr (!finite_codes)
      for (int64_t r = rbeg; r < rend; ++r)
        for (int64_t j = 0; j < n; j += VF::N)
          zero |= uint64_t(lane_bits(VF::load(P + r * ldp + j) == VF::zero())) << j;
    int64_t nclean = 0, ncareful = 0;
    for (int64_t j = 0; j < n; ++j) {
      vrows[j] = Vm + br.v[j] + vg;
      if ((zero >> j) & 1)
        careful[ncareful++] = j;
      else
        clean[nclean++] = j;
    }
    int64_t r = rbeg;
    if constexpr (code_pairs<SKV>)
      if (pv_pairs<SKV>(vrows, n, zero, rbeg, rend, P, ldp, pp, O, ldo, Dv, cb)) r = rend;
    for (; r + RB <= rend; r += RB)
      pv_rows<RB, DVB>(vrows, clean, nclean, P + r * ldp, ldp, O + r * ldo, ldo, Dv);
    // the rows left in one block (each V vector converted once for them)
    if constexpr (RB > 3)
      if (rend - r == 3) pv_rows<3, DVB>(vrows, clean, nclean, P + r * ldp, ldp, O + r * ldo, ldo, Dv), r += 3;
    if constexpr (RB > 2)
      if (rend - r == 2) pv_rows<2, DVB>(vrows, clean, nclean, P + r * ldp, ldp, O + r * ldo, ldo, Dv), r += 2;
    if (r < rend) pv_rows<1, DV1>(vrows, clean, nclean, P + r * ldp, ldp, O + r * ldo, ldo, Dv);
    for (int64_t e = 0; e < ncareful; ++e)
      accumulate_one(p, sv, g0, vrows[careful[e]], rbeg, rend, j0 + careful[e], P, ldp,
                     careful[e], O, ldo);
  }
}

// O[t] += P[t][j] V_j,t for one query row per KV head, kPvSeqKeys positions at a time (V in
// address order, as scores_seq reads K: that many ascending streams; each head's O row stays
// in L1 and is loaded and stored once per kPvSeqKeys keys, in registers between them). The
// keys are added one after the other as a single-key walk adds them. A zero P takes
// accumulate_one's careful rule, as in accumulate_pv (its group then goes key by key).
constexpr int kPvSeqKeys = 4;
template <class SKV>
void pv_seq(const AttentionParams& p, const SeqView& sv, int64_t g0, int64_t ng, int64_t j0,
            int64_t n, const BlockRows& br, const float* P, int64_t ldp, float* O, int64_t ldo) {
  constexpr int U = kPvSeqKeys;
  const int64_t Dv = p.head_dim_v, vs1 = p.v_stride[1];
  const SKV* V = typed<SKV>(p.v) + g0 * vs1;
  // one key of one head: accumulate_one's careful rule for a zero P
  auto one_key = [&](int64_t jj, int64_t t) {
    const SKV* vrow = V + br.v[jj] + t * vs1;
    const float pj = P[t * ldp + jj];
    if (pj == 0.0f)
      accumulate_one(p, sv, g0, vrow, t, t + 1, j0 + jj, P, ldp, jj, O, ldo);
    else
      pv_rows_seq<1>(&pj, &vrow, Dv, O + t * ldo);
  };
  int64_t j = 0;
  for (; j + U <= n; j += U)
    for (int64_t t = 0; t < ng; ++t) {
      const SKV* vrows[U];
      float pj[U];
      bool zero = false;
      for (int u = 0; u < U; ++u) {
        vrows[u] = V + br.v[j + u] + t * vs1;
        pj[u] = P[t * ldp + j + u];
        zero = zero || pj[u] == 0.0f;
      }
      if (!zero)
        pv_rows_seq<U>(pj, vrows, Dv, O + t * ldo);
      else
        for (int u = 0; u < U; ++u) one_key(j + u, t);
    }
  for (; j < n; ++j)
    for (int64_t t = 0; t < ng; ++t) one_key(j, t);
}

}  // namespace decode
}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
