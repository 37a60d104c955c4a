// OpenMP helpers shared by the kernels (ARCHITECTURE.md rule 7).
//
// The thread count of a call is resolved once, in the binding, by resolve_num_threads() and
// travels in the params struct; kernels never call omp_set_num_threads. Every parallel region
// is written `#pragma omp parallel num_threads(nt) if (nt > 1)`: the `if` matters after fork(),
// where libgomp's pool is gone and a team of more than one thread would hang (see threading.cpp).
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

// A thread's share of a packed GEMM: a grid of tm x tn threads over (mr-row panels) x
// (column panels). Splitting by panels, not MC blocks, keeps the shares within one panel.
// `columns`: every thread takes all rows and a share of the columns (the caller decides when:
// gemm.cpp, split_columns). Otherwise rows are split first (each thread then packs only its
// own A), columns only when there are too few row panels for every thread (fewer than two per
// thread row). The split never changes a result: each C element's sum is the same either way.
struct GemmShare {
  int64_t row0, row1;  // the thread's rows [row0, row1)
  int tj, tn;          // its column share tj of tn (split_range over the column panels)
};
inline GemmShare gemm_share(int64_t m, int mr, int tid, int team, bool columns = false) {
  if (columns) return {0, m, tid, team};
  const int64_t m_panels = (m + mr - 1) / mr;
  int tm = team, tn = 1;
  while (tm > 1 && m_panels < 2 * tm) {
    int f = 2;
    while (tm % f) ++f;
    tm /= f;
    tn *= f;
  }
  int64_t rbeg, rend;
  split_range(m_panels, tm, tid / tn, &rbeg, &rend);
  const int64_t row1 = rend * mr;
  return {rbeg * mr, row1 < m ? row1 : m, tid % tn, tn};
}

// Items [begin, end) of thread `tid` of `team` when n items with cost prefix sums prefix[0..n]
// are shared by cost: item i goes to the thread whose share [tid, tid+1) * total / team holds
// the item's cost midpoint. (Going by where an item *starts* gave one thread 3 of 4 big items
// when a few tiny ones followed: bench/NOTES.md, decode.) Contiguous ranges, deterministic.
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
