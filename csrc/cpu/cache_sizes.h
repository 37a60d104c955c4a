// The CPU's cache sizes, read once at run time (docs/ARCHITECTURE.md: blocking constants that
// depend on cache sizes come from the CPU, never from the machine a kernel was tuned on). Per
// ISA namespace like every kernel header (one copy per variant's flags).
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

// Assumed when unreadable: an AMD Zen 4 core (the CPU the constants were first tuned on).
constexpr int64_t kAssumedL1d = 32 << 10, kAssumedL2 = 1 << 20, kAssumedL3 = 32 << 20;

struct CacheSizes {
  int64_t l1d = kAssumedL1d, l2 = kAssumedL2;  // bytes per core
  int64_t l3 = kAssumedL3;                      // bytes of the last-level cache cpu0 shares
};

// "48K", "2048K", "2M" -> bytes; 0 if unreadable.
static inline int64_t parse_cache_size(const char* text) {
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (end == text || v <= 0) return 0;
  if (*end == 'K' || *end == 'k') return int64_t(v) << 10;
  if (*end == 'M' || *end == 'm') return int64_t(v) << 20;
  return int64_t(v);
}

// The L1d, L2 and L3 of cpu0: Linux sysfs (the kernel's reading of CPUID leaf 4 / 0x8000001D,
// also inside a VM), else glibc's sysconf, else the assumed sizes. Implausible values
// (outside 16 KB..1 MB for L1d, 128 KB..64 MB for L2, 1 MB..4 GB for L3) are ignored.
static inline CacheSizes read_cache_sizes() {
  CacheSizes c;
  int64_t l1d = 0, l2 = 0, l3 = 0;
  for (int i = 0; i < 16; ++i) {
    char path[96], level[16] = {0}, type[32] = {0}, size[32] = {0};
    auto read = [&](const char* leaf, char* buf, int n) {
      std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/%s", i, leaf);
      FILE* f = std::fopen(path, "r");
      if (!f) return false;
      const bool ok = std::fgets(buf, n, f) != nullptr;
      std::fclose(f);
      return ok;
    };
    if (!read("level", level, sizeof level)) break;
    if (!read("type", type, sizeof type) || !read("size", size, sizeof size)) continue;
    const bool data = std::strncmp(type, "Data", 4) == 0 || std::strncmp(type, "Unified", 7) == 0;
    if (data && level[0] == '1') l1d = parse_cache_size(size);
    if (data && level[0] == '2') l2 = parse_cache_size(size);
    if (data && level[0] == '3') l3 = parse_cache_size(size);
  }
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  if (l1d <= 0) l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE);
  if (l2 <= 0) l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
#if defined(_SC_LEVEL3_CACHE_SIZE)
  if (l3 <= 0) l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  if (l1d >= (16 << 10) && l1d <= (1 << 20)) c.l1d = l1d;
  if (l2 >= (128 << 10) && l2 <= (64 << 20)) c.l2 = l2;
  if (l3 >= (1 << 20) && l3 <= (int64_t(4) << 30)) c.l3 = l3;
  return c;
}

static inline const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = read_cache_sizes();
  return sizes;
}

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
