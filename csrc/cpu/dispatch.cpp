// Run-time ISA selection (ARCHITECTURE.md rule 3). Built WITHOUT -m flags: it must run on any CPU.
//
// The variant is chosen once, when the module is imported (the binding calls select_isa with
// $ATTNKIT_CPU or "auto"). "auto" takes the best variant that is compiled, supported by this
// CPU and OS, and verified, i.e. whose test suite has passed on a real CPU of that kind.
#include <atomic>
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#define ATTNKIT_X86 1
#include <cpuid.h>
#endif

namespace attnkit {
namespace cpu {
namespace {

#if ATTNKIT_X86
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

struct X86Features {
  bool avx2 = false;    // AVX2 + FMA + F16C, and the OS saves YMM state
  bool avx512 = false;  // AVX-512 F, BW, DQ, VL, and the OS saves ZMM + opmask state
  bool avx512_vnni = false;  // and AVX512-VNNI (vpdpbusd): Cascade Lake, Ice Lake, Zen 4 on
};

X86Features detect_x86() {
  X86Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  const bool fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17);
  const bool avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  f.avx2 = ymm_state && avx2 && fma && f16c;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
  f.avx512_vnni = f.avx512 && (c & (1u << 11));
  return f;
}
#endif

IsaInfo* mutable_isa_list() {
  // verified: the whole test suite has passed with this variant on a real CPU of its kind.
  // avx512 passed on an AMD EPYC Zen 4 (AVX-512 F/BW/DQ/VL), see the foundation issue note;
  // avx512_vnni on an Intel Xeon Emerald Rapids (bench/NOTES.md, "int8 Q K on VNNI").
  // Filled once (thread-safe static initialization).
  static IsaInfo* const list = [] {
    static IsaInfo l[kNumIsas] = {
        {"scalar", true, true, true},
        {"avx2", false, false, true},
        {"avx512", false, false, true},
        {"avx512_vnni", false, false, true},
    };
#if ATTNKIT_X86 && defined(ATTNKIT_HAVE_X86_VARIANTS)
    const X86Features f = detect_x86();
    l[1].compiled = l[2].compiled = true;
#if defined(ATTNKIT_HAVE_VNNI_VARIANT)
    l[3].compiled = true;
#endif
    l[1].supported = f.avx2;
    l[2].supported = f.avx512;
    l[3].supported = f.avx512_vnni;
#endif
    return l;
  }();
  return list;
}

const KernelTable* table_for(int index) {
  switch (index) {
    case 0:
      return scalar::kernel_table();
#if defined(ATTNKIT_HAVE_X86_VARIANTS)
    case 1:
      return avx2::kernel_table();
    case 2:
      return avx512::kernel_table();
#if defined(ATTNKIT_HAVE_VNNI_VARIANT)
    case 3:
      return avx512_vnni::kernel_table();
#endif
#endif
    default:
      return nullptr;
  }
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

const IsaInfo* isa_list() { return mutable_isa_list(); }

const KernelTable* variant_table(int index) { return table_for(index); }

const KernelTable* active_kernels() {
  const KernelTable* t = g_active.load();
  return t ? t : table_for(0);
}

const char* select_isa(const char* name) {
  IsaInfo* list = mutable_isa_list();
  const bool is_auto = name == nullptr || name[0] == '\0' ||
                       (name[0] == 'a' && name[1] == 'u' && name[2] == 't' && name[3] == 'o' &&
                        name[4] == '\0');
  if (is_auto) {
    for (int i = kNumIsas - 1; i >= 0; --i) {
      if (list[i].compiled && list[i].supported && list[i].verified) {
        g_active = table_for(i);
        return "";
      }
    }
    g_active = table_for(0);
    return "";
  }
  for (int i = 0; i < kNumIsas; ++i) {
    const char* a = list[i].name;
    const char* b = name;
    while (*a && *a == *b) ++a, ++b;
    if (*a != *b) continue;
    if (!list[i].compiled) return "that variant is not compiled into this build";
    if (!list[i].supported) return "this CPU (or its operating system) does not support it";
    g_active = table_for(i);
    return "";
  }
  return "unknown variant; expected one of scalar, avx2, avx512, avx512_vnni, auto";
}

}  // namespace cpu
}  // namespace attnkit
