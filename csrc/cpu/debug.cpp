// Test hooks (see debug.h). Built once, without ISA flags.
#include "debug.h"

#include <atomic>
#include <mutex>

namespace attnkit {
namespace cpu {
namespace {

std::atomic<int64_t> g_fail_countdown{0};  // > 0: armed
std::atomic<int64_t> g_llc_override{0};    // > 0: softmax's assumed last-level cache
std::atomic<int64_t> g_tile_items[2] = {{0}, {0}};
std::mutex g_plan_mutex;
AttentionPlanRecord g_last_plan;
GemmPlanRecord g_last_gemm_plan;
SoftmaxPlanRecord g_last_softmax_plan;

// Plan records are written by kernels and read by tests, under one lock.
template <class R>
void store_record(R& slot, const R& r) {
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  slot = r;
}
template <class R>
R load_record(const R& slot) {
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  return slot;
}

}  // namespace

void debug_fail_allocation_after(int64_t n) { g_fail_countdown.store(n > 0 ? n : 0); }

bool debug_allocation_fails() {
  // Fast path: one relaxed load when disarmed (every scratch allocation passes here).
  if (g_fail_countdown.load(std::memory_order_relaxed) <= 0) return false;
  return g_fail_countdown.fetch_sub(1) == 1;
}

void debug_set_llc_bytes(int64_t bytes) { g_llc_override.store(bytes > 0 ? bytes : 0); }
int64_t debug_llc_bytes() { return g_llc_override.load(std::memory_order_relaxed); }

void debug_record_softmax_plan(const SoftmaxPlanRecord& r) { store_record(g_last_softmax_plan, r); }
SoftmaxPlanRecord debug_last_softmax_plan() { return load_record(g_last_softmax_plan); }
void debug_record_attention_plan(const AttentionPlanRecord& r) { store_record(g_last_plan, r); }
AttentionPlanRecord debug_last_attention_plan() { return load_record(g_last_plan); }
void debug_record_gemm_plan(const GemmPlanRecord& r) { store_record(g_last_gemm_plan, r); }
void debug_count_tile_items(TileKernel k, int64_t n) { g_tile_items[int(k)].fetch_add(n); }
int64_t debug_take_tile_items(TileKernel k) { return g_tile_items[int(k)].exchange(0); }
GemmPlanRecord debug_last_gemm_plan() { return load_record(g_last_gemm_plan); }

}  // namespace cpu
}  // namespace attnkit
