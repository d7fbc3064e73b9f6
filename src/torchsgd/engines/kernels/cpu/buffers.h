// Phase 2 of a step: the momentum buffers of the parameters whose first step this is, put into the
// optimizer's state. All of a call's new buffers are views into one allocation: the step then walks one
// contiguous region instead of thousands of scattered small ones (fewer TLB misses), backed by huge pages
// where the OS allows. Each view has its parameter's shape and strides, so the state_dict is torch's.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "checks.h"
#include "loops.h"

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

}  // namespace
}  // namespace torchsgd::cpu
