// Phase 2 of a step: the momentum buffers of the parameters whose first step this is, put into the
// optimizer's state. All of a call's new buffers are views into one allocation: the step then walks one
// contiguous region instead of thousands of scattered small ones (fewer TLB misses), backed by huge pages
// where the OS allows. Each view has its parameter's shape and strides, so the state_dict is torch's.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/strides.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "checks.h"
#include "loops.h"
#include "quantized.h"

namespace torchsgd::cpu {
namespace {

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

// A tensor of `reserve` (None, or a dict: parameter -> tensor, or -> (codes, scales) for 8-bit momentum;
// step_in_backward's pool of first-step state, engines/fused.py reserve_buffers) usable as `param`'s new
// buffer: a plain CPU tensor of `dtype`, the shape `sizes` and the strides `strides`, that overlaps
// nothing the step writes besides itself (the caller's pool is fresh memory). Borrowed, or nullptr where
// there is none or it does not fit (the step then allocates the buffer itself, as without a reserve).
const at::Tensor* reserved_tensor(PyObject* entry, c10::ScalarType dtype, c10::IntArrayRef sizes,
                                  c10::IntArrayRef strides) {
  if (entry == nullptr || !plain_tensor(entry)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(entry);
  if (!t.device().is_cpu() || t.scalar_type() != dtype || t.sizes() != sizes || t.strides() != strides) return nullptr;
  return &t;
}

PyObject* reserve_entry(PyObject* reserve, PyObject* param) {
  if (reserve == nullptr || reserve == Py_None || !PyDict_Check(reserve)) return nullptr;
  return PyDict_GetItem(reserve, param);  // borrowed; NULL (no exception) where absent
}

// Creates the buffer of every segment marked first (in order: need_buffer[k] is the parameter of the
// k-th such segment), appends (param, buffer) to `out` (a list: the optimizer stores them, the kernel
// writes none of its state) and points the segment at it. A parameter with a fitting tensor in
// `reserve` (see reserved_tensor) gets that tensor; the others views into one new allocation. Returns
// false with a Python exception set if the list cannot grow; may throw what ATen throws.
bool make_new_buffers(PyObject* out, const std::vector<PyObject*>& need_buffer, std::vector<Segment>& segs,
                      c10::ScalarType dtype, PyObject* reserve = nullptr) {
  constexpr int64_t kAlign = 32;  // elements: every view starts on a 64-byte boundary
  std::vector<const at::Tensor*> reserved(need_buffer.size(), nullptr);
  int64_t total = 0, allocated = 0;
  size_t k = 0;
  for (const auto& seg : segs) {
    if (!seg.first) continue;
    const at::Tensor& p = THPVariable_Unpack(need_buffer[k]);
    reserved[k] = reserved_tensor(reserve_entry(reserve, need_buffer[k]), dtype, p.sizes(), p.strides());
    if (reserved[k] == nullptr) {
      total += (seg.numel + kAlign - 1) / kAlign * kAlign;
      ++allocated;
    }
    ++k;
  }
  at::Tensor flat;
  if (allocated > 0) {  // empty parameters get (empty) views too
    const at::Tensor& first_param = THPVariable_Unpack(need_buffer.front());
    flat = at::empty({total}, first_param.options().dtype(dtype));
    advise_huge_pages(flat.data_ptr(), total * static_cast<int64_t>(flat.element_size()));
  }
  int64_t offset = 0;
  k = 0;
  for (auto& seg : segs) {
    if (!seg.first) continue;
    const size_t index = k++;
    PyObject* obj = need_buffer[index];
    const at::Tensor& p = THPVariable_Unpack(obj);
    at::Tensor b;
    if (reserved[index] != nullptr) {
      b = *reserved[index];
    } else {
      b = flat.as_strided(p.sizes(), p.strides(), offset);
      offset += (seg.numel + kAlign - 1) / kAlign * kAlign;
    }
    seg.buffer = b.data_ptr();
    seg.buffer_bytes = b.numel() * static_cast<int64_t>(b.element_size());
    PyObject* wrapped = THPVariable_Wrap(std::move(b));
    if (wrapped == nullptr) return false;
    PyObject* pair = PyTuple_Pack(2, obj, wrapped);
    Py_DECREF(wrapped);
    if (pair == nullptr) return false;
    const int rc = PyList_Append(out, pair);
    Py_DECREF(pair);
    if (rc != 0) return false;
  }
  return true;
}


// make_new_buffers for 8-bit momentum: each new buffer is int8 codes of its parameter's shape (contiguous)
// and float32 scales, one a block, views into one allocation each, or the (codes, scales) tuple of
// `reserve` where both fit; appends (param, codes, scales).
bool make_new_quantized_buffers(PyObject* out, const std::vector<PyObject*>& need_buffer, std::vector<Segment>& segs,
                                PyObject* reserve = nullptr) {
  constexpr int64_t kAlign = 64;  // elements (bytes of codes): every view starts on a 64-byte boundary
  struct Pair {
    const at::Tensor* codes;
    const at::Tensor* scales;
  };
  std::vector<Pair> reserved(need_buffer.size(), Pair{nullptr, nullptr});
  int64_t total_codes = 0, total_scales = 0, allocated = 0;
  size_t k = 0;
  for (const auto& seg : segs) {
    if (!seg.first) continue;
    const at::Tensor& p = THPVariable_Unpack(need_buffer[k]);
    const int64_t blocks = quantized_blocks(seg.numel);
    PyObject* entry = reserve_entry(reserve, need_buffer[k]);
    if (entry != nullptr && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 2) {
      const at::Tensor* codes = reserved_tensor(PyTuple_GET_ITEM(entry, 0), c10::ScalarType::Char, p.sizes(),
                                                c10::contiguous_strides(p.sizes()));
      const int64_t one = 1;
      const at::Tensor* scales = reserved_tensor(PyTuple_GET_ITEM(entry, 1), c10::ScalarType::Float,
                                                 c10::IntArrayRef(&blocks, 1), c10::IntArrayRef(&one, 1));
      if (codes != nullptr && scales != nullptr) reserved[k] = Pair{codes, scales};
    }
    if (reserved[k].codes == nullptr) {
      total_codes += (seg.numel + kAlign - 1) / kAlign * kAlign;
      total_scales += blocks;
      ++allocated;
    }
    ++k;
  }
  at::Tensor codes_flat, scales_flat;
  if (allocated > 0) {
    const at::Tensor& first_param = THPVariable_Unpack(need_buffer.front());
    codes_flat = at::empty({total_codes}, first_param.options().dtype(c10::ScalarType::Char));
    scales_flat = at::empty({total_scales}, first_param.options().dtype(c10::ScalarType::Float));
    advise_huge_pages(codes_flat.data_ptr(), total_codes);
  }
  int64_t code_offset = 0, scale_offset = 0;
  k = 0;
  for (auto& seg : segs) {
    if (!seg.first) continue;
    const size_t index = k++;
    PyObject* obj = need_buffer[index];
    const at::Tensor& p = THPVariable_Unpack(obj);
    const int64_t blocks = quantized_blocks(seg.numel);
    at::Tensor codes, scales;
    if (reserved[index].codes != nullptr) {
      codes = *reserved[index].codes;
      scales = *reserved[index].scales;
    } else {
      codes = codes_flat.as_strided(p.sizes(), c10::contiguous_strides(p.sizes()), code_offset);
      scales = scales_flat.as_strided({blocks}, {1}, scale_offset);
      code_offset += (seg.numel + kAlign - 1) / kAlign * kAlign;
      scale_offset += blocks;
    }
    seg.buffer = codes.data_ptr();
    seg.buffer_bytes = seg.numel;
    seg.scales = scales.data_ptr<float>();
    PyObject* wrapped_codes = THPVariable_Wrap(std::move(codes));
    if (wrapped_codes == nullptr) return false;
    PyObject* wrapped_scales = THPVariable_Wrap(std::move(scales));
    if (wrapped_scales == nullptr) {
      Py_DECREF(wrapped_codes);
      return false;
    }
    PyObject* triple = PyTuple_Pack(3, obj, wrapped_codes, wrapped_scales);
    Py_DECREF(wrapped_codes);
    Py_DECREF(wrapped_scales);
    if (triple == nullptr) return false;
    const int rc = PyList_Append(out, triple);
    Py_DECREF(triple);
    if (rc != 0) return false;
  }
  return true;
}

}  // namespace
}  // namespace torchsgd::cpu
