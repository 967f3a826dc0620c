// Internal: the per-ISA building blocks the CPU drivers (kernels.cpp) are made of.
// Each works on at most one block of elements that fits in L1, so the drivers control the
// memory order (one pass over every input) and the ISA files only the arithmetic.
#pragma once

#include <cstdint>

#include "fastsoup/dtype.h"

namespace fastsoup {
namespace cpu {

constexpr int64_t kBlock = 2048;   // elements per L1 block (an 8 KiB binary32 accumulator)
constexpr int kGroup = 8;          // inputs summed in registers per pass over the accumulator

struct KernelTable {
  // acc[j] = (init ? -0.0f : acc[j]) + w[0]*x0[j] + ... + w[g-1]*x{g-1}[j], left to right,
  // for j < n <= kBlock, all x of element type D (the table's index), 1 <= g <= kGroup.
  void (*accumulate[kNumDTypes])(float* acc, bool init, const void* const* x, const float* w, int g,
                                 int64_t n);
  // out[j] = cast(acc[j]) for j < n, round to nearest even.
  void (*store[kNumDTypes])(const float* acc, void* out, int64_t n);
  // acc[j] = float(x[j]) for j < n.
  void (*load[kNumDTypes])(const void* x, float* acc, int64_t n);
  // sum_j a[j]*b[j] for j < n <= kBlock: binary32 products summed in 64 binary32 lanes
  // (lane = j mod 64), then the lanes added in binary64 in lane order. Same bits on every ISA.
  double (*dot)(const float* a, const float* b, int64_t n);
};

const KernelTable& scalar_table();
const KernelTable* avx2_table();    // nullptr where not compiled (non-x86)
const KernelTable* avx512_table();  // nullptr where not compiled (non-x86)

}  // namespace cpu
}  // namespace fastsoup
