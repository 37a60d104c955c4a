// Tensor-core attention forward and decode kernels, head-dim bucket 128 (fp16 and bf16). One
// bucket per file so the build compiles the buckets in parallel.
#include "attention_decode.cuh"

namespace attnkit {
namespace cuda {
ATTNKIT_INSTANTIATE_FWD(launch_attention_mma, 128)
ATTNKIT_INSTANTIATE_DECODE(128)
}  // namespace cuda
}  // namespace attnkit
