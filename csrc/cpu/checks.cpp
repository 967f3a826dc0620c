// The checks of the primitives' parameters (kernels.h), shared by the CPU kernels (kernels.cpp) and
// the CUDA ones (csrc/cuda/kernels.cu): host code, compiled once into fastsoup_native.
#include <cmath>
#include <string>

#include "fastsoup/kernels.h"

namespace fastsoup {

namespace {

// n, the inputs' dtype codes, and (n > 0) their addresses.
Status check_inputs(const char* op, const void* const* inputs, const DType* dtypes, int64_t K, int64_t n) {
  if (n < 0) return Status::Error(std::string(op) + ": n must be >= 0");
  for (int64_t k = 0; k < K; ++k)
    if (!valid_dtype_code(static_cast<int>(dtypes[k])))
      return Status::Error(std::string(op) + ": inputs[" + std::to_string(k) + "] has an invalid dtype code");
  if (n == 0) return Status::Ok();
  for (int64_t k = 0; k < K; ++k)
    if (inputs[k] == nullptr) return Status::Error(std::string(op) + ": inputs[" + std::to_string(k) + "] is a null address");
  return Status::Ok();
}

}  // namespace

Status check_weighted_sum(const WeightedSumParams& p) {
  Status st = check_inputs("weighted_sum", p.inputs, p.input_dtypes, p.num_inputs, p.n);
  if (!st.ok) return st;
  if (!valid_dtype_code(static_cast<int>(p.out_dtype))) return Status::Error("weighted_sum: invalid output dtype code");
  if (p.accumulate && p.out_dtype != DType::kFloat32)
    return Status::Error("weighted_sum: accumulate=True needs a float32 output");
  if (p.accumulate && (p.divisor != 1.0 || p.divisor_lo != 0.0))
    return Status::Error("weighted_sum: accumulate=True needs divisor 1");
  if (!std::isfinite(p.divisor) || p.divisor == 0.0 || !std::isfinite(p.divisor_lo))
    return Status::Error("weighted_sum: divisor must be finite and nonzero");
  if (p.n > 0 && p.out == nullptr) return Status::Error("weighted_sum: out is a null address");
  return Status::Ok();
}

Status check_multi_dot(const MultiDotParams& p) {
  Status st = check_inputs("multi_dot", p.inputs, p.input_dtypes, p.num_inputs, p.n);
  if (!st.ok) return st;
  if (!valid_dtype_code(static_cast<int>(p.g_dtype))) return Status::Error("multi_dot: invalid dtype code of g");
  if (p.n > 0 && p.num_inputs > 0 && p.g == nullptr) return Status::Error("multi_dot: g is a null address");
  return Status::Ok();
}

Status check_gram(const GramParams& p) {
  return check_inputs("gram", p.inputs, p.input_dtypes, p.num_inputs, p.n);
}

}  // namespace fastsoup
