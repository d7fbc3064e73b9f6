// Why the kernel hands a param group back to a Python engine: one code and one text per reason, listed
// once. The module exports the list as REASONS (code -> text) and engines/fused.py reports the text, so
// the C++ and the Python side cannot disagree about what a code means.
#pragma once

namespace torchsgd::cpu {
namespace {

// X(name, code, text). Codes are negative: step() returns the number of parameters it updated, or one of
// these with nothing changed. The overlap text is engines/base.py's OVERLAP_REASON, word for word: the
// Python side reports the same reason when it finds the overlap itself.
#define TORCHSGD_REASONS(X)                                                                                 \
  X(kNotAList, -1, "params is not a list or state is not a dict")                                           \
  X(kNotPlainTensor, -2, "a parameter is a tensor subclass")                                                \
  X(kUnsupportedDtype, -3, "unsupported or mixed dtypes")                                                   \
  X(kNotCpu, -4, "a tensor is not on the CPU")                                                              \
  X(kNotDense, -5, "a parameter is not dense (overlapping or with gaps)")                                   \
  X(kGradLayout, -6, "a gradient is laid out differently from its parameter")                               \
  X(kBufferLayout, -7, "a momentum buffer is laid out differently from its parameter")                      \
  X(kOverlappingParams, -8,                                                                                 \
    "parameters share memory (one listed twice, or views that overlap): torch's loop, in order")            \
  X(kGradNotStrided, -9, "a gradient is sparse")                                                            \
  X(kMomentumDtype, -10, "the momentum_dtype is not one the kernel stores (float32, bfloat16 or float16)")    \
  X(kStateLayout, -11, "a schedule-free z is not a plain CPU tensor laid out as its parameter, of its dtype") \
  X(kLiftedDtype, -12, "stochastic rounding of float64 (the lifted storage holds float32, bfloat16, float16)") \
  X(kNoState, -13, "a parameter has no schedule-free z yet (its first step)")                               \
  X(kQuantizedLayout, -14, "8-bit momentum of a parameter or gradient that is not contiguous (row-major blocks)")

enum Reason : long {
#define TORCHSGD_REASON_CODE(name, code, text) name = code,
  TORCHSGD_REASONS(TORCHSGD_REASON_CODE)
#undef TORCHSGD_REASON_CODE
};

struct ReasonText {
  Reason code;
  const char* text;
};

constexpr ReasonText kReasons[] = {
#define TORCHSGD_REASON_TEXT(name, code, text) {name, text},
    TORCHSGD_REASONS(TORCHSGD_REASON_TEXT)
#undef TORCHSGD_REASON_TEXT
};

}  // namespace
}  // namespace torchsgd::cpu
