// How a computed float32 value becomes a stored one. Torch's rounding of every intermediate to the
// tensor's dtype (round_to), and for the lifted storage of rules/sgd.py one rounding per stored value,
// to nearest (lanes.h's store) or stochastically, with noise from a counter hash of (seed, step, parameter,
// element): the arithmetic of rules/rounding.py, bit for bit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lanes.h"

namespace torchsgd::cpu {
namespace {

// Round to the tensor's dtype and back: what storing an intermediate result in a tensor does.
// A no-op for float32 and float64. For bfloat16 it is store()'s rounding without store()'s NaN select:
// every NaN an intermediate can hold has zero low 16 bits (it was loaded from bfloat16, or is the
// default NaN of an invalid operation, or was propagated from one of those), and for such a NaN the
// rounding cannot carry out of the mantissa, so it stays a NaN. Its sign and payload do not matter:
// the values written to memory go through store(), which writes the canonical NaN. The rule rounds seven
// times an element and the bfloat16 loop is compute-bound on few cores, so the select is worth leaving out.
template <typename T>
inline typename Acc<T>::type round_to(typename Acc<T>::type x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    float f;
    std::memcpy(&f, &r, sizeof f);
    return f;
  } else {
    return load<T>(store<T>(x));
  }
}

#ifdef TORCHSGD_HALF_LANES
template <typename T>
inline Half8 round_to(Half8 x) {
  static_assert(std::is_same_v<T, c10::Half>);
  return {_mm256_cvtph_ps(_mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT))};
}
#endif

#ifdef TORCHSGD_BF16_LANES
// round_to<BFloat16> in lanes (torch's rounding of each intermediate, without the NaN select: see there).
template <typename T>
inline Bf16x16 round_to(Bf16x16 x) {
  static_assert(std::is_same_v<T, c10::BFloat16>);
  return {_mm512_castsi512_ps(_mm512_and_si512(nearest_sum(x), splat16i(0xFFFF0000u)))};
}
#endif

// ---- the counter hash: one noise stream per (seed, step, parameter), one value per element ----------

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint32_t stream_key(uint64_t seed, uint64_t step, uint64_t stream) {
  return static_cast<uint32_t>(splitmix64(splitmix64(splitmix64(seed) ^ step) ^ stream));
}

// element_hash(key, i) = hash_finish(i·kHashStep + key) in 32-bit arithmetic. The loops advance the
// start by kHashStep per element: one vector addition, where the compiler would otherwise multiply a
// 64-bit index per element and narrow it.
constexpr uint32_t kHashStep = 0x9E3779B1u;
// hash_finish's multipliers (murmur3's finaliser); its lane versions (hash_lanes, hash_finish16) use them too.
constexpr uint32_t kMix1 = 0x85EBCA6Bu, kMix2 = 0xC2B2AE35u;

inline uint32_t hash_finish(uint32_t x) {
  x ^= x >> 16;
  x *= kMix1;
  x ^= x >> 13;
  x *= kMix2;
  x ^= x >> 16;
  return x;
}

inline uint32_t element_hash(uint32_t key, int64_t index) {
  return hash_finish(static_cast<uint32_t>(index) * kHashStep + key);
}

#ifdef TORCHSGD_HALF_LANES
// element_hash for eight elements, indices first..first+7.
inline __m256i hash_lanes(uint32_t key, int64_t first) {
  const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first))),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(index, _mm256_set1_epi32(static_cast<int>(kHashStep))),
                               _mm256_set1_epi32(static_cast<int>(key)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kMix1)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kMix2)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
#endif

#ifdef TORCHSGD_BF16_LANES
// hash_finish in sixteen lanes.
inline __m512i hash_finish16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, splat16i(kMix1));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, splat16i(kMix2));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
#endif

// ---- stochastic rounding ----------------------------------------------------------------------------

// Stochastic: add 16 random bits below the bf16 mantissa and truncate (infinities stay infinite: their
// low bits are zero). A NaN whose payload fills the mantissa would carry into the sign bit, so NaN is
// kept NaN by a select; branch-free, so the loop vectorises.
template <bool SR>
inline uint16_t round_bf16(float x, uint32_t noise16) {
  if constexpr (!SR) {
    return store<c10::BFloat16>(x);
  } else {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const auto rounded = static_cast<uint16_t>(((bits + noise16) & 0xFFFF0000u) >> 16);
    return (x != x) ? uint16_t{0x7FC0u} : rounded;  // store()'s canonical NaN, without its rounding
  }
}

// The float16 neighbour of a (given as bits) away from or toward zero: torch.nextafter's result.
inline uint16_t next_half(uint16_t bits, bool up) {
  const bool zero = (bits & 0x7FFFu) == 0;
  const bool positive = (bits & 0x8000u) == 0;
  const uint16_t away = static_cast<uint16_t>(positive == up ? bits + 1 : bits - 1);
  const uint16_t from_zero = up ? 0x0001u : 0x8001u;
  return zero ? from_zero : away;
}

// Stochastic: choose between the two float16 neighbours of x with probability proportional to the
// distance (NaN, ±inf and exactly representable values stay as they are); written with selects.
template <bool SR>
inline uint16_t round_half(float x, uint32_t key, int64_t i) {
  const uint16_t nearest = store<c10::Half>(x);
  if constexpr (!SR) {
    return nearest;
  } else {
    const float near = load<c10::Half>(nearest);
    const float other = load<c10::Half>(next_half(nearest, near < x));
    const float lo = std::min(near, other), hi = std::max(near, other);
    const float p_hi = (x - lo) / (hi - lo);
    const float u = static_cast<float>(element_hash(key, i) >> 8) * 0x1p-24f;
    const uint16_t rounded = store<c10::Half>(u < p_hi ? hi : lo);
    const bool finite = (x - x) == 0.0f;  // false for inf and NaN, with no branch
    return (finite & (near != x)) ? rounded : nearest;
  }
}

// The noise of one element (rules/rounding.py): one hash h of (key, i) serves both bfloat16 stores, the
// parameter taking its high 16 bits and the buffer its low 16; a float16 store hashes a salted key of
// its own (it needs 24 bits).
constexpr uint32_t kSaltParam = 0x68E31DA4u, kSaltBuffer = 0xB5297A4Du;

template <typename T, bool SR, bool PARAM>
inline S_of<T> store_as(float x, uint32_t h, uint32_t key, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return round_bf16<SR>(x, PARAM ? (h >> 16) : (h & 0xFFFFu));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return round_half<SR>(x, key ^ (PARAM ? kSaltParam : kSaltBuffer), i);
  } else {
    return static_cast<T>(x);
  }
}

#ifdef TORCHSGD_HALF_LANES
// round_half<true> in lanes: the float16 neighbours of x, one chosen with probability by distance.
inline __m128i round_half_lanes(__m256 x, __m256i hash) {
  const __m128i nearest = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
  const __m256 near = _mm256_cvtph_ps(nearest);
  const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(near, x, _CMP_LT_OQ));
  const __m256i bits = _mm256_cvtepu16_epi32(nearest);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i is_zero = _mm256_cmpeq_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7FFF)), zero);
  const __m256i positive = _mm256_cmpeq_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x8000)), zero);
  const __m256i away_up = _mm256_cmpeq_epi32(positive, up);  // next_half: positive == up
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i away = _mm256_blendv_epi8(_mm256_sub_epi32(bits, one), _mm256_add_epi32(bits, one), away_up);
  const __m256i from_zero = _mm256_blendv_epi8(_mm256_set1_epi32(0x8001), one, up);
  const __m256i other_bits =
      _mm256_and_si256(_mm256_blendv_epi8(away, from_zero, is_zero), _mm256_set1_epi32(0xFFFF));
  const __m256 other = _mm256_cvtph_ps(narrow16(other_bits));
  const __m256 lo = _mm256_min_ps(other, near);  // std::min(near, other)
  const __m256 hi = _mm256_max_ps(other, near);  // std::max(near, other)
  const __m256 p_hi = _mm256_div_ps(_mm256_sub_ps(x, lo), _mm256_sub_ps(hi, lo));
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(hash, 8)), _mm256_set1_ps(0x1p-24f));
  const __m256 chosen = _mm256_blendv_ps(lo, hi, _mm256_cmp_ps(u, p_hi, _CMP_LT_OQ));
  const __m256i rounded = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(chosen, _MM_FROUND_TO_NEAREST_INT));
  const __m256 finite = _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_EQ_OQ);
  const __m256 use = _mm256_and_ps(finite, _mm256_cmp_ps(near, x, _CMP_NEQ_UQ));
  return narrow16(_mm256_blendv_epi8(bits, rounded, _mm256_castps_si256(use)));
}

// Always inlined: gcc's heuristics may otherwise leave the float16 stochastic store out of line, a call
// (with its vector arguments spilled) per eight elements of a compute-bound loop.
template <typename T, bool SR, bool PARAM>
[[gnu::always_inline]] inline void store_lanes_as(S_of<T>* p, Half8 x, uint32_t key, int64_t first) {
  if constexpr (!SR || std::is_same_v<T, float>) {
    store_lanes<T>(p, x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // round_bf16<true>, noise from the shared hash
    const __m256i h = hash_lanes(key, first);
    const __m256i noise = PARAM ? _mm256_srli_epi32(h, 16) : _mm256_and_si256(h, _mm256_set1_epi32(0xFFFF));
    store_bf16_lanes(p, _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(x.v), noise), 16), x);
  } else {
    const __m256i h = hash_lanes(key ^ (PARAM ? kSaltParam : kSaltBuffer), first);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), round_half_lanes(x.v, h));
  }
}
#endif

#ifdef TORCHSGD_BF16_LANES
// round_bf16<true> in lanes: the value's bits plus 16 bits of noise (store_pair keeps the high half).
inline __m512i noisy_sum(Bf16x16 x, __m512i noise16) { return _mm512_add_epi32(_mm512_castps_si512(x.v), noise16); }
#endif

}  // namespace
}  // namespace torchsgd::cpu
