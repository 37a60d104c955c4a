// Fused attention forward, FlashAttention-2 style on the CPU. Compiled once per ISA.
//
// Work item = (batch, query head, block of kBlockM query rows). For each block of kBlockN keys:
//   S = Q K^T                 GEMM micro-kernel: A = query rows in place (or converted to
//                             fp32), B = K packed in NR-key panels
//   online softmax per row    scale, softcap, ALiBi, bounds and masks, running max m and sum l
//                             (the -inf guard below), P = exp(S - m) written over S
//   O = alpha O + P V         GEMM micro-kernel: A = P in place, B = V packed in NR-column panels
// and finally out = O / l, lse = m + log l. The avx512_bf16 variant compiles this file again
// for bf16 q, k, v only: S = Q K^T then runs on vdpbf16ps over K packed in pair words
// (kPairK below), the softmax in fp32, then P rounded to bf16 and O += P V on vdpbf16ps with V
// packed in pair panels along the keys (the layout of the tile path). The amx variants (kTiles) compile it for bf16
// q, k, v too: S = Q K^T on AMX tiles (q packed per item in tile rows, K in the same pair
// panels), the softmax in fp32, then P rounded to bf16 and O += P V on tiles with V packed in
// pair panels along the keys (gemm/ukernel_amx.h). No Sq x Sk matrix exists: per-thread scratch is
// one S tile (kBlockM x kBlockN), one O tile (kBlockM x Dv) and the packed K/V of the current
// (batch, kv head) group (see PackCache).
//
// Threads: items are ordered (batch, kv head, query head of the group, query block) and cut
// into one contiguous range per thread by estimated cost (the number of key blocks each item
// visits), which balances causal masks where later blocks do more work. Each thread packs a
// group's K/V once and reuses it for every query block and every head of that GQA group; with
// fewer groups than threads (threads would share groups) the threads first pack every group
// once together, into one shared copy, and then compute (SharedPack). A bool mask trims each
// key block to the last key any of the block's rows may attend (key padding costs nothing).
// Every output row is computed by one thread in a fixed order: bit-identical for any thread
// count.
#include <math.h>

#include <atomic>
#include <type_traits>

#include "attention_common.h"
#include "attention_pack.h"
#include "attention_rows.h"
#include "common.h"
#include "debug.h"
#include "gemm/blocking.h"
#include "gemm/pack.h"
#include "gemm/ukernel.h"
#include "simd/math.h"
#include "simd/vec.h"
#include "threading.h"
#if defined(ATTNKIT_ISA_AVX512_BF16)
#include "gemm/ukernel_bf16.h"
#include "kernels.h"
#elif defined(ATTNKIT_AMX_TILES)  // attention_pack.h included gemm/ukernel_amx.h
#include "kernels.h"
#endif

namespace attnkit {
namespace cpu {
#if defined(ATTNKIT_ISA_AVX512_BF16) || defined(ATTNKIT_AMX_TILES)
namespace avx512_vnni {
bool decode_applies(const AttentionParams& p);  // attention_decode.cpp, the variant below
}
#endif
namespace ATTNKIT_ISA_NS {

bool decode_applies(const AttentionParams& p);   // attention_decode.cpp
Status attention_decode(const AttentionParams& p);


namespace {

// avx512_bf16: with bf16 q and K, S = Q K^T runs on vdpbf16ps (gemm/ukernel_bf16.h): K is
// packed in pair words along the head dim, q rows are read in place as pair words. amx
// (kTiles): K in the same pair panels, their rows padded to whole tiles (16 words), and both
// GEMMs on tiles. Every other variant and dtype packs K in fp32 panels.
#if defined(ATTNKIT_ISA_AVX512_BF16) || defined(ATTNKIT_AMX_TILES)
template <class S>
constexpr bool kPairK = std::is_same<S, bf16_t>::value;
#else
template <class S>
constexpr bool kPairK = false;
uint32_t load_pair(const void*);
#endif
#if !defined(ATTNKIT_AMX_TILES)
// Declared only so that the tile branches (discarded without AMX) parse.
void pack_a_panel(const bf16_t*, int64_t, int64_t, int, int64_t, uint32_t*);
void pack_a_panel_f32(const float*, int64_t, int, int64_t, uint32_t*);
void compute_panel(int, int64_t, const uint32_t*, const uint32_t*, float*, int64_t, bool, int);
#if !defined(ATTNKIT_ISA_AVX512_BF16)
int64_t padded_pairs(int64_t);
template <class RowFn>
bool pack_rows_pairs(RowFn&&, int64_t, int64_t, int64_t, uint32_t*, int64_t);
#endif
#endif
#if !defined(ATTNKIT_ISA_AVX512_BF16)
// Declared only so that run_item's vdpbf16ps branches (discarded elsewhere) parse.
template <bool kPackedA>
void ukernel_bf16_rows(int, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t, float*,
                       int64_t, bool, int);
void round_rows_to_pairs(const float*, int64_t, int, int64_t, uint32_t*, int64_t);
#endif
// Variants whose bf16 path multiplies P V in bf16 (V in pair panels along the keys, P rounded).
#if defined(ATTNKIT_ISA_AVX512_BF16) || defined(ATTNKIT_AMX_TILES)
constexpr bool kPairPV = true;
#else
constexpr bool kPairPV = false;
#endif

template <class T>
struct Tiles {
  // 48 rows = 4 micro-panels of 12 (AVX-512) or 8 of 6 (AVX2). 256 keys per block: the
  // per-row work of a block (max/sum reductions, the rescale of O, one scalar exp) is fixed,
  // and at 64 keys it cost more than the exps themselves (bench/notes/attention.md: 157 -> 168 GFLOP/s
  // at B1 H12 S1024 D64). S tile 48 x 256 x 4 B = 48 KB lives in L2.
  // amx: 32 rows, one tile row pair (gemm/ukernel_amx.h).
  static constexpr int64_t kBlockM = kTiles ? 32 : Blocking<T>::MR >= 6 ? 48 : 32;
  static constexpr int64_t kBlockN = 256;
  static constexpr int NR = Blocking<T>::NR;
  static constexpr int64_t kBlockNPad = (kBlockN + NR - 1) / NR * NR;
#if defined(ATTNKIT_AMX_TILES)
  static_assert(NR == kPairPanel && kBlockM == 32 && kBlockNPad % 32 == 0,
                "the tile path reads 32-key pair panels and 32-row query tiles");
#endif
};

// Per-thread packed K/V of one (batch, kv head) group, by key block. Holds every block of the
// group when that fits in kPackCacheBytes (then each block is packed once per thread), else
// one block that is repacked on use.
constexpr int64_t kPackCacheBytes = int64_t(16) << 20;

// K/V of every (batch, kv head) group packed once, cooperatively, before any thread computes:
// used when there are fewer groups than threads, so that threads sharing a group do not each
// pack (and hold) their own copy. Group gi = b * Hkv + g, key block kb at slot gi * blocks + kb.
template <class T>
struct SharedPack {
  const T* k = nullptr;  // null: not shared, each thread packs into its PackCache
  const T* v = nullptr;
  const uint8_t* nonfinite = nullptr;
  int64_t blocks = 0;  // key blocks per group (of the longest sequence)
};

template <class T>
struct PackCache {
  int64_t b = -1, g = -1;
  int64_t slots = 0, block_elems_k = 0, block_elems_v = 0;
  Scratch<T> k, v;
  Scratch<int64_t> tag;   // key block held by each slot (-1: none)
  Scratch<uint8_t> nonfinite;  // the V block holds inf/NaN, or with pair panels a subnormal (see pv_with_nonfinite)
  SharedPack<T> shared;
};

template <class T>
struct Workspace {
  Scratch<T> qf, s, o, m, l;
  Scratch<uint32_t> pt;  // kTiles: P in bf16 tile rows (gemm/ukernel_amx.h)
  Scratch<T> add;  // mask row, in the compute type (a float64 mask stays float64)
  Scratch<uint8_t> keep;  // dropout decisions of one row
  PackCache<T> cache;
};

struct Item {
  int64_t b, h, i0;  // batch, query head, first query row of the block
  int64_t cost;      // key blocks visited (at least 1)
};

// Elements of T a packed K row (one key of a panel) or a q row takes: D, or with kTiles the
// pair words of D rounded up to whole tile rows when that is more.
inline int64_t packed_row_elems(int64_t D) {
  if constexpr (kTiles) return imax(D, padded_pairs((D + 1) / 2));
  return D;
}

// kPairK: key row jj of a block (null: a zero pad row) as pair words in the K panels at kb,
// [rows][NR] with rows = k_pair_rows(D) (an odd D's last word has a zero high half; rows past
// ceil(D/2), the tile padding, are zero).
inline int64_t k_pair_rows(int64_t D) { return kTiles ? padded_pairs((D + 1) / 2) : (D + 1) / 2; }
template <class T, class S>
inline void pack_k_pair_row(const S* krow, int64_t D, T* kb, int64_t jj) {
  constexpr int NR = Tiles<T>::NR;
  const int64_t rows = k_pair_rows(D);
  pack_pair_column(krow, D, rows, reinterpret_cast<uint32_t*>(kb) + (jj / NR) * rows * NR + jj % NR, NR);
}

// Packs keys j0..j0+bn of kv head g: K transposed into NR-key panels ([D][NR] each, or pair
// words with kPairK; keys bn..round_up(bn, NR) zero, as the S GEMM reads whole panels) and
// V as NR-column panels ([BNp][NR] each, rows >= bn never read). *nonfinite: V holds inf/NaN
// (or, in pair panels, a subnormal: the bf16 kernels would read it as zero).
template <class T, class S>
void pack_kv_block(const AttentionParams& p, const SeqView& s, int64_t g, int64_t j0, int64_t bn,
                   T* kb, T* vb, uint8_t* nonfinite) {
  constexpr int NR = Tiles<T>::NR;
  constexpr int64_t BNp = Tiles<T>::kBlockNPad;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Dvp = round_up(Dv, NR);
  if constexpr (kPairK<S>) {
    for (int64_t jj = 0; jj < round_up(bn, NR); ++jj)
      pack_k_pair_row<T, S>(jj < bn ? typed<S>(p.k) + kv_offset(p, s, g, j0 + jj, p.k_stride) : nullptr,
                            D, kb, jj);
    {  // V in pair panels along the keys, [Dvp / 32][BNp / 2][32] words
      *nonfinite = pack_rows_pairs(
          [&](int64_t jj) { return typed<S>(p.v) + kv_offset(p, s, g, j0 + jj, p.v_stride); }, bn,
          Dv, padded_pairs((bn + 1) / 2), reinterpret_cast<uint32_t*>(vb), Tiles<T>::kBlockNPad / 2 * 32);
      return;
    }
  } else {
    pack_panels_transposed<T, NR>(round_up(bn, NR), D, kb,
                                  [&](int64_t jj) { return kv_row<T, S>(p, s, g, j0, jj, bn, false); });
  }
  NonfiniteSum<T> nf;
  for (int64_t jj = 0; jj < bn; ++jj)
    copy_row_padded(kv_row<T, S>(p, s, g, j0, jj, bn, true), Dv, Dvp, nf,
                    [&](int64_t c0) { return vb + (c0 / NR) * BNp * NR + jj * NR + c0 % NR; });
  *nonfinite = nf.any();
}

template <class T, class S>
void ensure_packed(const AttentionParams& p, const SeqView& s, int64_t g, int64_t kb,
                   PackCache<T>& c, const T** kblk, const T** vblk, bool* nonfinite) {
  constexpr int64_t BN = Tiles<T>::kBlockN;
  if (c.shared.k) {
    const int64_t slot = (s.b * p.num_kv_heads + g) * c.shared.blocks + kb;
    *kblk = c.shared.k + slot * c.block_elems_k;
    *vblk = c.shared.v + slot * c.block_elems_v;
    *nonfinite = c.shared.nonfinite[slot];
    return;
  }
  if (c.b != s.b || c.g != g) {
    c.b = s.b;
    c.g = g;
    for (int64_t i = 0; i < c.slots; ++i) c.tag[i] = -1;
  }
  const int64_t slot = c.slots > 1 ? kb : 0;
  T* kp = c.k.get() + slot * c.block_elems_k;
  T* vp = c.v.get() + slot * c.block_elems_v;
  if (c.tag[slot] != kb) {
    const int64_t j0 = kb * BN;
    pack_kv_block<T, S>(p, s, g, j0, imin(BN, s.sk - j0), kp, vp, &c.nonfinite[slot]);
    c.tag[slot] = kb;
  }
  *kblk = kp;
  *vblk = vp;
  *nonfinite = c.nonfinite[slot];
}

// O += P V for a V block that holds inf/NaN: keys masked out for a row are skipped, so a
// NaN in a masked-out V row never reaches the output (0 * NaN would). A key whose P
// underflowed to 0 is still attended (0 * NaN = NaN, as in torch).
// v(j, d) reads V's element (key j of the block, column d) from its packed layout.
template <class T, class VFn>
void pv_with_nonfinite(const AttentionParams& p, const SeqView& s, int64_t h, int64_t i0,
                       int64_t j0, const T* P, int64_t ldp, int64_t bm, int64_t bn, VFn&& v,
                       T* O, int64_t ldo, int64_t dvp) {
  for (int64_t r = 0; r < bm; ++r)
    for (int64_t j = 0; j < bn; ++j) {
      const T pj = P[r * ldp + j];
      if (pj == T(0) && key_masked(p, s, h, i0 + r, j0 + j)) continue;
      for (int64_t d = 0; d < dvp; ++d) O[r * ldo + d] += pj * v(j, d);
    }
}

template <class T, class SQ, class SKV>
void run_item(const AttentionParams& p, const Item& it, Workspace<T>& w) {
  using Tl = Tiles<T>;
  constexpr int MR = Blocking<T>::MR, NR = Tl::NR;
  constexpr int64_t BN = Tl::kBlockN, BNp = Tl::kBlockNPad;
  const SeqView s = seq_view(p, it.b);
  const int64_t h = it.h, g = h / (p.num_heads / p.num_kv_heads);
  const int64_t i0 = it.i0, bm = imin(Tl::kBlockM, s.sq - i0);
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Dvp = round_up(Dv, NR);
  T *S = w.s.get(), *O = w.o.get(), *m = w.m.get(), *l = w.l.get();

  // Query rows: read in place when they are fp32 already (or pair words, see kPairK), else
  // converted into qf.
  const T* A = nullptr;
  int64_t rs_a = 0;
  const SQ* Q = typed<SQ>(p.q);
  constexpr bool pairs = kPairK<SQ> && kPairK<SKV>;
  static_assert(pairs || !kPairK<SKV>, "K packed in pair words needs bf16 q (attention_fwd)");
  const int64_t Dw = (D + 1) / 2;  // pair words of a q / K row
  const uint32_t* Aw = nullptr;
  int64_t rs_w = 0;
  if constexpr (pairs && kTiles) {  // q rows in tile layout (zero rows past bm, zero dims past D)
    uint32_t* qt = reinterpret_cast<uint32_t*>(w.qf.get());
    pack_a_panel(Q + q_offset(p, s, h, i0), p.q_stride[2], 1, int(bm), D, qt);
    Aw = qt;
  } else if constexpr (pairs) {
    if (D % 2 == 0 && p.q_stride[2] % 2 == 0) {  // rows of whole words: in place
      Aw = reinterpret_cast<const uint32_t*>(Q + q_offset(p, s, h, i0));
      rs_w = p.q_stride[2] / 2;
    } else {
      uint32_t* qw = reinterpret_cast<uint32_t*>(w.qf.get());
      for (int64_t r = 0; r < bm; ++r) {
        const SQ* qr = Q + q_offset(p, s, h, i0 + r);
        for (int64_t d = 0; d < Dw; ++d)
          qw[r * Dw + d] = 2 * d + 1 < D ? load_pair(qr + 2 * d) : uint32_t(qr[2 * d].bits);
      }
      Aw = qw;
      rs_w = Dw;
    }
  } else if constexpr (std::is_same<SQ, T>::value) {
    A = Q + q_offset(p, s, h, i0);
    rs_a = p.q_stride[2];
  } else {
    for (int64_t r = 0; r < bm; ++r) convert_row(Q + q_offset(p, s, h, i0 + r), D, w.qf.get() + r * D);
    A = w.qf.get();
    rs_a = D;
  }

  // Allowed key ranges; the blocks any row needs.
  int64_t lo_min = s.sk, hi_max = -1;
  for (int64_t r = 0; r < bm; ++r) {
    m[r] = -T(__builtin_inf());
    l[r] = T(0);
    for (int64_t d = 0; d < Dvp; ++d) O[r * Dvp + d] = T(0);
    const KeyRange kr = key_range(p, s, i0 + r);
    if (kr.lo > kr.hi) continue;
    lo_min = imin(lo_min, kr.lo);
    hi_max = imax(hi_max, kr.hi);
  }
  for (int64_t kb = lo_min / BN; hi_max >= 0 && kb <= hi_max / BN; ++kb) {
    const int64_t jb = kb * BN;
    // Keys past the last one any row may see are left out: past the causal / window edge of
    // the tile's last row (at S <= BN a causal tile computed the whole block: as slow as no
    // mask), and past the last key a bool mask lets any row see (key padding). Keys before
    // the first one any row may see (a sliding window's left edge) are left out from the
    // NR-key panel that holds it. Those keys are excluded for every row, so they contribute
    // nothing; a row whose allowed keys all fall inside the trimmed block may take the row
    // pipeline's unmasked form, which can change its last bits (deterministically, and never
    // with the thread count).
    const int64_t bn_end = mask_block_extent(p, s.b, h, i0, bm, jb, imin(imin(BN, s.sk - jb), hi_max + 1 - jb));
    const int64_t off = imax(0, lo_min - jb) / NR * NR;
    if (bn_end <= off) continue;
    const int64_t j0 = jb + off, bn = bn_end - off;
    const T *kblk, *vblk;
    bool v_nonfinite;
    ensure_packed<T, SKV>(p, s, g, kb, w.cache, &kblk, &vblk, &v_nonfinite);
    const int64_t k_rows = pairs ? k_pair_rows(D) : D;
    kblk += off * k_rows;  // panels [key/NR][k_rows][NR]: skip off / NR of them
    // V: [dim/NR][BNp][NR], or with kTiles pair panels [dim/32][BNp/2][32] (words): start at
    // key `off` of each panel.
    const uint32_t* vw = reinterpret_cast<const uint32_t*>(vblk);
    if (!kTiles) vblk += off * NR;
    // S = Q K^T
    if constexpr (pairs && kTiles) {
      for (int64_t jp = 0; jp < bn; jp += NR)
        compute_panel(int(bm), k_rows, Aw, reinterpret_cast<const uint32_t*>(kblk) + (jp / NR) * k_rows * NR,
                      S + jp, BNp, false, NR);
    } else {
    for (int64_t ir = 0; ir < bm; ir += MR) {
      const int mr = int(imin(MR, bm - ir));
      for (int64_t jp = 0; jp < bn; jp += NR) {
        if constexpr (pairs)
          ukernel_bf16_rows<false>(mr, Dw, Aw + ir * rs_w, rs_w,
                                   reinterpret_cast<const uint32_t*>(kblk) + (jp / NR) * Dw * NR,
                                   NR, S + ir * BNp + jp, BNp, false, NR);
        else
          ukernel_rows<T, false>(mr, D, A + ir * rs_a, rs_a, kblk + (jp / NR) * D * NR, NR,
                                 S + ir * BNp + jp, BNp, false, NR);
      }
    }
    }
    // Softmax update row by row. A mask broadcast over query rows (key padding) is the same
    // for every row: it is read once per block.
    for (int64_t r = 0; r < bm; ++r) {
      const int64_t i = i0 + r;
      const auto rc = row_ctx(p, s, h, i, j0, bn, w.add.get(), r == 0 || p.mask_stride[2] != 0);
      row_update(rc, S + r * BNp, m + r, l + r, O + r * Dvp, Dvp);
      if (p.dropout_p > 0.0f) dropout_row_apply<T>(p, s.b, h, i, j0, bn, S + r * BNp, w.keep.get());
    }
    // O += P V
    if constexpr (pairs) {
      constexpr int64_t half = BNp / 2;  // pair rows of a V panel
      if (v_nonfinite) {  // inf/NaN or subnormal values in V: exact fp32
        auto v = [&](int64_t j, int64_t d) {
          const uint32_t word = vw[(d / 32) * half * 32 + ((off + j) / 2) * 32 + d % 32];
          return bf16_to_f32(uint16_t((off + j) % 2 ? word >> 16 : word & 0xffffu));
        };
        pv_with_nonfinite<T>(p, s, h, i0, j0, S, BNp, bm, bn, v, O, Dvp, Dvp);
        continue;
      }
      uint32_t* pt = w.pt.get();
      const int64_t kp = padded_pairs((bn + 1) / 2);
      if constexpr (kTiles) {
        pack_a_panel_f32(S, BNp, int(bm), bn, pt);
        for (int64_t c = 0; c < Dvp; c += 32)
          compute_panel(int(bm), kp, pt, vw + (c / 32) * half * 32 + (off / 2) * 32, O + c, Dvp, true, 32);
      } else {  // P rows as pair words (row stride half), read in place by the micro-kernel
        round_rows_to_pairs(S, BNp, int(bm), bn, pt, half);
        for (int64_t ir = 0; ir < bm; ir += MR)
          for (int64_t c = 0; c < Dvp; c += 32)
            ukernel_bf16_rows<false>(int(imin(MR, bm - ir)), kp, pt + ir * half, half,
                                     vw + (c / 32) * half * 32 + (off / 2) * 32, 32,
                                     O + ir * Dvp + c, Dvp, true, 32);
      }
      continue;
    }
    if (v_nonfinite) {
      auto v = [&](int64_t j, int64_t d) { return vblk[(d / NR) * BNp * NR + j * NR + d % NR]; };
      pv_with_nonfinite<T>(p, s, h, i0, j0, S, BNp, bm, bn, v, O, Dvp, Dvp);
      continue;
    }
    for (int64_t ir = 0; ir < bm; ir += MR) {
      const int mr = int(imin(MR, bm - ir));
      for (int64_t c = 0; c < Dvp; c += NR)
        ukernel_rows<T, false>(mr, bn, S + ir * BNp, BNp, vblk + (c / NR) * BNp * NR, NR,
                               O + ir * Dvp + c, Dvp, true, NR);
    }
  }

  // out = O / l; a row that saw no allowed key (l == 0) gives 0 and lse = -inf, as torch SDPA.
  // A NaN l (a NaN or +inf among the attended scores) gives NaN out and lse.
  SQ* out = static_cast<SQ*>(p.out);
  for (int64_t r = 0; r < bm; ++r) {
    const T inv = l[r] == T(0) ? T(0) : T(1) / l[r];
    SQ* orow = out + out_offset(p, s, h, i0 + r, p.out_stride);
    store_row_scaled(O + r * Dvp, inv, Dv, orow);
    if (p.lse)
      p.lse[out_offset(p, s, h, i0 + r, p.lse_stride)] =
          l[r] == T(0) ? kNegInfF : float(m[r] + T(log(double(l[r]))));
  }
}

// Key blocks the pack cache holds: every block of the longest sequence when they fit in
// kPackCacheBytes, else 1 (repacked on each use).
template <class T>
int64_t pack_cache_slots(const AttentionParams& p, int64_t max_sk) {
  using Tl = Tiles<T>;
  const int64_t block_elems = Tl::kBlockNPad * (packed_row_elems(p.head_dim) + round_up(p.head_dim_v, Tl::NR));
  const int64_t nblocks = imax(1, ceil_div(max_sk, Tl::kBlockN));
  return nblocks * block_elems * int64_t(sizeof(T)) <= kPackCacheBytes ? nblocks : 1;
}

template <class T>
bool init_workspace(const AttentionParams& p, Workspace<T>& w, int64_t max_sk,
                    const SharedPack<T>& shared) {
  using Tl = Tiles<T>;
  constexpr int NR = Tl::NR;
  const int64_t BM = Tl::kBlockM, BNp = Tl::kBlockNPad;
  const int64_t D = p.head_dim, Dvp = round_up(p.head_dim_v, NR);
  PackCache<T>& c = w.cache;
  c.block_elems_k = BNp * packed_row_elems(D);
  c.block_elems_v = BNp * Dvp;
  c.shared = shared;
  c.slots = shared.k ? 0 : pack_cache_slots<T>(p, max_sk);
  if (kPairPV && !w.pt.reset(size_t(BM * BNp / 2))) return false;
  return w.qf.reset(size_t(BM * packed_row_elems(D))) && w.s.reset(size_t(BM * BNp)) && w.o.reset(size_t(BM * Dvp)) &&
         w.m.reset(size_t(BM)) && w.l.reset(size_t(BM)) && w.add.reset(size_t(Tl::kBlockN)) && w.keep.reset(size_t(Tl::kBlockN)) &&
         c.k.reset(size_t(c.slots * c.block_elems_k)) && c.v.reset(size_t(c.slots * c.block_elems_v)) &&
         c.tag.reset(size_t(c.slots)) && c.nonfinite.reset(size_t(c.slots));
}

template <class T, class SQ, class SKV>
Status attention_typed(const AttentionParams& p) {
  using Tl = Tiles<T>;
  const int64_t BM = Tl::kBlockM, BN = Tl::kBlockN;
  const int64_t G = p.num_heads / p.num_kv_heads;
  // Items in (batch, kv head, head of group, query block) order, with their cost.
  int64_t n_items = 0, max_sk = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqView s = seq_view(p, b);
    n_items += p.num_heads * ceil_div(s.sq, BM);
    max_sk = imax(max_sk, s.sk);
  }
  if (n_items == 0) {  // no query rows: only the cache append, if any
    append_new_rows(p);
    return Status::ok;
  }
  Scratch<Item> items;
  Scratch<int64_t> prefix;
  if (!items.reset(size_t(n_items)) || !prefix.reset(size_t(n_items + 1))) return Status::out_of_memory;
  int64_t n = 0;
  double flops = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqView s = seq_view(p, b);
    for (int64_t g = 0; g < p.num_kv_heads; ++g)
      for (int64_t hh = 0; hh < G; ++hh)
        for (int64_t i0 = 0; i0 < s.sq; i0 += BM) {
          const int64_t bm = imin(BM, s.sq - i0);
          const KeyRange first = key_range(p, s, i0), last = key_range(p, s, i0 + bm - 1);
          const int64_t lo = imax(0, first.lo), hi = imin(s.sk - 1, last.hi);
          // Keys the item computes: from the NR-key panel of its first allowed key to its
          // last allowed key (run_item's trims). Cost in units of 64 keys, plus a fixed part
          // worth one 256-key block.
          const int64_t keys = hi >= lo ? hi + 1 - lo / Tl::NR * Tl::NR : 0;
          items[n] = {b, g * G + hh, i0, 4 + ceil_div(keys, 64)};
          flops += double(bm) * double(keys) * double(p.head_dim + p.head_dim_v);
          ++n;
        }
  }
  prefix[0] = 0;
  for (int64_t i = 0; i < n_items; ++i) prefix[i + 1] = prefix[i] + items[i].cost;
  const int nt = threads_for(int64_t(flops / 16), p.num_threads);
  // Fewer groups than threads: threads would share groups, so K/V are packed once for all
  // (when every group's blocks fit in the memory the per-thread caches would have taken).
  const int64_t n_groups = p.batch * p.num_kv_heads;
  const int64_t blocks = imax(1, ceil_div(max_sk, BN));
  const int64_t block_elems_k = Tl::kBlockNPad * packed_row_elems(p.head_dim);
  const int64_t block_elems_v = Tl::kBlockNPad * round_up(p.head_dim_v, Tl::NR);
  const bool share = nt > 1 && n_groups < nt && pack_cache_slots<T>(p, max_sk) == blocks &&
                     n_groups * blocks * (block_elems_k + block_elems_v) * int64_t(sizeof(T)) <=
                         int64_t(nt) * kPackCacheBytes;
  Scratch<T> shared_k, shared_v;
  Scratch<uint8_t> shared_nonfinite;
  SharedPack<T> shared;
  if (share) {
    const size_t slots = size_t(n_groups * blocks);
    if (!shared_k.reset(slots * size_t(block_elems_k)) || !shared_v.reset(slots * size_t(block_elems_v)) ||
        !shared_nonfinite.reset(slots))
      return Status::out_of_memory;
    shared = {shared_k.get(), shared_v.get(), shared_nonfinite.get(), blocks};
  }
  AttentionPlanRecord rec;
  rec.kernel = 1;
  rec.num_chunks = 1;
  rec.pack_slots = share ? blocks : pack_cache_slots<T>(p, max_sk);
  rec.shared_pack = share;
  rec.items = n_items;
  rec.threads = nt;
  debug_record_attention_plan(rec);
  std::atomic<bool> failed{false};

  parallel_team(nt, [&] {
    const TileThread tiles;
    const int tid = thread_id(), team = team_size();
    int64_t begin, end;
    cost_split(prefix.get(), n_items, tid, team, &begin, &end);
    // Phase 1 allocates, phase 2 computes only if every thread's allocation succeeded: a
    // failed allocation leaves out and lse untouched.
    Workspace<T> w;
    if (begin < end && !init_workspace<T>(p, w, max_sk, shared)) failed = true;
#pragma omp barrier
    if (!failed.load()) {
      if (p.n_new > 0) {
#pragma omp single
        append_new_rows(p);  // the implied barrier: every thread then sees the new rows
      }
      if (share) {  // every (group, key block) packed by one thread, then a barrier
        int64_t t0, t1;
        split_range(n_groups * blocks, team, tid, &t0, &t1);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t gi = t / blocks, kb = t % blocks;
          const SeqView s = seq_view(p, gi / p.num_kv_heads);
          if (kb * BN >= s.sk) continue;  // a shorter sequence (varlen) has fewer blocks
          pack_kv_block<T, SKV>(p, s, gi % p.num_kv_heads, kb * BN, imin(BN, s.sk - kb * BN),
                                shared_k.get() + t * block_elems_k, shared_v.get() + t * block_elems_v,
                                &shared_nonfinite[t]);
        }
#pragma omp barrier
      }
      for (int64_t i = begin; i < end; ++i) run_item<T, SQ, SKV>(p, items[i], w);
      if (kTiles && kPairK<SQ> && kPairK<SKV>) debug_count_tile_items(TileKernel::forward, end - begin);
    }
  });
  return failed ? Status::out_of_memory : Status::ok;
}

template <class T, class SQ>
Status dispatch_kv(const AttentionParams& p) {
  switch (p.kv_dtype) {
    case DType::f32:
      if constexpr (std::is_same<T, float>::value) return attention_typed<T, SQ, float>(p);
      break;
    case DType::f16:
      if constexpr (std::is_same<T, float>::value) return attention_typed<T, SQ, f16_t>(p);
      break;
    case DType::bf16:
      if constexpr (std::is_same<T, float>::value) return attention_typed<T, SQ, bf16_t>(p);
      break;
    case DType::f64:
      if constexpr (std::is_same<T, double>::value) return attention_typed<T, SQ, double>(p);
      break;
    case DType::i8:
      if constexpr (std::is_same<T, float>::value) return attention_typed<T, SQ, int8_t>(p);
      break;
    case DType::f8e4m3:
      if constexpr (std::is_same<T, float>::value) return attention_typed<T, SQ, f8e4m3_t>(p);
      break;
    default:
      break;
  }
  return Status::invalid_argument;
}

}  // namespace

#if defined(ATTNKIT_ISA_AVX512_BF16) || defined(ATTNKIT_AMX_TILES)
// bf16 q, k and v in the prefill kernel: this variant's pair (or tile) path, and avx512_bf16
// decodes them too (its scores on vdpbf16ps: decode_stages.h, bf16_dots), and decodes over
// e4m3 caches (code_pairs); everything else (other dtypes, int8 caches, prefill over 8-bit
// caches) is avx512_vnni's.
Status attention_fwd(const AttentionParams& p) {
#if defined(ATTNKIT_ISA_AVX512_BF16)
  // e4m3 caches decode on vdpbf16ps here (decode_stages.h, code_pairs)
  if (p.kv_dtype == DType::f8e4m3 && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 &&
      decode_applies(p))
    return attention_decode(p);
#endif
  if (p.q_dtype == DType::bf16 && p.kv_dtype == DType::bf16 && p.num_kv_heads > 0 &&
      p.num_heads % p.num_kv_heads == 0) {
#if defined(ATTNKIT_ISA_AVX512_BF16)
    if (decode_applies(p)) return attention_decode(p);
#endif
    if (!avx512_vnni::decode_applies(p)) return attention_typed<float, bf16_t, bf16_t>(p);
  }
  return avx512_vnni::kernel_table()->attention_fwd(p);
}
#else
Status attention_fwd(const AttentionParams& p) {
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) return Status::invalid_argument;
  // Few query rows per KV head: the memory-bound decode kernel (chosen by shape only).
  if (decode_applies(p)) return attention_decode(p);
  switch (p.q_dtype) {
    case DType::f32:
      return dispatch_kv<float, float>(p);
    case DType::f16:
      return dispatch_kv<float, f16_t>(p);
    case DType::bf16:
      return dispatch_kv<float, bf16_t>(p);
    case DType::f64:
      return dispatch_kv<double, double>(p);
    default:
      return Status::invalid_argument;
  }
}
#endif

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
