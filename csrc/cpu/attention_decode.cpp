// Decode attention: few query rows against a long KV cache. Compiled once per ISA.
//
// Limits (B1 H32 Sq1 Sk4096 D128 fp32): 2 x 64 MB of K/V read once for 67 MFLOP, i.e. ~4 ms at
// 30 GB/s and ~0.4 ms of FMA work: memory-bound, so the kernel is built around reading every
// K/V element exactly once per call:
//   * GQA-aware: a work item holds every query row of its KV heads, all G heads x Sq rows
//     ("rows" below), so each K/V row is loaded once and used by all of them.
//   * Memory order: with a head-major cache (B, Hkv, S, D) an item is one KV head; with a
//     position-major cache (B, S, Hkv, D), FlashAttention's and HF's decode layout, an item
//     takes every KV head of a range of positions and walks positions outermost, so it reads
//     one contiguous (Hkv x D) row after another. Per head, that layout is a 16 KB stride
//     (B1 H32 D128): 12 GB/s; walked by position: see bench/notes/decode.md.
//   * Split-KV (flash-decoding): for position-major caches, or when batch x kv_heads is
//     small, the keys are cut into chunks whose size depends only on the longest sequence's
//     length (its cache_seqlens, not the cache capacity) and D; chunk partials
//     (m, l, O) are combined in chunk order through their log-sum-exp, so results do not
//     depend on the thread count.
//   * K/V are read in place (f16 via F16C, bf16 by widening, 8-bit codes widened in registers
//     with each row's scale applied to its scores or to P: one multiply per row), in fp32
//     registers; scores are dot products over D in register blocks of rows x 4 keys, then the
//     same row pipeline as prefill (attention_rows.h), then O += P V with blocks of O held in
//     registers across a key block.
//   * 8-bit caches move a quarter of fp32's bytes but not a quarter of the work: the FMAs and
//     conversions per element stay, so on two cores the int8 / e4m3 kernel is compute-bound
//     (bench/notes/decode.md, "decode over 8-bit caches").
//   * Software prefetch of V (and of K a few positions ahead) in the scores loop: O += P V walks
//     V head by head, a stride of Hkv rows the hardware prefetchers do not follow (it made the
//     int8 GQA decode 1.3x faster at Sk8192: bench/notes/decode.md). (The first version, whose loops
//     walked positions outermost, saw no gain from a prefetch of the next position.)
//   * MHA decode (one query row per KV head) over a 16-bit or 8-bit position-major cache reads
//     K and V in address order instead, all heads of a position one after another, with no
//     software prefetch (scores_seq, pv_seq; ARCHITECTURE.md, "Decode walks"): one ascending
//     stream is what the hardware prefetchers run at the full read rate, and the L1 prefetches
//     of the head-by-head walk capped it at 47-60% of the read ceiling.
#include <math.h>

#include <atomic>
#include <type_traits>

#include "attention_common.h"
#include "attention_rows.h"
#include "common.h"
#include "debug.h"
#include "gemm/pack.h"
#include "quantize.h"
#include "decode_blocks.h"
#include "decode_codes.h"
#include "decode_stages.h"
#include "simd/dot_i8.h"
#include "simd/vec.h"
#include "threading.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace {

using VF = Vec<float>;
using namespace decode;  // the register blocks (decode_blocks.h)

constexpr int64_t kMaxRows = 32;      // decode path: G x Sq query rows per KV head at most
constexpr int64_t kMaxQueryRows = 16;  // and at most this many query positions
// V bytes of one key block's head group (run_item): what its prefetches may bring in before
// P V reads them back. 64 KB (about L1 + a slice of L2): 32 KB and 128 KB were no better
// (bench/notes/decode.md, "V prefetch budget").
constexpr int64_t kBlockVBytes = 64 << 10;
// Split-KV: a chunk holds at least this many bytes of K (so the per-chunk fixed cost stays
// small) and a sequence is cut into at most kMaxChunks chunks. Both depend only on Sk and D.
constexpr int64_t kMinChunkBytes = 64 << 10;
constexpr int64_t kMaxChunks = 16;
// Items (batch x kv heads) below which the keys are split.
constexpr int64_t kSplitBelowGroups = 8;

int64_t chunk_keys(int64_t sk, int64_t d) {
  const int64_t min_keys = round_up(imax(1, kMinChunkBytes / (d * 4)), kKeyBlock);
  return imax(min_keys, round_up(ceil_div(sk, kMaxChunks), kKeyBlock));
}

struct DecodeItem {
  int64_t b, g0, ng;  // batch, first KV head, KV heads
  int64_t chunk;      // key chunk, or -1: all keys
  int64_t cost;
};


// Per-thread scratch, carved from one allocation (a decode call is short: a dozen separate
// allocations per thread were ~10k instructions of malloc, a quarter of a tiny call). acc and
// wgt serve the split combine; q8, qs, qcorr the int8 cache's quantized q.
struct DecodeWork {
  Scratch<float> all;
  float *qf = nullptr, *s = nullptr, *o = nullptr, *m = nullptr, *l = nullptr, *add = nullptr;
  float *vs = nullptr;  // 8-bit V rows' scales of one key block, per head
  float *acc = nullptr, *wgt = nullptr;
  float* qs = nullptr;          // int8 caches: each q row's scale (1 for an unquantized row)
  int8_t* q8 = nullptr;         // and its codes, rows of q8_stride(D) bytes, zero-padded
  int32_t* qcorr = nullptr;     // 128 x the sum of a row's codes (dot_i8.h)
  uint16_t* qb = nullptr;       // bf16_q: the q rows' bf16 bits, rows of qb_stride(D)
  uint32_t* pp = nullptr;       // code_pairs: P rows as pair words, rows of kPairStride
  // Sizes in floats, each rounded up to a cache line so every part stays 64-byte aligned.
  bool init(int64_t rows, int64_t D, int64_t Dvp, int64_t vs_count, int64_t Dv, int64_t nchunks,
            bool quantized_q, bool with_qb, bool pairs) {
    const int64_t qrows = quantized_q ? rows : 0;
    const int64_t sizes[14] = {rows * D, rows * kKeyBlock, rows * Dvp, rows, rows, kKeyBlock,
                               vs_count, Dv, nchunks, qrows, qrows * q8_stride(D) / 4, qrows,
                               with_qb ? rows * qb_stride(D) / 2 : 0, pairs ? rows * kPairStride : 0};
    float* parts[14];
    int64_t total = 0;
    for (int64_t n : sizes) total += round_up(imax(n, 1), 16);
    if (!all.reset(size_t(total))) return false;
    float* at = all.get();
    for (int i = 0; i < 14; ++i) {
      parts[i] = at;
      at += round_up(imax(sizes[i], 1), 16);
    }
    qf = parts[0], s = parts[1], o = parts[2], m = parts[3], l = parts[4], add = parts[5];
    vs = parts[6], acc = parts[7], wgt = parts[8], qs = parts[9];
    q8 = reinterpret_cast<int8_t*>(parts[10]);
    qcorr = reinterpret_cast<int32_t*>(parts[11]);
    qb = reinterpret_cast<uint16_t*>(parts[12]);
    pp = reinterpret_cast<uint32_t*>(parts[13]);
    return true;
  }
};

// The per-key-block stages (scores, the V scales, O += P V, both walks): decode_stages.h.

template <class SQ, class SKV>
void run_item(const AttentionParams& p, const DecodeItem& it, int64_t chunk_len, bool seq, DecodeWork& w,
              float* part_m, float* part_l, float* part_o) {
  const SeqView sv = seq_view(p, it.b);
  const int64_t G = p.num_heads / p.num_kv_heads, sq = sv.sq, rph = G * sq, R = it.ng * rph;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Dvp = round_up(Dv, VF::N);
  float *qf = w.qf, *S = w.s, *O = w.o, *m = w.m, *l = w.l;
  const SQ* Q = typed<SQ>(p.q);
  int64_t lo_min = sv.sk, hi_max = -1;
  for (int64_t r = 0; r < R; ++r) {
    const RowId id = row_id(it.g0, G, sq, r);
    const SQ* qr = Q + q_offset(p, sv, id.h, id.i);
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_f32(qr[d]);
    if constexpr (bf16_dots<SQ, SKV>)
      for (int64_t d = 0; d < qb_stride(D); ++d) w.qb[r * qb_stride(D) + d] = d < D ? qr[d].bits : 0;
    if constexpr (code_pairs<SKV>) round_q_rows(qf + r * D, D, w.qb + r * qb_stride(D), qb_stride(D));
    m[r] = kNegInfF;
    l[r] = 0.0f;
    for (int64_t d = 0; d < Dvp; ++d) O[r * Dvp + d] = 0.0f;
    const KeyRange kr = key_range(p, sv, id.i);
    if (kr.lo > kr.hi) continue;
    lo_min = imin(lo_min, kr.lo);
    hi_max = imax(hi_max, kr.hi);
  }
  int64_t k_begin = 0, k_end = sv.sk;
  if (it.chunk >= 0) {
    k_begin = it.chunk * chunk_len;
    k_end = imin(sv.sk, k_begin + chunk_len);
  }
  k_begin = imax(k_begin, lo_min);
  k_end = imin(k_end, hi_max + 1);
  const int8_t* q8 = nullptr;  // int8 caches: quantize q (see kMaxQuantizedD)
  if constexpr (std::is_same<SKV, int8_t>::value) {
    bool dots = false;
    if (D <= kMaxQuantizedD)
      dots = quantize_q_rows(qf, R, D, w.qs, w.q8, w.qcorr);
    else
      for (int64_t r = 0; r < R; ++r) w.qs[r] = 1.0f;
    if (dots && kHasDotI8) q8 = w.q8;
  }
  const int64_t lds = kKeyBlock;
  BlockRows br;
  // Heads of a key block in groups whose V rows (prefetched by `scores`, read back by
  // accumulate_pv) fit in kBlockVBytes: with 32 heads of an fp16 cache one block's V is 512 KB,
  // and its prefetches evicted each other before use (bench/notes/decode.md, "V prefetch budget").
  // Every row is computed exactly as without groups.
  // (seq: the walk in address order, decode_typed; it reads every head of a key block in one
  // group, and prefetches nothing.)
  const int64_t hg = seq ? it.ng : imax(1, imin(it.ng, kBlockVBytes / (kKeyBlock * Dv * int64_t(sizeof(SKV)))));
  for (int64_t j0 = k_begin; j0 < k_end; j0 += kKeyBlock) {
    const int64_t n = imin(kKeyBlock, k_end - j0);
    block_rows<SKV>(p, sv, j0, n, br);
    for (int64_t t0 = 0; t0 < it.ng; t0 += hg) {
      const int64_t g0 = it.g0 + t0, ng = imin(hg, it.ng - t0), r0 = t0 * rph;
      float* St = S + r0 * lds;
      float* Ot = O + r0 * Dvp;
      float* vst = w.vs + t0 * kKeyBlock;
      const int8_t* q8t = q8 ? q8 + r0 * q8_stride(D) : nullptr;
      const uint16_t* qbt = bf16_q<SQ, SKV> ? w.qb + r0 * qb_stride(D) : nullptr;
      if (seq)
        scores_seq<SKV>(p, g0, ng, n, br, qf + r0 * D, q8t, w.qcorr + r0, qbt, St, lds);
      else
        scores<SKV>(p, sv, g0, ng, rph, j0, n, k_end, br, qf + r0 * D, q8t, w.qcorr + r0, qbt, St, lds);
      if constexpr (is_code<SKV>)
        apply_k_scales<SKV>(p, g0, ng, rph, n, br, std::is_same<SKV, int8_t>::value ? w.qs + r0 : w.qs, St,
                            lds, vst);
      // rows r0.. in row_id's order, counted: no divisions per row and block (with the other
      // trims of bench/notes/decode.md, "decode: the per-block overheads", 1-4% of a GQA call)
      for (int64_t h = g0 * G, r = r0; h < (g0 + ng) * G; ++h)
        for (int64_t i = 0; i < sq; ++i, ++r) {
          const auto rc = row_ctx(p, sv, h, i, j0, n, w.add);
          row_update(rc, S + r * lds, m + r, l + r, O + r * Dvp, Dvp);
        }
      if constexpr (is_code<SKV>) scale_p_by_v_rows(ng, rph, n, St, lds, vst);
      if (seq)
        pv_seq<SKV>(p, sv, g0, ng, j0, n, br, St, lds, Ot, Dvp);
      else
        accumulate_pv<SKV>(p, sv, g0, ng, rph, j0, n, br, St, lds, Ot, Dvp, w.pp);
    }
  }
  if (part_o) {  // split: leave the chunk's partial result
    for (int64_t r = 0; r < R; ++r) {
      part_m[r] = m[r];
      part_l[r] = l[r];
      for (int64_t d = 0; d < Dv; ++d) part_o[r * Dv + d] = O[r * Dvp + d];
    }
    return;
  }
  SQ* out = static_cast<SQ*>(p.out);
  for (int64_t r = 0; r < R; ++r) {
    const RowId id = row_id(it.g0, G, sq, r);
    // l == 0: no allowed key (0, lse -inf); a NaN l (non-finite attended entry) gives NaN.
    const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];
    SQ* orow = out + out_offset(p, sv, id.h, id.i, p.out_stride);
    for (int64_t d = 0; d < Dv; ++d) from_f32(O[r * Dvp + d] * inv, orow + d);
    if (p.lse)
      p.lse[out_offset(p, sv, id.h, id.i, p.lse_stride)] = l[r] == 0.0f ? kNegInfF : m[r] + logf(l[r]);
  }
}

// Combine the chunk partials of one item family (b, g0..g0+ng) in chunk order; partial c of
// row r is at [c * stride + r].
template <class SQ>
void combine(const AttentionParams& p, const DecodeItem& it, int64_t nchunks, int64_t stride,
             const float* pm, const float* pl, const float* po, float* acc, float* wgt) {
  const SeqView sv = seq_view(p, it.b);
  const int64_t G = p.num_heads / p.num_kv_heads, sq = sv.sq, R = it.ng * G * sq;
  const int64_t Dv = p.head_dim_v;
  SQ* out = static_cast<SQ*>(p.out);
  for (int64_t r = 0; r < R; ++r) {
    const RowId id = row_id(it.g0, G, sq, r);
    float M = kNegInfF;
    for (int64_t c = 0; c < nchunks; ++c) M = pm[c * stride + r] > M ? pm[c * stride + r] : M;
    float L = 0.0f;
    for (int64_t c = 0; c < nchunks; ++c) {
      // A chunk with no allowed key (l = 0, m = -inf) weighs 0; so does everything when M is
      // -inf (the row saw no key at all). A NaN in a chunk (its l or m) makes L NaN, so the
      // row is NaN as if it had not been split (the max above may drop a NaN m; l keeps it).
      wgt[c] = pl[c * stride + r] == 0.0f ? 0.0f : expf(pm[c * stride + r] - M);
      L += pl[c * stride + r] * wgt[c];
    }
    for (int64_t d = 0; d < Dv; ++d) acc[d] = 0.0f;
    for (int64_t c = 0; c < nchunks; ++c) {
      // Skip only chunks without an allowed key: one whose weight underflowed still adds
      // 0 * O, which keeps a NaN its O holds (from an attended NaN value).
      if (pl[c * stride + r] == 0.0f) continue;
      const float* o = po + (c * stride + r) * Dv;
      const VF wc = VF::set1(wgt[c]);
      int64_t d = 0;
      for (; d + VF::N <= Dv; d += VF::N) fma(VF::load(o + d), wc, VF::load(acc + d)).store(acc + d);
      for (; d < Dv; ++d) acc[d] += o[d] * wgt[c];
    }
    const float inv = L == 0.0f ? 0.0f : 1.0f / L;
    SQ* orow = out + out_offset(p, sv, id.h, id.i, p.out_stride);
    for (int64_t d = 0; d < Dv; ++d) from_f32(acc[d] * inv, orow + d);
    if (p.lse) p.lse[out_offset(p, sv, id.h, id.i, p.lse_stride)] = L == 0.0f ? kNegInfF : M + logf(L);
  }
}

template <class SQ, class SKV>
Status decode_typed(const AttentionParams& p) {
  if (p.batch == 0 || p.num_heads == 0 || p.seqlen_q == 0) {  // no query rows: no scratch
    append_new_rows(p);  // (a cache append still happens)
    return Status::ok;
  }
  const int64_t G = p.num_heads / p.num_kv_heads;
  // Position-major caches (head stride below row stride) are walked position by position with
  // all KV heads in one item; head-major ones one KV head per item.
  const bool position_major = p.num_kv_heads > 1 && p.k_stride[1] < p.k_stride[2];
  const bool may_split = position_major || p.batch * p.num_kv_heads < kSplitBelowGroups;
  // Chunks are sized from the longest sequence actually attended (a KV cache's lengths, not
  // its capacity: 2k tokens in a 32k-position cache must not be cut into 32k-sized chunks,
  // most of them empty). The length depends on the inputs' shapes and lengths only, never on
  // the thread count, so results stay bit-identical for any number of threads.
  int64_t longest = 0, total_keys = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t sk = seq_view(p, b).sk;
    longest = imax(longest, sk);
    total_keys += sk;
  }
  const int64_t clen = chunk_keys(imax(1, longest), p.head_dim);
  const int64_t nchunks = may_split ? ceil_div(imax(1, longest), clen) : 1;
  // One chunk is no split: its item writes the output itself (the combine of one partial was
  // a third of a short call's instructions and gives the same bits).
  const bool split = nchunks > 1;
  const int nt = threads_for(total_keys * p.num_kv_heads * (p.head_dim + p.head_dim_v), p.num_threads);
  // An item is one KV head of a head-major cache. In a position-major one it is a set of
  // adjacent KV heads, walked position by position: all of them, unless that leaves fewer
  // than two items per thread (short sequences: one chunk of 128 keys was one item, so one
  // thread did all the work). Heads are independent, so how they are grouped never changes a
  // result; only the key chunks do, and those do not depend on the thread count.
  int64_t heads_per_item = 1;
  if (position_major) {
    const int64_t per_head_set = p.batch * nchunks;
    const int64_t sets_wanted = imin(p.num_kv_heads, ceil_div(2 * int64_t(nt), per_head_set));
    heads_per_item = imax(1, p.num_kv_heads / imax(1, sets_wanted));  // at least sets_wanted sets
  }
  // One query row per KV head (MHA decode) over a position-major cache of 16-bit or 8-bit
  // values (fp32 too on avx2 and scalar: kFloatInAddressOrder): the items read K and V
  // in address order (scores_seq, pv_seq). The choice depends on the shapes, the dtypes and the
  // variant only, never on the thread count (which sets heads_per_item).
  const bool seq = (kFloatInAddressOrder || !std::is_same<SKV, float>::value) && position_major &&
                   G * p.seqlen_q == 1 && p.num_kv_heads >= 4 && p.v_stride[1] < p.v_stride[2];
  const int64_t sets = ceil_div(p.num_kv_heads, heads_per_item);
  const int64_t rows_max = heads_per_item * G * p.seqlen_q, Dv = p.head_dim_v;
  const int64_t n_items = p.batch * sets * nchunks;
  Scratch<DecodeItem> items;
  Scratch<int64_t> prefix;
  // Split partials of every item, one allocation: m and l (rows_max each), O (rows_max x Dv).
  Scratch<float> partials;
  if (!items.reset(size_t(n_items)) || !prefix.reset(size_t(n_items + 1))) return Status::out_of_memory;
  if (split && !partials.reset(size_t(n_items * rows_max * (2 + Dv)))) return Status::out_of_memory;
  float* pm = partials.get();
  float* pl = pm ? pm + n_items * rows_max : nullptr;
  float* po = pm ? pl + n_items * rows_max : nullptr;
  int64_t n = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqView sv = seq_view(p, b);
    for (int64_t st = 0; st < sets; ++st)
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t keys = split ? imax(0, imin(clen, sv.sk - c * clen)) : sv.sk;
        const int64_t g0 = st * heads_per_item, ng = imin(heads_per_item, p.num_kv_heads - g0);
        const int64_t kv_bytes = keys * ng * (p.head_dim + Dv) * 4;
        items[n++] = {b, g0, ng, split ? c : -1, 1 + kv_bytes / 256};
      }
  }
  prefix[0] = 0;
  for (int64_t i = 0; i < n_items; ++i) prefix[i + 1] = prefix[i] + items[i].cost;
  AttentionPlanRecord rec;
  rec.kernel = 2;
  rec.split = split;
  rec.num_chunks = nchunks;
  rec.chunk_keys = split ? clen : longest;
  rec.items = n_items;
  rec.threads = nt;
  rec.address_order = seq;
  debug_record_attention_plan(rec);
  std::atomic<bool> failed{false};
  const int64_t D = p.head_dim, Dvp = round_up(Dv, VF::N);
  parallel_team(nt, [&] {
    const int tid = thread_id(), team = team_size();
    int64_t begin, end;
    cost_split(prefix.get(), n_items, tid, team, &begin, &end);
    // Phase 1: every thread allocates all it will need; phase 2 runs only if all of them
    // succeeded, so a failed allocation leaves out (and lse) untouched.
    DecodeWork w;
    if ((begin < end || split) &&
        !w.init(rows_max, D, Dvp, is_code<SKV> ? heads_per_item * kKeyBlock : 0, Dv, nchunks,
                std::is_same<SKV, int8_t>::value, bf16_q<SQ, SKV>, code_pairs<SKV>))
      failed = true;
#pragma omp barrier
    // `failed` is only written before the barrier: every thread reads the same value here, so
    // they all skip, or all reach, the worksharing loop below.
    if (!failed.load()) {
      if (p.n_new > 0) {
#pragma omp single
        append_new_rows(p);  // the implied barrier: every thread then sees the new rows
      }
      for (int64_t i = begin; i < end; ++i)
        run_item<SQ, SKV>(p, items[i], clen, seq, w, split ? pm + i * rows_max : nullptr,
                          split ? pl + i * rows_max : nullptr,
                          split ? po + i * rows_max * Dv : nullptr);
      if (split) {
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t f = 0; f < p.batch * sets; ++f) {
          const int64_t i0 = f * nchunks;
          combine<SQ>(p, items[i0], nchunks, rows_max, pm + i0 * rows_max,
                      pl + i0 * rows_max, po + i0 * rows_max * Dv, w.acc, w.wgt);
        }
      }
    }
  });
  return failed ? Status::out_of_memory : Status::ok;
}

template <class SQ>
Status decode_kv(const AttentionParams& p) {
#if defined(ATTNKIT_ISA_AVX512_VNNI)
  // This variant's table sends int8 caches only here (kernel_table.cpp).
  return p.kv_dtype == DType::i8 ? decode_typed<SQ, int8_t>(p) : Status::invalid_argument;
#elif defined(ATTNKIT_ISA_AVX512_BF16)
  // This variant's attention_fwd sends bf16 q over bf16 caches (bf16_dots) and e4m3 caches
  // (code_pairs) only here.
  if constexpr (std::is_same<SQ, bf16_t>::value)
    if (p.kv_dtype == DType::bf16) return decode_typed<SQ, bf16_t>(p);
  if (p.kv_dtype == DType::f8e4m3) return decode_typed<SQ, f8e4m3_t>(p);
  return Status::invalid_argument;
#else
  switch (p.kv_dtype) {
    case DType::f32:
      return decode_typed<SQ, float>(p);
    case DType::f16:
      return decode_typed<SQ, f16_t>(p);
    case DType::bf16:
      return decode_typed<SQ, bf16_t>(p);
    case DType::i8:
      return decode_typed<SQ, int8_t>(p);
    case DType::f8e4m3:
      return decode_typed<SQ, f8e4m3_t>(p);
    default:
      return Status::invalid_argument;
  }
#endif
}

}  // namespace

bool decode_applies(const AttentionParams& p) {
  if (p.q_dtype == DType::f64 || p.kv_dtype == DType::f64) return false;
  if (p.dropout_p > 0.0f) return false;  // training shapes: the prefill kernel applies dropout
  const int64_t G = p.num_heads / p.num_kv_heads;
  return p.seqlen_q <= kMaxQueryRows && G * p.seqlen_q <= kMaxRows;
}

Status attention_decode(const AttentionParams& p) {
  switch (p.q_dtype) {
    case DType::f32:
      return decode_kv<float>(p);
    case DType::f16:
      return decode_kv<f16_t>(p);
    case DType::bf16:
      return decode_kv<bf16_t>(p);
    default:
      return Status::invalid_argument;
  }
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
