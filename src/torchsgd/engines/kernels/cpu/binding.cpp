// torchsgd's fused CPU engine, the CPython module _torchsgd_cpu: one SGD step over a whole param group in
// one pass over memory. The headers beside this file are its parts, compiled with it as one translation
// unit (engines/build.py compiles this file); this file parses arguments, holds and releases the GIL,
// and lists the module's functions.
//
// Python hands over the group's parameter list and the optimizer's state dict; everything that torch's
// Python loop does per tensor (read .grad, look up the momentum buffer, check layouts) happens here at a
// few nanoseconds per tensor, then one parallel loop (torch's own OpenMP pool, via at::parallel_for)
// reads p, g, b and writes p, b once per element.
//
// The arithmetic is the rule of rules/sgd.py, line for line (rule.h), with each torch operation's
// rounding: torch's CPU `x.add(y, alpha=a)` is fma(y, (T)a, x) and `x.mul_(m)` is x * (T)m, so for
// float32 and float64 the result is bitwise that of torch.optim.SGD(foreach=False). For bfloat16/float16
// the arithmetic follows torch's vectorised half-precision kernels (float32 compute, every intermediate
// rounded to the dtype, add-alphas rounded to the dtype). torch's scalar tail loop rounds a little
// differently, so a few elements at the end of a tensor can differ by an ulp: the bound is stated in the
// README and tested.
//
// Nothing is changed unless the whole group is eligible: a negative return value is a code of reasons.h
// (exported as REASONS) and the Python side runs another engine instead.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <vector>

#include "buffers.h"
#include "checks.h"
#include "lanes.h"
#include "lars.h"
#include "loops.h"
#include "quantized.h"
#include "reasons.h"
#include "rounding.h"
#include "rule.h"
#include "schedule_free.h"

namespace torchsgd::cpu {
namespace {

// Releases the GIL for as long as it lives. Its destructor takes the GIL back also when an exception
// (from at::parallel_for, say) leaves its scope, so the handler that turns the exception into a Python
// error runs with the GIL held.
class GilReleased {
 public:
  GilReleased() : saved_(PyEval_SaveThread()) {}
  ~GilReleased() { PyEval_RestoreThread(saved_); }
  GilReleased(const GilReleased&) = delete;
  GilReleased& operator=(const GilReleased&) = delete;

 private:
  PyThreadState* saved_;
};

// The current C++ exception as a Python RuntimeError (call inside a catch block, with the GIL held).
PyObject* raise_runtime_error(const std::exception& e) {
  PyErr_SetString(PyExc_RuntimeError, e.what());
  return nullptr;
}

// A required keyword-only argument: PyArg_ParseTupleAndKeywords takes keyword-only arguments only as
// optional ones, so the required ones are parsed as objects and converted here, as "d" and "p" would.
struct Required {
  const char* name;
  PyObject* value = nullptr;
};

bool as_double(const Required& arg, double& out) {
  out = PyFloat_AsDouble(arg.value);
  if (!(out == -1.0 && PyErr_Occurred())) return true;
  if (PyErr_ExceptionMatches(PyExc_TypeError)) {
    PyErr_Format(PyExc_TypeError, "step(): %s must be a real number, not %.200s", arg.name,
                 Py_TYPE(arg.value)->tp_name);
  }
  return false;
}

bool as_bool(const Required& arg, bool& out) {
  const int truth = PyObject_IsTrue(arg.value);
  out = truth == 1;
  return truth >= 0;
}

constexpr const char* kStepDoc =
    "step(params, state, new_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,\n"
    "     decoupled_weight_decay, clip_coefficient, trust=None, momentum_dtype=None, stochastic_rounding=False,\n"
    "     seed=0, rounding_step=0, indices=None, reserve=None) -> int\n"
    "\n"
    "One SGD step over a param group: params (a list of tensors), state (the optimizer's state dict, only\n"
    "read: each parameter's momentum_buffer) and new_buffers (a list, to which the step appends a\n"
    "(param, buffer) pair for each momentum buffer it creates: the caller keeps them). clip_coefficient multiplies every gradient (1.0: no clipping); trust is\n"
    "None or one LARS trust ratio per parameter. indices (one int per parameter: its index in the optimizer)\n"
    "selects the lifted storage of rules/sgd.py: float32 arithmetic, each stored value rounded once, the\n"
    "buffers of momentum_dtype (a torch.dtype; None: the parameter's), to nearest or with\n"
    "stochastic_rounding, with noise keyed by (seed, rounding_step, index), taken modulo 2**64. Without\n"
    "indices, every operation rounds as torch's does and momentum_dtype and stochastic_rounding must be at\n"
    "their defaults. momentum_dtype=torch.int8 is 8-bit momentum (quantized.h): each parameter's state\n"
    "holds momentum_codes and momentum_scales, and a new buffer is appended as (param, codes, scales).\n"
    "reserve (None or a dict: param -> tensor, or -> (codes, scales)) holds memory for new buffers: a\n"
    "parameter's entry that fits (dtype, shape and strides of the buffer it would get) becomes its buffer.\n"
    "Returns the number of parameters updated, or a negative code of REASONS (nothing changed) when the\n"
    "group must run on another engine.";

PyObject* step(PyObject* /*self*/, PyObject* args, PyObject* kwargs) {
  static const char* const kKeywords[] = {
      "params", "state", "new_buffers",                                           // positional
      "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize",      // keyword-only, required
      "decoupled_weight_decay", "clip_coefficient",                               //
      "trust", "momentum_dtype", "stochastic_rounding", "seed", "rounding_step",  // keyword-only, optional
      "indices", "reserve", nullptr};
  PyObject* params;
  PyObject* state;
  PyObject* new_buffers;
  Required lr{"lr"}, momentum{"momentum"}, dampening{"dampening"}, weight_decay{"weight_decay"},
      nesterov{"nesterov"}, maximize{"maximize"}, decoupled{"decoupled_weight_decay"},
      clip{"clip_coefficient"};
  PyObject* trust = Py_None;           // None, or one float per parameter
  PyObject* momentum_dtype = Py_None;  // None, or a torch.dtype
  int stochastic = 0;
  unsigned long long seed = 0, rounding_step = 0;
  PyObject* indices = Py_None;  // None, or one int per parameter: the lifted storage
  PyObject* reserve = Py_None;  // None, or a dict: memory for new buffers (buffers.h, reserved_tensor)
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OOOOOOOOOOpKKOO:step", const_cast<char**>(kKeywords), &params,
                                   &state, &new_buffers, &lr.value, &momentum.value, &dampening.value, &weight_decay.value,
                                   &nesterov.value, &maximize.value, &decoupled.value, &clip.value, &trust,
                                   &momentum_dtype, &stochastic, &seed, &rounding_step, &indices, &reserve)) {
    return nullptr;
  }
  for (const Required* arg : {&lr, &momentum, &dampening, &weight_decay, &nesterov, &maximize, &decoupled, &clip}) {
    if (arg->value == nullptr) {
      PyErr_Format(PyExc_TypeError, "step() missing required keyword-only argument: '%s'", arg->name);
      return nullptr;
    }
  }
  Hyper h{};
  if (!as_double(lr, h.lr) || !as_double(momentum, h.momentum) || !as_double(dampening, h.dampening) ||
      !as_double(weight_decay, h.weight_decay) || !as_bool(nesterov, h.nesterov) || !as_bool(maximize, h.maximize) ||
      !as_bool(decoupled, h.decoupled) || !as_double(clip, h.clip_coefficient)) {
    return nullptr;
  }
  Rounding storage;
  if (momentum_dtype != Py_None) {
    if (!THPDtype_Check(momentum_dtype)) {
      PyErr_SetString(PyExc_TypeError, "step(): momentum_dtype must be None or a torch.dtype");
      return nullptr;
    }
    storage.buffer_dtype = reinterpret_cast<THPDtype*>(momentum_dtype)->scalar_type;
  }
  if (indices == Py_None && (momentum_dtype != Py_None || stochastic)) {
    PyErr_SetString(PyExc_ValueError, "step(): momentum_dtype and stochastic_rounding need indices (lifted storage)");
    return nullptr;
  }
  if (storage.buffer_dtype != c10::ScalarType::Undefined && !lifted_dtype(storage.buffer_dtype) &&
      !quantized_dtype(storage.buffer_dtype)) {
    return PyLong_FromLong(kMomentumDtype);
  }
  if (!PyList_Check(new_buffers)) {
    PyErr_SetString(PyExc_TypeError, "step(): new_buffers must be a list (it receives (param, buffer) pairs)");
    return nullptr;
  }
  if (!PyList_Check(params) || !PyDict_Check(state)) return PyLong_FromLong(kNotAList);
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (indices != Py_None) {
    if (!PyList_Check(indices) || PyList_GET_SIZE(indices) != n) {
      PyErr_SetString(PyExc_ValueError, "storage indices must be a list with one int per parameter");
      return nullptr;
    }
    storage.lifted = true;
    storage.stochastic = stochastic;
    storage.seed = seed;
    storage.step = rounding_step;
  }
  if (trust != Py_None && (!PyList_Check(trust) || PyList_GET_SIZE(trust) != n)) {
    PyErr_SetString(PyExc_ValueError, "trust must be None or a list with one float per parameter");
    return nullptr;
  }
  const bool with_momentum = h.momentum != 0.0;
  const bool quantized = with_momentum && quantized_dtype(storage.buffer_dtype);  // 8-bit momentum

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
    if (storage.lifted) {
      const unsigned long long index = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(indices, i));
      if (PyErr_Occurred()) return nullptr;
      f.key = stream_key(storage.seed, storage.step, index);
    }
    if (with_momentum && plain_tensor(obj) && !find_momentum(state, obj, quantized, f)) return nullptr;
  }
  // 1b, the tensors' metadata: C++ reads of objects the list and the state keep alive, no Python API
  // beyond reading a list item and a type, so a large group is checked on torch's threads in parallel
  // (its misses, one chain of small objects per parameter, are what this phase costs after backward).
  std::vector<Checked> checked(static_cast<size_t>(n));
  auto check_range = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      check_param(PyList_GET_ITEM(params, i), found[i], with_momentum, storage, checked[i]);
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
    return raise_runtime_error(e);
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
  // to torch's multi-tensor ops: scalar conversions would make this loop slower than them.
  if (dtype == c10::ScalarType::Half && !storage.lifted) return PyLong_FromLong(kUnsupportedDtype);
#endif

  // Phase 2: new momentum buffers (a parameter's first step), handed back in new_buffers.
  try {
    const c10::ScalarType buffer_dtype =
        storage.lifted && storage.buffer_dtype != c10::ScalarType::Undefined ? storage.buffer_dtype : dtype;
    if (quantized ? !make_new_quantized_buffers(new_buffers, need_buffer, segs, reserve)
                  : !make_new_buffers(new_buffers, need_buffer, segs, buffer_dtype, reserve)) {
      return nullptr;
    }
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }

  // Phase 3: one pass over memory, with the GIL released.
  std::vector<int64_t> offsets(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) offsets[i + 1] = offsets[i] + segs[i].numel;
  try {
    GilReleased released;
    if (quantized) {
      run_step_quantized(dtype, segs, h, storage.stochastic);
    } else {
      run_step(dtype, segs, offsets, h, storage);
    }
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
  return PyLong_FromSsize_t(static_cast<Py_ssize_t>(segs.size()));
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
  try {
    GilReleased released;
    at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end && finite.load(std::memory_order_relaxed); ++k) {
        const Span& sp = spans[k];
        bool ok;
        switch (sp.dtype) {
          case c10::ScalarType::Float: ok = range_finite(static_cast<const float*>(sp.data), sp.numel); break;
          case c10::ScalarType::Double: ok = range_finite(static_cast<const double*>(sp.data), sp.numel); break;
          case c10::ScalarType::BFloat16:
            ok = range_finite(static_cast<const c10::BFloat16*>(sp.data), sp.numel);
            break;
          default: ok = range_finite(static_cast<const c10::Half*>(sp.data), sp.numel); break;
        }
        if (!ok) finite.store(false, std::memory_order_relaxed);
      }
    });
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
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

PyObject* g_z_key = nullptr;  // "z", ScheduleFreeSGD's state

constexpr const char* kScheduleFreeDoc =
    "schedule_free_step(params, state, *, ckp1, y_alpha, lr, weight_decay, stochastic_rounding=False, seed=0,\n"
    "                   rounding_step=0, indices=None, torch_vector=0) -> int\n"
    "\n"
    "One ScheduleFreeSGD training step (rules/schedule_free.py) over the params (y) that have a gradient,\n"
    "each with its z in state (the optimizer's state dict, only read: state[p]['z']), in one pass:\n"
    "g = grad + weight_decay*y; y = lerp(y, z, ckp1) + y_alpha*g;\n"
    "z = z - lr*g. Without indices every operation rounds as torch's does (bitwise the schedulefree package\n"
    "for float32 and float64, and for bfloat16 and float16 given torch_vector, the elements of one iteration\n"
    "of torch's vectorised 16-bit loop: 32 with AVX2); with indices (one int per parameter: its index in the optimizer) the lifted\n"
    "storage: float32 arithmetic, y and z rounded once each, to nearest or with stochastic_rounding (noise\n"
    "keyed by (seed, rounding_step, index)). The gradients are only read. Returns the number of parameters\n"
    "updated, or a negative code of REASONS (nothing changed).";

PyObject* schedule_free_step(PyObject* /*self*/, PyObject* args, PyObject* kwargs) {
  static const char* const kKeywords[] = {"params",      "state", "ckp1",          "y_alpha", "lr",
                                          "weight_decay", "stochastic_rounding", "seed", "rounding_step",
                                          "indices",      "torch_vector",        nullptr};
  PyObject* params;
  PyObject* state;
  Required ckp1{"ckp1"}, y_alpha{"y_alpha"}, lr{"lr"}, weight_decay{"weight_decay"};
  int stochastic = 0;
  unsigned long long seed = 0, rounding_step = 0;
  PyObject* indices = Py_None;
  long long torch_vector = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$OOOOpKKOL:schedule_free_step", const_cast<char**>(kKeywords),
                                   &params, &state, &ckp1.value, &y_alpha.value, &lr.value, &weight_decay.value,
                                   &stochastic, &seed, &rounding_step, &indices, &torch_vector)) {
    return nullptr;
  }
  for (const Required* arg : {&ckp1, &y_alpha, &lr, &weight_decay}) {
    if (arg->value == nullptr) {
      PyErr_Format(PyExc_TypeError, "schedule_free_step() missing required keyword-only argument: '%s'", arg->name);
      return nullptr;
    }
  }
  ScheduleFreeHyper h{};
  if (!as_double(ckp1, h.ckp1) || !as_double(y_alpha, h.y_alpha) || !as_double(lr, h.lr) ||
      !as_double(weight_decay, h.weight_decay)) {
    return nullptr;
  }
  h.torch_vector = torch_vector;
  h.torch_threads = at::get_num_threads();
  if (!PyList_Check(params) || !PyDict_Check(state)) return PyLong_FromLong(kNotAList);
  const Py_ssize_t n = PyList_GET_SIZE(params);
  Rounding storage;
  if (indices != Py_None) {
    if (!PyList_Check(indices) || PyList_GET_SIZE(indices) != n) {
      PyErr_SetString(PyExc_ValueError, "storage indices must be a list with one int per parameter");
      return nullptr;
    }
    storage.lifted = true;
    storage.stochastic = stochastic;
  } else if (stochastic) {
    PyErr_SetString(PyExc_ValueError, "schedule_free_step(): stochastic_rounding needs indices (lifted storage)");
    return nullptr;
  }
  // Phase 1: check everything, change nothing; the first reason, in parameter order, wins.
  std::vector<Segment> segs;
  segs.reserve(static_cast<size_t>(n));
  std::vector<Span> spans;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!plain_tensor(obj)) return PyLong_FromLong(kNotPlainTensor);
    const at::Tensor& y = THPVariable_Unpack(obj);
    const at::Tensor& g = y.grad();
    if (!g.defined()) continue;
    PyObject* entry = state_entry(state, obj);
    if (entry == nullptr || !PyDict_Check(entry)) return PyLong_FromLong(kNoState);
    PyObject* z_obj = PyDict_GetItemWithError(entry, g_z_key);
    if (z_obj == nullptr && PyErr_Occurred()) return nullptr;
    if (z_obj == nullptr) return PyLong_FromLong(kNoState);
    if (dtype == c10::ScalarType::Undefined) dtype = y.scalar_type();
    if (y.scalar_type() != dtype) return PyLong_FromLong(kUnsupportedDtype);
    if (!y.device().is_cpu() || !g.device().is_cpu()) return PyLong_FromLong(kNotCpu);
    if (g.layout() != c10::kStrided || y.layout() != c10::kStrided) return PyLong_FromLong(kGradNotStrided);
    if (!y.is_non_overlapping_and_dense()) return PyLong_FromLong(kNotDense);
    if (g.scalar_type() != dtype || !same_layout(y, g)) return PyLong_FromLong(kGradLayout);
    if (!plain_tensor(z_obj)) return PyLong_FromLong(kStateLayout);
    const at::Tensor& z = THPVariable_Unpack(z_obj);
    if (z.scalar_type() != dtype || !z.device().is_cpu() || z.layout() != c10::kStrided || !same_layout(y, z)) {
      return PyLong_FromLong(kStateLayout);
    }
    Segment seg{y.data_ptr(), g.data_ptr(), z.data_ptr(), y.numel(), false, 1.0};
    seg.bytes = seg.buffer_bytes = y.numel() * static_cast<int64_t>(y.element_size());
    if (storage.lifted) {
      const unsigned long long index = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(indices, i));
      if (PyErr_Occurred()) return nullptr;
      seg.key = stream_key(seed, rounding_step, index);
    }
    if (seg.bytes > 0) {
      const auto yb = reinterpret_cast<uintptr_t>(seg.param), zb = reinterpret_cast<uintptr_t>(seg.buffer);
      spans.push_back({yb, yb + static_cast<uintptr_t>(seg.bytes)});
      spans.push_back({zb, zb + static_cast<uintptr_t>(seg.bytes)});
    }
    segs.push_back(seg);
  }
  if (segs.empty()) return PyLong_FromLong(0);
  if (dtype != c10::ScalarType::Float && dtype != c10::ScalarType::Double && dtype != c10::ScalarType::BFloat16 &&
      dtype != c10::ScalarType::Half) {
    return PyLong_FromLong(kUnsupportedDtype);
  }
  if (storage.lifted && dtype == c10::ScalarType::Double) return PyLong_FromLong(kLiftedDtype);
#ifndef TORCHSGD_HALF_LANES
  // Without F16C/AVX2/FMA, float16 at torch's rounding of every operation is left to torch's ops (scalar
  // conversions would make this loop slower than them); the lifted storage takes float16.
  if (!storage.lifted && dtype == c10::ScalarType::Half) return PyLong_FromLong(kUnsupportedDtype);
#endif
  if (spans_overlap(spans)) return PyLong_FromLong(kOverlappingParams);
  // Phase 2: one pass over memory, with the GIL released.
  std::vector<int64_t> offsets(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) offsets[i + 1] = offsets[i] + segs[i].numel;
  try {
    GilReleased released;
    run_schedule_free(dtype, segs, offsets, h, storage);
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
  return PyLong_FromSsize_t(static_cast<Py_ssize_t>(segs.size()));
}

constexpr const char* kTrustDoc =
    "lars_trust_ratios(params, out, *, weight_decay, trust_coefficient, eps, lr, trust_clip, vector_bytes) -> bool\n"
    "\n"
    "One LARS trust ratio per parameter, written into out (a contiguous float64 CPU tensor, one element per\n"
    "parameter: the ratio in the parameter's dtype, exactly), from the 2-norms of\n"
    "the parameter and of its gradient, bitwise rules/lars.py's trust_ratios on torch's CPU kernels whose\n"
    "vectors are vector_bytes wide (32: AVX2 or the default; 64: AVX-512). None, with nothing computed,\n"
    "when some parameter is not a contiguous float32, float64 or bfloat16 CPU tensor with such a gradient.";

PyObject* lars_trust_ratios(PyObject* /*self*/, PyObject* args, PyObject* kwargs) {
  static const char* const kKeywords[] = {"params", "out",        "weight_decay", "trust_coefficient", "eps",
                                          "lr",     "trust_clip", "vector_bytes", nullptr};
  PyObject* params;
  PyObject* out_obj;
  double weight_decay = 0, trust_coefficient = 0, eps = 0, lr = 0;
  int trust_clip = 0, vector_bytes = 32;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$ddddpi:lars_trust_ratios", const_cast<char**>(kKeywords),
                                   &params, &out_obj, &weight_decay, &trust_coefficient, &eps, &lr, &trust_clip,
                                   &vector_bytes)) {
    return nullptr;
  }
  if (!PyList_Check(params)) {
    PyErr_SetString(PyExc_TypeError, "lars_trust_ratios() takes a list of parameters");
    return nullptr;
  }
  if (vector_bytes != 32) Py_RETURN_FALSE;  // torch's AVX2 order, the one lars.h follows
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (!plain_tensor(out_obj)) {
    PyErr_SetString(PyExc_TypeError, "lars_trust_ratios(): out must be a tensor");
    return nullptr;
  }
  const at::Tensor& out = THPVariable_Unpack(out_obj);
  if (out.scalar_type() != c10::ScalarType::Double || !out.device().is_cpu() || !out.is_contiguous() ||
      out.numel() != n) {
    PyErr_SetString(PyExc_ValueError, "lars_trust_ratios(): out must be a contiguous float64 CPU tensor, one per param");
    return nullptr;
  }
  std::vector<double> norms(2 * static_cast<size_t>(n));  // parameter norms, then gradient norms
  std::vector<c10::ScalarType> dtypes(static_cast<size_t>(n));
  std::vector<NormJob> jobs;
  jobs.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!plain_tensor(obj)) Py_RETURN_FALSE;
    const at::Tensor& p = THPVariable_Unpack(obj);
    const at::Tensor& g = p.grad();
    const auto t = p.scalar_type();
    if (!g.defined() || t != g.scalar_type() || p.dim() == 0 || !p.device().is_cpu() || !g.device().is_cpu() ||
        p.layout() != c10::kStrided || g.layout() != c10::kStrided || !p.is_contiguous() || !g.is_contiguous() ||
        (t != c10::ScalarType::Float && t != c10::ScalarType::Double && t != c10::ScalarType::BFloat16)) {
      Py_RETURN_FALSE;
    }
    dtypes[i] = t;
    jobs.push_back({p.data_ptr(), g.data_ptr(), p.numel(), t, &norms[i], &norms[n + i]});
  }
  try {
    GilReleased released;
    run_norms(jobs);
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
  double* ratios = out.data_ptr<double>();
  for (Py_ssize_t i = 0; i < n; ++i) {
    const double pn = norms[i], gn = norms[n + i];
    switch (dtypes[i]) {
      case c10::ScalarType::Float:
        ratios[i] = trust_ratio<float>(pn, gn, weight_decay, trust_coefficient, eps, lr, trust_clip);
        break;
      case c10::ScalarType::Double:
        ratios[i] = trust_ratio<double>(pn, gn, weight_decay, trust_coefficient, eps, lr, trust_clip);
        break;
      default:
        ratios[i] = trust_ratio<c10::BFloat16>(pn, gn, weight_decay, trust_coefficient, eps, lr, trust_clip);
        break;
    }
  }
  Py_RETURN_TRUE;
}

constexpr const char* kLarsStepDoc =
    "lars_step(params, state, new_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,\n"
    "          trust_coefficient, eps, trust_clip, vector_bytes, reserve=None) -> int or None\n"
    "\n"
    "The LARS step of adapted parameters (each with a gradient) in one pass per tensor: its two norms, its\n"
    "trust ratio (bitwise lars_trust_ratios) and its SGD update with the ratio (bitwise step(trust=...)),\n"
    "while the tensor is in cache. state, new_buffers and reserve as in step (torch's rounding of every operation:\n"
    "no lifted storage, no clipping). Returns the number of parameters updated, or None, with nothing\n"
    "changed, when the group is not one it takes: a parameter not a contiguous float32, float64 or\n"
    "bfloat16 CPU tensor (not 0-d) with such a gradient and buffer, mixed dtypes, shared memory, or\n"
    "vector_bytes other than 32 (the caller then runs lars_trust_ratios and step, which say why).";

PyObject* lars_step(PyObject* /*self*/, PyObject* args, PyObject* kwargs) {
  static const char* const kKeywords[] = {"params",   "state",        "new_buffers", "lr",
                                          "momentum", "dampening",    "weight_decay", "nesterov",
                                          "maximize", "trust_coefficient", "eps",     "trust_clip",
                                          "vector_bytes", "reserve", nullptr};
  PyObject* params;
  PyObject* state;
  PyObject* new_buffers;
  Hyper h{};
  h.decoupled = false;
  h.clip_coefficient = 1.0;
  int nesterov = 0, maximize = 0, trust_clip = 0, vector_bytes = 32;
  PyObject* reserve = Py_None;
  TrustOptions o{};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$ddddppddpiO:lars_step", const_cast<char**>(kKeywords), &params,
                                   &state, &new_buffers, &h.lr, &h.momentum, &h.dampening, &h.weight_decay,
                                   &nesterov, &maximize, &o.trust_coefficient, &o.eps, &trust_clip, &vector_bytes,
                                   &reserve)) {
    return nullptr;
  }
  h.nesterov = nesterov;
  h.maximize = maximize;
  o.weight_decay = h.weight_decay;
  o.lr = h.lr;
  o.trust_clip = trust_clip;
  if (!PyList_Check(new_buffers)) {
    PyErr_SetString(PyExc_TypeError, "lars_step(): new_buffers must be a list (it receives (param, buffer) pairs)");
    return nullptr;
  }
  if (vector_bytes != 32 || !PyList_Check(params) || !PyDict_Check(state)) Py_RETURN_NONE;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const bool with_momentum = h.momentum != 0.0;
  const Rounding storage;  // torch's rounding of every operation
  std::vector<Segment> segs;
  segs.reserve(static_cast<size_t>(n));
  std::vector<PyObject*> need_buffer;
  std::vector<Span> spans;
  spans.reserve(static_cast<size_t>(n));
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!plain_tensor(obj)) Py_RETURN_NONE;
    Found f;
    if (with_momentum && !find_momentum(state, obj, false, f)) return nullptr;
    if (f.bad_buffer) Py_RETURN_NONE;
    Checked c;
    check_param(obj, f, with_momentum, storage, c);
    if (!c.has_grad || c.early != 0 || c.late != 0) Py_RETURN_NONE;
    if (dtype == c10::ScalarType::Undefined) dtype = c.dtype;
    if (c.dtype != dtype || (dtype != c10::ScalarType::Float && dtype != c10::ScalarType::Double &&
                             dtype != c10::ScalarType::BFloat16)) {
      Py_RETURN_NONE;
    }
    const at::Tensor& p = THPVariable_Unpack(obj);
    if (p.dim() == 0 || !p.is_contiguous() || !p.grad().is_contiguous()) Py_RETURN_NONE;  // the norms' order
    if (c.seg.first) need_buffer.push_back(obj);
    const auto begin = reinterpret_cast<uintptr_t>(c.seg.param);
    if (c.seg.bytes > 0) spans.push_back({begin, begin + static_cast<uintptr_t>(c.seg.bytes)});
    segs.push_back(c.seg);
  }
  if (segs.empty()) return PyLong_FromLong(0);
  if (spans_overlap(spans)) Py_RETURN_NONE;  // torch's loop, in order (the step says so)
  try {
    if (!make_new_buffers(new_buffers, need_buffer, segs, dtype, reserve)) return nullptr;
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
  try {
    GilReleased released;
    run_lars_step(dtype, segs, h, o);
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
  return PyLong_FromSsize_t(static_cast<Py_ssize_t>(segs.size()));
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
  if (g_z_key == nullptr) g_z_key = PyUnicode_InternFromString("z");
  if (g_codes_key == nullptr) g_codes_key = PyUnicode_InternFromString("momentum_codes");
  if (g_scales_key == nullptr) g_scales_key = PyUnicode_InternFromString("momentum_scales");
  Py_RETURN_NONE;
}

// A METH_VARARGS | METH_KEYWORDS function as the PyCFunction the method table holds (the cast through a
// function type without parameters says the mismatch is meant: CPython calls it with its real type).
PyCFunction with_keywords(PyObject* (*function)(PyObject*, PyObject*, PyObject*)) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(function));
}

PyMethodDef kMethods[] = {
    {"init", init, METH_VARARGS, "init(torch.Tensor, torch.nn.Parameter)"},
    {"overlapping", overlapping, METH_VARARGS, "overlapping(tensors) -> bool: whether two CPU tensors share memory"},
    {"grads_finite", grads_finite, METH_VARARGS,
     "grads_finite(params) -> bool, or None when a gradient is not a dense CPU float tensor"},
    {"step", with_keywords(step), METH_VARARGS | METH_KEYWORDS, kStepDoc},
    {"schedule_free_step", with_keywords(schedule_free_step), METH_VARARGS | METH_KEYWORDS, kScheduleFreeDoc},
    {"lars_trust_ratios", with_keywords(lars_trust_ratios), METH_VARARGS | METH_KEYWORDS, kTrustDoc},
    {"lars_step", with_keywords(lars_step), METH_VARARGS | METH_KEYWORDS, kLarsStepDoc},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "_torchsgd_cpu",                    // m_name
    "torchsgd's fused CPU SGD kernel",  // m_doc
    -1,                                 // m_size: module state in globals (init's types)
    kMethods,                           // m_methods
    nullptr,                            // m_slots
    nullptr,                            // m_traverse
    nullptr,                            // m_clear
    nullptr,                            // m_free
};

// REASONS: {code: text} from reasons.h's one table.
PyObject* reasons_dict() {
  PyObject* reasons = PyDict_New();
  if (reasons == nullptr) return nullptr;
  for (const ReasonText& reason : kReasons) {
    PyObject* code = PyLong_FromLong(reason.code);
    PyObject* text = code == nullptr ? nullptr : PyUnicode_FromString(reason.text);
    const int rc = text == nullptr ? -1 : PyDict_SetItem(reasons, code, text);
    Py_XDECREF(code);
    Py_XDECREF(text);
    if (rc != 0) {
      Py_DECREF(reasons);
      return nullptr;
    }
  }
  return reasons;
}

}  // namespace
}  // namespace torchsgd::cpu

PyMODINIT_FUNC PyInit__torchsgd_cpu(void) {
  using namespace torchsgd::cpu;
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
#ifdef TORCHSGD_HALF_LANES
  constexpr long kHalfLanes = 1;
#else
  constexpr long kHalfLanes = 0;
#endif
  // HALF_LANES: whether float16 at torch's arithmetic runs here (built with F16C, AVX2 and FMA) or is
  // refused. OVERLAPPING: the code of parameters that share memory (the caller runs torch's loop).
  PyObject* reasons = reasons_dict();
  const bool added = reasons != nullptr && PyModule_AddObjectRef(module, "REASONS", reasons) == 0 &&
                     PyModule_AddIntConstant(module, "HALF_LANES", kHalfLanes) == 0 &&
                     PyModule_AddIntConstant(module, "OVERLAPPING", kOverlappingParams) == 0;
  Py_XDECREF(reasons);
  if (!added) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
