// OpenMP helpers shared by the kernels (ARCHITECTURE.md rule 7).
//
// The thread count of a call is resolved once, in the binding, by resolve_num_threads() and
// travels in the params struct; kernels never call omp_set_num_threads. Every parallel region
// is `parallel_team(nt, [&] { ... })` (below): one thread runs the body without a region, which
// also matters after fork(), where libgomp's pool is gone and a team of more than one thread
// would hang (resolve_num_threads() is 1 there; see threading.cpp).
#pragma once
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attnkit {

// Baseline functions (threading.cpp, built without ISA flags).
int resolve_num_threads();       // the override, else omp_get_max_threads(); 1 in a forked child
void set_num_threads_override(int n);  // n <= 0 clears the override
int num_threads_override();
bool openmp_enabled();
bool in_forked_child();

#ifdef ATTNKIT_ISA_NS  // the helpers below belong to one ISA variant (ODR)
namespace cpu {
namespace ATTNKIT_ISA_NS {

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// body() on a team of nt threads, or straight on the calling thread when nt <= 1 outside any
// parallel region: a region with `if (false)` still builds a one-thread team in libgomp (~2.8k
// instructions, more than a small matmul's whole kernel; bench/notes/matmul.md, "fixed cost of
// a small product"). Outside every region thread_id() is 0, team_size() 1, and an orphaned
// barrier or worksharing loop acts as in a team of one, so the body is the same code either
// way. Inside an enclosing region (one product per thread of a batch) those would bind to the
// enclosing team, so there the body gets its own team of one, as before.
template <class F>
inline void parallel_team(int nt, F&& body) {
#ifdef _OPENMP
  if (nt > 1 || omp_in_parallel()) {
#pragma omp parallel num_threads(nt > 1 ? nt : 1)
    body();
    return;
  }
#endif
  body();
}

// Problems below this many "work units" (roughly flops or bytes touched) run on one thread:
// waking the pool costs a few microseconds.
constexpr int64_t kSerialWork = 1 << 15;

inline int threads_for(int64_t work, int requested) {
  if (requested < 1) return 1;
  return work < kSerialWork ? 1 : requested;
}

// Contiguous split of [0, n) into `parts` near-equal ranges; returns range `part`.
inline void split_range(int64_t n, int parts, int part, int64_t* begin, int64_t* end) {
  int64_t base = n / parts, rem = n % parts;
  *begin = part * base + (part < rem ? part : rem);
  *end = *begin + base + (part < rem ? 1 : 0);
}

// The thread grid of a packed GEMM: tm x tn threads over (mr-row panels) x (nr-column panels
// of one B block). Returns tm (tn = team / tm). `columns`: all rows, a share of the columns
// each (gemm.cpp, split_columns). From 4 threads on, a 2-D grid: per k-block a thread packs or
// reads its A rows and its B columns, so the divisor of the team that makes
// (rows per thread row) + (columns per thread column) smallest is taken (ties: more thread
// rows); 16 threads on 512^3 were 16 x 1, each reading the whole B block from the other cores
// for 3 row panels (issue 13: 0.32x NumPy there). Up to 3 threads: rows, columns only when
// there are fewer than two row panels per thread row. The grid never changes a result.
inline int gemm_grid_rows(int64_t m_panels, int mr, int64_t n_panels, int nr, int team,
                          bool columns) {
  if (columns) return 1;
  if (team >= 4 && n_panels > 0) {
    int best = 0;
    int64_t best_cost = 0;
    for (int tm = team; tm >= 1; --tm) {
      const int tn = team / tm;
      if (team % tm || tm > m_panels || tn > n_panels) continue;
      const int64_t cost = (m_panels + tm - 1) / tm * mr + (n_panels + tn - 1) / tn * nr;
      if (best == 0 || cost < best_cost) best = tm, best_cost = cost;
    }
    if (best > 0) return best;
  }
  int tm = team;
  while (tm > 1 && m_panels < 2 * tm) {
    int f = 2;
    while (tm % f) ++f;
    tm /= f;
  }
  return tm;
}

// A thread's share of the grid: its rows and its column share (split_range over the column
// panels). Splitting by panels, not MC blocks, keeps the shares within one panel.
struct GemmShare {
  int64_t row0, row1;  // the thread's rows [row0, row1)
  int tj, tn;          // its column share tj of tn
};
inline GemmShare gemm_share(int64_t m, int mr, int tid, int team, int tm) {
  const int64_t m_panels = (m + mr - 1) / mr;
  const int tn = team / tm;
  int64_t rbeg, rend;
  split_range(m_panels, tm, tid / tn, &rbeg, &rend);
  const int64_t row1 = rend * mr;
  return {rbeg * mr, row1 < m ? row1 : m, tid % tn, tn};
}
inline GemmShare gemm_share(int64_t m, int mr, int tid, int team) {  // rows first (up to 3 threads' rule)
  return gemm_share(m, mr, tid, team, gemm_grid_rows((m + mr - 1) / mr, mr, 0, 0, team, false));
}

// Items [begin, end) of thread `tid` of `team` when n items with cost prefix sums prefix[0..n]
// are shared by cost: item i goes to the thread whose share [tid, tid+1) * total / team holds
// the item's cost midpoint. (Going by where an item *starts* gave one thread 3 of 4 big items
// when a few tiny ones followed: bench/notes/attention.md, decode.) Contiguous ranges, deterministic.
inline void cost_split(const int64_t* prefix, int64_t n, int tid, int team, int64_t* begin,
                       int64_t* end) {
  const int64_t total = prefix[n];
  auto first_from = [&](int64_t c) {  // first item whose midpoint is at or past c
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (prefix[mid] + prefix[mid + 1] < 2 * c) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  *begin = tid == 0 ? 0 : first_from(total * tid / team);
  *end = tid == team - 1 ? n : first_from(total * (tid + 1) / team);
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
#endif
}  // namespace attnkit
