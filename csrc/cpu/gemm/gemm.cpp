// Packed GEMM, BLIS style (ARCHITECTURE.md rule 5). Compiled once per ISA.
//
// Products with both operands packed run in the shared-A order (gemm_shared_a): BLIS's loop
// order with the roles of A and B exchanged, because with row-major C the micro-kernel loads
// B as vectors and broadcasts A. The broadcast operand's micro-panel stays in L1 and the
// vector operand's panels stream from a block in the core's own L2:
//
//   for ic in M by NC (rows)               A block (NC x KC), packed once per k-block by all
//     for pc in K by KC                    threads (two alternating buffers: one barrier per
//                                          k-block); k-blocks equal, of at most KC (balanced_kc)
//       pack this thread's share of A
//       for jc in the thread's columns by NB   B block (KC x NB, half the L2) packed by the
//                                              thread that uses it
//         for ir in the thread's rows: for jr: micro-kernel   C (+)= A_panel * B_panel
//
// Products that read A or B in place (small, or few rows: bandwidth-bound) run in the
// shared-B order (gemm_blocked): B blocks (KC x NC) shared by the threads, A blocks (MC x KC)
// per thread, the A micro-panels streaming under a fixed B micro-panel.
//
// KC, MC, NC, NB come from the CPU's caches at run time (gemm/blocking.h). The micro-kernel
// itself is not the limit (fp32, one Emerald Rapids core, operands in L1: 173 GFLOP/s);
// what the loops around it lose is cache traffic and packing (bench/notes/matmul.md, "fp32
// GEMM on Emerald Rapids", "the shared-A order").
//
// Every C element is accumulated in the same order (k-blocks in order, k within a block in
// order) whatever the thread count, the split or the loop order, so results are bit-identical
// across thread counts. Small or skinny problems read A and/or B in place when their layout
// allows it: for M = 1..16 with K = N = 4096 packing B would triple the memory traffic of a
// bandwidth-bound problem. Half-precision operands are converted to fp32 while packing; their C (and any C
// whose columns are strided) is accumulated in an fp32 workspace and converted at the end.
#include <cstring>
#include <atomic>
#include <type_traits>

#include "common.h"
#include "gemm/blocking.h"
#include "gemm/pack.h"
#include "gemm/ukernel.h"
#include "threading.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace {

// Below this many multiply-adds a matmul runs on one thread (~5 us of work).
constexpr int64_t kSerialMacs = int64_t(1) << 18;
// At most this many multiply-adds, operands are read in place instead of packed.
constexpr int64_t kSmallMacs = int64_t(1) << 21;
// Depth of a k-block when a skinny product streams B in place: each k-block walks kc rows of
// B side by side, and fewer rows means fewer concurrent streams for the prefetchers. Measured
// (bench/notes/matmul.md, M x 4096 x 4096, avx512): kc 256 -> 8.6 GFLOP/s at M=1, 31 at M=16;
// kc 16 -> 12.7 and 83; kc 8 -> 16 and 66. Tiny M takes 8 (memory-bound), larger M 16.
inline int64_t skinny_kc(int64_t m) { return m <= 4 ? 8 : 16; }
constexpr int64_t kSkinnyPrefetchPanels = 8;

// Few rows read B in place instead of packing it (packing reads and writes all of B once
// more): always up to kSkinnyRows rows, and up to kSkinnyRowsLargeB when B is larger than
// kLargeBL2s L2s. Measured on Emerald Rapids (2 threads, bench/notes/matmul.md, "GEMM: few rows"):
// 32 x 4096 x 4096 (B 64 MB) 140-155 GFLOP/s in place vs 90-120 packed, 32 x 2048 x 2048 (16 MB)
// 98-122 vs 138-151, 40-64 x 4096 x 4096 121-156 vs 137-176.
constexpr int64_t kSkinnyRows = 24, kSkinnyRowsLargeB = 36, kLargeBL2s = 16;
inline bool reads_b_in_place_skinny(int64_t m, int64_t k, int64_t n, int64_t elem_bytes) {
  return m <= kSkinnyRows ||
         (m <= kSkinnyRowsLargeB && k * n * elem_bytes > kLargeBL2s * cache_sizes().l2);
}

// Columns rather than rows are split among the threads (threading.h, gemm_share) for a wide
// product (more columns than rows) whose row split would leave each thread fewer than two MC
// blocks of rows: there every thread read every packed B block, half of it written by the other
// core, and the row shares ended in unequal edge panels; a column split keeps each thread's B
// panels in its own L2. Emerald Rapids, 2 threads (bench/notes/matmul.md, "GEMM: few rows"):
// 128 x 4096 x 4096 185 -> 228 GFLOP/s, 64 x 4096 x 4096 (packed) 132 -> 180, 512 x 4096 x 4096
// 218-248 -> 257-259. Square products of 256-1000 were within the (large) noise either way, so
// they keep the row split.
inline bool split_columns(int64_t m, int64_t n, int64_t n_panels, int64_t mc, int team) {
  return team > 1 && m < 2 * mc * team && n > m && n_panels >= 2 * team;
}

// In the shared-A order, up to 3 threads share the columns of a product at least as wide as it
// is tall: each packs only the B columns it uses and reads all of the shared A block, each A
// micro-panel serving the thread's share of columns from L1. A taller product shares the rows:
// each thread then packs all of B (the smaller operand) and its A micro-panels serve every
// column. From 4 threads on, the 2-D grid of gemm_grid_rows.
inline bool split_columns_shared_a(int64_t m, int64_t n, int64_t n_panels, int team) {
  return team > 1 && team < 4 && n > m && n_panels >= 2 * team;
}

// Depth of the packed k-blocks: the fewest blocks of at most kc_max, of equal depth (rounded
// up to 16), so that no thin last block pays a whole pass over C for little work (K = 512
// with KC = 384: 2 x 256, not 384 + 128). A function of K and the machine only, so every C
// element gets the same sums on any thread count.
inline int64_t balanced_kc(int64_t k, int64_t kc_max) {
  const int64_t blocks = imax(1, ceil_div(k, kc_max));  // K = 0 records 0
  return imin(kc_max, round_up(ceil_div(k, blocks), 16));
}

template <class T, class S>
struct GemmArgs {
  const S* a;
  const S* b;
  T* c;  // compute-type C: the output itself or the workspace
  int64_t m, n, k;
  int64_t rs_a, cs_a, rs_b, cs_b, ldc;
};

// How one product's loops run: which operands are read in place, the block steps, and whether
// threads split the columns. A function of the shape, the layout, the machine and the team
// size; only kc_step changes sums, and it never depends on the team.
struct LoopPlan {
  bool direct_a, direct_b;  // A / B read in place (no packing)
  bool shared_a;            // both packed: the shared-A order (gemm_shared_a)
  bool skinny;              // few rows: B streamed in place in shallow k-blocks
  bool prefetch_b_rows;     // GEMV-like: prefetch the in-place B rows ahead (below)
  bool split_columns;       // threads share columns, not rows (gemm_share)
  int grid_rows;            // thread rows of the grid (threading.h, gemm_grid_rows)
  int64_t nc_step, kc_step;
};

template <class T, class S>
LoopPlan plan_loops(int64_t m, int64_t n, int64_t k, int64_t cs_a, int64_t cs_b, int team) {
  using B = Blocking<T>;
  const GemmBlocks& blk = gemm_blocks<T>();
  constexpr bool same = std::is_same<S, T>::value;
  LoopPlan lp;
  lp.skinny = reads_b_in_place_skinny(m, k, n, sizeof(S));
  const bool small = m * n * k <= kSmallMacs;
  lp.direct_a = same && cs_a == 1 && (small || lp.skinny);
  lp.direct_b = same && cs_b == 1 && (small || lp.skinny);
  // NC budgets a packed B block. A skinny product's B, read in place, takes every column in
  // one block: each k-block then streams whole rows (NC = 2048 on a 48 KB-L1d Xeon cut
  // 4096-wide rows into 8 KB runs, and M = 1..64 x 4096 x 4096 lost 3-13%).
  const bool streams_b = lp.direct_b && lp.skinny;
  lp.nc_step = streams_b ? n : blk.nc;
  lp.kc_step = streams_b ? skinny_kc(m) : balanced_kc(k, blk.kc);
  // Products of at most 4 rows (k-blocks of 8 rows of B read in place) prefetch each row's
  // panel kSkinnyPrefetchPanels ahead: 8 streams of B rows 16 KB apart were more than the
  // hardware prefetchers kept up with (1 x 4096 x 4096: 1.81-1.95 -> 1.58-1.61 ms, Emerald
  // Rapids, bench/notes/matmul.md, "GEMV prefetch").
  lp.prefetch_b_rows = streams_b && m <= 4;
  // Both operands packed: the shared-A order, unless the product is taller than wide and all
  // of N fits one NB block. There the shared-B order's B block already sits in each L2 and is
  // packed once for all threads, where the shared-A order packs B once per thread and reads
  // its A rows back from L3 (Emerald Rapids, 2 threads: 4096 x 1024 x 640 272 vs 265 GFLOP/s,
  // 4096 x 4096 x 512 285 vs 271; bench/notes/matmul.md, "the shared-A order").
  lp.shared_a = !lp.direct_a && !lp.direct_b && !(m > n && n <= blk.nb);
  const int64_t n_panels = ceil_div(lp.shared_a ? n : imin(n, lp.nc_step), B::NR);
  lp.split_columns = lp.shared_a ? split_columns_shared_a(m, n, n_panels, team)
                                 : split_columns(m, n, n_panels, blk.mc, team);
  lp.grid_rows = gemm_grid_rows(ceil_div(m, B::MR), B::MR, n_panels, B::NR, team, lp.split_columns);
  return lp;
}

// Products of at most 4 rows with A and B in place (GEMV-like): the whole NR-column panels of
// a k-block in one tight loop, each panel's rows prefetched kSkinnyPrefetchPanels panels ahead.
// The micro-kernel calls of the general loop below in the same order (the same sums), without
// its per-panel bookkeeping: 1 x 4096 x 4096 1.55 -> 1.44 ms, 4 x 4096 x 4096 2.16 -> 1.96
// (Emerald Rapids, 2 threads, bench/notes/matmul.md, "GEMV: panels in one loop").
template <class T, int M>
void stream_panels(int64_t kc, const T* a, int64_t rs_a, const T* b, int64_t ldb, T* c,
                   int64_t ldc, bool accumulate, int64_t panels) {
  static_assert(M <= Blocking<T>::MR, "the micro-kernel's row count");
  constexpr int64_t NR = Blocking<T>::NR;
  for (int64_t jp = 0; jp < panels; ++jp) {
    const T* bp = b + jp * NR;
    if (jp + kSkinnyPrefetchPanels < panels)
      for (int64_t kk = 0; kk < kc; ++kk)
        for (int64_t o = 0; o < NR; o += 64 / int64_t(sizeof(T)))
          __builtin_prefetch(bp + kk * ldb + kSkinnyPrefetchPanels * NR + o, 0, 3);
    ukernel<T, M, false>(kc, a, rs_a, bp, ldb, c + jp * NR, ldc, accumulate, int(NR));
  }
}
template <class T>
void stream_panels_rows(int m, int64_t kc, const T* a, int64_t rs_a, const T* b, int64_t ldb,
                        T* c, int64_t ldc, bool accumulate, int64_t panels) {
  switch (m) {
    case 1: return stream_panels<T, 1>(kc, a, rs_a, b, ldb, c, ldc, accumulate, panels);
    case 2: return stream_panels<T, 2>(kc, a, rs_a, b, ldb, c, ldc, accumulate, panels);
    case 3: return stream_panels<T, 3>(kc, a, rs_a, b, ldb, c, ldc, accumulate, panels);
    case 4: return stream_panels<T, 4>(kc, a, rs_a, b, ldb, c, ldc, accumulate, panels);
  }
}

// Rows of the shared A block of one product: all of M up to NC rows (the L3 budget that the
// shared-B order gives its B block), whole micro-panels.
template <class T>
int64_t shared_a_rows(int64_t m) {
  return imin(round_up(m, Blocking<T>::MR), round_up(gemm_blocks<T>().nc, Blocking<T>::MR));
}

// The rows of a shared A block are split among the thread rows of the grid in quanta of this
// many rows, not in whole MR-row panels: each thread row's last panel is shorter instead of
// one thread getting a whole extra panel (512 rows = 43 panels of 12 went 22 / 21 to two
// threads: ~5% of the product waiting at the end). A panel's height never changes its sums.
constexpr int64_t kRowQuantum = 4;

// Rows of one shared A block buffer: the block's panels, plus one panel per thread row (each
// thread row's panels start where its rows of a full block start, r0 / MR, plus its index:
// past every earlier row's).
template <class T>
int64_t shared_a_buffer_rows(int64_t m, int team) {
  return shared_a_rows<T>(m) + int64_t(team) * Blocking<T>::MR;
}

// The shared-A order (top of this file). Measured against the shared-B order on Emerald Rapids
// (bench/notes/matmul.md, "the shared-A order"): 2048^3 fp32 264-271 -> 292-293 GFLOP/s at 2
// threads, 140-145 -> 151-154 at 1 thread.
template <class T, class S>
void gemm_shared_a(const GemmArgs<T, S>& g, int nt, T* apack_all, T* bpack_all) {
  using B = Blocking<T>;
  constexpr int MR = B::MR, NR = B::NR;
  const GemmBlocks& blk = gemm_blocks<T>();
  const int64_t m = g.m, n = g.n, k = g.k;
  const int64_t a_rows = shared_a_rows<T>(m), buffer_rows = shared_a_buffer_rows<T>(m, nt);

  parallel_team(nt, [&] {
    const int tid = thread_id(), team = team_size();
    const LoopPlan lp = plan_loops<T, S>(m, n, k, g.cs_a, g.cs_b, team);
    const int64_t kc_step = lp.kc_step;
    const int tm = lp.grid_rows, tn = team / tm;
    T* bpack = bpack_all + int64_t(tid) * blk.kc * blk.nb;
    int64_t cbeg, cend;
    split_range(ceil_div(n, NR), tn, tid % tn, &cbeg, &cend);
    const int64_t col0 = cbeg * NR, col1 = imin(cend * NR, n);
    // A blocks alternate between two buffers (one for a single thread): a block is packed while
    // slower threads may still compute on the previous one, and a buffer is repacked two blocks
    // later, once every thread has passed the barrier of the block in between.
    int64_t block_index = 0;
    // A row group's panels start at panel rbeg of either buffer in every block: where its rows
    // of a full block start (r0 / MR, plus one panel per earlier row group). A shorter last
    // block gives each group at most as many panels from the same start, so a group only ever
    // rewrites its own panels. (With a single-column grid there is no barrier: panels placed
    // by the short block's own split landed in a range another thread could still be reading
    // two blocks back; m = 6256 on a 3 x 1 grid gave wrong rows in ~1% of products.)
    int64_t f0, f1;
    split_range(ceil_div(a_rows, kRowQuantum), tm, tid / tn, &f0, &f1);
    const int64_t rbeg = f0 * kRowQuantum / MR + tid / tn;
    for (int64_t ic = 0; ic < m; ic += a_rows) {
      const int64_t mc = imin(a_rows, m - ic);
      // This row group's rows [r0, r1) of the block, in quanta of kRowQuantum rows, and its
      // panels (the last one shorter) from panel index rbeg of the buffer.
      int64_t q0, q1;
      split_range(ceil_div(mc, kRowQuantum), tm, tid / tn, &q0, &q1);
      const int64_t r0 = imin(q0 * kRowQuantum, mc), r1 = imin(q1 * kRowQuantum, mc);
      const int64_t rend = rbeg + ceil_div(r1 - r0, MR);
      for (int64_t pc = 0; pc < k; pc += kc_step) {
        const int64_t kc = imin(kc_step, k - pc);
        const bool accumulate = pc > 0;
        T* apack = apack_all + (team > 1 ? block_index++ % 2 : 0) * buffer_rows * blk.kc;
        // The threads of a row group (same rows, different columns) pack its panels together.
        // Panels sit kc_step deep whatever this block's depth: with a single-column grid there
        // is no barrier, and a thread's panels of a shallower last block must not reach into
        // the panels another thread may still be reading two blocks back.
        int64_t pbeg, pend;
        split_range(rend - rbeg, tn, tid % tn, &pbeg, &pend);
        for (int64_t p = pbeg; p < pend; ++p) {
          const int64_t row = r0 + p * MR;
          pack_a_panel<T, S>(g.a + (ic + row) * g.rs_a + pc * g.cs_a, g.rs_a, g.cs_a,
                             int(imin(MR, r1 - row)), kc, apack + (rbeg + p) * MR * kc_step);
        }
        if (tn > 1) {  // (every thread of the team takes the same branch)
#pragma omp barrier
        }
        for (int64_t jc = col0; jc < col1; jc += blk.nb) {
          const int64_t nc = imin(blk.nb, col1 - jc);
          pack_b_block<T, S>(g.b + pc * g.rs_b + jc * g.cs_b, g.rs_b, g.cs_b, kc, nc, bpack);
          for (int64_t p = rbeg; p < rend; ++p) {
            const int64_t row = r0 + (p - rbeg) * MR;
            const int mr = int(imin(MR, r1 - row));
            const T* ap = apack + p * MR * kc_step;
            T* cp = g.c + (ic + row) * g.ldc + jc;
            for (int64_t jp = 0; jp * NR < nc; ++jp)
              ukernel_rows<T, true>(mr, kc, ap, 0, bpack + jp * kc * NR, NR, cp + jp * NR, g.ldc,
                                    accumulate, int(imin(NR, nc - jp * NR)));
          }
        }
      }
    }
  });
}

// The shared-B order (top of this file): for jc in N by NC, for pc in K by KC, pack the B
// block (threads pack disjoint panels into one of two alternating buffers, then a barrier),
// for ic in the thread's rows by MC, pack the A block (per thread), for jr, ir: micro-kernel,
// the next B panel prefetched a slice per call. A and/or B may be read in place.
template <class T, class S>
void gemm_blocked(const GemmArgs<T, S>& g, int nt, T* bpack_all, T* apack_all, T* tail_all) {
  using B = Blocking<T>;
  constexpr int MR = B::MR, NR = B::NR;
  const GemmBlocks& blk = gemm_blocks<T>();
  const int64_t m = g.m, n = g.n, k = g.k;

  parallel_team(nt, [&] {
    const int tid = thread_id(), team = team_size();
    // (only the buffers of the operands this product packs exist: GemmBuffers)
    T* apack = apack_all ? apack_all + int64_t(tid) * blk.mc * blk.kc : nullptr;
    T* tail = tail_all ? tail_all + int64_t(tid) * blk.kc * NR : nullptr;
    const LoopPlan lp = plan_loops<T, S>(m, n, k, g.cs_a, g.cs_b, team);
    const bool direct_a = lp.direct_a, direct_b = lp.direct_b;
    const int64_t nc_step = lp.nc_step, kc_step = lp.kc_step;
    const GemmShare share = gemm_share(m, MR, tid, team, lp.grid_rows);
    const int64_t row0 = share.row0, row1 = share.row1;
    const int tj = share.tj, tn = share.tn;
    // Packed B blocks alternate between two buffers (one when the team is a single thread),
    // so a block is packed while slower threads may still read the previous one: one barrier
    // per block (packed -> readable) instead of two. A buffer is repacked two blocks later,
    // once every thread has passed the barrier of the block in between, i.e. finished with it.
    int64_t block_index = 0;
    for (int64_t jc = 0; jc < n; jc += nc_step) {
      const int64_t nc = imin(nc_step, n - jc);
      const int64_t np = ceil_div(nc, NR);
      int64_t jbeg, jend;
      split_range(np, tn, tj, &jbeg, &jend);
      for (int64_t pc = 0; pc < k; pc += kc_step) {
        const int64_t kc = imin(kc_step, k - pc);
        const bool accumulate = pc > 0;
        T* bpack = bpack_all ? bpack_all + (team > 1 ? block_index++ % 2 : 0) * blk.kc * blk.nc
                             : nullptr;
        if (!direct_b) {
          int64_t pbeg, pend;
          split_range(np, team, tid, &pbeg, &pend);
          if (pbeg < pend)
            pack_b_block<T, S>(g.b + pc * g.rs_b + (jc + pbeg * NR) * g.cs_b, g.rs_b, g.cs_b, kc,
                               imin(nc, pend * NR) - pbeg * NR, bpack + pbeg * kc * NR);
#pragma omp barrier
        }
        for (int64_t ic = row0; ic < row1; ic += blk.mc) {
          const int64_t mc = imin(blk.mc, row1 - ic);
          // Prefetch share of one micro-kernel call in the next B panel (below). Computed here:
          // two divisions per panel cost 5-10% of a skinny product's short k-blocks.
          const int64_t slice = ceil_div(kc * NR, ceil_div(mc, MR));
          if (!direct_a)
            for (int64_t ir = 0; ir < mc; ir += MR)
              pack_a_panel<T, S>(g.a + (ic + ir) * g.rs_a + pc * g.cs_a, g.rs_a, g.cs_a,
                                 int(imin(MR, mc - ir)), kc, apack + ir * kc);
          int64_t jp0 = jbeg;
          if (lp.prefetch_b_rows && direct_a) {  // m <= 4 (<= MR): whole panels, one loop
            const int64_t jfull = imin(jend, nc / NR);
            if (jfull > jbeg) {
              stream_panels_rows<T>(int(mc), kc, reinterpret_cast<const T*>(g.a) + ic * g.rs_a + pc,
                                    g.rs_a, reinterpret_cast<const T*>(g.b) + pc * g.rs_b + jc + jbeg * NR,
                                    g.rs_b, g.c + ic * g.ldc + jc + jbeg * NR, g.ldc, accumulate,
                                    jfull - jbeg);
              jp0 = jfull;
            }
          }
          for (int64_t jp = jp0; jp < jend; ++jp) {
            const int nr = int(imin(NR, nc - jp * NR));
            const T* bp;
            int64_t ldb;
            if (!direct_b) {
              bp = bpack + jp * kc * NR;
              ldb = NR;
            } else if (nr == NR) {
              bp = reinterpret_cast<const T*>(g.b) + pc * g.rs_b + jc + jp * NR;
              ldb = g.rs_b;
            } else {  // the N tail of an in-place B: pack it so full vectors can be loaded
              pack_b_panel<T, S>(g.b + pc * g.rs_b + jc + jp * NR, g.rs_b, 1, kc, nr, tail);
              bp = tail;
              ldb = NR;
            }
            T* cp = g.c + ic * g.ldc + jc + jp * NR;
            // The next packed B panel, a slice per micro-kernel call, towards L2
            const T* bnext = !direct_b && jp + 1 < jend ? bpack + (jp + 1) * kc * NR : nullptr;
            for (int64_t ir = 0; ir < mc; ir += MR) {
              const int mr = int(imin(MR, mc - ir));
              if (bnext) {
                const T* s0 = bnext + (ir / MR) * slice;
                for (int64_t o = 0; o < slice; o += 64 / sizeof(T)) __builtin_prefetch(s0 + o, 0, 2);
              }
              if (lp.prefetch_b_rows && nr == NR && ir == 0 && jp + kSkinnyPrefetchPanels < jend)
                for (int64_t kk = 0; kk < kc; ++kk)  // each row's panel 8 ahead (2 lines: fp32)
                  for (int64_t o = 0; o < NR; o += 64 / int64_t(sizeof(T)))
                    __builtin_prefetch(bp + kk * ldb + kSkinnyPrefetchPanels * NR + o, 0, 3);
              if (direct_a)
                ukernel_rows<T, false>(mr, kc, reinterpret_cast<const T*>(g.a) + (ic + ir) * g.rs_a + pc,
                                       g.rs_a, bp, ldb, cp + ir * g.ldc, g.ldc, accumulate, nr);
              else
                ukernel_rows<T, true>(mr, kc, apack + ir * kc, 0, bp, ldb, cp + ir * g.ldc, g.ldc,
                                      accumulate, nr);
            }
          }
        }
      }
    }
  });
}

// Scratch of one product: the compute-type workspace for C (when C cannot be written in
// place) and the packing buffers of `nt` threads. Allocated before anything is written, so a
// failed allocation leaves the output untouched.
template <class T>
struct GemmBuffers {
  Scratch<T> ws, bpack, apack, tail;
  bool shared_a = false;  // the loop order the buffers are laid out for
  bool init(int64_t m, int64_t n, bool direct_c, const LoopPlan& lp, int nt) {
    const GemmBlocks& blk = gemm_blocks<T>();
    shared_a = lp.shared_a;
    if (!direct_c && !ws.reset(size_t(m * n))) return false;
    const int buffers = nt > 1 ? 2 : 1;
    if (lp.shared_a)  // one shared A block per buffer, one B block per thread
      return apack.reset(size_t(buffers * shared_a_buffer_rows<T>(m, nt) * blk.kc)) &&
             bpack.reset(size_t(nt * blk.kc * blk.nb));
    // The shared-B order: only the buffers of the operands it packs (a small product reads
    // both in place and packs at most B's N tail)
    return (lp.direct_b || bpack.reset(size_t(buffers * blk.kc * blk.nc))) &&
           (lp.direct_a || apack.reset(size_t(nt * blk.mc * blk.kc))) &&
           (!lp.direct_b || tail.reset(size_t(nt * blk.kc * Blocking<T>::NR)));
  }
};

// The loop order and the operands read in place: functions of the shape and layout only (the
// team size changes the split, never these).
template <class T, class S>
LoopPlan order_of(const GemmParams& p) {
  return plan_loops<T, S>(p.m, p.n, p.k, p.cs_a, p.cs_b, 1);
}

template <class T, class S>
bool writes_c_directly(const GemmParams& p) {
  return std::is_same<S, T>::value && p.cs_c == 1;
}

// One (M, K) x (K, N) product into C with strides (rs_c, cs_c), S the storage type of a, b, c.
template <class T, class S>
void gemm_one(const S* a, const S* b, S* c, const GemmParams& p, int nt, GemmBuffers<T>& buf) {
  const int64_t m = p.m, n = p.n, k = p.k;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) store_as<T, S>(T(0), c + i * p.rs_c + j * p.cs_c);
    return;
  }
  const bool direct_c = writes_c_directly<T, S>(p);
  GemmArgs<T, S> g{a, b, direct_c ? reinterpret_cast<T*>(c) : buf.ws.get(), m, n, k,
                   p.rs_a, p.cs_a, p.rs_b, p.cs_b, direct_c ? p.rs_c : n};
  if (buf.shared_a)
    gemm_shared_a<T, S>(g, nt, buf.apack.get(), buf.bpack.get());
  else
    gemm_blocked<T, S>(g, nt, buf.bpack.get(), buf.apack.get(), buf.tail.get());
  if (!direct_c) {
    T* w = buf.ws.get();
    const int ntc = threads_for(m * n, nt);
    parallel_team(ntc, [&] {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) store_as<T, S>(w[i * n + j], c + i * p.rs_c + j * p.cs_c);
    });
  }
}

// The blocking and loop plan of this call, for the tests (debug.h).
template <class T, class S>
void record_plan(const GemmParams& p, int nt) {
  const GemmBlocks& blk = gemm_blocks<T>();
  const LoopPlan lp = plan_loops<T, S>(p.m, p.n, p.k, p.cs_a, p.cs_b, nt);
  GemmPlanRecord r;
  r.mr = Blocking<T>::MR;
  r.nr = Blocking<T>::NR;
  r.kc = lp.kc_step;
  r.kc_max = blk.kc;
  r.mc = blk.mc;
  r.nc = blk.nc;
  r.l1d = cache_sizes().l1d;
  r.l2 = cache_sizes().l2;
  r.elem_bytes = int32_t(sizeof(T));
  r.nb = blk.nb;
  r.shared_a = lp.shared_a;
  r.b_in_place = lp.direct_b;
  r.split_columns = lp.split_columns;
  r.grid_rows = lp.grid_rows;
  r.grid_cols = nt / lp.grid_rows;
  debug_record_gemm_plan(r);
}

template <class T, class S>
Status gemm_typed(const GemmParams& p) {
  const S* a = static_cast<const S*>(p.a);
  const S* b = static_cast<const S*>(p.b);
  S* c = static_cast<S*>(p.c);
  int64_t batch = 1;
  for (int d = 0; d < p.batch_ndim; ++d) batch *= p.batch_shape[d];
  const int64_t macs = p.m * p.n * p.k;
  if (batch == 0 || p.m == 0 || p.n == 0) return Status::ok;
  const int nt = (macs * batch < kSerialMacs || p.num_threads < 1) ? 1 : p.num_threads;
  const bool direct_c = writes_c_directly<T, S>(p);
  const LoopPlan order = order_of<T, S>(p);
  auto at = [&](int64_t bi, const int64_t* strides) {
    return unravel_offset(bi, p.batch_ndim, p.batch_shape, strides);
  };
  // Many small products: one product per thread at a time. Otherwise each product uses all
  // threads. Either way every product is computed by the same serial arithmetic.
  const bool per_thread_products = batch >= nt && nt > 1 && macs <= kSmallMacs * 4;
  record_plan<T, S>(p, per_thread_products ? 1 : nt);
  if (per_thread_products) {
    std::atomic<bool> failed{false};
    parallel_team(nt, [&] {
      GemmBuffers<T> buf;  // this thread's; all allocated before any product is written
      if (!buf.init(p.m, p.n, direct_c, order, 1)) failed = true;
#pragma omp barrier
      if (!failed.load()) {
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < batch; ++bi)
          gemm_one<T, S>(a + at(bi, p.a_batch_strides), b + at(bi, p.b_batch_strides),
                         c + at(bi, p.c_batch_strides), p, 1, buf);
      }
    });
    return failed ? Status::out_of_memory : Status::ok;
  }
  GemmBuffers<T> buf;
  if (!buf.init(p.m, p.n, direct_c, order, nt)) return Status::out_of_memory;
  for (int64_t bi = 0; bi < batch; ++bi)
    gemm_one<T, S>(a + at(bi, p.a_batch_strides), b + at(bi, p.b_batch_strides),
                   c + at(bi, p.c_batch_strides), p, nt, buf);
  return Status::ok;
}

}  // namespace

Status gemm(const GemmParams& p) {
  switch (p.dtype) {
    case DType::f32:
      return gemm_typed<float, float>(p);
    case DType::f64:
      return gemm_typed<double, double>(p);
    case DType::f16:
      return gemm_typed<float, f16_t>(p);
    case DType::bf16:
      return gemm_typed<float, bf16_t>(p);
    default:
      return Status::invalid_argument;
  }
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
