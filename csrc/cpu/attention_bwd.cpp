// Attention backward, FlashAttention-2 style: P is recomputed from q, k and the forward's
// log-sum-exp, never stored. Compiled once per ISA.
//
// Per key block j (K_j, V_j packed once) and query block i of every head of the GQA group:
//   S   = Q_i K_j^T, final scores by the shared pipeline, P = exp(S - lse_i)
//   dP  = dO_i V_j^T
//   dS  = P * (dP - D_i),  D_i = rowsum(dO_i * O_i)      (dropout: dP and P carry Z / (1-p))
//   dV_j += P^T dO_i,  dK_j += dS^T Q_i,  dQ_i += dS K_j  (five micro-kernel GEMMs)
// with dS also multiplied by the softcap derivative and the scale.
//
// Determinism without atomics: a work item is (batch, kv head, chunk of query rows) and owns
// dQ of its rows outright; dK/dV of a key block are summed inside the item over the group's
// heads in order. With one chunk per sequence (enough batch x kv heads to share out) the item
// writes dK/dV directly; with several (chunk count fixed by the shape, never the thread
// count), each item leaves partial dK/dV that are summed in chunk order afterwards.
#include <math.h>

#include <atomic>
#include <type_traits>

#include "attention_common.h"
#include "attention_pack.h"
#include "attention_rows.h"
#include "attnkit/philox.h"
#include "common.h"
#include "debug.h"
#include "gemm/blocking.h"
#include "gemm/pack.h"
#include "gemm/ukernel.h"
#include "simd/math.h"
#include "simd/vec.h"
#include "threading.h"
// The bf16 backward on the tile layout (run_item_tiles): GEMMs on AMX tiles (amx variants) or
// on vdpbf16ps over the same layout (avx512_bf16).
#if defined(ATTNKIT_AMX_TILES)
#define ATTNKIT_BWD_TILES 1
#include "kernels.h"
#elif defined(ATTNKIT_ISA_AVX512_BF16)
#define ATTNKIT_BWD_TILES 1
#include "gemm/tile_layout.h"
#include "gemm/ukernel_bf16.h"
#include "kernels.h"
#endif

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace {

template <class T>
struct BwdTiles {
  // 96 query rows: the dK/dV GEMMs run along the rows (k = rows), so more rows per tile means
  // longer micro-kernel loops there. 64 keys keep the per-block dK/dV accumulators in L2.
  static constexpr int64_t kBlockM = Blocking<T>::MR >= 6 ? 96 : 32;
  static constexpr int64_t kBlockN = 64;
  static constexpr int NR = Blocking<T>::NR, MR = Blocking<T>::MR;
  static constexpr int64_t kBlockNPad = (kBlockN + NR - 1) / NR * NR;
};

constexpr int64_t kOwnGroups = 8;    // batch x kv heads at which items stop splitting queries
constexpr int64_t kMaxChunks = 8;

struct BwdItem {
  int64_t b, g, r0, r1;  // query rows [r0, r1) of sequence b, every head of kv group g
  int64_t chunk;
  int64_t cost;
};

template <class T>
struct BwdWork {
  Scratch<T> qf, dof, lse, drow, dq;        // per item: G x rows (x D / Dv)
  Scratch<T> kt, vt, krow, dk, dv;          // per key block
  Scratch<T> s, dp, sraw, apack;            // per tile
  Scratch<T> add;  // mask row, in the compute type (a float64 mask stays float64)
  Scratch<uint8_t> keep;
  Scratch<T> zbuf;  // dropout factor Z / (1-p) of one row
  bool rows_nonfinite = false;  // the item's Q or dO rows hold inf/NaN (see accumulate_unmasked)
#if defined(ATTNKIT_BWD_TILES)
  struct Tiles {  // the bf16 tile path's operands (run_item_tiles)
    Scratch<uint32_t> qa, doa, qt, dot;  // per item: q, dO rows as A tiles; q^T, dO^T as A tiles
    Scratch<uint32_t> kt, vt, kb;        // per key block: K^T, V^T pairs along the head dim; K
                                         // pairs along the keys
    Scratch<uint32_t> pb, dsb, dsa;      // per tile: P, dS pairs along the rows; dS rows as A tiles
    Scratch<float> dkt, dvt, dq;         // dK^T, dV^T of a block; the item's dQ [G][rows32][Dp]
  } tiles;
#endif
};

#if defined(ATTNKIT_BWD_TILES)
template <class T>
bool init_tiles(const AttentionParams& p, BwdWork<T>& w, int64_t max_rows) {
  if (p.q_dtype != DType::bf16) return true;
  using Tl = BwdTiles<T>;
  const int64_t G = p.num_heads / p.num_kv_heads, R32 = round_up(max_rows, 32);
  const int64_t Dp = round_up(p.head_dim, 32), Dvp = round_up(p.head_dim_v, 32);
  const int64_t Dw = tiles::padded_pairs((p.head_dim + 1) / 2), Dvw = tiles::padded_pairs((p.head_dim_v + 1) / 2);
  const int64_t BNp = Tl::kBlockNPad, BM = Tl::kBlockM;
  auto& t = w.tiles;
  return t.qa.reset(size_t(G * R32 * Dw)) && t.doa.reset(size_t(G * R32 * Dvw)) &&
         t.qt.reset(size_t(G * Dp * R32 / 2)) && t.dot.reset(size_t(G * Dvp * R32 / 2)) &&
         t.kt.reset(size_t(BNp * Dw)) && t.vt.reset(size_t(BNp * Dvw)) &&
         t.kb.reset(size_t(Dp * BNp / 2)) && t.pb.reset(size_t(BNp * BM / 2)) &&
         t.dsb.reset(size_t(BNp * BM / 2)) &&
         t.dsa.reset(size_t(BM / 32 * tiles::padded_pairs(BNp / 2) * 32)) &&
         t.dkt.reset(size_t(Dp * BNp)) && t.dvt.reset(size_t(Dvp * BNp)) &&
         t.dq.reset(size_t(G * R32 * Dp));
}
#else
template <class T>
bool init_tiles(const AttentionParams&, BwdWork<T>&, int64_t) {
  return true;
}
#endif

template <class T>
bool init_work(const AttentionParams& p, BwdWork<T>& w, int64_t max_rows) {
  using Tl = BwdTiles<T>;
  const int64_t G = p.num_heads / p.num_kv_heads;
  const int64_t Dp = round_up(p.head_dim, Tl::NR), Dvp = round_up(p.head_dim_v, Tl::NR);
  const int64_t BNp = Tl::kBlockNPad, BM = Tl::kBlockM;
  const size_t rows = size_t(G * max_rows);
  return w.qf.reset(rows * Dp) && w.dof.reset(rows * Dvp) && w.lse.reset(rows) &&
         w.drow.reset(rows) && w.dq.reset(rows * Dp) && w.kt.reset(size_t(BNp * Dp)) &&
         w.vt.reset(size_t(BNp * Dvp)) && w.krow.reset(size_t(BNp * Dp)) &&
         w.dk.reset(size_t(BNp * Dp)) && w.dv.reset(size_t(BNp * Dvp)) &&
         w.s.reset(size_t(BM * BNp)) && w.dp.reset(size_t(BM * BNp)) &&
         w.sraw.reset(size_t(BM * BNp)) && w.apack.reset(size_t(BNp * BM)) &&
         w.add.reset(size_t(Tl::kBlockN)) && w.keep.reset(size_t(Tl::kBlockN)) &&
         w.zbuf.reset(size_t(BNp)) && init_tiles(p, w, max_rows);
}

// Packs keys j0..j0+bn: K^T and V^T in NR-key panels ([key/NR][dim][NR], the B operand of
// S = Q K^T and dP = dO V^T) and K row-major padded (the B operand of dQ += dS K).
// Returns true when K holds inf/NaN.
template <class T, class S>
bool pack_block(const AttentionParams& p, const SeqView& sv, int64_t g, int64_t j0, int64_t bn,
                BwdWork<T>& w) {
  using Tl = BwdTiles<T>;
  constexpr int NR = Tl::NR;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Dp = round_up(D, NR);
  auto k_row = [&](int64_t jj) { return kv_row<T, S>(p, sv, g, j0, jj, bn, false); };
  pack_panels_transposed<T, NR>(Tl::kBlockNPad, D, w.kt.get(), k_row);
  pack_panels_transposed<T, NR>(Tl::kBlockNPad, Dv, w.vt.get(),
                                [&](int64_t jj) { return kv_row<T, S>(p, sv, g, j0, jj, bn, true); });
  NonfiniteSum<T> nf;
  for (int64_t jj = 0; jj < Tl::kBlockNPad; ++jj)
    copy_row_padded(k_row(jj), D, Dp, nf, [&](int64_t d0) { return w.krow.get() + jj * Dp + d0; });
  return nf.any();
}

// C (M x n, ld ldc) += X^T (M x k) * B (k x n, ld ldb) where X is a (k x M) tile with row
// stride ldx: X^T is packed into micro-panels first (X = P or dS, k = query rows).
template <class T>
void gemm_tn(const T* X, int64_t ldx, int64_t k, int64_t M, const T* B, int64_t ldb, int64_t n,
             T* C, int64_t ldc, T* apack) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR;
  for (int64_t i = 0; i < M; i += MR) {
    const int mr = int(imin(MR, M - i));
    pack_a_panel<T, T>(X + i, 1, ldx, mr, k, apack);
    for (int64_t c = 0; c < n; c += NR)
      ukernel_rows<T, true>(mr, k, apack, 0, B + c, ldb, C + i * ldc + c, ldc, true, NR);
  }
}

// C (bm x n) += A (bm x k, ld lda) * B (k x n, ld ldb), A in place.
template <class T>
void gemm_nn(const T* A, int64_t lda, int64_t bm, int64_t k, const T* B, int64_t ldb, int64_t n,
             T* C, int64_t ldc, bool accumulate) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR;
  for (int64_t i = 0; i < bm; i += MR) {
    const int mr = int(imin(MR, bm - i));
    for (int64_t c = 0; c < n; c += NR)
      ukernel_rows<T, false>(mr, k, A + i * lda, lda, B + c, ldb, C + i * ldc + c, ldc, accumulate, NR);
  }
}

// S = A (bm x kd) * panels^T, panels in [key/NR][kd][NR] (keys padded to BNp).
template <class T>
void gemm_panels(const T* A, int64_t lda, int64_t bm, int64_t kd, const T* panels, int64_t bnp,
                 T* S, int64_t lds) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR;
  for (int64_t i = 0; i < bm; i += MR) {
    const int mr = int(imin(MR, bm - i));
    for (int64_t jp = 0; jp < bnp; jp += NR)
      ukernel_rows<T, false>(mr, kd, A + i * lda, lda, panels + (jp / NR) * kd * NR, NR,
                             S + i * lds + jp, lds, false, NR);
  }
}

template <class T, class SQ, class SKV>
void load_item(const AttentionParams& p, const AttentionBwdParams& bp, const BwdItem& it,
               const SeqView& sv, BwdWork<T>& w) {
  constexpr int NR = BwdTiles<T>::NR;
  const int64_t G = p.num_heads / p.num_kv_heads, rows = it.r1 - it.r0;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Dp = round_up(D, NR), Dvp = round_up(Dv, NR);
  const SQ* Q = typed<SQ>(p.q);
  const SQ* O = typed<SQ>(p.out);
  const SQ* dO = static_cast<const SQ*>(bp.dout);
  bool bad = false;
  for (int64_t hh = 0; hh < G; ++hh) {
    const int64_t h = it.g * G + hh;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = it.r0 + r, row = hh * rows + r;
      const SQ* qr = Q + q_offset(p, sv, h, i);
      const SQ* orow = O + out_offset(p, sv, h, i, p.out_stride);
      const SQ* dorow = dO + out_offset(p, sv, h, i, bp.dout_stride);
      T* qf = w.qf.get() + row * Dp;
      T* df = w.dof.get() + row * Dvp;
      for (int64_t d = 0; d < Dp; ++d) qf[d] = d < D ? load_as<T>(qr + d) : T(0);
      T dsum = T(0), qsum = T(0);
      for (int64_t d = 0; d < Dvp; ++d) {
        df[d] = d < Dv ? load_as<T>(dorow + d) : T(0);
        if (d < Dv) dsum += df[d] * load_as<T>(orow + d);
      }
      for (int64_t d = 0; d < D; ++d) qsum += qf[d];
      // inf/NaN in dO (or O) makes dsum, in q makes qsum non-finite (so can a sum that
      // overflows: then the rare path runs for nothing, still correct).
      if (!(dsum - dsum == T(0)) || !(qsum - qsum == T(0))) bad = true;
      w.drow[row] = dsum;
      const float l = p.lse[out_offset(p, sv, h, i, p.lse_stride)];
      w.lse[row] = T(l);
      T* dq = w.dq.get() + row * Dp;
      for (int64_t d = 0; d < Dp; ++d) dq[d] = T(0);
    }
  }
  w.rows_nonfinite = bad;
}

// C[j] += sum_r X[r][j] B[r] over the rows r of a tile (query rows i0.., head h) and keys j0..,
// skipping the keys masked out for each row: the rare path of the X^T B and X B GEMMs when
// B holds inf/NaN (masked entries have X == 0 exactly, but 0 * NaN = NaN in a GEMM). With
// transpose = false it is C[r] += sum_j X[r][j] B[j] instead (dQ += dS K). Masked means
// key_masked: a key whose weight merely underflowed is attended, as in the forward.
template <class T>
void accumulate_unmasked(const AttentionParams& p, const SeqView& sv, int64_t h, int64_t i0,
                         int64_t j0, bool transpose, const T* X, int64_t ldx, int64_t bm,
                         int64_t bn, const T* B, int64_t ldb, int64_t n, T* C, int64_t ldc) {
  for (int64_t r = 0; r < bm; ++r)
    for (int64_t j = 0; j < bn; ++j) {
      const T x = X[r * ldx + j];
      if (x == T(0) && key_masked(p, sv, h, i0 + r, j0 + j)) continue;
      const T* b = B + (transpose ? r : j) * ldb;
      T* c = C + (transpose ? j : r) * ldc;
      for (int64_t d = 0; d < n; ++d) c[d] += x * b[d];
    }
}

// float64: recompute each row's log-sum-exp in double (the stored lse is fp32), so float64
// gradients are exact to float64 (gradcheck). Key blocks outermost: each is packed once.
template <class T, class SKV>
void recompute_lse(const AttentionParams& p, const BwdItem& it, const SeqView& sv, BwdWork<T>& w) {
  using Tl = BwdTiles<T>;
  const int64_t G = p.num_heads / p.num_kv_heads, rows = it.r1 - it.r0;
  const int64_t D = p.head_dim, Dp = round_up(D, Tl::NR), BN = Tl::kBlockN, BNp = Tl::kBlockNPad;
  T* m = w.lse.get();
  T* l = w.zbuf.get();  // free until the main loop; holds one sum per row of a head at a time
  for (int64_t hh = 0; hh < G; ++hh) {
    const int64_t h = it.g * G + hh;
    for (int64_t r0 = 0; r0 < rows; r0 += BNp) {  // zbuf holds BNp sums
      const int64_t nr = imin(BNp, rows - r0);
      for (int64_t r = 0; r < nr; ++r) m[hh * rows + r0 + r] = -T(__builtin_inf()), l[r] = T(0);
      for (int64_t j0 = 0; j0 < sv.sk; j0 += BN) {
        const int64_t bn = imin(BN, sv.sk - j0);
        pack_block<T, SKV>(p, sv, it.g, j0, bn, w);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = it.r0 + r0 + r;
          T* srow = w.s.get();
          gemm_panels<T>(w.qf.get() + (hh * rows + r0 + r) * Dp, Dp, 1, D, w.kt.get(), BNp, srow, BNp);
          const auto rc = row_ctx(p, sv, h, i, j0, bn, w.add.get());
          const T mx = T(score_row(rc, srow));
          T& mr = m[hh * rows + r0 + r];
          const T mn = mx > mr ? mx : mr;  // (a NaN reaches l: the exp or the guard)
          if (mn == -T(__builtin_inf())) {  // nothing allowed yet; a NaN lane poisons l
            guard_row(srow, bn, &l[r]);
            continue;
          }
          T sum = T(0);
          for (int64_t j = 0; j < bn; ++j) sum += T(exp(double(srow[j] - mn)));
          l[r] = l[r] * T(exp(double(mr - mn))) + sum;
          mr = mn;
        }
      }
      for (int64_t r = 0; r < nr; ++r) {  // l == 0: no allowed key; a NaN l stays NaN
        T& mr = m[hh * rows + r0 + r];
        mr = l[r] == T(0) ? -T(__builtin_inf()) : mr + T(log(double(l[r])));
      }
    }
  }
}

// One row of the tile: srow holds the final scores, dprow dO.V. On return srow holds P (with
// dropout's Z / (1-p) when zbuf is given) for dV, and dprow dS * scale for dK and dQ:
//   dS = P * (dP Z' - D_i) [* softcap'(raw)]; masked keys (P == 0) give exactly 0.
// A NaN lse (the forward row attended a NaN or +inf) gives P = NaN on every allowed key, so
// the row's gradients are NaN as in torch, while masked keys (score -inf) keep exactly 0.
template <class T>
void grad_row(const AttentionParams& p, T* srow, T* dprow, const T* sraw, int64_t bn, int64_t bnp,
              T lse, T Di, const T* zbuf) {
  // lse = -inf: the row saw no allowed key, P = 0 (a zero gradient row). A NaN lse (a
  // forward that met NaN) is not "dead": NaN reaches every attended key's gradient.
  const bool dead = lse == -T(__builtin_inf());
  if (lse != lse) {  // rare: scalar
    for (int64_t j = 0; j < bnp; ++j) {
      const T P = (j < bn && srow[j] != -T(__builtin_inf())) ? T(__builtin_nan("")) : T(0);
      const T z = zbuf ? zbuf[j] : T(1);
      srow[j] = P * z;
      dprow[j] = P == T(0) ? T(0) : P;  // NaN wherever P is
    }
    return;
  }
  if constexpr (std::is_same<T, float>::value) {
    using V = Vec<float>;
    const V vl = V::set1(dead ? 0.0f : lse), vD = V::set1(Di), vscale = V::set1(float(p.scale));
    const V vcap_in = V::set1(p.softcap > 0.0 ? float(p.scale / p.softcap) : 0.0f), one = V::set1(1.0f);
    for (int64_t j = 0; j < bnp; j += V::N) {
      V P = vexp(V::load(srow + j) - vl);
      P = select(V::iota(float(j)) < V::set1(float(dead ? 0 : bn)), P, V::zero());
      V dp = V::load(dprow + j), pk = P;
      if (zbuf) {
        const V z = V::load(zbuf + j);
        pk = P * z;
        dp = dp * z;
      }
      V ds = select(P == V::zero(), V::zero(), P * (dp - vD));
      if (p.softcap > 0.0f) {
        const V t = vtanh(V::load(sraw + j) * vcap_in);
        ds = ds * (one - t * t);
      }
      pk.store(srow + j);
      (ds * vscale).store(dprow + j);
    }
  } else {
    for (int64_t j = 0; j < bnp; ++j) {
      // (lse is finite here: exp(s - lse) is 0 for a masked key's -inf score, never NaN.)
      const T P = (dead || j >= bn) ? T(0) : T(exp(double(srow[j] - lse)));
      T dp = dprow[j], pk = P;
      if (zbuf) {
        pk = P * zbuf[j];
        dp = dp * zbuf[j];
      }
      T ds = P == T(0) ? T(0) : P * (dp - Di);
      if (p.softcap > 0.0 && ds != T(0)) {
        const T t = T(tanh(double(sraw[j]) * p.scale / p.softcap));
        ds *= T(1) - t * t;
      }
      srow[j] = pk;
      dprow[j] = ds * T(p.scale);
    }
  }
}

// The rows [*i0, *i1) of tile [t0, t1) that reach keys j0..j0+bn_full, and the keys *bn
// (from j0) any of them may attend: key ranges grow with the row (causal, window), so the rows
// that see no key of the block are a prefix and a suffix of the tile, and the keys past the
// last row's edge are excluded for all. Leaving them out only drops exact zeros (P and dS are
// 0 there): near a causal diagonal most of a tile x block is such zeros. *i0 is then moved
// back to a multiple of `align` rows from t0 (the rows it adds get P = dS = 0). False: no row.
inline bool tile_span(const AttentionParams& p, const SeqView& sv, int64_t t0, int64_t t1,
                      int64_t j0, int64_t bn_full, int64_t align, int64_t* i0, int64_t* i1,
                      int64_t* bn) {
  int64_t a = t0, b = t1;
  while (a < b && key_range(p, sv, a).hi < j0) ++a;
  while (b > a && key_range(p, sv, b - 1).lo > j0 + bn_full - 1) --b;
  if (a == b) return false;
  *i0 = t0 + (a - t0) / align * align;
  *i1 = b;
  *bn = imin(bn_full, key_range(p, sv, b - 1).hi + 1 - j0);
  return true;
}

// Starts key block j0..j0+bn_full of an item: zeroes its dK / dV accumulators (w.dk, w.dv)
// and returns whether any row of the item reaches the block (key ranges grow with the row).
template <class T>
bool start_key_block(const AttentionParams& p, const SeqView& sv, const BwdItem& it, int64_t j0,
                     int64_t bn_full, BwdWork<T>& w) {
  constexpr int NR = BwdTiles<T>::NR;
  constexpr int64_t BNp = BwdTiles<T>::kBlockNPad;
  const int64_t Dp = round_up(p.head_dim, NR), Dvp = round_up(p.head_dim_v, NR);
  for (int64_t x = 0; x < BNp * Dp; ++x) w.dk[x] = T(0);
  for (int64_t x = 0; x < BNp * Dvp; ++x) w.dv[x] = T(0);
  if (it.r1 <= it.r0) return false;
  const KeyRange first = key_range(p, sv, it.r0), last = key_range(p, sv, it.r1 - 1);
  return !(j0 > last.hi || j0 + bn_full - 1 < first.lo);
}

// Rows i0..i0+bm of head h against keys j0..j0+bn: w.s holds S, w.dp dO V^T (row stride
// BNp); on return w.s holds P and w.dp dS * scale (grad_row). row0: the rows' index in the
// item's per-row arrays (lse, D_i).
template <class T>
void tile_grads(const AttentionParams& p, const SeqView& sv, int64_t h, int64_t i0, int64_t bm,
                int64_t j0, int64_t bn, int64_t bnp, int64_t row0, BwdWork<T>& w) {
  constexpr int64_t BNp = BwdTiles<T>::kBlockNPad;
  T *S = w.s.get(), *dP = w.dp.get(), *Sraw = w.sraw.get();
  const T inv_keep = p.dropout_p > 0.0f ? T(1) / (T(1) - T(p.dropout_p)) : T(1);
  if (p.softcap > 0.0f)
    for (int64_t x = 0; x < bm * BNp; ++x) Sraw[x] = S[x];
  for (int64_t r = 0; r < bm; ++r) {
    const int64_t i = i0 + r;
    T* srow = S + r * BNp;
    T* dprow = dP + r * BNp;
    const auto rc = row_ctx(p, sv, h, i, j0, bn, w.add.get());
    score_row(rc, srow);
    const T lse = w.lse[row0 + r], Di = w.drow[row0 + r];
    const T* zbuf = nullptr;
    if (p.dropout_p > 0.0f) {
      const DropoutRow dr = dropout_row(p.dropout_seed, p.dropout_offset, sv.b, h,
                                        p.num_heads, i, float(p.dropout_p));
      dropout_keep(dr, j0, bn, w.keep.get());
      for (int64_t j = 0; j < BNp; ++j) w.zbuf[j] = j < bn && w.keep[j] ? inv_keep : T(0);
      zbuf = w.zbuf.get();
    }
    grad_row<T>(p, srow, dprow, Sraw + r * BNp, bn, bnp, lse, Di, zbuf);
  }
}

// dK/dV of keys j0..j0+bn_full (fp32 rows at dk / dv, strides Dp / Dvp): straight to the
// output, or to this chunk's partial.
template <class T, class SKV>
void store_block_grads(const AttentionParams& p, const AttentionBwdParams& bp, const SeqView& sv,
                       int64_t g, int64_t j0, int64_t bn_full, const T* dk, const T* dv,
                       T* part_dk, T* part_dv) {
  constexpr int NR = BwdTiles<T>::NR;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Dp = round_up(D, NR), Dvp = round_up(Dv, NR);
  for (int64_t jj = 0; jj < bn_full; ++jj) {
    if (part_dk) {
      for (int64_t d = 0; d < D; ++d) part_dk[(j0 + jj) * D + d] = dk[jj * Dp + d];
      for (int64_t d = 0; d < Dv; ++d) part_dv[(j0 + jj) * Dv + d] = dv[jj * Dvp + d];
      continue;
    }
    SKV* dko = static_cast<SKV*>(bp.dk) + kv_offset(p, sv, g, j0 + jj, bp.dk_stride);
    SKV* dvo = static_cast<SKV*>(bp.dv) + kv_offset(p, sv, g, j0 + jj, bp.dv_stride);
    store_row_scaled(dk + jj * Dp, T(1), D, dko);
    store_row_scaled(dv + jj * Dvp, T(1), Dv, dvo);
  }
}

template <class T, class SQ, class SKV>
void run_item(const AttentionParams& p, const AttentionBwdParams& bp, const BwdItem& it,
              BwdWork<T>& w, T* part_dk, T* part_dv) {
  using Tl = BwdTiles<T>;
  constexpr int NR = Tl::NR;
  const int64_t BM = Tl::kBlockM, BN = Tl::kBlockN, BNp = Tl::kBlockNPad;
  const SeqView sv = seq_view(p, it.b);
  const int64_t G = p.num_heads / p.num_kv_heads, rows = it.r1 - it.r0;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Dp = round_up(D, NR), Dvp = round_up(Dv, NR);
  load_item<T, SQ, SKV>(p, bp, it, sv, w);
  if constexpr (std::is_same<T, double>::value) recompute_lse<T, SKV>(p, it, sv, w);
  T *S = w.s.get(), *dP = w.dp.get();

  for (int64_t j0 = 0; j0 < sv.sk; j0 += BN) {
    const int64_t bn_full = imin(BN, sv.sk - j0);
    T* dk = w.dk.get();
    T* dv = w.dv.get();
    if (start_key_block(p, sv, it, j0, bn_full, w)) {
      const bool k_nonfinite = pack_block<T, SKV>(p, sv, it.g, j0, bn_full, w);
      for (int64_t hh = 0; hh < G; ++hh) {
        const int64_t h = it.g * G + hh;
        for (int64_t t0 = it.r0; t0 < it.r1; t0 += BM) {
          int64_t i0, i1, bn;
          if (!tile_span(p, sv, t0, imin(t0 + BM, it.r1), j0, bn_full, 1, &i0, &i1, &bn)) continue;
          const int64_t bm = i1 - i0;
          const int64_t bnp = round_up(bn, NR);
          if (mask_block_empty(p, sv.b, h, i0, bm, j0, bn)) continue;
          const int64_t row0 = hh * rows + (i0 - it.r0);
          const T* qf = w.qf.get() + row0 * Dp;
          const T* df = w.dof.get() + row0 * Dvp;
          gemm_panels<T>(qf, Dp, bm, D, w.kt.get(), bnp, S, BNp);
          gemm_panels<T>(df, Dvp, bm, Dv, w.vt.get(), bnp, dP, BNp);
          tile_grads<T>(p, sv, h, i0, bm, j0, bn, bnp, row0, w);
          // dV += P^T dO, dK += dS^T Q, dQ += dS K; where the right operand holds inf/NaN
          // (rare), masked keys are skipped so it never reaches them (or from them).
          if (!w.rows_nonfinite) {
            gemm_tn<T>(S, BNp, bm, bn, df, Dvp, Dvp, dv, Dvp, w.apack.get());
            gemm_tn<T>(dP, BNp, bm, bn, qf, Dp, Dp, dk, Dp, w.apack.get());
          } else {
            accumulate_unmasked<T>(p, sv, h, i0, j0, true, S, BNp, bm, bn, df, Dvp, Dvp, dv, Dvp);
            accumulate_unmasked<T>(p, sv, h, i0, j0, true, dP, BNp, bm, bn, qf, Dp, Dp, dk, Dp);
          }
          T* dq = w.dq.get() + row0 * Dp;
          if (!k_nonfinite)
            gemm_nn<T>(dP, BNp, bm, bn, w.krow.get(), Dp, Dp, dq, Dp, true);
          else
            accumulate_unmasked<T>(p, sv, h, i0, j0, false, dP, BNp, bm, bn, w.krow.get(), Dp, D, dq, Dp);
        }
      }
    }
    store_block_grads<T, SKV>(p, bp, sv, it.g, j0, bn_full, dk, dv, part_dk, part_dv);
  }
  // dQ of every row of the item.
  SQ* dQ = static_cast<SQ*>(bp.dq);
  for (int64_t hh = 0; hh < G; ++hh)
    for (int64_t r = 0; r < rows; ++r) {
      SQ* o = dQ + out_offset(p, sv, it.g * G + hh, it.r0 + r, bp.dq_stride);
      const T* src = w.dq.get() + (hh * rows + r) * Dp;
      store_row_scaled(src, T(1), D, o);
    }
}

#if defined(ATTNKIT_BWD_TILES)
// ---- bf16 on the tile layout (ARCHITECTURE.md, "ISA variants"): AMX tiles (amx,
// amx_emulated) or vdpbf16ps (avx512_bf16) through tiles::compute_panel ----
// The five GEMMs of a tile on tiles, transposed where that spares a transpose of P or dS:
//   S = Q K^T, dP = dO V^T     A: q / dO rows (A tiles, packed once per item); B: K^T / V^T in
//                              pair panels along the head dim (per key block)
//   dV^T += dO^T P, dK^T += Q^T dS
//                              A: dO^T / q^T (A tiles whose k runs along the query rows, once
//                              per item); B: P / dS in pair rows straight from their fp32 rows
//   dQ += dS K                 A: dS rows; B: K in pair panels along the keys
// dK^T / dV^T accumulate in fp32 over the group's heads and tiles and are added transposed to
// the block's dK / dV; dQ accumulates in fp32 per item. P and dS are rounded to bf16 for their
// GEMMs, as GPU flash kernels do. Query tiles start at multiples of 32 rows from the item's
// first row (the rows of a tile that reach no key of the block get P = dS = 0). Returns false,
// having written nothing, when the item's q or dO or its group's K or V hold inf/NaN or a
// subnormal (which the tile GEMMs read as zero: a gradient is as small as its operands): the
// fp32 path (run_item) handles those exactly, skipping masked keys.
bool group_kv_unfit(const AttentionParams& p, const SeqView& sv, int64_t g) {
  const bf16_t* K = typed<bf16_t>(p.k);
  const bf16_t* V = typed<bf16_t>(p.v);
  for (int64_t j = 0; j < sv.sk; ++j)
    if (bf16_any_unfit(K + kv_offset(p, sv, g, j, p.k_stride), p.head_dim) ||
        bf16_any_unfit(V + kv_offset(p, sv, g, j, p.v_stride), p.head_dim_v))
      return true;
  return false;
}

bool item_rows_unfit(const AttentionParams& p, const AttentionBwdParams& bp, const BwdItem& it,
                     const SeqView& sv) {
  const int64_t G = p.num_heads / p.num_kv_heads;
  const bf16_t* Q = typed<bf16_t>(p.q);
  const bf16_t* dO = static_cast<const bf16_t*>(bp.dout);
  for (int64_t hh = 0; hh < G; ++hh)
    for (int64_t r = it.r0; r < it.r1; ++r)
      if (bf16_any_unfit(Q + q_offset(p, sv, it.g * G + hh, r), p.head_dim) ||
          bf16_any_unfit(dO + out_offset(p, sv, it.g * G + hh, r, bp.dout_stride), p.head_dim_v))
        return true;
  return false;
}

bool run_item_tiles(const AttentionParams& p, const AttentionBwdParams& bp, const BwdItem& it,
                    BwdWork<float>& w, float* part_dk, float* part_dv) {
  using Tl = BwdTiles<float>;
  // Query tiles and item chunks start at multiples of 32 rows (step0, the A tiles of q^T and
  // dO^T), key blocks are whole 32-key panels.
  static_assert(Tl::kBlockM % 32 == 0 && Tl::kBlockNPad % 32 == 0, "tile-aligned blocks");
  const int64_t BM = Tl::kBlockM, BN = Tl::kBlockN, BNp = Tl::kBlockNPad;
  const SeqView sv = seq_view(p, it.b);
  const int64_t G = p.num_heads / p.num_kv_heads, rows = it.r1 - it.r0, R32 = round_up(rows, 32);
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Dp = round_up(D, 32), Dvp = round_up(Dv, 32);
  const int64_t Dw = tiles::padded_pairs((D + 1) / 2), Dvw = tiles::padded_pairs((Dv + 1) / 2);
  const int64_t steps = R32 / 32, half = BM / 2 * 32;  // row steps of the item; words of a P / dS panel
  load_item<float, bf16_t, bf16_t>(p, bp, it, sv, w);
  if (w.rows_nonfinite || item_rows_unfit(p, bp, it, sv) || group_kv_unfit(p, sv, it.g)) return false;
  auto& t = w.tiles;
  const bf16_t* Q = typed<bf16_t>(p.q);
  const bf16_t* dO = static_cast<const bf16_t*>(bp.dout);
  for (int64_t hh = 0; hh < G; ++hh) {
    const int64_t h = it.g * G + hh;
    auto qrow = [&](int64_t r) { return Q + q_offset(p, sv, h, it.r0 + r); };
    auto dorow = [&](int64_t r) { return dO + out_offset(p, sv, h, it.r0 + r, bp.dout_stride); };
    for (int64_t r = 0; r < rows; r += 32) {
      tiles::pack_a_panel(qrow(r), p.q_stride[2], 1, int(imin(32, rows - r)), D, t.qa.get() + (hh * R32 + r) * Dw);
      tiles::pack_a_panel(dorow(r), bp.dout_stride[2], 1, int(imin(32, rows - r)), Dv,
                   t.doa.get() + (hh * R32 + r) * Dvw);
    }
    for (int64_t c = 0; c < Dp; c += 32)
      tiles::pack_a_transposed(qrow, rows, D, c, R32 / 2, t.qt.get() + ((hh * (Dp / 32) + c / 32) * steps) * 512);
    for (int64_t c = 0; c < Dvp; c += 32)
      tiles::pack_a_transposed(dorow, rows, Dv, c, R32 / 2, t.dot.get() + ((hh * (Dvp / 32) + c / 32) * steps) * 512);
  }
  for (int64_t x = 0; x < G * R32 * Dp; ++x) t.dq[x] = 0.0f;
  float *S = w.s.get(), *dP = w.dp.get();
  for (int64_t j0 = 0; j0 < sv.sk; j0 += BN) {
    const int64_t bn_full = imin(BN, sv.sk - j0);
    float* dk = w.dk.get();
    float* dv = w.dv.get();
    if (start_key_block(p, sv, it, j0, bn_full, w)) {
      auto krow = [&](int64_t jj) { return typed<bf16_t>(p.k) + kv_offset(p, sv, it.g, j0 + jj, p.k_stride); };
      auto vrow = [&](int64_t jj) { return typed<bf16_t>(p.v) + kv_offset(p, sv, it.g, j0 + jj, p.v_stride); };
      for (int64_t jj = 0; jj < BNp; ++jj) {
        pack_pair_column(jj < bn_full ? krow(jj) : nullptr, D, Dw, t.kt.get() + (jj / 32) * Dw * 32 + jj % 32, 32);
        pack_pair_column(jj < bn_full ? vrow(jj) : nullptr, Dv, Dvw, t.vt.get() + (jj / 32) * Dvw * 32 + jj % 32, 32);
      }
      pack_rows_pairs(krow, bn_full, D, tiles::padded_pairs((bn_full + 1) / 2), t.kb.get(), BNp / 2 * 32);
      for (int64_t x = 0; x < Dp * BNp; ++x) t.dkt[x] = 0.0f;
      for (int64_t x = 0; x < Dvp * BNp; ++x) t.dvt[x] = 0.0f;
      for (int64_t hh = 0; hh < G; ++hh) {
        const int64_t h = it.g * G + hh;
        for (int64_t t0 = it.r0; t0 < it.r1; t0 += BM) {
          int64_t i0, i1, bn;  // the first row aligned to 32 rows from t0 (A tiles)
          if (!tile_span(p, sv, t0, imin(t0 + BM, it.r1), j0, bn_full, 32, &i0, &i1, &bn)) continue;
          const int64_t bm = i1 - i0, bm32 = round_up(bm, 32);
          const int64_t bnp = round_up(bn, 32), kpk = tiles::padded_pairs((bn + 1) / 2);
          if (mask_block_empty(p, sv.b, h, i0, bm, j0, bn)) continue;
          const int64_t row0 = hh * rows + (i0 - it.r0);  // in load_item's arrays
          const int64_t prow = hh * R32 + (i0 - it.r0);   // in the padded tile arrays
          const int64_t step0 = (i0 - it.r0) / 32;
          for (int64_t g = 0; g < bm32; g += 32)
            for (int64_t jp = 0; jp < bnp; jp += 32) {
              tiles::compute_panel(32, Dw, t.qa.get() + (prow + g) * Dw, t.kt.get() + (jp / 32) * Dw * 32,
                            S + g * BNp + jp, BNp, false, 32);
              tiles::compute_panel(32, Dvw, t.doa.get() + (prow + g) * Dvw, t.vt.get() + (jp / 32) * Dvw * 32,
                            dP + g * BNp + jp, BNp, false, 32);
            }
          tile_grads<float>(p, sv, h, i0, bm, j0, bn, bnp, row0, w);
          tiles::pack_rows_pairs_f32(S, BNp, bm, bn, bm32 / 2, t.pb.get(), half);
          tiles::pack_rows_pairs_f32(dP, BNp, bm, bn, bm32 / 2, t.dsb.get(), half);
          for (int64_t g = 0; g < bm32; g += 32)
            tiles::pack_a_panel_f32(dP + g * BNp, BNp, int(imin(32, bm - g)), bn, t.dsa.get() + (g / 32) * kpk * 32);
          for (int64_t jp = 0; jp < bnp; jp += 32) {
            for (int64_t c = 0; c < Dvp; c += 32)
              tiles::compute_panel(32, bm32 / 2, t.dot.get() + ((hh * (Dvp / 32) + c / 32) * steps + step0) * 512,
                            t.pb.get() + (jp / 32) * half, t.dvt.get() + c * BNp + jp, BNp, true, 32);
            for (int64_t c = 0; c < Dp; c += 32)
              tiles::compute_panel(32, bm32 / 2, t.qt.get() + ((hh * (Dp / 32) + c / 32) * steps + step0) * 512,
                            t.dsb.get() + (jp / 32) * half, t.dkt.get() + c * BNp + jp, BNp, true, 32);
          }
          for (int64_t g = 0; g < bm32; g += 32)
            for (int64_t c = 0; c < Dp; c += 32)
              tiles::compute_panel(32, kpk, t.dsa.get() + (g / 32) * kpk * 32, t.kb.get() + (c / 32) * (BNp / 2 * 32),
                            t.dq.get() + (prow + g) * Dp + c, Dp, true, 32);
        }
      }
      for (int64_t jj = 0; jj < bn_full; ++jj) {
        for (int64_t d = 0; d < D; ++d) dk[jj * Dp + d] = t.dkt[d * BNp + jj];
        for (int64_t d = 0; d < Dv; ++d) dv[jj * Dvp + d] = t.dvt[d * BNp + jj];
      }
    }
    store_block_grads<float, bf16_t>(p, bp, sv, it.g, j0, bn_full, dk, dv, part_dk, part_dv);
  }
  bf16_t* dQ = static_cast<bf16_t*>(bp.dq);
  for (int64_t hh = 0; hh < G; ++hh)
    for (int64_t r = 0; r < rows; ++r)
      store_row_scaled(t.dq.get() + (hh * R32 + r) * Dp, 1.0f,
                       D, dQ + out_offset(p, sv, it.g * G + hh, it.r0 + r, bp.dq_stride));
  return true;
}
#endif

// An item on the tile path when this variant has one for its types, else on run_item.
template <class T, class SQ, class SKV>
void run_any_item(const AttentionParams& p, const AttentionBwdParams& bp, const BwdItem& it,
                  BwdWork<T>& w, T* part_dk, T* part_dv) {
#if defined(ATTNKIT_BWD_TILES)
  if constexpr (std::is_same<T, float>::value && std::is_same<SQ, bf16_t>::value &&
                std::is_same<SKV, bf16_t>::value)
    if (run_item_tiles(p, bp, it, w, part_dk, part_dv)) {
      debug_count_tile_items(TileKernel::backward, 1);
      return;
    }
#endif
  run_item<T, SQ, SKV>(p, bp, it, w, part_dk, part_dv);
}

template <class T, class SQ, class SKV>
Status bwd_typed(const AttentionBwdParams& bp) {
  using Tl = BwdTiles<T>;
  const AttentionParams& p = bp.fwd;
  const int64_t BM = Tl::kBlockM;
  const int64_t groups = p.batch * p.num_kv_heads;
  // Query chunks per sequence: from the shape only (rule 6), never from the thread count.
  const int64_t chunks = groups >= kOwnGroups
                             ? 1
                             : imax(1, imin(kMaxChunks, ceil_div(p.seqlen_q, 2 * BM)));
  const int64_t chunk_rows = round_up(ceil_div(imax(1, p.seqlen_q), chunks), BM);
  int64_t n_items = 0, max_rows = 1;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqView sv = seq_view(p, b);
    n_items += p.num_kv_heads * imax(1, ceil_div(sv.sq, chunk_rows));
  }
  Scratch<BwdItem> items;
  Scratch<int64_t> prefix;
  if (!items.reset(size_t(n_items)) || !prefix.reset(size_t(n_items + 1))) return Status::out_of_memory;
  int64_t n = 0;
  double flops = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqView sv = seq_view(p, b);
    const int64_t nc = imax(1, ceil_div(sv.sq, chunk_rows));
    for (int64_t g = 0; g < p.num_kv_heads; ++g)
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t r0 = imin(sv.sq, c * chunk_rows), r1 = imin(sv.sq, r0 + chunk_rows);
        const int64_t cost = 1 + (r1 - r0) * (sv.sk / 64 + 1);
        items[n++] = {b, g, r0, r1, chunks > 1 ? c : -1, cost};
        max_rows = imax(max_rows, r1 - r0);
        flops += double(r1 - r0) * double(sv.sk) * double(p.head_dim + p.head_dim_v) * 5.0;
      }
  }
  prefix[0] = 0;
  for (int64_t i = 0; i < n_items; ++i) prefix[i + 1] = prefix[i] + items[i].cost;
  // Partial dK/dV per chunk item, summed in chunk order below.
  Scratch<T> pdk, pdv;
  const int64_t Sk = p.seqlen_k, D = p.head_dim, Dv = p.head_dim_v;
  if (chunks > 1 && (!pdk.reset(size_t(n_items * Sk * D)) || !pdv.reset(size_t(n_items * Sk * Dv))))
    return Status::out_of_memory;
  const int nt = threads_for(int64_t(flops / 16), p.num_threads);
  std::atomic<bool> failed{false};
  parallel_team(nt, [&] {
    const TileThread tiles;
    const int tid = thread_id(), team = team_size();
    int64_t begin, end;
    cost_split(prefix.get(), n_items, tid, team, &begin, &end);
    // Phase 1 allocates, phase 2 computes only if every thread's allocation succeeded: a
    // failed allocation leaves dq, dk and dv untouched.
    BwdWork<T> w;
    if (begin < end && !init_work<T>(p, w, max_rows)) failed = true;
#pragma omp barrier
    if (!failed.load()) {
      for (int64_t i = begin; i < end; ++i)
        run_any_item<T, SQ, SKV>(p, bp, items[i], w, chunks > 1 ? pdk.get() + i * Sk * D : nullptr,
                                 chunks > 1 ? pdv.get() + i * Sk * Dv : nullptr);
    }
    if (!failed.load() && chunks > 1) {
#pragma omp barrier
      // Sum the chunk partials of each (batch, kv head) in chunk order.
#pragma omp for schedule(static)
      for (int64_t grp = 0; grp < groups; ++grp) {
        const int64_t b = grp / p.num_kv_heads, g = grp % p.num_kv_heads;
        int64_t first = -1, count = 0;
        for (int64_t i = 0; i < n_items; ++i)
          if (items[i].b == b && items[i].g == g) {
            if (first < 0) first = i;
            ++count;
          }
        const SeqView sv = seq_view(p, b);
        for (int64_t j = 0; j < sv.sk; ++j) {
          SKV* dko = static_cast<SKV*>(bp.dk) + kv_offset(p, sv, g, j, bp.dk_stride);
          SKV* dvo = static_cast<SKV*>(bp.dv) + kv_offset(p, sv, g, j, bp.dv_stride);
          for (int64_t d = 0; d < D; ++d) {
            T acc = T(0);
            for (int64_t c = 0; c < count; ++c) acc += pdk[(first + c) * Sk * D + j * D + d];
            store_as<T, SKV>(acc, dko + d);
          }
          for (int64_t d = 0; d < Dv; ++d) {
            T acc = T(0);
            for (int64_t c = 0; c < count; ++c) acc += pdv[(first + c) * Sk * Dv + j * Dv + d];
            store_as<T, SKV>(acc, dvo + d);
          }
        }
      }
    }
  });
  return failed ? Status::out_of_memory : Status::ok;
}

}  // namespace

#if defined(ATTNKIT_BWD_TILES)
// bf16 on the tile layout (run_item_tiles); every other dtype is avx512_vnni's (that is,
// avx512's).
Status attention_bwd(const AttentionBwdParams& bp) {
  const AttentionParams& p = bp.fwd;
  if (p.q_dtype == DType::bf16 && p.kv_dtype == DType::bf16 && p.num_kv_heads > 0 &&
      p.num_heads % p.num_kv_heads == 0 && !p.block_table)
    return bwd_typed<float, bf16_t, bf16_t>(bp);
  return avx512_vnni::kernel_table()->attention_bwd(bp);
}
#else
Status attention_bwd(const AttentionBwdParams& bp) {
  const AttentionParams& p = bp.fwd;
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0 || p.block_table) return Status::invalid_argument;
  if (p.kv_dtype != p.q_dtype) return Status::invalid_argument;
  switch (p.q_dtype) {
    case DType::f32:
      return bwd_typed<float, float, float>(bp);
    case DType::f16:
      return bwd_typed<float, f16_t, f16_t>(bp);
    case DType::bf16:
      return bwd_typed<float, bf16_t, bf16_t>(bp);
    case DType::f64:
      return bwd_typed<double, double, double>(bp);
    default:
      return Status::invalid_argument;
  }
}
#endif

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
