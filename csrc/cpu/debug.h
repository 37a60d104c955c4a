// Test hooks of the CPU kernels, defined once in debug.cpp (built without ISA flags). Kernels
// of every ISA variant call these plain functions; nothing here is inline (ODR, see
// docs/ARCHITECTURE.md "ISA variants").
//
//  * Allocation faults: the next `n`-th scratch allocation fails, so tests can check that a
//    kernel whose allocation fails inside a parallel region reports out_of_memory and writes
//    nothing (issue: failures inside parallel regions).
//  * Plan records: the attention kernels record how they ran the last call (which kernel,
//    split-KV or not, chunk count and length), so tests assert the path, not only the result;
//    matmul records the blocking its last call used (sizes read from the CPU's caches).
#pragma once
#include <cstdint>

namespace attnkit {
namespace cpu {

// Arm the fault: the `n`-th scratch allocation from now (1 = the next one) fails; n <= 0
// disarms. Counting is process-wide and atomic.
void debug_fail_allocation_after(int64_t n);
// Called by Scratch::reset: true if this allocation must fail.
bool debug_allocation_fails();

// Softmax: the last call's path, and an override of the last-level cache size its store
// policy uses (0: the CPU's), so tests reach the streaming paths with small arrays.
enum class SoftmaxPath : int32_t { none = 0, short_rows, whole_rows, chunk_items, lanes, f64 };
struct SoftmaxPlanRecord {
  SoftmaxPath path = SoftmaxPath::none;
  bool streamed = false;  // non-temporal stores
};
void debug_record_softmax_plan(const SoftmaxPlanRecord& r);
SoftmaxPlanRecord debug_last_softmax_plan();
void debug_set_llc_bytes(int64_t bytes);
int64_t debug_llc_bytes();

struct AttentionPlanRecord {
  int32_t kernel = 0;       // 0: none yet, 1: prefill (tile) kernel, 2: decode kernel
  int32_t split = 0;        // decode: keys split into chunks (flash-decoding)
  int64_t num_chunks = 0;   // decode: chunks per sequence (1 when not split)
  int64_t chunk_keys = 0;   // decode: keys per chunk
  int64_t items = 0;        // work items of the call
  int64_t threads = 0;      // threads the parallel region was asked for
  int64_t pack_slots = 0;   // prefill: key blocks the per-thread K/V pack cache holds
                            // (1: the blocks are repacked on every use, a long sequence)
  int32_t shared_pack = 0;  // prefill: K/V packed once for all threads (fewer groups than threads)
  int32_t address_order = 0;  // decode: K and V read in address order (one query row per KV head
                              // over a position-major cache: decode_stages.h, scores_seq)
};
void debug_record_attention_plan(const AttentionPlanRecord& r);
AttentionPlanRecord debug_last_attention_plan();

struct GemmPlanRecord {
  int32_t mr = 0, nr = 0;    // register tile
  int64_t kc = 0;            // depth of the k-blocks of the last product
  int64_t kc_max = 0, mc = 0, nc = 0;  // the run-time blocking (gemm/blocking.h)
  int64_t l1d = 0, l2 = 0;   // the cache sizes it was derived from (bytes)
  int32_t elem_bytes = 0;    // 4: fp32 compute (also fp16/bf16 storage), 8: fp64, 2: bf16 pairs
                             // (gemm_bf16.cpp: vdpbf16ps, mr 12, or AMX tiles, mr 32)
  int64_t nb = 0;             // columns of a thread's B block in the shared-A order
  bool shared_a = false;       // the shared-A loop order (gemm.cpp): A and B both packed
  bool b_in_place = false;     // B read where it lies (small or few-row products), not packed
  bool split_columns = false;  // threads shared the columns, not the rows
  int32_t grid_rows = 1, grid_cols = 1;  // the thread grid (rows x columns of C)
};
void debug_record_gemm_plan(const GemmPlanRecord& r);
GemmPlanRecord debug_last_gemm_plan();

// AMX tile paths of the attention forward and backward: work items run on tiles since the last
// take (tests assert the tile path ran, not only that results are right: a silent fall back to
// the fp32 path passes the same tolerances).
enum class TileKernel : int { forward = 0, backward = 1 };
void debug_count_tile_items(TileKernel k, int64_t n);
int64_t debug_take_tile_items(TileKernel k);

}  // namespace cpu
}  // namespace attnkit
