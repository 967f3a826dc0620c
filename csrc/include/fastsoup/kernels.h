// The native primitives. Plain C++ over raw pointers: no torch, no Python.
//
// Summation order (what "bit-identical to the reference" means): for every element i,
//   acc = -0.0f                     (or out[i] in accumulate mode)
//   for k in 0 .. K-1:  acc = acc + (w_k * float(in_k[i]))     each * and + rounded to binary32, no FMA
//   out[i] = round_to_nearest_even(acc)  in the output dtype
// -0.0 is the additive identity, so a single input with weight 1 is copied exactly. K == 0 writes +0.
#pragma once

#include <cstdint>
#include <string>

#include "fastsoup/dtype.h"

namespace fastsoup {

// Returned by every entry point: ok, or the reason the call was refused / failed.
struct Status {
  bool ok = true;
  std::string message;
  static Status Ok() { return {}; }
  static Status Error(std::string m) { return {false, std::move(m)}; }
};

struct WeightedSumParams {
  const void* const* inputs = nullptr;  // K base pointers, each to n elements (any alignment >= itemsize)
  const DType* input_dtypes = nullptr;  // K element types
  const float* weights = nullptr;       // K weights, applied in binary32
  int64_t num_inputs = 0;               // K, may be 0
  void* out = nullptr;                  // n elements of out_dtype; may not overlap any input
  DType out_dtype = DType::kFloat32;
  int64_t n = 0;                        // elements per input and in out
  bool accumulate = false;              // out (float32 only) += sum, instead of out = cast(sum)
  int threads = 0;                      // 0: every core this process may use
};

struct MultiDotParams {
  const void* const* inputs = nullptr;  // K base pointers, n elements each
  const DType* input_dtypes = nullptr;
  int64_t num_inputs = 0;
  const void* g = nullptr;  // n elements
  DType g_dtype = DType::kFloat32;
  int64_t n = 0;
  double* out = nullptr;  // K results: sum_i g[i] * in_k[i]
  int threads = 0;
};

struct GramParams {
  const void* const* inputs = nullptr;
  const DType* input_dtypes = nullptr;
  int64_t num_inputs = 0;
  int64_t n = 0;
  double* out = nullptr;  // K*K results, row-major, symmetric: sum_i in_a[i] * in_b[i]
  int threads = 0;
};

// Products are binary32, summed in binary32 within fixed blocks of elements and across blocks in
// binary64, in an order that depends only on n: the same inputs give the same bits run to run,
// whatever the thread count.
Status weighted_sum_cpu(const WeightedSumParams& p);
Status multi_dot_cpu(const MultiDotParams& p);
Status gram_cpu(const GramParams& p);

// Which vector instruction set the CPU kernels use. Chosen at first use from the CPU's features
// (FASTSOUP_ISA=scalar|avx2|avx512 caps it); set_isa() lets tests run every path on one machine.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
Isa current_isa();
Isa best_supported_isa();
bool isa_supported(Isa isa);
void set_isa(Isa isa);  // throws std::invalid_argument if this CPU lacks it
const char* isa_name(Isa isa);

// Threads the CPU kernels use by default (the CPU affinity count, or FASTSOUP_NUM_THREADS).
int default_threads();

// Bytes the kernels have read and written since the last reset (for tests and benchmarks).
struct Counters {
  int64_t bytes_read = 0;
  int64_t bytes_written = 0;
  int64_t calls = 0;
  int64_t mapped_bytes_read = 0;  // of bytes_read: input bytes the merge executor read from file mappings
};
Counters counters();
void reset_counters();
void add_counters(int64_t read, int64_t written);
void add_mapped_read(int64_t bytes);

}  // namespace fastsoup
