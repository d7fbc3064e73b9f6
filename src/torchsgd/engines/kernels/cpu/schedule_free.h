// ScheduleFreeSGD's training step (rules/schedule_free.py) in one pass over y, z and the gradient: each
// element is read once and y and z written once, where the Python engines run four torch operations
// (and a fifth with weight decay), each a pass over memory. Two rounding policies, as for SGD (rule.h):
// torch's (every operation's result rounded to the tensor's dtype: bitwise the schedulefree package for
// float32 and float64, and for bfloat16 and float16 where TorchChunks knows torch's loop) and the lifted
// storage's (float32 throughout, y and z each rounded once, to nearest or stochastically with the noise of
// rounding.h: y takes the parameter's noise, z the buffer's).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "lanes.h"
#include "loops.h"
#include "rounding.h"

namespace torchsgd::cpu {
namespace {

// One step's scalars, as Python computed them (rules/schedule_free.py, advance_schedule).
struct ScheduleFreeHyper {
  double ckp1;          // c, the lerp weight toward z
  double y_alpha;       // γ·(μ·(1 − c) − 1)
  double lr;            // γ after warmup
  double weight_decay;  // λ
  // bfloat16 and float16 at torch's rounding: the elements of one iteration of torch's vectorised loop
  // (2 vectors: 32 with AVX2; 0: unknown, no remainder emulated) and torch's thread count (see TorchChunks).
  int64_t torch_vector = 0, torch_threads = 1;
};

// Where torch's CPU loop over a tensor of n elements runs its scalar code: TensorIterator splits the
// tensor among its threads (at::parallel_for with a grain of 32768 elements, chunks of ceil(n / threads))
// and each chunk's vectorised loop leaves its last (length mod vector) elements to the scalar op. For
// bfloat16 and float16, x.add_(y, alpha=a) there is a + round(a·y) rounded twice, where the vector op is
// one fma.
struct TorchChunks {
  int64_t numel, chunk, vector;
  TorchChunks(int64_t n, const ScheduleFreeHyper& h) : numel(n), chunk(n), vector(h.torch_vector) {
    constexpr int64_t kGrain = 32768;
    if (n >= kGrain && h.torch_threads > 1) {
      const int64_t threads = std::min<int64_t>(h.torch_threads, (n + kGrain - 1) / kGrain);
      chunk = (n + threads - 1) / threads;
    }
  }
  // Calls body(begin, end, scalar) over [begin, end) cut where torch's loop changes between its vector
  // op and its scalar one.
  template <typename Body>
  void split(int64_t begin, int64_t end, const Body& body) const {
    if (vector <= 0 || chunk <= 0) {
      body(begin, end, false);
      return;
    }
    while (begin < end) {
      const int64_t chunk_begin = begin / chunk * chunk;
      const int64_t chunk_end = std::min(numel, chunk_begin + chunk);
      const int64_t scalar_begin = chunk_begin + (chunk_end - chunk_begin) / vector * vector;
      const int64_t stop = std::min(end, chunk_end);
      if (begin < scalar_begin) body(begin, std::min(stop, scalar_begin), false);
      if (stop > scalar_begin) body(std::max(begin, scalar_begin), stop, true);
      begin = stop;
    }
  }
};

// The scalars as torch's kernels see them: an add's alpha rounded to the tensor's dtype, the lerp weight
// to the compute type (torch's lerp_vec: fma(w, z − y, y) when |w| < 0.5, else fma(w − 1, z − y, z)).
template <typename T>
struct ScheduleFreeScalars {
  using A = typename Acc<T>::type;
  A wd, coefficient, y_alpha, neg_lr;
  bool small;  // |w| < 0.5: the lerp starts from y, else from z
  explicit ScheduleFreeScalars(const ScheduleFreeHyper& h)
      : wd(as_alpha(h.weight_decay)),
        coefficient(static_cast<A>(h.ckp1)),
        y_alpha(as_alpha(h.y_alpha)),
        neg_lr(as_alpha(-h.lr)),
        small(std::abs(static_cast<A>(h.ckp1)) < A(0.5)) {
    if (!small) coefficient = coefficient - A(1);
  }
  static A as_alpha(double x) { return static_cast<A>(static_cast<T>(x)); }
};

// The lane type's subtraction and addition: operators for float and double, intrinsics for Half8.
template <typename A>
inline A minus(A a, A b) {
  return a - b;
}
template <typename A>
inline A plus(A a, A b) {
  return a + b;
}
#ifdef TORCHSGD_HALF_LANES
inline Half8 minus(Half8 a, Half8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Half8 plus(Half8 a, Half8 b) { return {_mm256_add_ps(a.v, b.v)}; }
#endif

// x.add(other, alpha=a) as torch computes it: one fma in its vector loop; in its scalar remainder
// (SCALAR, bfloat16 and float16) a + round(a·other), both rounded. Not rounded here: the caller rounds.
template <typename R, bool SCALAR, typename A>
inline A torch_add(A x, A other, A alpha) {
  if constexpr (SCALAR) {
    return plus(x, R::round(alpha * other));
  } else {
    return fma_(other, alpha, x);
  }
}

// The rule, one rounded torch operation per line (R: EveryOperation<T> or StoredValuesOnly). The loop's
// stores round new_y and new_z. SCALAR: the element is in torch's scalar remainder (TorchChunks). A is
// one element (float, double) or eight float16 lanes (Half8, S then holds the scalars broadcast).
template <typename R, typename A, bool WD, bool SMALL, bool SCALAR = false, typename S>
inline void schedule_free_rule(A grad, A y, A z, const S& s, A& new_y, A& new_z) {
  A g = grad;
  if constexpr (WD) g = R::round(torch_add<R, SCALAR>(grad, y, s.wd));        // g = grad.add(y, alpha=λ)
  const A lerped = R::round(fma_(s.coefficient, minus(z, y), SMALL ? y : z));  // y.lerp_(z, c)
  new_y = torch_add<R, SCALAR>(lerped, g, s.y_alpha);                         // y.add_(g, alpha=γ(μ(1−c)−1))
  new_z = torch_add<R, SCALAR>(z, g, s.neg_lr);                               // z.sub_(g, alpha=γ)
}

// torch's rounding, element by element (gcc vectorises float32, float64 and bfloat16).
template <typename T, bool WD, bool SMALL, bool SCALAR = false>
void schedule_free_range(S_of<T>* __restrict y, const S_of<T>* __restrict g, S_of<T>* __restrict z, int64_t begin,
                         int64_t end, const ScheduleFreeScalars<T>& s) {
  using A = typename Acc<T>::type;
  const ScheduleFreeScalars<T> c = s;  // in locals: never mistaken for memory the loop writes
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    A new_y, new_z;
    schedule_free_rule<EveryOperation<T>, A, WD, SMALL, SCALAR>(load<T>(g[i]), load<T>(y[i]), load<T>(z[i]), c, new_y,
                                                                new_z);
    y[i] = store<T>(new_y);
    z[i] = store<T>(new_z);
  }
}

#ifdef TORCHSGD_HALF_LANES
// The scalars broadcast to eight lanes.
struct ScheduleFreeLanes {
  Half8 wd, coefficient, y_alpha, neg_lr;
};

// float16 at torch's rounding in torch's vector loop: eight F16C lanes at a time (gcc does not vectorise
// the element loop's scalar conversions), the same conversions and float32 operations as the element loop,
// so the same numbers; the remainder runs in the element loop.
template <bool WD, bool SMALL>
void schedule_free_range_half(uint16_t* __restrict y, const uint16_t* __restrict g, uint16_t* __restrict z,
                              int64_t begin, int64_t end, const ScheduleFreeScalars<c10::Half>& s) {
  using R = EveryOperation<c10::Half>;
  const ScheduleFreeLanes v{splat8(s.wd), splat8(s.coefficient), splat8(s.y_alpha), splat8(s.neg_lr)};
  for (; begin + 8 <= end; begin += 8) {
    Half8 new_y, new_z;
    schedule_free_rule<R, Half8, WD, SMALL>(load8(g + begin), load8(y + begin), load8(z + begin), v, new_y, new_z);
    store8(y + begin, new_y);
    store8(z + begin, new_z);
  }
  schedule_free_range<c10::Half, WD, SMALL>(y, g, z, begin, end, s);
}
#endif

// The lifted storage: float32 arithmetic whatever the dtype, y and z each rounded once (SR: stochastically,
// from the element's hash as rules/rounding.py draws it).
template <typename T, bool WD, bool SMALL, bool SR>
void schedule_free_range_lifted(S_of<T>* __restrict y, const S_of<T>* __restrict g, S_of<T>* __restrict z,
                                int64_t begin, int64_t end, uint32_t key, const ScheduleFreeScalars<float>& s) {
  const ScheduleFreeScalars<float> c = s;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t h = (SR && kBf16) ? element_hash(key, i) : 0u;
    float new_y, new_z;
    schedule_free_rule<StoredValuesOnly, float, WD, SMALL>(load<T>(g[i]), load<T>(y[i]), load<T>(z[i]), c, new_y,
                                                           new_z);
    y[i] = store_as<T, SR, true>(new_y, h, key, i);
    z[i] = store_as<T, SR, false>(new_z, h, key, i);
  }
}

// Segments as SGD's pass holds them: param is y, grad the gradient, buffer z.
template <typename T, bool WD, bool SMALL>
void schedule_free_segments(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets,
                            const ScheduleFreeHyper& h, const Rounding& storage) {
  if (storage.lifted) {
    const ScheduleFreeScalars<float> s(h);
    for_each_piece(segs, offsets, [&](const Segment& seg, int64_t begin, int64_t end) {
      auto* y = static_cast<S_of<T>*>(seg.param);
      auto* g = static_cast<const S_of<T>*>(seg.grad);
      auto* z = static_cast<S_of<T>*>(seg.buffer);
      if (storage.stochastic) {
        schedule_free_range_lifted<T, WD, SMALL, true>(y, g, z, begin, end, seg.key, s);
      } else {
        schedule_free_range_lifted<T, WD, SMALL, false>(y, g, z, begin, end, seg.key, s);
      }
    });
    return;
  }
  const ScheduleFreeScalars<T> s(h);
  for_each_piece(segs, offsets, [&](const Segment& seg, int64_t begin, int64_t end) {
    auto* y = static_cast<S_of<T>*>(seg.param);
    auto* g = static_cast<const S_of<T>*>(seg.grad);
    auto* z = static_cast<S_of<T>*>(seg.buffer);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      TorchChunks(seg.numel, h).split(begin, end, [&](int64_t from, int64_t to, bool scalar) {
        scalar ? schedule_free_range<T, WD, SMALL, true>(y, g, z, from, to, s)
               : schedule_free_range<T, WD, SMALL, false>(y, g, z, from, to, s);
      });
    } else if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef TORCHSGD_HALF_LANES  // else the binding refuses float16 at torch's rounding
      TorchChunks(seg.numel, h).split(begin, end, [&](int64_t from, int64_t to, bool scalar) {
        scalar ? schedule_free_range<T, WD, SMALL, true>(y, g, z, from, to, s)
               : schedule_free_range_half<WD, SMALL>(y, g, z, from, to, s);
      });
#endif
    } else {  // float32 and float64: torch's scalar op is its vector op's fma
      schedule_free_range<T, WD, SMALL>(y, g, z, begin, end, s);
    }
  });
}

template <typename T>
void schedule_free_flags(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets,
                         const ScheduleFreeHyper& h, const Rounding& storage) {
  const bool wd = h.weight_decay != 0.0;
  // Whether the lerp starts from y: decided in the compute type, as torch's lerp decides it.
  const bool small = storage.lifted ? ScheduleFreeScalars<float>(h).small : ScheduleFreeScalars<T>(h).small;
  if (wd) {
    small ? schedule_free_segments<T, true, true>(segs, offsets, h, storage)
          : schedule_free_segments<T, true, false>(segs, offsets, h, storage);
  } else {
    small ? schedule_free_segments<T, false, true>(segs, offsets, h, storage)
          : schedule_free_segments<T, false, false>(segs, offsets, h, storage);
  }
}

// The pass over a checked group of one dtype (float32, float64, bfloat16 or float16; lifted: not float64).
inline void run_schedule_free(c10::ScalarType dtype, const std::vector<Segment>& segs,
                              const std::vector<int64_t>& offsets, const ScheduleFreeHyper& h,
                              const Rounding& storage) {
  switch (dtype) {
    case c10::ScalarType::Float: schedule_free_flags<float>(segs, offsets, h, storage); break;
    case c10::ScalarType::Double: schedule_free_flags<double>(segs, offsets, h, storage); break;
    case c10::ScalarType::BFloat16: schedule_free_flags<c10::BFloat16>(segs, offsets, h, storage); break;
    default: schedule_free_flags<c10::Half>(segs, offsets, h, storage); break;
  }
}

}  // namespace
}  // namespace torchsgd::cpu
