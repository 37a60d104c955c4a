// Thread-count resolution and fork safety. Built once, without ISA flags.
//
// GNU libgomp is not fork-safe: in a child forked after the parent ran a parallel region, the
// first region with more than one thread waits forever for workers that no longer exist. A
// pthread_atfork handler marks the child, and resolve_num_threads() then answers 1, so every
// region in the child runs on the calling thread alone (parallel_team opens no region for one
// thread, so the pool is never touched). PyTorch does the same for its own pool.
#include "threading.h"

#include <atomic>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace attnkit {
namespace {

std::atomic<int> g_override{0};
std::atomic<bool> g_forked_child{false};

void mark_forked_child() { g_forked_child.store(true); }

struct AtForkRegistration {
  AtForkRegistration() {
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, &mark_forked_child);
#endif
  }
};
const AtForkRegistration g_atfork_registration;

}  // namespace

int resolve_num_threads() {
  if (g_forked_child.load()) return 1;
  int n = g_override.load();
  if (n > 0) return n;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads_override(int n) { g_override.store(n > 0 ? n : 0); }
int num_threads_override() { return g_override.load(); }
bool in_forked_child() { return g_forked_child.load(); }

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace attnkit
