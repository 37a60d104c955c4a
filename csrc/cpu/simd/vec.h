// The one SIMD vocabulary of attnkit (ARCHITECTURE.md rules 3, 4). Kernels include this header inside
// their per-ISA namespace and write everything in terms of Vec<T>; they never test __AVX2__.
//
// The build defines exactly one of ATTNKIT_ISA_AVX512, ATTNKIT_ISA_AVX2, ATTNKIT_ISA_SCALAR per
// kernel object, and ATTNKIT_ISA_NS, the namespace that object's symbols live in.
//
// Every Vec<T> offers:
//   N                          lanes
//   load(p) / store(p)         unaligned full-width
//   stream(p) (float)          non-temporal store to an N*4-byte aligned p; stream_fence() after
//   load_partial(p, n)         first n lanes, the rest zero; never touches p[n..N)
//   store_partial(p, n)        first n lanes only
//   set1(x), zero(), broadcast(p)
//   + - * /, fma(a, b, c) = a*b + c, fnma(a, b, c) = c - a*b
//   max(a, b), min(a, b)       NaN in b wins (x86 semantics: the second operand is returned
//                              when either is NaN), so write max(limit, x) to keep a NaN x
//   hsum(), hmax(); hsum4(a, b, c, d, out) (Vec<float>: the four sums into out[0..3])
//   Mask: a < b, a <= b, a == b, is_nan(a); select(mask, if_true, if_false); any(mask);
//   lane_bits(mask) (bit i = lane i)
// Vec<float> also has round() (to nearest even) and scale_pow2(y, n) = y * 2^n for integral n in
// [-125, 128] and normal results (vscalefps on AVX-512, the exponent field elsewhere),
// and the storage conversions load_cvt / store_cvt for float, f16_t and bf16_t.
// 8-bit KV codes (int8_t, f8e4m3_t): load_code(p) / load_code_partial(p, n) /
// load_code_pair(p, a, b) (2N codes) give the codes'
// values times CodeUnit<T>::kLoaded (1 for int8, 2^-8 for e4m3: scalar_cvt.h says why); the
// caller folds CodeUnit<T>::kUnscale into the row's scale. AVX-512 only (kHasE4m3Finite):
// e4m3_row_has_nan(p, n), and load_code_pair_finite(p, a, b) for rows known to hold no NaN code.
#pragma once

#if defined(ATTNKIT_ISA_AVX512)
#include "vec_avx512.h"
#elif defined(ATTNKIT_ISA_AVX2)
#include "vec_avx2.h"
#elif defined(ATTNKIT_ISA_SCALAR)
#include "vec_scalar.h"
#else
#error "vec.h: the build must define ATTNKIT_ISA_AVX512, ATTNKIT_ISA_AVX2 or ATTNKIT_ISA_SCALAR"
#endif
