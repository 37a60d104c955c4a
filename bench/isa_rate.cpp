// Instruction throughput of vfmadd231ps against vdpbf16ps (zmm), 12 independent accumulator
// chains each, one thread: what bench/notes/matmul.md "avx512_bf16 variant" rests on.
//   g++ -O2 -mavx512f -mavx512bf16 bench/isa_rate.cpp -o /tmp/isa_rate && /tmp/isa_rate
// FLOP per instruction: vfmadd231ps 32 (16 lanes x 2), vdpbf16ps 64 (16 lanes x 2 pairs x 2).
#include <immintrin.h>

#include <chrono>
#include <cstdio>

template <bool kDot>
static double rate(long iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(0.001f * i);
  // normal bf16 pairs (1.0078, 1.0156) and (0.9922, 0.9883): no subnormal halves
  __m512 x = _mm512_castsi512_ps(_mm512_set1_epi32(0x3f813f82));
  const __m512 y = _mm512_castsi512_ps(_mm512_set1_epi32(0x3f7e3f7d));
  const auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i)
      acc[i] = kDot ? _mm512_dpbf16_ps(acc[i], (__m512bh)x, (__m512bh)y) : _mm512_fmadd_ps(x, y, acc[i]);
    __asm__ volatile("" : "+v"(x));
  }
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(acc[i]);
  if (s == 42.0f) std::puts("");  // keep the sums alive
  return iters * 12 / sec / 1e9;
}

int main() {
  const long n = 100000000;
  for (int r = 0; r < 3; ++r) {
    const double f = rate<false>(n), d = rate<true>(n);
    std::printf("vfmadd231ps %.2f G/s (%.0f GFLOP/s)  vdpbf16ps %.2f G/s (%.0f GFLOP/s)  "
                "FLOP ratio dp/fma %.2f\n", f, f * 32, d, d * 64, d * 64 / (f * 32));
  }
}
