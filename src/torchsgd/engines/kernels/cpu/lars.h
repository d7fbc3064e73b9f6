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
#include "loops.h"
#include "rounding.h"
#include "rule.h"

namespace torchsgd::cpu {
namespace {

// The sum of squares of x[0..n) as torch's kernel orders it, W accumulator lanes of type A; a bfloat16
// vector holds 2W values (two float32 halves, low then high). The remainder (n mod the vector) is summed
// as torch's AVX2 build compiled its scalar loop (measured bitwise, tests/test_native_lars.py): its
// first whole blocks of four as v·v rounded and then added, the rest as fused multiply-adds.
// Two sums of squares, of x and of y (a parameter and its gradient, n elements each), in one loop: each
// is torch's serial chain of additions (see above), so the two chains run side by side where one alone
// would wait on its additions' latency.
template <typename T, int W>
void torch_norm2_pair(const S_of<T>* __restrict x, const S_of<T>* __restrict y, int64_t n, A_of<T>& norm_x,
                      A_of<T>& norm_y) {
  using A = A_of<T>;
  constexpr int kPerVector = std::is_same_v<T, c10::BFloat16> ? 2 * W : W;
  constexpr int64_t kTailBlock = 4;
  A acc_x[W] = {}, acc_y[W] = {};
  int64_t d = 0;
  const int64_t main = n - n % kPerVector;
  for (; d < main; d += kPerVector) {
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      const A u = load<T>(x[d + j]), v = load<T>(y[d + j]);
      acc_x[j] = acc_x[j] + u * u;
      acc_y[j] = acc_y[j] + v * v;
    }
    if constexpr (kPerVector == 2 * W) {
#pragma omp simd
      for (int j = 0; j < W; ++j) {
        const A u = load<T>(x[d + W + j]), v = load<T>(y[d + W + j]);
        acc_x[j] = acc_x[j] + u * u;
        acc_y[j] = acc_y[j] + v * v;
      }
    }
  }
  A sum_x = acc_x[0], sum_y = acc_y[0];
  for (int j = 1; j < W; ++j) {
    sum_x = sum_x + acc_x[j];
    sum_y = sum_y + acc_y[j];
  }
  const int64_t blocks_end = d + (n - d) / kTailBlock * kTailBlock;
  for (; d < blocks_end; ++d) {
    const A u = load<T>(x[d]), v = load<T>(y[d]);
    sum_x = sum_x + u * u;
    sum_y = sum_y + v * v;
  }
  for (; d < n; ++d) {
    const A u = load<T>(x[d]), v = load<T>(y[d]);
    sum_x = std::fma(u, u, sum_x);
    sum_y = std::fma(v, v, sum_y);
  }
  norm_x = std::sqrt(sum_x);
  norm_y = std::sqrt(sum_y);
}

template <typename T>
void norms_of(const void* x, const void* y, int64_t n, double* out_x, double* out_y) {
  constexpr int kAcc = static_cast<int>(sizeof(A_of<T>));
  A_of<T> norm_x, norm_y;
  torch_norm2_pair<T, 32 / kAcc>(static_cast<const S_of<T>*>(x), static_cast<const S_of<T>*>(y), n, norm_x, norm_y);
  // the root in the tensor's dtype (torch's norm of a bfloat16 tensor is bfloat16), as a double
  *out_x = static_cast<double>(load<T>(store<T>(norm_x)));
  *out_y = static_cast<double>(load<T>(store<T>(norm_y)));
}

// One parameter of the norm pass: its data and its gradient's, alike.
struct NormJob {
  const void* param;
  const void* grad;
  int64_t numel;
  c10::ScalarType dtype;
  double* param_norm;  // the norms, rounded to the tensor's dtype, as doubles
  double* grad_norm;
};

// Every job's two norms, the largest first, each job on one of torch's threads (as torch sums a tensor).
inline void run_norms(std::vector<NormJob>& jobs) {
  std::sort(jobs.begin(), jobs.end(), [](const NormJob& a, const NormJob& b) { return a.numel > b.numel; });
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(jobs.size()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (size_t k = next.fetch_add(1); k < jobs.size(); k = next.fetch_add(1)) {
        const NormJob& job = jobs[k];
        switch (job.dtype) {
          case c10::ScalarType::Float:
            norms_of<float>(job.param, job.grad, job.numel, job.param_norm, job.grad_norm);
            break;
          case c10::ScalarType::Double:
            norms_of<double>(job.param, job.grad, job.numel, job.param_norm, job.grad_norm);
            break;
          default: norms_of<c10::BFloat16>(job.param, job.grad, job.numel, job.param_norm, job.grad_norm); break;
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

// The options of the trust ratio (rules/lars.py), as the Python path passes them.
struct TrustOptions {
  double weight_decay, trust_coefficient, eps, lr;
  bool trust_clip;
};

// The whole LARS step of the adapted parameters in one pass per tensor: each job (a parameter) is taken
// by one of torch's threads, the largest first, which sums its two norms (torch's order, above), computes
// its trust ratio and at once runs the SGD kernel's update of that tensor (loops.h, run_range, the same
// instantiation the step's pass runs for it), while θ and ∇ are still in cache: as much of the update's
// reads of them as the cache kept (on the 2-core VM about 40% of a 2.4M-element tensor's, 2% of a
// 16.8M one's) come from it instead of from memory, the second read of the separate passes.
// The numbers are those of the two passes: each norm is one thread's serial sum either way, the update is
// elementwise, and the ratio reaches it exactly (a double of the value in T, as Python's float() of the
// 0-d ratio hands it to the step).
constexpr int64_t kUpdateBlock = 16384;  // elements of the update run forwards at a time

template <typename T, bool WD, bool MOM, bool NEST>
void run_lars_jobs(std::vector<Segment>& segs, const Hyper& h, const TrustOptions& o) {
  const Scalars<T> s(h);
  std::vector<size_t> order(segs.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = k;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return segs[a].numel > segs[b].numel; });
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(segs.size()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (size_t k = next.fetch_add(1); k < segs.size(); k = next.fetch_add(1)) {
        Segment& seg = segs[order[k]];
        double param_norm, grad_norm;
        norms_of<T>(seg.param, seg.grad, seg.numel, &param_norm, &grad_norm);
        seg.trust = trust_ratio<T>(param_norm, grad_norm, o.weight_decay, o.trust_coefficient, o.eps, o.lr,
                                   o.trust_clip);
        auto* p = static_cast<S_of<T>*>(seg.param);
        auto* g = static_cast<const S_of<T>*>(seg.grad);
        auto* b = static_cast<S_of<T>*>(seg.buffer);
        const auto trust = static_cast<A_of<T>>(seg.trust);
        // Last block first: the norms have just read the tensor front to back, so what is still in cache
        // is its end (a tensor larger than the cache read forwards again would evict each line before it
        // reached it). Each block runs forwards, for the hardware prefetchers.
        for (int64_t stop = seg.numel; stop > 0; stop -= kUpdateBlock) {
          const int64_t start = std::max<int64_t>(0, stop - kUpdateBlock);
          if (MOM && seg.first) {
            run_range<T, WD, MOM, NEST, true>(p, g, b, start, stop, h.maximize, trust, s);
          } else {
            run_range<T, WD, MOM, NEST, false>(p, g, b, start, stop, h.maximize, trust, s);
          }
        }
      }
    }
  });
}

template <typename T>
void dispatch_lars(std::vector<Segment>& segs, const Hyper& h, const TrustOptions& o) {
  const bool wd = h.weight_decay != 0.0 && !h.decoupled;
  if (h.momentum == 0.0) {
    wd ? run_lars_jobs<T, true, false, false>(segs, h, o) : run_lars_jobs<T, false, false, false>(segs, h, o);
  } else if (h.nesterov) {
    wd ? run_lars_jobs<T, true, true, true>(segs, h, o) : run_lars_jobs<T, false, true, true>(segs, h, o);
  } else {
    wd ? run_lars_jobs<T, true, true, false>(segs, h, o) : run_lars_jobs<T, false, true, false>(segs, h, o);
  }
}

// The fused LARS step over checked segments of one dtype (float32, float64 or bfloat16, torch's rounding
// of every operation); each segment's trust is set to its ratio.
inline void run_lars_step(c10::ScalarType dtype, std::vector<Segment>& segs, const Hyper& h, const TrustOptions& o) {
  switch (dtype) {
    case c10::ScalarType::Float: dispatch_lars<float>(segs, h, o); break;
    case c10::ScalarType::Double: dispatch_lars<double>(segs, h, o); break;
    default: dispatch_lars<c10::BFloat16>(segs, h, o); break;
  }
}

}  // namespace
}  // namespace torchsgd::cpu
