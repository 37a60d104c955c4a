// float8 e4m3fn KV codes as bf16 words for vdpbf16ps: part of the SIMD vocabulary (vec.h), for
// the avx512_bf16 variant only (which requires AVX512-VBMI: dispatch.cpp). kHasCodeBf16 says
// whether this object has them. Used by the decode kernel over e4m3 caches (decode_blocks.h;
// docs/ARCHITECTURE.md, "e4m3 KV caches on vdpbf16ps").
//
// Every e4m3 code is exact in bf16 (4 significant bits, exponents well inside bf16's), so the
// conversion is a lookup: two 128-entry byte tables give the high and the low byte of the bf16
// of each code's magnitude (one vpermi2b of 64 bytes each, a single operation at two per cycle
// on Zen 5), and the sign bit is ORed into the high byte; the NaN codes give a bf16 NaN. Values
// are code value x CodeUnit<S>::kLoaded (scalar_cvt.h), as the fp32 loads (load_code) give
// them, so the kernels fold the same kUnscale into the scales on either path.
//
// zip_lo(a, b) / zip_hi(a, b): bytes 0..31 (32..63) of a and b interleaved, a first (vpermt2b).
// A K row: zip the low and high bytes of its 64 codes -> 32 + 32 bf16 in order. Two V rows (a
// pair of keys for one vdpbf16ps lane): zip their codes first, then look up, then zip the low
// and high bytes -> dword lanes of (v0[d], v1[d]) in the order of d.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "scalar_cvt.h"

#if defined(ATTNKIT_ISA_AVX512_BF16)
#include <immintrin.h>
#endif

namespace attnkit {
namespace cpu {
namespace ATTNKIT_ISA_NS {

#if defined(ATTNKIT_ISA_AVX512_BF16)
constexpr bool kHasCodeBf16 = true;

namespace code_bf16_detail {
// byte tables [lo 128 | hi 128] of the bf16 of value(code m) x kLoaded, m = 0..127
template <class S>
inline const uint8_t* tables() {
  static_assert(std::is_same<S, f8e4m3_t>::value, "e4m3 codes only");
  static const struct T {
    alignas(64) uint8_t b[256];
    T() {
      for (int m = 0; m < 128; ++m) {
        const float x = f8e4m3_to_f32(uint8_t(m)) * CodeUnit<S>::kLoaded;
        const uint16_t h = f32_to_bf16(x);  // exact: no rounding happens
        b[m] = uint8_t(h & 0xff);
        b[128 + m] = uint8_t(h >> 8);
      }
    }
  } t;
  return t.b;
}
inline const uint8_t* zip_index() {  // [lo 64 | hi 64]
  static const struct Z {
    alignas(64) uint8_t b[128];
    Z() {
      for (int j = 0; j < 64; ++j) {
        b[j] = uint8_t((j & 1) * 64 + j / 2);
        b[64 + j] = uint8_t((j & 1) * 64 + 32 + j / 2);
      }
    }
  } z;
  return z.b;
}
}  // namespace code_bf16_detail

// The tables and indices of one code type, held in registers by the kernels that use them.
template <class S>
struct CodeBf16 {
  __m512i lo0, lo1, hi0, hi1, zlo, zhi, sign;
  CodeBf16() {
    const uint8_t* t = code_bf16_detail::tables<S>();
    const uint8_t* z = code_bf16_detail::zip_index();
    lo0 = _mm512_load_si512(t), lo1 = _mm512_load_si512(t + 64);
    hi0 = _mm512_load_si512(t + 128), hi1 = _mm512_load_si512(t + 192);
    zlo = _mm512_load_si512(z), zhi = _mm512_load_si512(z + 64);
    sign = _mm512_set1_epi8(char(0x80));
  }
  __m512i zip_lo(__m512i a, __m512i b) const { return _mm512_permutex2var_epi8(a, zlo, b); }
  __m512i zip_hi(__m512i a, __m512i b) const { return _mm512_permutex2var_epi8(a, zhi, b); }
  // The low and high bytes of the bf16 of each of the 64 codes in c.
  void lookup(__m512i c, __m512i& lo, __m512i& hi) const {
    lo = _mm512_permutex2var_epi8(lo0, c, lo1);  // (index bit 7, the sign, is not read)
    hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, c, hi1), c, sign, 0xf8);  // | sign
  }
  // n (<= 64) codes at p as 2 x 32 bf16 words in order (zeros past n). Whole rows load unmasked:
  // with masked loads the DRAM-bound MHA decode ran ~11% slower (bench/notes/decode.md).
  void row(const S* p, int n, __m512i& a, __m512i& b) const {
    __m512i lo, hi;
    lookup(n >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((__mmask64(1) << n) - 1, p), lo, hi);
    a = zip_lo(lo, hi);
    b = zip_hi(lo, hi);
  }
  // 32 positions of two rows as 2 x 16 dword lanes (v0[d], v1[d]); the masked form loads only
  // the bytes of k (a row's tail), zeros elsewhere.
  void pair(const S* v0, const S* v1, __m512i& a, __m512i& b) const {
    pair_of(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1)), a, b);
  }
  void pair(const S* v0, const S* v1, __mmask32 k, __m512i& a, __m512i& b) const {
    pair_of(_mm256_maskz_loadu_epi8(k, v0), _mm256_maskz_loadu_epi8(k, v1), a, b);
  }

 private:
  void pair_of(__m256i c0, __m256i c1, __m512i& a, __m512i& b) const {
    __m512i lo, hi;
    lookup(zip_lo(_mm512_castsi256_si512(c0), _mm512_castsi256_si512(c1)), lo, hi);
    a = zip_lo(lo, hi);
    b = zip_hi(lo, hi);
  }
};
#else
constexpr bool kHasCodeBf16 = false;
template <class S>
struct CodeBf16 {};  // named only (decode_stages.h's CodeTables)
#endif

}  // namespace ATTNKIT_ISA_NS
}  // namespace cpu
}  // namespace attnkit
