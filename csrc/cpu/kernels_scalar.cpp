// Portable scalar building blocks: the reference every vector path is tested against, and the
// path for CPUs without AVX2/F16C.
#include "kernel_table.h"

namespace fastsoup {
namespace cpu {
namespace {

#include "kernel_generic.h"

template <DType D>
void load(const void* x, float* acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] = load_float(x, j, D);
}

double dot(const float* a, const float* b, int64_t n) {
  // 64 binary32 lanes (lane = j mod 64), added in binary64 in lane order: the vector paths keep
  // the same lanes, so every ISA gives the same bits.
  float lane[64] = {0};
  for (int64_t j = 0; j < n; ++j) lane[j & 63] = lane[j & 63] + a[j] * b[j];
  double s = 0.0;
  for (int l = 0; l < 64; ++l) s += lane[l];
  return s;
}

const KernelTable kTable = {
    FASTSOUP_GENERIC_TABLE(sum_generic),
    FASTSOUP_GENERIC_TABLE(sum2_generic),
    {},  // no binary32 fast path: the scalar code is the reference
    {},
    {},
    {load<DType::kFloat16>, load<DType::kBFloat16>, load<DType::kFloat32>, load<DType::kFloat64>},
    dot,
};

}  // namespace

const KernelTable& scalar_table() { return kTable; }

}  // namespace cpu
}  // namespace fastsoup
