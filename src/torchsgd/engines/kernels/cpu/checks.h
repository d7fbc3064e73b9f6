// Phase 1 of a step: read and check every parameter, gradient and momentum buffer of a group, changing
// nothing, and find the first reason (reasons.h) the group cannot run here. Also the memory-overlap check
// that the step and overlapping() share, and the finiteness scan behind grads_finite().
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "loops.h"
#include "quantized.h"
#include "reasons.h"

namespace torchsgd::cpu {
namespace {

PyTypeObject* g_tensor_type = nullptr;     // torch.Tensor
PyTypeObject* g_parameter_type = nullptr;  // torch.nn.Parameter
PyObject* g_momentum_key = nullptr;        // "momentum_buffer"
PyObject* g_codes_key = nullptr;           // "momentum_codes": 8-bit momentum's int8 codes
PyObject* g_scales_key = nullptr;          // "momentum_scales": and its float32 scales, one a block

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

// The dtypes the lifted storage holds parameters and buffers in.
bool lifted_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}

// Whether a momentum_dtype is 8-bit momentum (int8 codes and float32 scales: quantized.h).
bool quantized_dtype(c10::ScalarType t) { return t == c10::ScalarType::Char; }

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
  PyObject* scales = nullptr;  // 8-bit momentum: buffer holds the codes, and this their scales
  bool bad_buffer = false;     // a state entry or buffer the kernel cannot read
  double trust = 1.0;
  uint32_t key = 0;
};

// Phase 1a for one parameter: its momentum state in the optimizer's state dict (read with the GIL), into
// f: the float buffer, or with 8-bit momentum (quantized) its codes and scales, both or neither; an entry
// or buffer the kernel cannot read sets f.bad_buffer. False with a Python exception set on a lookup error.
bool find_momentum(PyObject* state, PyObject* param, bool quantized, Found& f) {
  PyObject* entry = state_entry(state, param);
  if (entry == nullptr) return true;
  if (!PyDict_Check(entry)) {
    f.bad_buffer = true;
    return true;
  }
  if (quantized) {
    PyObject* codes = PyDict_GetItemWithError(entry, g_codes_key);
    if (codes == nullptr && PyErr_Occurred()) return false;
    PyObject* scales = PyDict_GetItemWithError(entry, g_scales_key);
    if (scales == nullptr && PyErr_Occurred()) return false;
    if (codes == nullptr && scales == nullptr) return true;
    if (codes != nullptr && scales != nullptr && plain_tensor(codes) && plain_tensor(scales)) {
      f.buffer = codes;
      f.scales = scales;
    } else {
      f.bad_buffer = true;
    }
    return true;
  }
  PyObject* buffer = PyDict_GetItemWithError(entry, g_momentum_key);
  if (buffer == nullptr && PyErr_Occurred()) return false;
  if (buffer != nullptr && buffer != Py_None) {
    if (plain_tensor(buffer)) {
      f.buffer = buffer;
    } else {
      f.bad_buffer = true;
    }
  }
  return true;
}

// Phase 1b's findings: the reason a parameter cannot run here, split at the point where one loop over
// the group would have checked for duplicates, so that 1c reports the reason that loop would have.
struct Checked {
  long early = 0, late = 0;
  bool has_grad = false;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  Segment seg{};
};

void check_param(PyObject* obj, const Found& f, bool with_momentum, const Rounding& storage, Checked& c) {
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
      storage.lifted && storage.buffer_dtype != c10::ScalarType::Undefined ? storage.buffer_dtype : dtype;
  const bool quantized = quantized_dtype(buffer_dtype);
  if (storage.lifted && (!lifted_dtype(dtype) || !(lifted_dtype(buffer_dtype) || quantized))) {
    c.late = kUnsupportedDtype;
    return;
  }
  if (!with_momentum) return;
  if (quantized && (!p.is_contiguous() || !g.is_contiguous())) {
    c.late = kQuantizedLayout;  // the blocks are the elements' row-major order
    return;
  }
  if (f.bad_buffer) {
    c.late = kBufferLayout;
  } else if (f.buffer == nullptr) {
    seg.first = true;
  } else if (quantized) {
    const at::Tensor& codes = THPVariable_Unpack(f.buffer);
    const at::Tensor& scales = THPVariable_Unpack(f.scales);
    const bool codes_ok = codes.scalar_type() == c10::ScalarType::Char && codes.device().is_cpu() &&
                          codes.layout() == c10::kStrided && codes.is_contiguous() && codes.numel() == p.numel();
    const bool scales_ok = scales.scalar_type() == c10::ScalarType::Float && scales.device().is_cpu() &&
                           scales.layout() == c10::kStrided && scales.is_contiguous() &&
                           scales.numel() == quantized_blocks(p.numel());
    if (!codes_ok || !scales_ok) {
      c.late = kBufferLayout;
      return;
    }
    seg.buffer = codes.data_ptr();
    seg.buffer_bytes = codes.numel();
    seg.scales = scales.data_ptr<float>();
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

}  // namespace
}  // namespace torchsgd::cpu
