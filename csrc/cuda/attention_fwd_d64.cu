// Tensor-core attention forward and decode kernels, head-dim bucket 64 (fp16 and bf16). One
// bucket per file so the build compiles the buckets in parallel.
#include "attention_decode.cuh"

namespace attnkit {
namespace cuda {
ATTNKIT_INSTANTIATE_FWD(launch_attention_mma, 64)
ATTNKIT_INSTANTIATE_DECODE(64)
}  // namespace cuda
}  // namespace attnkit
