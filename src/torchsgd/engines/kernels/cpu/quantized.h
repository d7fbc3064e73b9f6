// 8-bit momentum (momentum_dtype=torch.int8) in one pass: for each block of kQBlock elements of a tensor,
// dequantize its codes, run the rule (rule.h, the lifted storage's float32 arithmetic), store the
// parameter (rounded once, stochastically with SR) and requantize the new buffer, all from registers and
// one 1 KiB stack array: memory sees one read of the parameter, gradient and codes and one write of the
// parameter and codes, 2 + 2 + 1 + ... bytes fewer than a float32 buffer's 8 an element. The code is
// rules/quantize.py's LINEAR one, bit for bit:
//   dequantize  b = float(c) · (s / 127)                  (s / 127 once a block)
//   quantize    s = max |b|;  c = round(b · (127 / s))    (127 / s once a block; half to even, or
//               ⌊b · (127 / s) + u⌋ stochastically, u from the counter hash keyed key ^ kQuantizeStream)
// with zero codes for a block below kFloor and zero codes and a NaN scale for a non-finite block.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "lanes.h"
#include "loops.h"
#include "rounding.h"
#include "rule.h"

namespace torchsgd::cpu {
namespace {

constexpr int64_t kQBlock = 256;                 // rules/quantize.py's BLOCK
constexpr float kFloor = 0x1p-120f;              // rules/quantize.py's FLOOR
constexpr uint32_t kQuantizeStream = 0x3C6EF372u;  // rules/quantize.py's QUANTIZE
constexpr uint32_t kAbsMask = 0x7FFFFFFFu, kInfBits = 0x7F800000u;

constexpr int64_t kQuantizedGrain = 65536 / kQBlock;  // blocks: for_each_piece's grain, as for elements

inline int64_t quantized_blocks(int64_t numel) { return (numel + kQBlock - 1) / kQBlock; }

// Rounding to an integer, for |x| < 2^22 (here |x| ≤ 127 plus two ulps, plus u < 1): x + 1.5·2^23 is a
// float32 with an ulp of 1, so the addition rounds x to the nearest integer n, ties to even (the default
// rounding mode, torch.round's), and its bits are 0x4B400000 + n: the low byte is n as an int8. The floor
// is the nearest integer minus one where that came out above y, found from the sign bits of the
// difference with integer operations. (gcc vectorises neither std::floor nor a float comparison in a
// select here without -fno-trapping-math, and its float-to-int8 conversion costs more than the rest of
// the quantization; these are exact, torch.round's and torch.floor's results, and vectorise; the clamp of
// the stochastic code is in integers for the same reason.)
constexpr float kMagic = 0x1.8p23f;
constexpr int32_t kMagicBits = 0x4B400000;

inline int8_t code_of_nearest(float x) {  // round(x) as an int8, for |x| < 128
  const float shifted = x + kMagic;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  return static_cast<int8_t>(bits & 0xFFu);
}

inline int32_t floor_small(float y) {  // ⌊y⌋, for |y| < 2^22
  const float shifted = y + kMagic;
  int32_t nearest;
  std::memcpy(&nearest, &shifted, sizeof nearest);
  const float above = (shifted - kMagic) - y;  // in (-0.5, 0.5]; +0 when y is an integer
  uint32_t bits;
  std::memcpy(&bits, &above, sizeof bits);
  const int32_t positive = (bits - 1u) < 0x7FFFFFFFu;  // bits in [1, 0x7FFFFFFF]: above > 0
  return nearest - kMagicBits - positive;
}

// One block of n ≤ kQBlock elements starting at element `begin` of its tensor.
template <typename T, bool WD, bool NEST, bool SR, bool FIRST, bool SCALED>
inline void quantized_block(S_of<T>* __restrict p, const S_of<T>* __restrict g, int8_t* __restrict codes,
                            float* scale, int64_t begin, int64_t n, uint32_t key, const Lanes<float>& c) {
  alignas(64) float fresh[kQBlock];  // the new buffer, float32, before it is quantized
  const float step = FIRST ? 0.0f : *scale / 127.0f;
  // The block's largest |b| as bits: for non-negative floats the integer order is the float order, and
  // every inf or NaN is above kInfBits, so one integer max finds the scale and whether the block is finite.
  uint32_t largest = 0;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const uint32_t hash_start = static_cast<uint32_t>(begin) * kHashStep + key;
#pragma omp simd reduction(max : largest)
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = begin + k;
    const float buffer = FIRST ? 0.0f : static_cast<float>(codes[i]) * step;
    float new_param, new_buffer;
    rule<StoredValuesOnly, float, WD, true, NEST, FIRST, SCALED>(load<T>(g[i]), load<T>(p[i]), buffer, c, new_param,
                                                                 new_buffer);
    const uint32_t h = (SR && kBf16) ? hash_finish(hash_start + static_cast<uint32_t>(k) * kHashStep) : 0u;
    p[i] = store_as<T, SR, true>(new_param, h, key, i);
    fresh[k] = new_buffer;
    uint32_t bits;
    std::memcpy(&bits, &new_buffer, sizeof bits);
    largest = std::max(largest, bits & kAbsMask);
  }
  if (largest >= kInfBits) {  // a non-finite value: zero codes and a NaN scale (it dequantizes to NaN)
    std::memset(codes + begin, 0, static_cast<size_t>(n));
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  float s;
  std::memcpy(&s, &largest, sizeof s);
  *scale = s;
  const float inverse = s >= kFloor ? 127.0f / s : 0.0f;
  const uint32_t noise_start = static_cast<uint32_t>(begin) * kHashStep + (key ^ kQuantizeStream);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float x = fresh[k] * inverse;
    if constexpr (SR) {
      const uint32_t h = hash_finish(noise_start + static_cast<uint32_t>(k) * kHashStep);
      const float y = x + static_cast<float>(static_cast<int32_t>(h >> 8)) * 0x1p-24f;  // u: 24 bits in [0, 1)
      codes[begin + k] = static_cast<int8_t>(std::min(std::max(floor_small(y), -127), 127));
    } else {
      // No clamp needed: |b| ≤ s, so |x| ≤ 127 · (1 + 2^-23)^2, which rounds to at most 127.
      codes[begin + k] = code_of_nearest(x);
    }
  }
}

template <typename T, bool WD, bool NEST>
void run_segments_quantized(const std::vector<Segment>& segs, const std::vector<int64_t>& block_offsets,
                            const Hyper& h, bool stochastic) {
  const Scalars<float> s(h);
  // The index space is one of blocks: a piece never splits a block between threads.
  for_each_piece(
      segs, block_offsets,
      [&](const Segment& seg, int64_t block_begin, int64_t block_end) {
        auto* p = static_cast<S_of<T>*>(seg.param);
        auto* g = static_cast<const S_of<T>*>(seg.grad);
        auto* codes = static_cast<int8_t*>(seg.buffer);
        const Lanes<float> c{h.maximize ? -1.0f : 1.0f, s.clip_coefficient, s.decay, s.wd, s.m_mul, s.m_add,
                             s.one_minus_d, s.neg_lr, static_cast<float>(seg.trust)};
        const bool scaled = h.maximize || s.clip_coefficient != 1.0f || s.decay != 1.0f || seg.trust != 1.0;
        auto run = [&](auto sr, auto first, auto sc) {
          for (int64_t block = block_begin; block < block_end; ++block) {
            const int64_t begin = block * kQBlock;
            quantized_block<T, WD, NEST, decltype(sr)::value, decltype(first)::value, decltype(sc)::value>(
                p, g, codes, seg.scales + block, begin, std::min(kQBlock, seg.numel - begin), seg.key, c);
          }
        };
        auto with_scaled = [&](auto sr, auto first) {
          scaled ? run(sr, first, std::true_type{}) : run(sr, first, std::false_type{});
        };
        auto with_first = [&](auto sr) {
          seg.first ? with_scaled(sr, std::true_type{}) : with_scaled(sr, std::false_type{});
        };
        stochastic ? with_first(std::true_type{}) : with_first(std::false_type{});
      },
      kQuantizedGrain);
}

template <typename T>
void dispatch_quantized(const std::vector<Segment>& segs, const Hyper& h, bool stochastic) {
  std::vector<int64_t> block_offsets(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) block_offsets[i + 1] = block_offsets[i] + quantized_blocks(segs[i].numel);
  const bool wd = h.weight_decay != 0.0 && !h.decoupled;
  if (h.nesterov) {
    wd ? run_segments_quantized<T, true, true>(segs, block_offsets, h, stochastic)
       : run_segments_quantized<T, false, true>(segs, block_offsets, h, stochastic);
  } else {
    wd ? run_segments_quantized<T, true, false>(segs, block_offsets, h, stochastic)
       : run_segments_quantized<T, false, false>(segs, block_offsets, h, stochastic);
  }
}

// The pass of a checked group with 8-bit momentum (momentum != 0): parameters of float32, bfloat16 or
// float16, each segment's buffer its codes and its scales one float32 a block.
inline void run_step_quantized(c10::ScalarType dtype, const std::vector<Segment>& segs, const Hyper& h,
                               bool stochastic) {
  switch (dtype) {
    case c10::ScalarType::Float: dispatch_quantized<float>(segs, h, stochastic); break;
    case c10::ScalarType::BFloat16: dispatch_quantized<c10::BFloat16>(segs, h, stochastic); break;
    default: dispatch_quantized<c10::Half>(segs, h, stochastic); break;
  }
}

}  // namespace
}  // namespace torchsgd::cpu
