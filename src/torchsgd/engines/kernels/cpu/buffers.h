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

// Creates the buffer of every segment marked first (in order: need_buffer[k] is the parameter of the
// k-th such segment), appends (param, buffer) to `out` (a list: the optimizer stores them, the kernel
// writes none of its state) and points the segment at it. Returns false with a Python exception set if
// the list cannot grow; may throw what ATen throws.
bool make_new_buffers(PyObject* out, const std::vector<PyObject*>& need_buffer, std::vector<Segment>& segs,
                      c10::ScalarType dtype) {
  constexpr int64_t kAlign = 32;  // elements: every view starts on a 64-byte boundary
  int64_t total = 0;
  for (const auto& seg : segs) {
    if (seg.first) total += (seg.numel + kAlign - 1) / kAlign * kAlign;
  }
  at::Tensor flat;
  if (!need_buffer.empty()) {  // empty parameters get (empty) views too
    const at::Tensor& first_param = THPVariable_Unpack(need_buffer.front());
    flat = at::empty({total}, first_param.options().dtype(dtype));
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
// and float32 scales, one a block, views into one allocation each; appends (param, codes, scales).
bool make_new_quantized_buffers(PyObject* out, const std::vector<PyObject*>& need_buffer, std::vector<Segment>& segs) {
  constexpr int64_t kAlign = 64;  // elements (bytes of codes): every view starts on a 64-byte boundary
  int64_t total_codes = 0, total_scales = 0;
  for (const auto& seg : segs) {
    if (!seg.first) continue;
    total_codes += (seg.numel + kAlign - 1) / kAlign * kAlign;
    total_scales += quantized_blocks(seg.numel);
  }
  at::Tensor codes_flat, scales_flat;
  if (!need_buffer.empty()) {
    const at::Tensor& first_param = THPVariable_Unpack(need_buffer.front());
    codes_flat = at::empty({total_codes}, first_param.options().dtype(c10::ScalarType::Char));
    scales_flat = at::empty({total_scales}, first_param.options().dtype(c10::ScalarType::Float));
    advise_huge_pages(codes_flat.data_ptr(), total_codes);
  }
  int64_t code_offset = 0, scale_offset = 0;
  size_t k = 0;
  for (auto& seg : segs) {
    if (!seg.first) continue;
    PyObject* obj = need_buffer[k++];
    const at::Tensor& p = THPVariable_Unpack(obj);
    const int64_t blocks = quantized_blocks(seg.numel);
    at::Tensor codes = codes_flat.as_strided(p.sizes(), c10::contiguous_strides(p.sizes()), code_offset);
    at::Tensor scales = scales_flat.as_strided({blocks}, {1}, scale_offset);
    code_offset += (seg.numel + kAlign - 1) / kAlign * kAlign;
    scale_offset += blocks;
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
