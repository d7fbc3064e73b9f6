// The SGD rule of rules/sgd.py for one element or one vector of lanes, written once. Two rounding
// policies run it: torch's (every operation's result rounded to the tensor's dtype, as torch's kernels
// store it: the default, bitwise torch for float32/float64) and the lifted storage's (float32 throughout,
// each stored value rounded once afterwards by the loop: momentum_dtype, stochastic rounding).
#pragma once

#include "lanes.h"
#include "rounding.h"

namespace torchsgd::cpu {
namespace {

// One param group's hyperparameters, as Python passed them.
struct Hyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, decoupled;
  double clip_coefficient;  // the global-norm clip coefficient (1.0: none; multiplying by 1 is exact)
};

// The scalars of one step as torch's kernels see them. A scalar that multiplies inside `x.add(y, alpha=a)`
// is rounded to the tensor's dtype first (torch does so for bfloat16/float16 too); the factor of
// `x.mul_(m)` is rounded to the compute type. The lifted storage computes in float32: Scalars<float>.
template <typename T>
struct Scalars {
  using A = typename Acc<T>::type;
  A neg_lr, wd, m_mul, m_add, one_minus_d, decay, clip_coefficient;
  explicit Scalars(const Hyper& h)
      : neg_lr(as_alpha(-h.lr)),
        wd(as_alpha(h.weight_decay)),
        m_mul(static_cast<A>(h.momentum)),
        m_add(as_alpha(h.momentum)),
        one_minus_d(as_alpha(1.0 - h.dampening)),
        decay(static_cast<A>(h.decoupled ? 1.0 - h.lr * h.weight_decay : 1.0)),
        clip_coefficient(static_cast<A>(h.clip_coefficient)) {}
  static A as_alpha(double x) { return static_cast<A>(static_cast<T>(x)); }
};

// Torch's rounding: each intermediate is stored in a tensor of dtype T, so it is rounded to T.
template <typename T>
struct EveryOperation {
  template <typename V>
  static V round(V x) {
    return round_to<T>(x);
  }
};

// The lifted storage: intermediates stay float32; the loop rounds the two stored values once each.
struct StoredValuesOnly {
  template <typename V>
  static V round(V x) {
    return x;
  }
};

// The rule, one rounded torch operation per line: from the gradient, the parameter and the buffer as
// loaded, the new buffer and the new parameter before they are stored (the loop's store rounds them).
// V is one element (float, double) or a vector of lanes (Half8, Bf16x16). WD (coupled decay), MOM, NEST
// and FIRST (the buffer is a copy of the direction) are template flags, so that each combination
// compiles to a branch-free loop. The clip factor, the decoupled decay factor, the trust ratio (LARS) and
// the sign (maximize) are multiplications that are exact no-ops when the factor is 1, so they need no
// flag of their own; SCALED = false leaves all four out when every one of them is 1, which only the
// lifted loop does (it is compute-bound; torch's rounding policy always multiplies, as torch does).
template <typename Rounding, typename V, bool WD, bool MOM, bool NEST, bool FIRST, bool SCALED = true>
inline void rule(V grad, V param, V buffer, const Lanes<V>& c, V& new_param, V& new_buffer) {
  using R = Rounding;
  V d = grad;
  V pv = param;
  if constexpr (SCALED) {
    d = R::round(c.sign * grad * c.clip_coefficient);                    // g = -grad if maximize; g·c (clip)
    pv = R::round(param * c.decay);                                 // p.mul_(1 - lr·wd) (decoupled)
  }
  if constexpr (WD) d = R::round(fma_(pv, c.wd, d));                // g = g.add(p, alpha=wd) (coupled)
  if constexpr (SCALED) d = R::round(d * c.trust);                  // g = g·t (LARS)
  if constexpr (MOM) {
    V buf = d;                                                      // b = g.clone() (first step)
    if constexpr (!FIRST) {
      buf = R::round(buffer * c.m_mul);                             // b.mul_(momentum)
      buf = R::round(fma_(d, c.one_minus_d, buf));                  //  .add_(g, alpha=1 - dampening)
    }
    new_buffer = buf;
    if constexpr (NEST) {
      d = R::round(fma_(buf, c.m_add, d));                          // g = g.add(b, alpha=momentum)
    } else {
      d = buf;                                                      // g = b
    }
  }
  new_param = fma_(d, c.neg_lr, pv);                                // p.add_(g, alpha=-lr)
}

}  // namespace
}  // namespace torchsgd::cpu
