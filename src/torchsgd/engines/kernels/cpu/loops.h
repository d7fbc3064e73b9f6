// Phase 3 of a step: one pass over memory. The group's tensors are segments of one index space that
// at::parallel_for splits among torch's threads; each piece runs the rule (rule.h) over its elements with
// torch's rounding, or with the lifted storage's (float32, each stored value rounded once). Nothing here
// touches Python: the binding calls run_step with the GIL released.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "lanes.h"
#include "rounding.h"
#include "rule.h"

namespace torchsgd::cpu {
namespace {

// One tensor's part of the pass: its parameter, gradient and momentum buffer, all laid out alike.
struct Segment {
  void* param;
  const void* grad;
  void* buffer;
  int64_t numel;
  bool first;    // the parameter's first step: the buffer is a copy of the direction
  double trust;  // LARS trust ratio (1.0: none)
  uint32_t key = 0;                       // stochastic-rounding noise key (rules/rounding.py)
  int64_t bytes = 0, buffer_bytes = 0;     // sizes in memory, for prefetching
  float* scales = nullptr;                 // 8-bit momentum: one scale a block (buffer: the int8 codes)
};

// How results are stored (rules/sgd.py, Rounding). Off: torch's rounding after every operation.
struct Rounding {
  bool lifted = false;
  c10::ScalarType buffer_dtype = c10::ScalarType::Undefined;  // Undefined: the parameter's dtype
  bool stochastic = false;
  uint64_t seed = 0, step = 0;
};

// One element range of one tensor: the rule, element by element (vectorised by the compiler), or for
// float16 eight lanes and for bfloat16 (with AVX-512) 32 elements at a time, the remainder element by element.
template <typename T, bool WD, bool MOM, bool NEST, bool FIRST>
void run_range(S_of<T>* __restrict p, const S_of<T>* __restrict g, S_of<T>* __restrict b, int64_t begin,
               int64_t end, bool maximize, A_of<T> trust, const Scalars<T>& s) {
  using A = typename Acc<T>::type;
  // Scalars in locals: loaded once, and never mistaken for memory the loop writes.
  const Lanes<A> c{maximize ? A(-1) : A(1), s.clip_coefficient, s.decay, s.wd, s.m_mul, s.m_add, s.one_minus_d,
                   s.neg_lr, trust};
#ifdef TORCHSGD_HALF_LANES
  if constexpr (std::is_same_v<T, c10::Half>) {
    const Lanes<Half8> v = broadcast<Half8>(c, splat8);
    for (; begin + 8 <= end; begin += 8) {
      Half8 new_param, new_buffer;
      const Half8 buffer = (MOM && !FIRST) ? load8(b + begin) : Half8{};
      rule<EveryOperation<T>, Half8, WD, MOM, NEST, FIRST>(load8(g + begin), load8(p + begin), buffer, v, new_param,
                                                           new_buffer);
      if constexpr (MOM) store8(b + begin, new_buffer);
      store8(p + begin, new_param);
    }
  }
#endif
#ifdef TORCHSGD_BF16_LANES
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const Lanes<Bf16x16> v = broadcast<Bf16x16>(c, splat16);
    for (; begin + 32 <= end; begin += 32) {
      const Bf16Pair grad = load_pair(g + begin), param = load_pair(p + begin);
      Bf16Pair buffer{}, new_param, new_buffer;
      if constexpr (MOM && !FIRST) buffer = load_pair(b + begin);
      rule<EveryOperation<T>, Bf16x16, WD, MOM, NEST, FIRST>(grad.even, param.even, buffer.even, v, new_param.even,
                                                             new_buffer.even);
      rule<EveryOperation<T>, Bf16x16, WD, MOM, NEST, FIRST>(grad.odd, param.odd, buffer.odd, v, new_param.odd,
                                                             new_buffer.odd);
      if constexpr (MOM) store_pair_nearest(b + begin, new_buffer.even, new_buffer.odd);
      store_pair_nearest(p + begin, new_param.even, new_param.odd);
    }
  }
#endif
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    A new_param, new_buffer{};
    const A buffer = (MOM && !FIRST) ? load<T>(b[i]) : A(0);
    rule<EveryOperation<T>, A, WD, MOM, NEST, FIRST>(load<T>(g[i]), load<T>(p[i]), buffer, c, new_param,
                                                     new_buffer);
    if constexpr (MOM) b[i] = store<T>(new_buffer);
    p[i] = store<T>(new_param);
  }
}

constexpr size_t kPrefetchSegments = 8;

// The first and last line of each array of a segment: a small tensor spans one or two pages.
inline void prefetch(const Segment& seg) {
  if (seg.bytes == 0) return;
  const auto* p = static_cast<const char*>(seg.param);
  const auto* g = static_cast<const char*>(seg.grad);
  __builtin_prefetch(p, 1);
  __builtin_prefetch(p + seg.bytes - 1, 1);
  __builtin_prefetch(g, 0);
  __builtin_prefetch(g + seg.bytes - 1, 0);
  if (seg.buffer != nullptr) {
    const auto* b = static_cast<const char*>(seg.buffer);
    __builtin_prefetch(b, 1);
    __builtin_prefetch(b + seg.buffer_bytes - 1, 1);
  }
}

// Split the concatenation of all segments into chunks for torch's thread pool and call
// body(segment, begin, end) on each piece, with indices local to the segment: elements, or whatever unit
// `offsets` counts (8-bit momentum counts blocks, so that no block is split), `grain` of them at least.
template <typename Body>
void for_each_piece(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets, const Body& body,
                    int64_t grain = 65536) {
  at::parallel_for(0, offsets.back(), grain, [&](int64_t begin, int64_t end) {
    auto it = std::upper_bound(offsets.begin(), offsets.end(), begin);
    size_t k = static_cast<size_t>(it - offsets.begin()) - 1;
    for (size_t ahead = k + 1; ahead < std::min(segs.size(), k + kPrefetchSegments); ++ahead) prefetch(segs[ahead]);
    while (begin < end && k < segs.size()) {
      // Many small tensors live on pages of their own: touch the one kPrefetchSegments ahead so that its
      // address translation (a TLB miss) overlaps with this segment's work instead of stalling it.
      if (k + kPrefetchSegments < segs.size()) prefetch(segs[k + kPrefetchSegments]);
      const int64_t seg_end = std::min(end, offsets[k + 1]);
      if (seg_end > begin) body(segs[k], begin - offsets[k], seg_end - offsets[k]);
      begin = seg_end;
      ++k;
    }
  });
}

template <typename T, bool WD, bool MOM, bool NEST>
void run_segments(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets, const Hyper& h) {
  const Scalars<T> s(h);
  for_each_piece(segs, offsets, [&](const Segment& seg, int64_t begin, int64_t end) {
    auto* p = static_cast<S_of<T>*>(seg.param);
    auto* g = static_cast<const S_of<T>*>(seg.grad);
    auto* b = static_cast<S_of<T>*>(seg.buffer);
    const auto trust = static_cast<A_of<T>>(seg.trust);
    if (MOM && seg.first) {  // the first step gets a loop of its own: no read of the new buffer
      run_range<T, WD, MOM, NEST, true>(p, g, b, begin, end, h.maximize, trust, s);
    } else {
      run_range<T, WD, MOM, NEST, false>(p, g, b, begin, end, h.maximize, trust, s);
    }
  });
}

// One element range of one tensor with the lifted storage: the rule in float32 whatever the storage, the
// new buffer (dtype B) and parameter (dtype T) each rounded once, to nearest or stochastically (SR), for
// one element, eight lanes (Half8) or sixteen (Bf16x16). The direction reads the float32 buffer before it
// is rounded for storage, as the reference's lifted copy does. SCALED: whether any of the clip factor,
// decoupled decay, LARS trust ratio and maximize sign is not 1; when none is, the rule leaves out those
// multiplications (exact no-ops by 1), which matters here: this loop is compute-bound on few cores.
template <typename T, typename B, bool WD, bool MOM, bool NEST, bool SR, bool FIRST, bool SCALED>
void run_range_lifted(S_of<T>* __restrict p, const S_of<T>* __restrict g, S_of<B>* __restrict b, int64_t begin,
                      int64_t end, const Segment& seg, bool maximize, const Scalars<float>& s) {
  const uint32_t key = seg.key;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16> || (MOM && std::is_same_v<B, c10::BFloat16>);
  const Lanes<float> c{maximize ? -1.0f : 1.0f, s.clip_coefficient, s.decay, s.wd, s.m_mul, s.m_add, s.one_minus_d,
                       s.neg_lr, static_cast<float>(seg.trust)};
#ifdef TORCHSGD_HALF_LANES
  // float16 storage: eight F16C lanes at a time, where the element loop's scalar conversions keep gcc from
  // vectorising it. The same conversions, hashes and float32 operations in the same order, so the same
  // numbers; the remainder runs in the element loop below.
  if constexpr (std::is_same_v<T, c10::Half> || (MOM && std::is_same_v<B, c10::Half>)) {
    const Lanes<Half8> v = broadcast<Half8>(c, splat8);
    for (; begin + 8 <= end; begin += 8) {
      Half8 new_param, new_buffer;
      const Half8 buffer = (MOM && !FIRST) ? load_lanes<B>(b + begin) : Half8{};
      rule<StoredValuesOnly, Half8, WD, MOM, NEST, FIRST, SCALED>(load_lanes<T>(g + begin), load_lanes<T>(p + begin),
                                                                   buffer, v, new_param, new_buffer);
      if constexpr (MOM) store_lanes_as<B, SR, false>(b + begin, new_buffer, key, begin);
      store_lanes_as<T, SR, true>(p + begin, new_param, key, begin);
    }
  }
#endif
#ifdef TORCHSGD_BF16_LANES
  // bfloat16 parameters (with a bfloat16 buffer, or none): 32 elements at a time, even and odd lanes.
  if constexpr (std::is_same_v<T, c10::BFloat16> && (!MOM || std::is_same_v<B, c10::BFloat16>)) {
    const Lanes<Bf16x16> v = broadcast<Bf16x16>(c, splat16);
    // The hash inputs i·kHashStep + key of the even elements begin, begin + 2, ..., begin + 30; the odd
    // ones are one kHashStep further. Advanced by an addition per block, in 32-bit arithmetic.
    __m512i x_even = _mm512_add_epi32(
        splat16i(static_cast<uint32_t>(begin) * kHashStep + key),
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                           splat16i(kHashStep)));
    for (; begin + 32 <= end; begin += 32) {
      const Bf16Pair grad = load_pair(g + begin), param = load_pair(p + begin);
      Bf16Pair buffer{};
      if constexpr (MOM && !FIRST) buffer = load_pair(b + begin);
      Bf16Pair new_param, new_buffer;
      rule<StoredValuesOnly, Bf16x16, WD, MOM, NEST, FIRST, SCALED>(grad.even, param.even, buffer.even, v,
                                                                     new_param.even, new_buffer.even);
      rule<StoredValuesOnly, Bf16x16, WD, MOM, NEST, FIRST, SCALED>(grad.odd, param.odd, buffer.odd, v,
                                                                     new_param.odd, new_buffer.odd);
      if constexpr (SR) {
        // One hash an element: the parameter takes its high 16 bits, the buffer its low 16 (store_as).
        const __m512i h_even = hash_finish16(x_even);
        const __m512i h_odd = hash_finish16(_mm512_add_epi32(x_even, splat16i(kHashStep)));
        x_even = _mm512_add_epi32(x_even, splat16i(32u * kHashStep));
        if constexpr (MOM) {
          const __m512i low16 = splat16i(0xFFFFu);
          store_pair(b + begin, noisy_sum(new_buffer.even, _mm512_and_si512(h_even, low16)), new_buffer.even,
                     noisy_sum(new_buffer.odd, _mm512_and_si512(h_odd, low16)), new_buffer.odd);
        }
        store_pair(p + begin, noisy_sum(new_param.even, _mm512_srli_epi32(h_even, 16)), new_param.even,
                   noisy_sum(new_param.odd, _mm512_srli_epi32(h_odd, 16)), new_param.odd);
      } else {
        if constexpr (MOM) store_pair_nearest(b + begin, new_buffer.even, new_buffer.odd);
        store_pair_nearest(p + begin, new_param.even, new_param.odd);
      }
    }
  }
#endif
  // Chunks of at most 2^30 elements, counted in 32 bits inside: the hash's index stays in 32-bit lanes.
  constexpr int64_t kChunk = int64_t{1} << 30;
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    const uint32_t count = static_cast<uint32_t>(std::min(end - chunk, kChunk));
    S_of<T>* __restrict pc = p + chunk;
    const S_of<T>* __restrict gc = g + chunk;
    S_of<B>* __restrict bc = MOM ? b + chunk : nullptr;
    const uint32_t start = static_cast<uint32_t>(chunk) * kHashStep + key;
#pragma omp simd
    for (uint32_t k = 0; k < count; ++k) {
      const int64_t i = chunk + k;
      const uint32_t h = (SR && kBf16) ? hash_finish(start + k * kHashStep) : 0u;
      float new_param, new_buffer{};
      const float buffer = (MOM && !FIRST) ? load<B>(bc[k]) : 0.0f;
      rule<StoredValuesOnly, float, WD, MOM, NEST, FIRST, SCALED>(load<T>(gc[k]), load<T>(pc[k]), buffer, c,
                                                                  new_param, new_buffer);
      if constexpr (MOM) bc[k] = store_as<B, SR, false>(new_buffer, h, key, i);
      pc[k] = store_as<T, SR, true>(new_param, h, key, i);
    }
  }
}

template <typename T, typename B, bool WD, bool MOM, bool NEST>
void run_segments_lifted(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets, const Hyper& h,
                         bool stochastic) {
  const Scalars<float> s(h);
  for_each_piece(segs, offsets, [&](const Segment& seg, int64_t begin, int64_t end) {
    auto* p = static_cast<S_of<T>*>(seg.param);
    auto* g = static_cast<const S_of<T>*>(seg.grad);
    auto* b = static_cast<S_of<B>*>(seg.buffer);
    const bool first = MOM && seg.first;
    const bool scaled = h.maximize || s.clip_coefficient != 1.0f || s.decay != 1.0f || seg.trust != 1.0;
    // One instantiation per (stochastic, first step, scaled), chosen per piece.
    auto run = [&](auto sr, auto fst, auto sc) {
      run_range_lifted<T, B, WD, MOM, NEST, decltype(sr)::value, decltype(fst)::value, decltype(sc)::value>(
          p, g, b, begin, end, seg, h.maximize, s);
    };
    auto with_scaled = [&](auto sr, auto fst) {
      scaled ? run(sr, fst, std::true_type{}) : run(sr, fst, std::false_type{});
    };
    auto with_first = [&](auto sr) {
      first ? with_scaled(sr, std::true_type{}) : with_scaled(sr, std::false_type{});
    };
    stochastic ? with_first(std::true_type{}) : with_first(std::false_type{});
  });
}

template <typename T, typename B>
void dispatch_lifted_flags(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets, const Hyper& h,
                           bool stochastic) {
  const bool wd = h.weight_decay != 0.0 && !h.decoupled;
  if (h.momentum == 0.0) {
    wd ? run_segments_lifted<T, B, true, false, false>(segs, offsets, h, stochastic)
       : run_segments_lifted<T, B, false, false, false>(segs, offsets, h, stochastic);
  } else if (h.nesterov) {
    wd ? run_segments_lifted<T, B, true, true, true>(segs, offsets, h, stochastic)
       : run_segments_lifted<T, B, false, true, true>(segs, offsets, h, stochastic);
  } else {
    wd ? run_segments_lifted<T, B, true, true, false>(segs, offsets, h, stochastic)
       : run_segments_lifted<T, B, false, true, false>(segs, offsets, h, stochastic);
  }
}

template <typename T>
void dispatch_lifted_buffer(c10::ScalarType buffer, const std::vector<Segment>& segs,
                            const std::vector<int64_t>& offsets, const Hyper& h, bool stochastic) {
  switch (buffer) {
    case c10::ScalarType::Float: dispatch_lifted_flags<T, float>(segs, offsets, h, stochastic); break;
    case c10::ScalarType::BFloat16: dispatch_lifted_flags<T, c10::BFloat16>(segs, offsets, h, stochastic); break;
    default: dispatch_lifted_flags<T, c10::Half>(segs, offsets, h, stochastic); break;
  }
}

template <typename T>
void dispatch_flags(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets, const Hyper& h) {
  const bool wd = h.weight_decay != 0.0 && !h.decoupled;
  const bool mom = h.momentum != 0.0;
  if (!mom) {
    wd ? run_segments<T, true, false, false>(segs, offsets, h) : run_segments<T, false, false, false>(segs, offsets, h);
  } else if (h.nesterov) {
    wd ? run_segments<T, true, true, true>(segs, offsets, h) : run_segments<T, false, true, true>(segs, offsets, h);
  } else {
    wd ? run_segments<T, true, true, false>(segs, offsets, h) : run_segments<T, false, true, false>(segs, offsets, h);
  }
}

// The pass over a checked group whose parameters (and gradients) are all of dtype `dtype`: float32,
// float64 or bfloat16, float16 with the half lanes, any of float32, bfloat16 and float16 lifted (the
// buffers then of the storage's dtype, the same three). The caller has checked all of that.
inline void run_step(c10::ScalarType dtype, const std::vector<Segment>& segs, const std::vector<int64_t>& offsets,
                     const Hyper& h, const Rounding& storage) {
  if (storage.lifted) {
    const c10::ScalarType buffer = storage.buffer_dtype == c10::ScalarType::Undefined ? dtype : storage.buffer_dtype;
    switch (dtype) {
      case c10::ScalarType::Float: dispatch_lifted_buffer<float>(buffer, segs, offsets, h, storage.stochastic); break;
      case c10::ScalarType::BFloat16:
        dispatch_lifted_buffer<c10::BFloat16>(buffer, segs, offsets, h, storage.stochastic);
        break;
      default: dispatch_lifted_buffer<c10::Half>(buffer, segs, offsets, h, storage.stochastic); break;
    }
  } else {
    switch (dtype) {
      case c10::ScalarType::Float: dispatch_flags<float>(segs, offsets, h); break;
      case c10::ScalarType::Double: dispatch_flags<double>(segs, offsets, h); break;
      case c10::ScalarType::BFloat16: dispatch_flags<c10::BFloat16>(segs, offsets, h); break;
      default:
#ifdef TORCHSGD_HALF_LANES
        dispatch_flags<c10::Half>(segs, offsets, h);
#endif
        break;
    }
  }
}

}  // namespace
}  // namespace torchsgd::cpu
