// Hopper attention forward (attention_hopper.cuh), head-dim bucket 96 (fp16 and bf16). One
// bucket per file so the build compiles the buckets in parallel.
#include "attention_hopper.cuh"

namespace attnkit {
namespace cuda {
ATTNKIT_INSTANTIATE_HOPPER(96)
}  // namespace cuda
}  // namespace attnkit
