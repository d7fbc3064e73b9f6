// LARS's per-tensor norms and trust ratios (rules/lars.py), bitwise what torch computes there: one read of
// every parameter and gradient, the tensors spread over torch's threads, each norm summed in the order of
// torch's CPU kernel for a contiguous 2-norm (norm_kernel_tensor_iterator_impl's last-dim path: one
// vector of float32 (float64) accumulators, acc += x·x lane by lane, the lanes summed left to right, the
// remainder added element by element, the square root) and the ratio's arithmetic one torch operation at a
// time, each rounded to the norms' dtype. The order is that of torch's AVX2 kernels (32-byte vectors); for
// another capability Python keeps the ratios in rules/lars.py (engines/native_extras.py, VECTOR_BYTES).
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lanes.h"
#include "rounding.h"

namespace torchsgd::cpu {
namespace {

// The sum of squares of x[0..n) as torch's kernel orders it, W accumulator lanes of type A; a bfloat16
// vector holds 2W values (two float32 halves, low then high). The remainder (n mod the vector) is summed
// as torch's AVX2 build compiled its scalar loop (measured bitwise, tests/test_native_lars.py): its
// first whole blocks of four as v·v rounded and then added, the rest as fused multiply-adds.
template <typename T, int W>
A_of<T> torch_norm2(const S_of<T>* __restrict x, int64_t n) {
  using A = A_of<T>;
  constexpr int kPerVector = std::is_same_v<T, c10::BFloat16> ? 2 * W : W;
  constexpr int64_t kTailBlock = 4;
  A acc[W] = {};
  int64_t d = 0;
  const int64_t main = n - n % kPerVector;
  for (; d < main; d += kPerVector) {
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      const A v = load<T>(x[d + j]);
      acc[j] = acc[j] + v * v;
    }
    if constexpr (kPerVector == 2 * W) {
#pragma omp simd
      for (int j = 0; j < W; ++j) {
        const A v = load<T>(x[d + W + j]);
        acc[j] = acc[j] + v * v;
      }
    }
  }
  A sum = acc[0];
  for (int j = 1; j < W; ++j) sum = sum + acc[j];
  const int64_t blocks_end = d + (n - d) / kTailBlock * kTailBlock;
  for (; d < blocks_end; ++d) {
    const A v = load<T>(x[d]);
    sum = sum + v * v;
  }
  for (; d < n; ++d) {
    const A v = load<T>(x[d]);
    sum = std::fma(v, v, sum);
  }
  return std::sqrt(sum);
}

template <typename T>
A_of<T> norm_of(const void* data, int64_t n, int vector_bytes) {
  const auto* x = static_cast<const S_of<T>*>(data);
  constexpr int kAcc = static_cast<int>(sizeof(A_of<T>));
  (void)vector_bytes;  // 32, the one width whose remainder loop is measured (see torch_norm2)
  return torch_norm2<T, 32 / kAcc>(x, n);
}

// One tensor of the norm pass.
struct NormJob {
  const void* data;
  int64_t numel;
  c10::ScalarType dtype;
  double* out;  // the norm, rounded to the tensor's dtype, as a double
};

// Every job's norm, the largest first, each on one of torch's threads (as torch sums one tensor: alone).
inline void run_norms(std::vector<NormJob>& jobs, int vector_bytes) {
  std::sort(jobs.begin(), jobs.end(), [](const NormJob& a, const NormJob& b) { return a.numel > b.numel; });
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(jobs.size()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (size_t k = next.fetch_add(1); k < jobs.size(); k = next.fetch_add(1)) {
        const NormJob& job = jobs[k];
        switch (job.dtype) {
          case c10::ScalarType::Float:
            *job.out = static_cast<float>(norm_of<float>(job.data, job.numel, vector_bytes));
            break;
          case c10::ScalarType::Double: *job.out = norm_of<double>(job.data, job.numel, vector_bytes); break;
          default:  // bfloat16: the float32 root rounded to bfloat16
            *job.out = load<c10::BFloat16>(store<c10::BFloat16>(norm_of<c10::BFloat16>(job.data, job.numel, vector_bytes)));
            break;
        }
      }
    }
  });
}

// The trust ratio of rules/lars.py from the two norms, one torch operation per line, each rounded to T
// (its scalars are the compute type's: torch multiplies, adds and divides by a Python number in it).
template <typename T>
double trust_ratio(double param_norm, double grad_norm, double weight_decay, double trust_coefficient, double eps,
                   double lr, bool trust_clip) {
  using A = A_of<T>;
  auto r = [](A x) { return round_to<T>(x); };
  const A pn = static_cast<A>(param_norm), gn = static_cast<A>(grad_norm);
  A denominator = r(gn + r(pn * static_cast<A>(weight_decay)));  // grad_norms + weight_decay * param_norms
  denominator = r(denominator + static_cast<A>(eps));           //   + eps
  A ratio = r(r(pn * static_cast<A>(trust_coefficient)) / denominator);
  if (!(pn > A(0) && gn > A(0))) ratio = A(1);  // torch.where(...)
  if (trust_clip) {
    ratio = r(ratio / static_cast<A>(lr));
    if (ratio > A(1)) ratio = A(1);  // torch.clamp(max=1.0): NaN stays NaN
  }
  return static_cast<double>(ratio);
}

}  // namespace
}  // namespace torchsgd::cpu
