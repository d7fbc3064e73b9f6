// torchsgd's fused CPU engine: one SGD step over a whole param group in one pass over memory.
//
// Python hands over the group's parameter list and the optimizer's state dict; everything that torch's
// Python loop does per tensor (read .grad, look up the momentum buffer, check layouts) happens here at a
// few nanoseconds per tensor, then one parallel loop (torch's own OpenMP pool, via at::parallel_for)
// reads p, g, b and writes p, b once per element.
//
// The arithmetic is the rule of rules/sgd.py, line for line, with each torch operation's rounding:
// torch's CPU `x.add(y, alpha=a)` is fma(y, (T)a, x) and `x.mul_(m)` is x * (T)m, so for float32 and
// float64 the result is bitwise that of torch.optim.SGD(foreach=False). For bfloat16/float16 the
// arithmetic follows torch's vectorised half-precision kernels (float32 compute, every intermediate
// rounded to the dtype, add-alphas rounded to the dtype). torch's scalar tail loop rounds a little
// differently, so a few elements at the end of a tensor can differ by an ulp: the bound is stated in the
// README and tested.
//
// Nothing is changed unless the whole group is eligible: a negative return value names the reason and
// the Python side runs its generic engine instead.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstring>
#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Reasons a group is handed back to the generic engine (kept in sync with engines/fused.py).
enum Ineligible : long {
  kNotAList = -1,
  kNotPlainTensor = -2,
  kUnsupportedDtype = -3,
  kNotCpu = -4,
  kNotDense = -5,
  kGradLayout = -6,
  kBufferLayout = -7,
  kOverlappingParams = -8,
  kGradNotStrided = -9,
};

PyTypeObject* g_tensor_type = nullptr;     // torch.Tensor
PyTypeObject* g_parameter_type = nullptr;  // torch.nn.Parameter
PyObject* g_momentum_key = nullptr;        // "momentum_buffer"

struct Hyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, decoupled;
  double grad_factor;  // global-norm clip coefficient (1.0: none; multiplying by 1 is exact)
};

struct Segment {
  void* param;
  const void* grad;
  void* buffer;
  int64_t numel;
  bool first;    // the parameter's first step: the buffer is a copy of the direction
  double trust;  // LARS trust ratio (1.0: none)
  uint32_t key = 0;                       // stochastic-rounding noise key (precision.py)
  int64_t bytes = 0, buffer_bytes = 0;     // sizes in memory, for prefetching
};

// How results are stored (rules/sgd.py, Storage). Absent: torch's rounding after every operation.
struct Lifted {
  bool on = false;
  c10::ScalarType buffer_dtype = c10::ScalarType::Undefined;
  bool stochastic = false;
  uint64_t seed = 0, step = 0;
};

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

// The scalars of one step as torch's kernels see them. A scalar that multiplies inside `x.add(y, alpha=a)`
// is rounded to the tensor's dtype first (torch does so for bfloat16/float16 too); the factor of
// `x.mul_(m)` is rounded to the compute type.
template <typename T>
struct Scalars {
  using A = typename Acc<T>::type;
  A neg_lr, wd, m_mul, m_add, one_minus_d, decay, grad_factor;
  explicit Scalars(const Hyper& h)
      : neg_lr(as_alpha(-h.lr)),
        wd(as_alpha(h.weight_decay)),
        m_mul(static_cast<A>(h.momentum)),
        m_add(as_alpha(h.momentum)),
        one_minus_d(as_alpha(1.0 - h.dampening)),
        decay(static_cast<A>(h.decoupled ? 1.0 - h.lr * h.weight_decay : 1.0)),
        grad_factor(static_cast<A>(h.grad_factor)) {}
  static A as_alpha(double x) { return static_cast<A>(static_cast<T>(x)); }
};

// Round to the tensor's dtype and back: what storing an intermediate result in a tensor does.
// A no-op for float32 and float64. For bfloat16 it is store()'s rounding without store()'s NaN select:
// every NaN an intermediate can hold has zero low 16 bits (it was loaded from bfloat16, or is the
// default NaN of an invalid operation, or was propagated from one of those), and for such a NaN the
// rounding cannot carry out of the mantissa, so it stays a NaN. Its sign and payload do not matter:
// the values written to memory go through store(), which writes the canonical NaN. Seven roundings an
// element, two fewer vector instructions each: the bfloat16 loop is compute-bound on few cores.
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

// float16 lanes, eight at a time: F16C converts eight values per instruction, where the element loop's
// scalar conversions keep gcc from vectorising it (~3x slower than torch's own float16 ops). The same
// conversions and the same float32 operations, so the same numbers as one element at a time.
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
template <typename T>
inline Half8 round_to(Half8 x) {
  static_assert(std::is_same_v<T, c10::Half>);
  return {_mm256_cvtph_ps(_mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT))};
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
// zero-extending both 256-bit halves and narrows with a cross-lane permute: the lifted loop with stochastic
// rounding went from ~80 vector instructions per 32 elements to ~57 (0.43 -> 0.33 ns/element on one
// thread in cache), and these loops are compute-bound on few cores. The lanes hold the elements in another
// order, but every operation is elementwise and each element keeps its own hash index, so the numbers are
// bitwise those of the element loop.
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

// round_bf16<true>: the value's bits plus 16 bits of noise.
inline __m512i noisy_sum(Bf16x16 x, __m512i noise16) { return _mm512_add_epi32(_mm512_castps_si512(x.v), noise16); }

// 32 bfloat16 values from the high halves of the even and odd sums, NaN written as the canonical 0x7FC0.
inline void store_pair(uint16_t* p, __m512i sum_even, Bf16x16 even, __m512i sum_odd, Bf16x16 odd) {
  const __mmask16 number_even = _mm512_cmp_ps_mask(even.v, even.v, _CMP_ORD_Q);
  const __mmask16 number_odd = _mm512_cmp_ps_mask(odd.v, odd.v, _CMP_ORD_Q);
  const __m512i low = _mm512_mask_srli_epi32(splat16i(0x7FC0u), number_even, sum_even, 16);
  const __m512i high = _mm512_mask_and_epi32(splat16i(0x7FC00000u), number_odd, sum_odd, splat16i(0xFFFF0000u));
  _mm512_storeu_si512(p, _mm512_or_si512(low, high));
}

// round_to<BFloat16> in lanes (torch's rounding of each intermediate, without the NaN select: see there).
template <typename T>
inline Bf16x16 round_to(Bf16x16 x) {
  static_assert(std::is_same_v<T, c10::BFloat16>);
  return {_mm512_castsi512_ps(_mm512_and_si512(nearest_sum(x), splat16i(0xFFFF0000u)))};
}

inline void store_pair_nearest(uint16_t* p, Bf16x16 even, Bf16x16 odd) {
  store_pair(p, nearest_sum(even), even, nearest_sum(odd), odd);
}

#endif

// The scalars of a step as values of the loop's lane type V (one element, or a vector of lanes).
template <typename V>
struct Lanes {
  V sign, grad_factor, decay, wd, m_mul, m_add, one_minus_d, neg_lr, trust;
};

// The scalars of one element broadcast to every lane of a vector type (splat: float -> V).
template <typename V, typename Splat>
inline Lanes<V> broadcast(const Lanes<float>& c, Splat splat) {
  return {splat(c.sign),  splat(c.grad_factor), splat(c.decay),  splat(c.wd),   splat(c.m_mul),
          splat(c.m_add), splat(c.one_minus_d), splat(c.neg_lr), splat(c.trust)};
}

// The rule of rules/sgd.py for one element (V = float/double) or one vector of lanes (Half8, Bf16x16),
// one rounded torch operation per line: from the gradient, the parameter and the buffer as loaded, the new
// buffer and the new parameter before they are stored (store() rounds them). WD (coupled decay)/MOM/NEST
// are template flags so that each combination compiles to a branch-free loop. The clip factor, the
// decoupled decay factor and the trust ratio are multiplications that are exact no-ops when the factor
// is 1, so they need no flag.
template <typename T, typename V, bool WD, bool MOM, bool NEST, bool FIRST>
inline void rule(V grad, V param, V buffer, const Lanes<V>& c, V& new_param, V& new_buffer) {
  V d = round_to<T>(c.sign * grad * c.grad_factor);                  // g = -grad if maximize; g·c (clip)
  const V pv = round_to<T>(param * c.decay);                        // p.mul_(1 - lr·wd) (decoupled)
  if constexpr (WD) d = round_to<T>(fma_(pv, c.wd, d));             // g = g.add(p, alpha=wd) (coupled)
  d = round_to<T>(d * c.trust);                                     // g = g·t (LARS)
  if constexpr (MOM) {
    V buf = d;                                                      // b = g.clone() (first step)
    if constexpr (!FIRST) {
      buf = round_to<T>(buffer * c.m_mul);                          // b.mul_(momentum)
      buf = round_to<T>(fma_(d, c.one_minus_d, buf));               //  .add_(g, alpha=1 - dampening)
    }
    new_buffer = buf;
    if constexpr (NEST) {
      d = round_to<T>(fma_(buf, c.m_add, d));                       // g = g.add(b, alpha=momentum)
    } else {
      d = buf;                                                      // g = b
    }
  }
  new_param = fma_(d, c.neg_lr, pv);                                // p.add_(g, alpha=-lr)
}

// One element range of one tensor: the rule, element by element (vectorised by the compiler), or for
// float16 eight lanes and for bfloat16 (with AVX-512) 32 elements at a time, the remainder element by element.
template <typename T, bool WD, bool MOM, bool NEST, bool FIRST>
void run_range(S_of<T>* __restrict p, const S_of<T>* __restrict g, S_of<T>* __restrict b, int64_t begin,
               int64_t end, bool maximize, A_of<T> trust, const Scalars<T>& s) {
  using A = typename Acc<T>::type;
  // Scalars in locals: loaded once, and never mistaken for memory the loop writes.
  const Lanes<A> c{maximize ? A(-1) : A(1), s.grad_factor, s.decay, s.wd, s.m_mul, s.m_add, s.one_minus_d,
                   s.neg_lr, trust};
#ifdef TORCHSGD_HALF_LANES
  if constexpr (std::is_same_v<T, c10::Half>) {
    const Lanes<Half8> v = broadcast<Half8>(c, splat8);
    for (; begin + 8 <= end; begin += 8) {
      Half8 new_param, new_buffer;
      const Half8 buffer = (MOM && !FIRST) ? load8(b + begin) : Half8{};
      rule<T, Half8, WD, MOM, NEST, FIRST>(load8(g + begin), load8(p + begin), buffer, v, new_param, new_buffer);
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
      rule<T, Bf16x16, WD, MOM, NEST, FIRST>(grad.even, param.even, buffer.even, v, new_param.even, new_buffer.even);
      rule<T, Bf16x16, WD, MOM, NEST, FIRST>(grad.odd, param.odd, buffer.odd, v, new_param.odd, new_buffer.odd);
      if constexpr (MOM) store_pair_nearest(b + begin, new_buffer.even, new_buffer.odd);
      store_pair_nearest(p + begin, new_param.even, new_param.odd);
    }
  }
#endif
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    A new_param, new_buffer{};
    const A buffer = (MOM && !FIRST) ? load<T>(b[i]) : A(0);
    rule<T, A, WD, MOM, NEST, FIRST>(load<T>(g[i]), load<T>(p[i]), buffer, c, new_param, new_buffer);
    if constexpr (MOM) b[i] = store<T>(new_buffer);
    p[i] = store<T>(new_param);
  }
}

// Split the concatenation of all segments into chunks for torch's thread pool and call
// body(segment, begin, end) on each piece, with element indices local to the segment.
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

template <typename Body>
void for_each_piece(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets, const Body& body) {
  constexpr int64_t kGrain = 65536;
  at::parallel_for(0, offsets.back(), kGrain, [&](int64_t begin, int64_t end) {
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

// ---- stochastic rounding: the arithmetic of precision.py, bit for bit ------------------------------

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
// 64-bit index per element and narrow it (~8% of the stochastic-rounding loop's time).
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

// The noise of one element (precision.py): one hash h of (key, i) serves both bfloat16 stores, the
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
// store_as for eight elements, indices first..first+7: the same hashes and the same selects, in lanes.
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

template <typename T, bool SR, bool PARAM>
inline void store_lanes_as(S_of<T>* p, Half8 x, uint32_t key, int64_t first) {
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
// hash_finish in sixteen lanes.
inline __m512i hash_finish16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, splat16i(kMix1));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, splat16i(kMix2));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
#endif

// The lifted rule: float32 arithmetic whatever the storage, each stored value rounded once (to nearest
// or stochastically). The lines are those of rule() without its intermediate roundings, for one element
// (V = float), eight lanes (V = Half8) or sixteen (V = Bf16x16); the direction reads the float32 buffer
// before it is rounded for storage, as the reference's lifted copy does.
// SCALED: whether a factor that is 1 without clipping, decoupled decay, LARS and maximize is not 1; when
// none is, the loop skips those four multiplications (exact no-ops by 1), a tenth of its vector
// instructions: the lifted bfloat16 loop with stochastic rounding is compute-bound on few cores.
template <typename V, bool WD, bool MOM, bool NEST, bool FIRST, bool SCALED>
inline void lifted_rule(V grad, V param, V buffer, const Lanes<V>& c, V& new_param, V& new_buffer) {
  V d = SCALED ? c.sign * grad * c.grad_factor : grad;
  const V pv = SCALED ? param * c.decay : param;
  if constexpr (WD) d = fma_(pv, c.wd, d);
  if constexpr (SCALED) d = d * c.trust;
  if constexpr (MOM) {
    V buf = d;
    if constexpr (!FIRST) buf = fma_(d, c.one_minus_d, buffer * c.m_mul);
    new_buffer = buf;
    if constexpr (NEST) {
      d = fma_(buf, c.m_add, d);
    } else {
      d = buf;
    }
  }
  new_param = fma_(d, c.neg_lr, pv);
}

template <typename T, typename B, bool WD, bool MOM, bool NEST, bool SR, bool FIRST, bool SCALED>
void run_range_lifted(S_of<T>* __restrict p, const S_of<T>* __restrict g, S_of<B>* __restrict b, int64_t begin,
                      int64_t end, const Segment& seg, bool maximize, const Scalars<float>& s) {
  const uint32_t key = seg.key;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16> || (MOM && std::is_same_v<B, c10::BFloat16>);
  const Lanes<float> c{maximize ? -1.0f : 1.0f, s.grad_factor, s.decay, s.wd, s.m_mul, s.m_add, s.one_minus_d,
                       s.neg_lr, static_cast<float>(seg.trust)};
#ifdef TORCHSGD_HALF_LANES
  // float16 storage: eight F16C lanes at a time, where the element loop's scalar conversions keep gcc from
  // vectorising it (~10x slower rounding to nearest, ~6x stochastically). The same conversions, hashes and
  // float32 operations in the same order, so the same numbers; the remainder runs in the element loop below.
  if constexpr (std::is_same_v<T, c10::Half> || (MOM && std::is_same_v<B, c10::Half>)) {
    const Lanes<Half8> v = broadcast<Half8>(c, splat8);
    for (; begin + 8 <= end; begin += 8) {
      Half8 new_param, new_buffer;
      const Half8 buffer = (MOM && !FIRST) ? load_lanes<B>(b + begin) : Half8{};
      lifted_rule<Half8, WD, MOM, NEST, FIRST, SCALED>(load_lanes<T>(g + begin), load_lanes<T>(p + begin), buffer,
                                                        v, new_param, new_buffer);
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
      lifted_rule<Bf16x16, WD, MOM, NEST, FIRST, SCALED>(grad.even, param.even, buffer.even, v, new_param.even,
                                                          new_buffer.even);
      lifted_rule<Bf16x16, WD, MOM, NEST, FIRST, SCALED>(grad.odd, param.odd, buffer.odd, v, new_param.odd,
                                                          new_buffer.odd);
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
      lifted_rule<float, WD, MOM, NEST, FIRST, SCALED>(load<T>(gc[k]), load<T>(pc[k]), buffer, c, new_param,
                                                       new_buffer);
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
    const bool scaled = h.maximize || s.grad_factor != 1.0f || s.decay != 1.0f || seg.trust != 1.0;
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

bool lifted_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
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

// Same memory layout: equal sizes and equal strides in every dimension of size > 1.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  auto as = a.sizes(), bs = b.sizes();
  auto at_ = a.strides(), bt = b.strides();
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (as[d] != bs[d]) return false;
    if (as[d] > 1 && at_[d] != bt[d]) return false;
  }
  return true;
}

// Ask for transparent huge pages on the whole 2 MiB pages inside [data, data + bytes) (Linux, where
// THP is in "madvise" mode); elsewhere, or if refused, nothing changes.
void advise_huge_pages(void* data, int64_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHuge = 2u << 20;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t stop = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (stop > start) madvise(reinterpret_cast<void*>(start), stop - start, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

bool plain_tensor(PyObject* obj) {
  PyTypeObject* t = Py_TYPE(obj);
  return t == g_tensor_type || t == g_parameter_type;
}

// state.get(param), without calling Tensor.__hash__ through Python: for torch.Tensor and Parameter
// it is id(self), whose hash is the address itself. init() checks that this holds.
PyObject* state_entry(PyObject* state, PyObject* param) {
#if PY_VERSION_HEX < 0x030D0000
  return _PyDict_GetItem_KnownHash(state, param, static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(param)));
#else
  return PyDict_GetItemWithError(state, param);
#endif
}

// A byte range [begin, end) of one tensor's memory.
struct Span {
  uintptr_t begin, end;
};

// Layouts already found free of overlap, by a hash of their ordered spans: a group whose parameters are
// not in ascending address order (common after a model is built, its tensors allocated out of order)
// pays the sort once, not every step. Read and written with the GIL held.
constexpr size_t kVerifiedLayouts = 16;
uint64_t g_verified[kVerifiedLayouts] = {};
size_t g_verified_next = 0;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Whether any two spans share a byte. Each tensor's update reads what the others write when they do, so
// only torch's loop, in order, gives torch's numbers; the parallel loop would race.
bool spans_overlap(std::vector<Span>& spans) {
  uintptr_t previous_end = 0;
  bool ascending = true;
  uint64_t layout = 0x9E3779B97F4A7C15ULL;
  for (const Span& s : spans) {
    if (s.begin < previous_end) ascending = false;
    previous_end = s.end;
    layout = mix64(layout ^ s.begin) ^ mix64(s.end + layout);
  }
  if (ascending) return false;  // each begins at or after the previous end: disjoint, in O(n)
  for (uint64_t known : g_verified) {
    if (known == layout) return false;
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].begin < spans[i - 1].end) return true;
  }
  g_verified[g_verified_next] = layout;
  g_verified_next = (g_verified_next + 1) % kVerifiedLayouts;
  return false;
}

// Phase 1a's findings for one parameter (Python objects, read with the GIL).
struct Found {
  PyObject* buffer = nullptr;  // the momentum buffer, a plain tensor (borrowed), or none yet
  bool bad_buffer = false;     // a state entry or buffer the kernel cannot read
  double trust = 1.0;
  uint32_t key = 0;
};

// Phase 1b's findings: the reason a parameter cannot run here, split at the point where one loop over
// the group would have checked for duplicates, so that 1c reports the reason that loop would have.
struct Checked {
  long early = 0, late = 0;
  bool has_grad = false;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  Segment seg{};
};

void check_param(PyObject* obj, const Found& f, bool with_momentum, const Lifted& lifted, Checked& c) {
  if (!plain_tensor(obj)) {
    c.early = kNotPlainTensor;
    return;
  }
  const at::Tensor& p = THPVariable_Unpack(obj);
  const at::Tensor& g = p.grad();
  if (!g.defined()) return;
  c.has_grad = true;
  const c10::ScalarType dtype = p.scalar_type();
  c.dtype = dtype;
  if (!p.device().is_cpu() || !g.device().is_cpu()) {
    c.early = kNotCpu;
  } else if (g.layout() != c10::kStrided || p.layout() != c10::kStrided) {
    c.early = kGradNotStrided;
  } else if (!p.is_non_overlapping_and_dense()) {
    c.early = kNotDense;
  } else if (g.scalar_type() != dtype || !same_layout(p, g)) {
    c.early = kGradLayout;
  }
  if (c.early != 0) return;
  Segment& seg = c.seg;
  seg = Segment{p.data_ptr(), g.data_ptr(), nullptr, p.numel(), false, f.trust};
  seg.bytes = p.numel() * static_cast<int64_t>(p.element_size());
  seg.key = f.key;
  const c10::ScalarType buffer_dtype =
      lifted.on && lifted.buffer_dtype != c10::ScalarType::Undefined ? lifted.buffer_dtype : dtype;
  if (lifted.on && (!lifted_dtype(dtype) || !lifted_dtype(buffer_dtype))) {
    c.late = kUnsupportedDtype;
    return;
  }
  if (!with_momentum) return;
  if (f.bad_buffer) {
    c.late = kBufferLayout;
  } else if (f.buffer == nullptr) {
    seg.first = true;
  } else {
    const at::Tensor& b = THPVariable_Unpack(f.buffer);
    if (b.scalar_type() != buffer_dtype || !b.device().is_cpu() || b.layout() != c10::kStrided || !same_layout(p, b)) {
      c.late = kBufferLayout;
      return;
    }
    seg.buffer = b.data_ptr();
    seg.buffer_bytes = b.numel() * static_cast<int64_t>(b.element_size());
  }
}

PyObject* step(PyObject* /*self*/, PyObject* args) {
  PyObject* params;
  PyObject* state;
  PyObject* trust;    // None, or one float per parameter
  PyObject* storage;  // None, or (buffer dtype code or -1, stochastic, seed, step, [global index per param])
  Hyper h{};
  int nesterov = 0, maximize = 0, decoupled = 0;
  if (!PyArg_ParseTuple(args, "OOddddpppdOO", &params, &state, &h.lr, &h.momentum, &h.dampening, &h.weight_decay,
                        &nesterov, &maximize, &decoupled, &h.grad_factor, &trust, &storage)) {
    return nullptr;
  }
  Lifted lifted;
  PyObject* indices = nullptr;
  if (storage != Py_None) {
    int buffer_code = -1, stochastic = 0;
    unsigned long long seed = 0, step_count = 0;
    if (!PyArg_ParseTuple(storage, "ipKKO", &buffer_code, &stochastic, &seed, &step_count, &indices)) return nullptr;
    if (!PyList_Check(indices) || PyList_GET_SIZE(indices) != PyList_GET_SIZE(params)) {
      PyErr_SetString(PyExc_ValueError, "storage indices must be a list with one int per parameter");
      return nullptr;
    }
    lifted.on = true;
    lifted.buffer_dtype = buffer_code < 0 ? c10::ScalarType::Undefined : static_cast<c10::ScalarType>(buffer_code);
    lifted.stochastic = stochastic;
    lifted.seed = seed;
    lifted.step = step_count;
  }
  h.nesterov = nesterov;
  h.maximize = maximize;
  h.decoupled = decoupled;
  if (!PyList_Check(params) || !PyDict_Check(state)) return PyLong_FromLong(kNotAList);
  if (trust != Py_None && (!PyList_Check(trust) || PyList_GET_SIZE(trust) != PyList_GET_SIZE(params))) {
    PyErr_SetString(PyExc_ValueError, "trust must be None or a list with one float per parameter");
    return nullptr;
  }
  const bool with_momentum = h.momentum != 0.0;
  const Py_ssize_t n = PyList_GET_SIZE(params);

  // Phase 1: read and check everything; change nothing.
  // 1a, on this thread (it holds the GIL): what lives in Python objects, per parameter: its momentum
  // buffer object, trust ratio and noise key.
  std::vector<Found> found(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    Found& f = found[i];
    if (trust != Py_None) {
      f.trust = PyFloat_AsDouble(PyList_GET_ITEM(trust, i));
      if (f.trust == -1.0 && PyErr_Occurred()) return nullptr;
    }
    if (lifted.on) {
      const unsigned long long index = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(indices, i));
      if (PyErr_Occurred()) return nullptr;
      f.key = stream_key(lifted.seed, lifted.step, index);
    }
    if (with_momentum && plain_tensor(obj)) {
      PyObject* entry = state_entry(state, obj);
      if (entry != nullptr && !PyDict_Check(entry)) {
        f.bad_buffer = true;
      } else if (entry != nullptr) {
        PyObject* buffer = PyDict_GetItemWithError(entry, g_momentum_key);
        if (buffer == nullptr && PyErr_Occurred()) return nullptr;
        if (buffer != nullptr && buffer != Py_None) {
          if (plain_tensor(buffer)) {
            f.buffer = buffer;
          } else {
            f.bad_buffer = true;
          }
        }
      }
    }
  }
  // 1b, the tensors' metadata: C++ reads of objects the list and the state keep alive, no Python API
  // beyond reading a list item and a type, so a large group is checked on torch's threads in parallel
  // (its misses, one chain of small objects per parameter, are what this phase costs after backward).
  std::vector<Checked> checked(static_cast<size_t>(n));
  auto check_range = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      check_param(PyList_GET_ITEM(params, i), found[i], with_momentum, lifted, checked[i]);
    }
  };
  try {
    constexpr Py_ssize_t kParallelCheck = 256;
    if (n >= kParallelCheck) {
      // The GIL stays held: no other Python thread can change a parameter, gradient or state meanwhile.
      at::parallel_for(0, n, kParallelCheck / 2, check_range);
    } else {
      check_range(0, n);
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  // 1c, in parameter order, as one loop would decide: the first reason wins.
  std::vector<Segment> segs;
  segs.reserve(n);
  std::vector<PyObject*> need_buffer;  // params whose first step this is (momentum only)
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const Checked& c = checked[i];
    if (c.early == kNotPlainTensor) return PyLong_FromLong(kNotPlainTensor);
    if (!c.has_grad) continue;
    if (dtype == c10::ScalarType::Undefined) dtype = c.dtype;
    if (c.dtype != dtype) return PyLong_FromLong(kUnsupportedDtype);
    if (c.early != 0) return PyLong_FromLong(c.early);
    if (c.late != 0) return PyLong_FromLong(c.late);
    if (c.seg.first) need_buffer.push_back(PyList_GET_ITEM(params, i));
    segs.push_back(c.seg);
  }
  if (segs.empty()) return PyLong_FromLong(0);
  {
    // Dense parameters (checked above) occupy exactly [data, data + bytes).
    std::vector<Span> spans;
    spans.reserve(segs.size());
    for (const auto& seg : segs) {
      const auto begin = reinterpret_cast<uintptr_t>(seg.param);
      if (seg.bytes > 0) spans.push_back({begin, begin + static_cast<uintptr_t>(seg.bytes)});
    }
    if (spans_overlap(spans)) return PyLong_FromLong(kOverlappingParams);
  }
  if (dtype != c10::ScalarType::Float && dtype != c10::ScalarType::Double && dtype != c10::ScalarType::BFloat16 &&
      dtype != c10::ScalarType::Half) {
    return PyLong_FromLong(kUnsupportedDtype);
  }
#ifndef TORCHSGD_HALF_LANES
  // Without F16C/AVX2/FMA, float16 at torch's per-operation rounding (seven roundings an element) is left
  // to torch's multi-tensor ops: scalar conversions would make this loop ~3x slower than them.
  if (dtype == c10::ScalarType::Half && !lifted.on) return PyLong_FromLong(kUnsupportedDtype);
#endif

  // Phase 2: new momentum buffers (a parameter's first step), put into the optimizer's state. All of a
  // call's new buffers are views into one allocation: the step then walks one contiguous region
  // instead of thousands of scattered small ones (fewer TLB misses), backed by huge pages where the
  // kernel allows. Each view has its parameter's shape and strides, so the state_dict is torch's.
  try {
    const c10::ScalarType new_dtype = lifted.on && lifted.buffer_dtype != c10::ScalarType::Undefined
                                          ? lifted.buffer_dtype
                                          : dtype;
    constexpr int64_t kAlign = 32;  // elements: every view starts on a 64-byte boundary
    int64_t total = 0;
    for (const auto& seg : segs) {
      if (seg.first) total += (seg.numel + kAlign - 1) / kAlign * kAlign;
    }
    at::Tensor flat;
    if (!need_buffer.empty()) {  // empty parameters get (empty) views too
      const at::Tensor& first_param = THPVariable_Unpack(need_buffer.front());
      flat = at::empty({total}, first_param.options().dtype(new_dtype));
      advise_huge_pages(flat.data_ptr(), total * static_cast<int64_t>(flat.element_size()));
    }
    int64_t offset = 0;
    size_t k = 0;
    for (auto& seg : segs) {
      if (!seg.first) continue;
      PyObject* obj = need_buffer[k++];
      const at::Tensor& p = THPVariable_Unpack(obj);
      at::Tensor b = flat.as_strided(p.sizes(), p.strides(), offset);
      offset += (seg.numel + kAlign - 1) / kAlign * kAlign;
      seg.buffer = b.data_ptr();
      seg.buffer_bytes = b.numel() * static_cast<int64_t>(b.element_size());
      PyObject* wrapped = THPVariable_Wrap(std::move(b));
      if (wrapped == nullptr) return nullptr;
      PyObject* entry = PyObject_GetItem(state, obj);  // a defaultdict creates the entry
      if (entry == nullptr) {
        Py_DECREF(wrapped);
        return nullptr;
      }
      const int rc = PyObject_SetItem(entry, g_momentum_key, wrapped);
      Py_DECREF(entry);
      Py_DECREF(wrapped);
      if (rc != 0) return nullptr;
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }

  // Phase 3: one pass over memory.
  std::vector<int64_t> offsets(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) offsets[i + 1] = offsets[i] + segs[i].numel;
  try {
    Py_BEGIN_ALLOW_THREADS;
    if (lifted.on) {
      const c10::ScalarType buffer = lifted.buffer_dtype == c10::ScalarType::Undefined ? dtype : lifted.buffer_dtype;
      switch (dtype) {
        case c10::ScalarType::Float: dispatch_lifted_buffer<float>(buffer, segs, offsets, h, lifted.stochastic); break;
        case c10::ScalarType::BFloat16:
          dispatch_lifted_buffer<c10::BFloat16>(buffer, segs, offsets, h, lifted.stochastic);
          break;
        default: dispatch_lifted_buffer<c10::Half>(buffer, segs, offsets, h, lifted.stochastic); break;
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
    Py_END_ALLOW_THREADS;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return PyLong_FromSsize_t(static_cast<Py_ssize_t>(segs.size()));
}

template <typename T>
bool range_finite(const T* g, int64_t n) {
  using A = A_of<T>;
  bool ok = true;
#pragma omp simd reduction(&& : ok)
  for (int64_t i = 0; i < n; ++i) {
    const A v = static_cast<A>(g[i]);
    ok = ok && (v - v == A(0));  // false for inf and NaN
  }
  return ok;
}

// grads_finite(params) -> True/False, or None when some gradient is not a dense CPU float tensor.
// One read of every gradient, in parallel; the non-finite guard's whole cost.
PyObject* grads_finite(PyObject* /*self*/, PyObject* args) {
  PyObject* params;
  if (!PyArg_ParseTuple(args, "O", &params)) return nullptr;
  if (!PyList_Check(params)) Py_RETURN_NONE;
  struct Span {
    const void* data;
    int64_t numel;
    c10::ScalarType dtype;
  };
  std::vector<Span> spans;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!plain_tensor(obj)) Py_RETURN_NONE;
    const at::Tensor& g = THPVariable_Unpack(obj).grad();
    if (!g.defined()) continue;
    const auto t = g.scalar_type();
    if (!g.device().is_cpu() || g.layout() != c10::kStrided || !g.is_non_overlapping_and_dense() ||
        (t != c10::ScalarType::Float && t != c10::ScalarType::Double && t != c10::ScalarType::BFloat16 &&
         t != c10::ScalarType::Half)) {
      Py_RETURN_NONE;
    }
    spans.push_back({g.data_ptr(), g.numel(), t});
  }
  std::atomic<bool> finite{true};
  Py_BEGIN_ALLOW_THREADS;
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end && finite.load(std::memory_order_relaxed); ++k) {
      const Span& sp = spans[k];
      bool ok;
      switch (sp.dtype) {
        case c10::ScalarType::Float: ok = range_finite(static_cast<const float*>(sp.data), sp.numel); break;
        case c10::ScalarType::Double: ok = range_finite(static_cast<const double*>(sp.data), sp.numel); break;
        case c10::ScalarType::BFloat16: ok = range_finite(static_cast<const c10::BFloat16*>(sp.data), sp.numel); break;
        default: ok = range_finite(static_cast<const c10::Half*>(sp.data), sp.numel); break;
      }
      if (!ok) finite.store(false, std::memory_order_relaxed);
    }
  });
  Py_END_ALLOW_THREADS;
  if (finite.load()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// overlapping(tensors) -> bool: whether any two of these CPU tensors share memory, or None when one is not
// a plain strided tensor (a subclass such as DTensor: the caller checks those itself). A tensor's span
// runs from its first to its last element (positive strides), so interleaved views count as overlapping.
PyObject* overlapping(PyObject* /*self*/, PyObject* args) {
  PyObject* tensors;
  if (!PyArg_ParseTuple(args, "O", &tensors)) return nullptr;
  if (!PyList_Check(tensors)) {
    PyErr_SetString(PyExc_TypeError, "overlapping() takes a list of tensors");
    return nullptr;
  }
  std::vector<Span> spans;
  spans.reserve(static_cast<size_t>(PyList_GET_SIZE(tensors)));
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tensors); ++i) {
    PyObject* obj = PyList_GET_ITEM(tensors, i);
    if (!plain_tensor(obj)) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (t.layout() != c10::kStrided || !t.device().is_cpu()) Py_RETURN_NONE;
    if (t.numel() == 0) continue;
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.push_back({begin, begin + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()))});
  }
  if (spans_overlap(spans)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* init(PyObject* /*self*/, PyObject* args) {
  PyObject* tensor_type;
  PyObject* parameter_type;
  if (!PyArg_ParseTuple(args, "OO", &tensor_type, &parameter_type)) return nullptr;
  if (!PyType_Check(tensor_type) || !PyType_Check(parameter_type)) {
    PyErr_SetString(PyExc_TypeError, "init(torch.Tensor, torch.nn.Parameter)");
    return nullptr;
  }
  Py_INCREF(tensor_type);
  Py_INCREF(parameter_type);
  g_tensor_type = reinterpret_cast<PyTypeObject*>(tensor_type);
  g_parameter_type = reinterpret_cast<PyTypeObject*>(parameter_type);
  if (g_momentum_key == nullptr) g_momentum_key = PyUnicode_InternFromString("momentum_buffer");
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"init", init, METH_VARARGS, "init(torch.Tensor, torch.nn.Parameter)"},
    {"overlapping", overlapping, METH_VARARGS, "overlapping(tensors) -> bool: whether two CPU tensors share memory"},
    {"grads_finite", grads_finite, METH_VARARGS,
     "grads_finite(params) -> bool, or None when a gradient is not a dense CPU float tensor"},
    {"step", step, METH_VARARGS,
     "step(params, state, lr, momentum, dampening, weight_decay, nesterov, maximize, decoupled, grad_factor,\n"
     "     trust, storage) -> int\n"
     "One SGD step over a param group; returns the number of parameters updated, or a negative reason\n"
     "code (nothing changed) when the group must run on the generic engine."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_torchsgd_cpu", "torchsgd's fused CPU SGD kernel", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__torchsgd_cpu(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
#ifdef TORCHSGD_HALF_LANES
  constexpr long kHalfLanes = 1;
#else
  constexpr long kHalfLanes = 0;
#endif
  // Whether float16 at torch's arithmetic runs here (built with F16C, AVX2 and FMA) or is refused.
  if (PyModule_AddIntConstant(module, "HALF_LANES", kHalfLanes) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
