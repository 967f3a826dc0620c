// Internal: the per-ISA building blocks the CPU drivers (kernels.cpp) are made of.
// Each works on at most one block of elements that fits in L1, so the drivers control the
// memory order (one pass over every input) and the ISA files only the arithmetic.
#pragma once

#include <cstdint>

#include "fastsoup/dtype.h"

namespace fastsoup {
namespace cpu {

constexpr int64_t kBlock = 2048;   // elements per L1 block (a 16 KiB binary64 accumulator)
constexpr int kGroup = 8;          // inputs summed in registers per pass over the accumulator

struct KernelTable {
  // Plain mode (kernels.h) over one block, inputs of type I (first index), output type O (second),
  // j < n <= kBlock, 1 <= g <= kGroup:
  //   a = (init ? -0.0 : acc[j]) + w[0]*x0[j] + ... + w[g-1]*x{g-1}[j]   (binary64, left to right)
  //   out == nullptr: acc[j] = a;  else out[j] = round_O(a / divisor) and acc is not written.
  void (*sum[kNumDTypes][kNumDTypes])(double* acc, bool init, const void* const* x, const double* w, int g,
                                      int64_t n, void* out, double divisor);
  // Compensated mode likewise, the running sum kept as s[j] + c[j] (init: s = -0.0, c = 0), the
  // divisor divisor + divisor_lo.
  void (*sum2[kNumDTypes][kNumDTypes])(double* s, double* c, bool init, const void* const* x, const double* w,
                                       int g, int64_t n, void* out, double divisor, double divisor_lo);
  // The binary32 fast path (kernels.cpp: used only while no operation of a block is inexact, so
  // it gives the binary64 results bit for bit). nullptr where the ISA has none (scalar).
  //   acc[j] = ((init ? -0.0f : acc[j]) + w[0]*x0[j] + ... + w[g-1]*x{g-1}[j]) * scale   (binary32)
  void (*sum32[kNumDTypes])(float* acc, bool init, const void* const* x, const float* w, int g, int64_t n,
                            float scale);
  //   out[j] = round_O(acc[j]) (the value is exact: binary32 -> O, nearest even)
  void (*store32[kNumDTypes])(const float* acc, void* out, int64_t n);
  //   out[j] = round_O(double(acc[j]) / divisor): plain mode's finish, for a divisor that is not a
  //   power of two
  void (*finish32[kNumDTypes])(const float* acc, void* out, int64_t n, double divisor);
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
