// The kernel table of one ISA variant (compiled once per ISA, like the kernels it lists).
#include "kernels.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

Status softmax(const SoftmaxParams&);
Status gemm(const GemmParams&);
Status attention_fwd(const AttentionParams&);
Status attention_bwd(const AttentionBwdParams&);
Status quantize_kv(const QuantizeParams&);
Status merge_attention_states(const MergeParams&);

const KernelTable* kernel_table() {
  static const KernelTable table = {
#if defined(ATTNKIT_ISA_AVX512)
      "avx512",
#elif defined(ATTNKIT_ISA_AVX2)
      "avx2",
#else
      "scalar",
#endif
      &softmax, &gemm, &attention_fwd, &attention_bwd, &quantize_kv,
      &merge_attention_states};
  return &table;
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
