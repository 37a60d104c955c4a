// The kernel table of one ISA variant (compiled once per ISA, like the kernels it lists).
#include "kernels.h"

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

#if defined(ATTNKIT_ISA_AMX) || defined(ATTNKIT_ISA_AMX_EMULATED)
// amx (and its software model amx_emulated, simd/amx.h) sit on avx512_vnni: bf16 matmul on
// tiles (gemm_bf16.cpp with gemm/ukernel_amx.h) and the bf16 attention forward and backward on
// tiles (attention_fwd.cpp, attention_bwd.cpp: kTiles) are their own; every other entry, and what those kernels leave
// to the fp32 path, are avx512_vnni's (not avx512_bf16's: vdpbf16ps ran slower than the fp32
// path on the Emerald Rapids where it was measured).
Status gemm(const GemmParams& p);                     // gemm_bf16.cpp
Status attention_fwd(const AttentionParams& p);       // attention_fwd.cpp
Status attention_bwd(const AttentionBwdParams& bp);  // attention_bwd.cpp

const KernelTable* kernel_table() {
  const KernelTable* base = avx512_vnni::kernel_table();
  static const KernelTable table = {
#if defined(ATTNKIT_ISA_AMX)
      "amx",
#else
      "amx_emulated",
#endif
      base->softmax,  &gemm,           &attention_fwd,
      &attention_bwd, base->quantize_kv, base->merge_attention_states};
  return &table;
}
#elif defined(ATTNKIT_ISA_AVX512_BF16)
// avx512_bf16 sits on top of avx512_vnni: bf16 matmul (gemm_bf16.cpp), the bf16 attention
// forward (attention_fwd.cpp's pair path) and backward (attention_bwd.cpp's tile-layout path on
// vdpbf16ps) are its own; each sends the rest (other dtypes, decode-shaped attention) to
// avx512_vnni, as does every other entry.
Status gemm(const GemmParams& p);                    // gemm_bf16.cpp
Status attention_fwd(const AttentionParams& p);      // attention_fwd.cpp
Status attention_bwd(const AttentionBwdParams& bp);  // attention_bwd.cpp

const KernelTable* kernel_table() {
  const KernelTable* base = avx512_vnni::kernel_table();
  static const KernelTable table = {"avx512_bf16",  base->softmax,  &gemm,
                                    &attention_fwd, &attention_bwd, base->quantize_kv,
                                    base->merge_attention_states};
  return &table;
}
#elif defined(ATTNKIT_ISA_AVX512_VNNI)
// avx512_vnni sits on top of avx512 (ARCHITECTURE.md, "ISA variants"): only the decode kernel is
// compiled again (int8 caches: Q K on vpdpbusd); every other entry is avx512's.
bool decode_applies(const AttentionParams& p);  // attention_decode.cpp
Status attention_decode(const AttentionParams& p);

namespace {
Status attention_fwd(const AttentionParams& p) {
  if (p.kv_dtype == DType::i8 && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 &&
      decode_applies(p))
    return attention_decode(p);
  return avx512::kernel_table()->attention_fwd(p);
}
}  // namespace

const KernelTable* kernel_table() {
  const KernelTable* base = avx512::kernel_table();
  static const KernelTable table = {"avx512_vnni",       base->softmax,     base->gemm,
                                    &attention_fwd,      base->attention_bwd, base->quantize_kv,
                                    base->merge_attention_states};
  return &table;
}
#else
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
#endif

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
