// The table of CPU kernels one ISA variant provides. Each variant's kernel_table.cpp fills
// one; dispatch.cpp picks a table once at import. Declarations only (no inline code).
#pragma once
#include "attnkit/error.h"
#include "attnkit/params.h"

namespace attnkit {
namespace cpu {

struct KernelTable {
  const char* isa;  // "scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx", "amx_emulated"
  Status (*softmax)(const SoftmaxParams&);
  Status (*gemm)(const GemmParams&);
  Status (*attention_fwd)(const AttentionParams&);
  Status (*attention_bwd)(const AttentionBwdParams&);
  Status (*quantize_kv)(const QuantizeParams&);
  Status (*merge_attention_states)(const MergeParams&);
};

// One accessor per compiled variant (defined in that variant's kernel_table.cpp).
namespace scalar {
const KernelTable* kernel_table();
}
namespace avx2 {
const KernelTable* kernel_table();
}
namespace avx512 {
const KernelTable* kernel_table();
}
namespace avx512_vnni {
const KernelTable* kernel_table();
}
namespace avx512_bf16 {
const KernelTable* kernel_table();
}
namespace amx {
const KernelTable* kernel_table();
}
namespace amx_emulated {
const KernelTable* kernel_table();
}

// dispatch.cpp (compiled without -m flags)
struct IsaInfo {
  const char* name;
  bool compiled;   // built into this module
  bool supported;  // this CPU and OS can run it
  bool verified;   // its tests have passed on a real CPU of that kind
  bool assumed;    // supported only because $ATTNKIT_CPU_ASSUME says so (CPUID does not)
  const char* auto_skip;  // non-null: why "auto" does not take it (it can still be forced)
  int base;               // the variant whose table it builds on (-1: none); see kernel_table.cpp
  const char* unsupported;  // non-null when compiled but not supported: why
};
// scalar, avx2, avx512, avx512_vnni, avx512_bf16, amx, amx_emulated: each x86 one needs the
// one before it, except amx and amx_emulated, which build on avx512_vnni (amx_emulated is
// the software model of amx's tiles, for tests: it needs avx512_vnni, whose kernels it uses).
constexpr int kNumIsas = 7;
constexpr int kAmx = 5;  // the variant that needs the OS's tile permission (dispatch.cpp)
const IsaInfo* isa_list();                       // kNumIsas entries
const KernelTable* active_kernels();             // chosen at import, see select_isa
const KernelTable* variant_table(int index);     // variant `index`'s table, null if not compiled
// Choose a variant by name ("auto" = the best verified one the CPU supports). Returns an
// empty string on success, else the reason it cannot be used.
const char* select_isa(const char* name);

}  // namespace cpu
}  // namespace attnkit
