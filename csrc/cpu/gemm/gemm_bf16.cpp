// bf16 matmul on vdpbf16ps (the avx512_bf16 variant) or on AMX tiles (amx, amx_emulated);
// ARCHITECTURE.md, "ISA variants".
//
// BLIS-style like gemm.cpp, but A and B stay bf16: they are packed into pair words
// (gemm/pairs.h) and the micro-kernel multiplies two k per step, accumulating in fp32: 12 x 32
// broadcast products on vdpbf16ps (gemm/ukernel_bf16.h) or 32 x 32 tiles (gemm/ukernel_amx.h);
// both headers offer the same panel interface, which this file drives. C is accumulated in an
// fp32 workspace over the k-blocks and rounded to bf16 once at the end. Every C element is
// accumulated in the same order for any thread count or split.
//
// Products that gemm.cpp reads in place (small, or few rows: bandwidth-bound) and every other
// dtype go to the variant below. A call with a subnormal bf16 input anywhere in A or B goes
// there too (vdpbf16ps and TDPBF16PS would read those inputs as zero): results then match the fp32 path
// exactly. That is decided before anything is written (A by a scan first, a single product's B
// as it is packed, since C is written from the fp32 workspace only at the end), so a
// MemoryError on either path leaves C untouched.
#include <atomic>

#include "cache_sizes.h"
#include "common.h"
#include "gemm/blocking.h"
#include "debug.h"
#if defined(ATTNKIT_ISA_AMX) || defined(ATTNKIT_ISA_AMX_EMULATED)
#include "gemm/ukernel_amx.h"
#else
#include "gemm/ukernel_bf16.h"
#endif
#include "kernels.h"
#include "simd/scalar_cvt.h"
#include "simd/vec.h"
#include "threading.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {
namespace {

using Bk = PanelBlocking;
// Up to this many multiply-adds per product (gemm.cpp's kSmallMacs) or fewer rows than two
// micro-panels, the fp32 path (operands read in place, no packing) is as fast or faster.
constexpr int64_t kMinMacs = int64_t(1) << 21;
constexpr int64_t kMinRows = 2 * Bk::MR;

// KCP / MC / NC for this CPU: the header's values are those of its reference caches
// (Bk::kRefL1d, kRefL2), scaled as gemm/blocking.h scales the fp32 blocks (the B micro-panel
// keeps its share of the L1d, the A block of the L2, the B block its bytes). Machine constants
// only, never the thread count: results do not depend on it.
struct PairBlocks {
  int64_t kcp, mc, nc;
};
const PairBlocks& pair_blocks() {
  static const PairBlocks b = [] {
    const GemmBlocks g = scale_blocks(Bk::KCP, Bk::MC, Bk::NC, Bk::MR, Bk::NR, Bk::kRefL1d,
                                      Bk::kRefL2, cache_sizes());
    return PairBlocks{g.kc, g.mc, g.nc};
  }();
  return b;
}

struct Bf16Buffers {
  Scratch<float> ws;         // fp32 C: workspace_rows(m) x workspace_ld(n)
  Scratch<uint32_t> bpack;   // KCP x NC words, shared
  Scratch<uint32_t> apack;   // MC x KCP words per thread
  bool init(int64_t m, int64_t n, int nt) {
    const PairBlocks& b = pair_blocks();
    // B panels of one block, plus up to one per thread (the per-thread slots of gemm_pairs)
    const int64_t panels = ceil_div(b.nc, Bk::NR) + nt;
    return ws.reset(size_t(workspace_rows(m) * workspace_ld(n))) &&
           bpack.reset(size_t(padded_pairs(b.kcp) * Bk::NR * panels)) &&
           apack.reset(size_t(nt * b.mc * b.kcp));
  }
};

struct Operands {
  const bf16_t* a;
  const bf16_t* b;
  int64_t m, n, k, rs_a, cs_a, rs_b, cs_b;
};

// Threads share the columns, not the rows, of a product wider than tall (up to 3 threads, as
// gemm.cpp's shared-A order): each then packs exactly the B panels it uses, so no thread waits
// for another (no barrier) and its B block stays in its own L2, and each packs all of the
// (small) A. 64 x 4096 x 4096 on a Zen 5, 2 threads: 315 -> 505 GFLOP/s (bench/notes/matmul.md,
// "bf16 GEMM: B packed by rows, columns split"). Taller and square products share the rows and
// the B block (squares split by columns lost 3-13%).
inline bool split_columns(int64_t m, int64_t n, int team) {
  return team > 1 && team < 4 && n > m && ceil_div(n, Bk::NR) >= 2 * team;
}

// ws = A B (fp32, row stride workspace_ld(n)). A holds no subnormal (the caller scanned it); B
// is checked as it is packed: a subnormal sets *subnormal_b and every thread stops (the caller
// then discards ws and takes the exact fp32 path).
void gemm_pairs(const Operands& g, int nt, Bf16Buffers& buf, std::atomic<bool>& subnormal_b) {
  constexpr int MR = Bk::MR, NR = Bk::NR;
  const PairBlocks& bl = pair_blocks();
  const int64_t m = g.m, n = g.n, k = g.k, ldc = workspace_ld(n);
  // Each B panel sits a whole k-block deep whatever the block's depth, so that without a
  // barrier a thread's panels of a shallower last block never reach into another's.
  const int64_t panel_words = padded_pairs(bl.kcp) * NR;
  float* c = buf.ws.get();
  parallel_team(nt, [&] {
    const PanelThreadScope scope;
    const int tid = thread_id(), team = team_size();
    uint32_t* apack = buf.apack.get() + int64_t(tid) * bl.mc * bl.kcp;
    uint32_t* bpack = buf.bpack.get();
    const bool columns = split_columns(m, n, team);
    const GemmShare share = columns ? gemm_share(m, MR, tid, team, 1) : gemm_share(m, MR, tid, team);
    // A thread reads only the panels it packed when its column share is its packing share.
    // Then there is no barrier, and each thread packs into a slot of the buffer of its own:
    // the shares of a narrower last column block start elsewhere, and a thread must not pack
    // the next block into a panel another thread is still reading (64 x 4032 x 384 on 2
    // threads, NC = 2048: wrong results in 16 of 30 products before the slots).
    const bool shared_b = share.tn != team;
    uint32_t* bown = bpack + int64_t(tid) * ceil_div(ceil_div(bl.nc, NR), team) * panel_words;
    const int64_t row0 = share.row0, row1 = share.row1;
    // A read in place as pair words when its rows are whole words in every k-block.
    const bool a_in_place = kAInPlace && g.cs_a == 1 && k % 2 == 0 && g.rs_a % 2 == 0;
    const uint32_t* aw = reinterpret_cast<const uint32_t*>(g.a);
    for (int64_t jc = 0; jc < n; jc += bl.nc) {
      const int64_t nc = imin(bl.nc, n - jc);
      const int64_t np = ceil_div(nc, NR);
      int64_t jbeg, jend;
      split_range(np, share.tn, share.tj, &jbeg, &jend);
      for (int64_t pc = 0; pc < k; pc += 2 * bl.kcp) {
        const int64_t kc = imin(2 * bl.kcp, k - pc), kp = padded_pairs((kc + 1) / 2);
        int64_t pbeg, pend;
        split_range(np, team, tid, &pbeg, &pend);
        // Panel jp of the block: at jp in the shared buffer, or in the thread's own slot (its
        // packing share is then its column share: pbeg = jbeg).
        auto panel = [&](int64_t jp) {
          return shared_b ? bpack + jp * panel_words : bown + (jp - jbeg) * panel_words;
        };
        if (pend > pbeg &&
            pack_b_panels(g.b + pc * g.rs_b + (jc + pbeg * NR) * g.cs_b, g.rs_b, g.cs_b, kc,
                          imin(nc, pend * NR) - pbeg * NR, panel(pbeg), panel_words))
          subnormal_b = true;
        if (shared_b) {
#pragma omp barrier
        }
        // With a shared B every thread reads the flag after the same barrier, so all stop at
        // the same block (and skip the same barriers); without one each stops on its own.
        if (subnormal_b.load(std::memory_order_relaxed)) return;
        for (int64_t ic = row0; ic < row1; ic += bl.mc) {
          const int64_t mc = imin(bl.mc, row1 - ic);
          if (!a_in_place)
            for (int64_t ir = 0; ir < mc; ir += MR)
              pack_a_panel(g.a + (ic + ir) * g.rs_a + pc * g.cs_a, g.rs_a, g.cs_a,
                           int(imin(MR, mc - ir)), kc, apack + ir * kp);
          for (int64_t jp = jbeg; jp < jend; ++jp) {
            const int nr = int(imin(NR, nc - jp * NR));
            float* cp = c + ic * ldc + jc + jp * NR;
            for (int64_t ir = 0; ir < mc; ir += MR) {
              const int mr = int(imin(MR, mc - ir));
              if constexpr (kAInPlace) {
                if (a_in_place) {
                  compute_panel_in_place(mr, kp, aw + ((ic + ir) * g.rs_a + pc) / 2, g.rs_a / 2,
                                         panel(jp), cp + ir * ldc, ldc, pc > 0, nr);
                  continue;
                }
              }
              compute_panel(mr, kp, apack + ir * kp, panel(jp), cp + ir * ldc, ldc, pc > 0, nr);
            }
          }
        }
        if (shared_b) {
#pragma omp barrier
        }
      }
    }
  });
}

// Whether the rows x cols matrix at x (strides rs, cs) holds a subnormal bf16, walked along its
// contiguous axis when it has one.
bool matrix_has_subnormal(const bf16_t* x, int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  if (cs != 1 && rs == 1) return matrix_has_subnormal(x, cols, rows, cs, rs);
  for (int64_t i = 0; i < rows; ++i)
    if (bf16_any_subnormal(x + i * rs, cols, cs)) return true;
  return false;
}

// Whether an A element (and with check_b a B element) of any product is a subnormal bf16: one
// vector read of A (and B). A single product's B is checked as it is packed instead.
bool any_subnormal(const GemmParams& p, int64_t batch, bool check_b) {
  const bf16_t* a = static_cast<const bf16_t*>(p.a);
  const bf16_t* b = static_cast<const bf16_t*>(p.b);
  for (int64_t bi = 0; bi < batch; ++bi) {
    const bf16_t* ai = a + unravel_offset(bi, p.batch_ndim, p.batch_shape, p.a_batch_strides);
    const bf16_t* bbi = b + unravel_offset(bi, p.batch_ndim, p.batch_shape, p.b_batch_strides);
    if (matrix_has_subnormal(ai, p.m, p.k, p.rs_a, p.cs_a) ||
        (check_b && matrix_has_subnormal(bbi, p.k, p.n, p.rs_b, p.cs_b)))
      return true;
  }
  return false;
}

// C (bf16, strides rs_c / cs_c) = the fp32 workspace (row stride ldw) rounded to nearest even.
void store_c(const float* w, int64_t ldw, bf16_t* c, int64_t m, int64_t n, int64_t rs_c,
             int64_t cs_c, int nt) {
  using V = Vec<float>;
  const int ntc = threads_for(m * n, nt);
  parallel_team(ntc, [&] {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      const float* wi = w + i * ldw;
      bf16_t* ci = c + i * rs_c;
      int64_t j = 0;
      if (cs_c == 1)
        for (; j + V::N <= n; j += V::N) store_cvt(ci + j, V::load(wi + j));
      for (; j < n; ++j) ci[j * cs_c].bits = f32_to_bf16(wi[j]);
    }
  });
}

}  // namespace

bool gemm_bf16_applies(const GemmParams& p) {
  return p.dtype == DType::bf16 && p.m >= kMinRows && p.n > 0 && p.m * p.n * p.k > kMinMacs;
}

Status gemm(const GemmParams& p) {
  if (!gemm_bf16_applies(p)) return avx512_vnni::kernel_table()->gemm(p);
  int64_t batch = 1;
  for (int d = 0; d < p.batch_ndim; ++d) batch *= p.batch_shape[d];
  if (batch == 0) return Status::ok;
  // Batched products scan B too: once a product's C is stored, a later product's subnormal
  // must not send the call to the fp32 path (whose MemoryError would leave C half written).
  if (any_subnormal(p, batch, batch > 1)) return avx512_vnni::kernel_table()->gemm(p);
  const int nt = p.num_threads < 1 ? 1 : p.num_threads;
  Bf16Buffers buf;
  if (!buf.init(p.m, p.n, nt)) return Status::out_of_memory;
  const bf16_t* a = static_cast<const bf16_t*>(p.a);
  const bf16_t* b = static_cast<const bf16_t*>(p.b);
  bf16_t* c = static_cast<bf16_t*>(p.c);
  for (int64_t bi = 0; bi < batch; ++bi) {
    const bf16_t* ai = a + unravel_offset(bi, p.batch_ndim, p.batch_shape, p.a_batch_strides);
    const bf16_t* bbi = b + unravel_offset(bi, p.batch_ndim, p.batch_shape, p.b_batch_strides);
    bf16_t* ci = c + unravel_offset(bi, p.batch_ndim, p.batch_shape, p.c_batch_strides);
    const Operands g{ai, bbi, p.m, p.n, p.k, p.rs_a, p.cs_a, p.rs_b, p.cs_b};
    std::atomic<bool> subnormal_b{false};
    gemm_pairs(g, nt, buf, subnormal_b);
    // A subnormal in B (a single product: nothing is written yet): the exact fp32 path.
    if (subnormal_b) return avx512_vnni::kernel_table()->gemm(p);
    store_c(buf.ws.get(), workspace_ld(p.n), ci, p.m, p.n, p.rs_c, p.cs_c, nt);
  }
  GemmPlanRecord r;
  r.mr = Bk::MR;
  r.nr = Bk::NR;
  const PairBlocks& bl = pair_blocks();
  r.kc = imin(2 * bl.kcp, p.k);
  r.kc_max = 2 * bl.kcp;
  r.mc = bl.mc;
  r.nc = bl.nc;
  r.l1d = cache_sizes().l1d;
  r.l2 = cache_sizes().l2;
  r.elem_bytes = 2;
  debug_record_gemm_plan(r);
  return Status::ok;
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
