// Run-time ISA selection (ARCHITECTURE.md rule 3). Built WITHOUT -m flags: it must run on any CPU.
//
// The variant is chosen once, when the module is imported (the binding calls select_isa with
// $ATTNKIT_CPU or "auto"). "auto" takes the best variant that is compiled, supported by this
// CPU and OS (by CPUID, or by $ATTNKIT_CPU_ASSUME), and verified, i.e. whose test suite has
// passed on a real CPU of that kind, unless the variant says why auto should pass it over
// (IsaInfo::auto_skip: measured slower than the variant below).
//
// $ATTNKIT_CPU_ASSUME (read once, with the list) names variants to treat as supported although
// CPUID does not list their feature: for virtual machines whose hypervisor masks CPUID bits
// (AVX512-BF16 hidden on an Emerald Rapids VM). Unsafe by design: a wrong claim is SIGILL.
// The OS must still save ZMM state (XCR0) and the variant below must be supported.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#define ATTNKIT_X86 1
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <cstdio>
#include <mutex>

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
  bool avx512_bf16 = false;  // and AVX512-BF16 (vdpbf16ps) and AVX512-VBMI: Sapphire Rapids, Zen 4 on
  bool vbmi = false;         // AVX512-VBMI (vpermi2b; what avx512_bf16 needs beside AVX512-BF16)
  bool amd = false;          // CPUID vendor AuthenticAMD (see kBf16AutoSkip)
  bool zmm_state = false;    // the OS saves ZMM + opmask state (what ATTNKIT_CPU_ASSUME needs)
  bool amx = false;          // avx512_vnni and AMX-TILE + AMX-BF16, tile state enabled by the OS
  const char* amx_why = "needs avx512_vnni (AVX-512 with VNNI), which this CPU lacks";
};

// AMX: CPUID leaf 7 EDX bits 24 (AMX-TILE) and 22 (AMX-BF16), XCR0 bits 17 and 18 (the OS
// enables tile configuration and data state). The OS's permission is asked only when amx is
// selected (ensure_tiles below). amx runs avx512_vnni's kernels for everything else.
void detect_amx(X86Features& f, uint64_t xcr0, unsigned leaf7_edx) {
  if (!f.avx512_vnni) {
    f.amx_why = "needs avx512_vnni (AVX-512 with VNNI), which this CPU lacks";
    return;
  }
  if (!(leaf7_edx & (1u << 24)) || !(leaf7_edx & (1u << 22))) {
    f.amx_why = "CPUID lists no AMX-TILE and AMX-BF16";
    return;
  }
  if ((xcr0 & 0x60000) != 0x60000) {
    f.amx_why = "the operating system does not enable AMX tile state (XCR0 bits 17, 18)";
    return;
  }
  f.amx = true;
  f.amx_why = nullptr;
}

X86Features detect_x86() {
  X86Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  f.amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "Auth" "enti" "cAMD"
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
  f.vbmi = f.avx512 && (c & (1u << 1));
  f.zmm_state = zmm_state;
  detect_amx(f, xcr0, d);
  unsigned a1 = 0, b1, c1, d1;
  if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1))  // leaf 7 subleaf 1, EAX bit 5: AVX512_BF16
    f.avx512_bf16 = f.avx512_vnni && f.vbmi && (a1 & (1u << 5));
  return f;
}
#endif

// Why auto passes over avx512_bf16 on Intel CPUs even where it is supported and verified:
// measured on an Emerald Rapids, vdpbf16ps retires at a quarter of the rate of vfmadd231ps
// (twice the FLOP per instruction: half the FLOP rate), so its bf16 matmul and attention ran
// slower than avx512_vnni's fp32 path over widened bf16 (bench/notes/matmul.md, "avx512_bf16
// variant"); Intel's fast bf16 unit is AMX. On AMD it is taken: on a Zen 5 (family 26)
// vdpbf16ps retires at 0.93x the rate of vfmadd231ps, 1.85x its FLOP rate, and the variant's
// bf16 attention ran 1.7x and its matmul 1.6-1.75x avx512_vnni's (bench/notes/matmul.md,
// "avx512_bf16 on Zen 5"). Zen 4 (AMD's first AVX512-BF16 core) has not been measured.
constexpr const char* kBf16AutoSkip =
    "slower than avx512_vnni on Intel CPUs where measured (Emerald Rapids: vdpbf16ps at half "
    "the fp32 FMA FLOP rate); force it with ATTNKIT_CPU=avx512_bf16";
// amx_emulated runs amx's tile kernels on a software model of the tiles (simd/amx.h): it
// exists so that those kernels are tested on every AVX-512 CPU.
constexpr const char* kEmulatedAutoSkip =
    "a software model of AMX tiles for testing the amx kernels (slow); force it with "
    "ATTNKIT_CPU=amx_emulated";

#if ATTNKIT_X86
// ATTNKIT_CPU_ASSUME: a comma list of variant names marked supported without their CPUID bit
// (see the top of this file). Only AVX-512 variants above avx512 can be assumed, and only when
// the OS saves ZMM state and every variant below them is supported (by CPUID or assumption),
// so the claim is at most one feature bit. Unknown names are ignored here (the Python layer
// reports them).
// avx512_bf16 also needs AVX512-VBMI, which an assumption never claims: it must be in CPUID.
void apply_assumptions(IsaInfo* l, bool zmm_state, bool vbmi) {
  const char* env = std::getenv("ATTNKIT_CPU_ASSUME");
  if (!env || !zmm_state) return;
  for (int i = 3; i <= 4; ++i) {  // avx512_vnni, avx512_bf16
    const size_t len = std::strlen(l[i].name);
    for (const char* p = env; *p;) {
      while (*p == ',' || *p == ' ') ++p;
      const char* e = p;
      while (*e && *e != ',' && *e != ' ') ++e;
      if (size_t(e - p) == len && std::strncmp(p, l[i].name, len) == 0 && !l[i].supported &&
          l[i - 1].supported && (i != 4 || vbmi)) {
        l[i].supported = true;
        l[i].assumed = true;
        l[i].unsupported = nullptr;
      }
      p = e;
    }
  }
}
#endif

IsaInfo* mutable_isa_list() {
  // verified: the whole test suite has passed with this variant on a real CPU of its kind.
  // avx512 passed on an AMD EPYC Zen 4 (AVX-512 F/BW/DQ/VL), see the foundation issue note;
  // avx512_vnni on an Intel Xeon Emerald Rapids (bench/notes/decode.md, "int8 Q K on VNNI").
  // avx512_bf16 on the same Emerald Rapids (family 6 model 207, a VM whose CPUID hides
  // AVX512-BF16: run with ATTNKIT_CPU_ASSUME=avx512_bf16 ATTNKIT_CPU=avx512_bf16, the whole
  // suite, 2005 passed; bench/notes/matmul.md, "avx512_bf16 variant"), and on an AMD EPYC Zen 5
  // (family 26 model 2, AVX512-BF16 in CPUID: ATTNKIT_CPU=avx512_bf16, the whole suite, 2157
  // passed). auto skips it on Intel CPUs (kBf16AutoSkip).
  // amx on an Intel Xeon Emerald Rapids with AMX-TILE/BF16/INT8 in CPUID (family 6 model 207,
  // 2 cores): ATTNKIT_CPU=amx, the whole suite, 3008 passed (bench/notes/amx.md, "First run on
  // AMX"), so auto takes it where the CPU and the OS allow it (tile data permission asked then).
  // Filled once (thread-safe static initialization); ensure_tiles may later mark amx
  // unsupported, under its lock, when the OS refuses tile data.
  static IsaInfo* const list = [] {
    static IsaInfo l[kNumIsas] = {
        {"scalar", true, true, true, false, nullptr, -1, nullptr},
        {"avx2", false, false, true, false, nullptr, 0,
         "needs AVX2, FMA and F16C in CPUID and YMM state saved by the OS"},
        {"avx512", false, false, true, false, nullptr, 1,
         "needs AVX-512 F, BW, DQ and VL in CPUID and ZMM state saved by the OS"},
        {"avx512_vnni", false, false, true, false, nullptr, 2,
         "needs avx512 and AVX512-VNNI in CPUID"},
        {"avx512_bf16", false, false, true, false, kBf16AutoSkip, 3,
         "needs avx512_vnni, AVX512-BF16 and AVX512-VBMI in CPUID"},
        {"amx", false, false, true, false, nullptr, 3,
         "needs avx512_vnni (AVX-512 with VNNI), which this CPU lacks"},
        {"amx_emulated", false, false, true, false, kEmulatedAutoSkip, 3,
         "needs avx512_vnni (AVX-512 with VNNI), whose kernels it uses"},
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
#if defined(ATTNKIT_HAVE_BF16_VARIANT)
    l[4].compiled = true;
#endif
    l[4].supported = f.avx512_bf16;
    if (f.amd) l[4].auto_skip = nullptr;  // vdpbf16ps at the FMA rate (kBf16AutoSkip)
#if defined(ATTNKIT_HAVE_AMX_VARIANT)
    l[kAmx].compiled = true;
#endif
    l[kAmx].supported = f.amx;
    if (f.amx_why) l[kAmx].unsupported = f.amx_why;
#if defined(ATTNKIT_HAVE_AMX_EMULATED_VARIANT)
    l[6].compiled = true;
#endif
    apply_assumptions(l, f.zmm_state, f.vbmi);
    l[6].supported = l[3].supported;  // amx_emulated runs where avx512_vnni does (assumed too)
#endif
    for (IsaInfo& v : l)
      if (v.supported) v.unsupported = nullptr;
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
#if defined(ATTNKIT_HAVE_BF16_VARIANT)
    case 4:
      return avx512_bf16::kernel_table();
#endif
#if defined(ATTNKIT_HAVE_AMX_VARIANT)
    case 5:
      return amx::kernel_table();
#endif
#if defined(ATTNKIT_HAVE_AMX_EMULATED_VARIANT)
    case 6:
      return amx_emulated::kernel_table();
#endif
#endif
    default:
      return nullptr;
  }
}

std::atomic<const KernelTable*> g_active{nullptr};

// Linux hands out tile data state per process on request (kernel 5.16+): without it the first
// tile instruction faults. Asked only when amx is selected (at import, by auto on a CPU with
// AMX or by ATTNKIT_CPU=amx; torch's oneDNN asks the same when it runs AMX): once granted, the
// kernel refuses later alternate signal stacks smaller than the tile state for the whole
// process, which other native libraries may set up. Granted once for the whole process
// (threads and forked children inherit it). A refusal marks amx unsupported, with errno in
// info()'s `unsupported`; under auto the next variant is taken.
bool ensure_tiles(IsaInfo* list, int i) {
  if (i != kAmx) return true;
  static std::mutex mu;
  static int state = 0;  // 0: not asked, 1: granted, -1: refused
  static char why[160];
  std::lock_guard<std::mutex> lock(mu);
  if (state == 0) {
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    const long rc = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata);
    const int err = rc == 0 ? 0 : errno;
    state = rc == 0 ? 1 : -1;
    if (state < 0)
      std::snprintf(why, sizeof why,
                    "the operating system refused tile data permission (arch_prctl("
                    "ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): errno %d)", err);
#else
    state = 1;  // no such step elsewhere (not verified)
#endif
  }
  if (state < 0) {
    list[i].supported = false;
    list[i].unsupported = why;
  }
  return state > 0;
}

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
      if (list[i].compiled && list[i].supported && list[i].verified && !list[i].auto_skip &&
          ensure_tiles(list, i)) {
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
    if (!list[i].supported)
      return i == kAmx ? list[i].unsupported
                    : "this CPU (or its operating system) does not support it (if a hypervisor "
                      "hides the CPUID bit of a feature the CPU has, see ATTNKIT_CPU_ASSUME in "
                      "the README)";
    if (!ensure_tiles(list, i)) return list[i].unsupported;
    g_active = table_for(i);
    return "";
  }
  return "unknown variant; expected one of scalar, avx2, avx512, avx512_vnni, avx512_bf16, amx, "
         "amx_emulated, auto";
}

}  // namespace cpu
}  // namespace attnkit
