// The values the loops compute on: each dtype's storage and compute types, the conversions between them,
// and the SIMD lane types (Half8: eight float32 lanes with F16C/AVX2/FMA; Bf16x16: sixteen with AVX-512)
// with the few operations the rule needs, so that one rule template runs on an element or on a vector.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace torchsgd::cpu {
namespace {

// The compute type of a dtype: float32 for the 16-bit types, as torch's CPU kernels compute them.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using A_of = typename Acc<T>::type;

// How a dtype is held in memory inside the loops: 16-bit types as their raw bits, so that no c10 object
// is built per element (gcc will not vectorise loops that do) and conversions are plain bit arithmetic.
template <typename T>
struct Raw {
  using type = T;
};
template <>
struct Raw<c10::BFloat16> {
  using type = uint16_t;
};
template <>
struct Raw<c10::Half> {
  using type = uint16_t;
};
template <typename T>
using S_of = typename Raw<T>::type;

// Loads and stores between a storage type and its compute type: bfloat16 rounds to nearest even with NaN
// kept NaN (c10's results), float16 uses the F16C conversion instructions where the CPU has them. gcc
// does not vectorise element loops over them for float16: the loops that store float16 run eight lanes at
// a time by hand (Half8 below) and leave only the remainder to the element loop.
template <typename T>
inline A_of<T> load(S_of<T> v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef __F16C__
    return _cvtsh_ss(v);  // one instruction
#else
    return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
#endif
  } else {
    return static_cast<A_of<T>>(v);
  }
}

template <typename T>
inline S_of<T> store(A_of<T> x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((x != x) ? 0x7FC0u : r);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef __F16C__
    return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);  // round to nearest even, one instruction
#else
    return c10::Half(x).x;
#endif
  } else {
    return static_cast<T>(x);
  }
}

template <typename A>
inline A fma_(A a, A b, A c) {
  return std::fma(a, b, c);
}

// float16 lanes, eight at a time: F16C converts eight values per instruction, where the element loop's
// scalar conversions keep gcc from vectorising it. The same conversions and the same float32
// operations, so the same numbers as one element at a time.
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#define TORCHSGD_HALF_LANES 1
struct Half8 {
  __m256 v;
};
inline Half8 operator*(Half8 a, Half8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Half8 fma_(Half8 a, Half8 b, Half8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Half8 splat8(float x) { return {_mm256_set1_ps(x)}; }
inline Half8 load8(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void store8(uint16_t* p, Half8 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}

// Eight elements of any storage type as float32 lanes and back, rounding to nearest (the lifted loop's
// float16 path without stochastic rounding): the same bits as load<T>/store<T> one element at a time.
template <typename T>
inline Half8 load_lanes(const S_of<T>* p) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return load8(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
  } else {
    return {_mm256_loadu_ps(p)};
  }
}

// Eight 32-bit lanes holding 16-bit values, as eight 16-bit values.
inline __m128i narrow16(__m256i r) {
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));  // lanes 0-3, 4-7
}

// Eight bfloat16 values computed from x in 32-bit lanes, stored with NaN as the canonical 0x7FC0.
inline void store_bf16_lanes(uint16_t* p, __m256i rounded, Half8 x) {
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  const __m256i bits = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow16(bits));
}

template <typename T>
inline void store_lanes(S_of<T>* p, Half8 x) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    store8(p, x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // store<BFloat16>'s rounding to nearest even, in 32-bit lanes.
    const __m256i u = _mm256_castps_si256(x.v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i biased = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd);
    store_bf16_lanes(p, _mm256_srli_epi32(biased, 16), x);
  } else {
    _mm256_storeu_ps(p, x.v);
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TORCHSGD_BF16_LANES 1
// bfloat16 storage, 32 elements at a time as two vectors of sixteen float32 lanes (both loops; with AVX-512).
// One 64-byte load holds 32 values: the even-indexed ones in the low halves of its 32-bit lanes, the
// odd-indexed ones in the high halves. Widening is then one shift (even) or one mask (odd), and narrowing one
// masked shift, one masked and and one or, where gcc's vectorisation of the element loop widens by
// zero-extending both 256-bit halves and narrows with a cross-lane permute: fewer vector instructions per
// element, and these loops are compute-bound on few cores (docs/performance.md, "Inside the kernel"). The
// lanes hold the elements in another order, but every operation is elementwise and each element keeps its
// own hash index, so the numbers are bitwise those of the element loop.
struct Bf16x16 {
  __m512 v;
};
inline Bf16x16 operator*(Bf16x16 a, Bf16x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Bf16x16 fma_(Bf16x16 a, Bf16x16 b, Bf16x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Bf16x16 splat16(float x) { return {_mm512_set1_ps(x)}; }
inline __m512i splat16i(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }

// 32 consecutive bfloat16 values as float32: elements 0, 2, ..., 30 and elements 1, 3, ..., 31.
struct Bf16Pair {
  Bf16x16 even, odd;
};
inline Bf16Pair load_pair(const uint16_t* p) {
  const __m512i w = _mm512_loadu_si512(p);
  return {{_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))},
          {_mm512_castsi512_ps(_mm512_and_si512(w, splat16i(0xFFFF0000u)))}};
}

// store<BFloat16>'s rounding to nearest even as a 32-bit sum whose high half is the stored value.
inline __m512i nearest_sum(Bf16x16 x) {
  const __m512i u = _mm512_castps_si512(x.v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), splat16i(1));
  return _mm512_add_epi32(_mm512_add_epi32(u, splat16i(0x7FFF)), odd);
}

// 32 bfloat16 values from the high halves of the even and odd sums, NaN written as the canonical 0x7FC0.
inline void store_pair(uint16_t* p, __m512i sum_even, Bf16x16 even, __m512i sum_odd, Bf16x16 odd) {
  const __mmask16 number_even = _mm512_cmp_ps_mask(even.v, even.v, _CMP_ORD_Q);
  const __mmask16 number_odd = _mm512_cmp_ps_mask(odd.v, odd.v, _CMP_ORD_Q);
  const __m512i low = _mm512_mask_srli_epi32(splat16i(0x7FC0u), number_even, sum_even, 16);
  const __m512i high = _mm512_mask_and_epi32(splat16i(0x7FC00000u), number_odd, sum_odd, splat16i(0xFFFF0000u));
  _mm512_storeu_si512(p, _mm512_or_si512(low, high));
}

inline void store_pair_nearest(uint16_t* p, Bf16x16 even, Bf16x16 odd) {
  store_pair(p, nearest_sum(even), even, nearest_sum(odd), odd);
}
#endif

// The scalars of a step as values of the loop's lane type V (one element, or a vector of lanes).
template <typename V>
struct Lanes {
  V sign, clip_coefficient, decay, wd, m_mul, m_add, one_minus_d, neg_lr, trust;
};

// The scalars of one element broadcast to every lane of a vector type (splat: float -> V).
template <typename V, typename Splat>
inline Lanes<V> broadcast(const Lanes<float>& c, Splat splat) {
  return {splat(c.sign),  splat(c.clip_coefficient), splat(c.decay),  splat(c.wd),   splat(c.m_mul),
          splat(c.m_add), splat(c.one_minus_d), splat(c.neg_lr), splat(c.trust)};
}

}  // namespace
}  // namespace torchsgd::cpu
