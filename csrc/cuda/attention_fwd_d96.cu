// Tensor-core attention forward, head-dim bucket 96 (fp16 and bf16). One bucket per file so
// the build compiles the buckets in parallel.
#include "attention_mma.cuh"

namespace attnkit {
namespace cuda {
ATTNKIT_INSTANTIATE_MMA(96)
}  // namespace cuda
}  // namespace attnkit
