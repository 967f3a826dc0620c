// The native primitives. Plain C++ over raw pointers: no torch, no Python.
//
// weighted_sum computes, for every element i, out[i] = round(sum_k w_k * x_k[i] / divisor), in
// this order (what "bit-identical to the reference" means; dtype.h has the per-element code):
//
//   Plain mode (no float64 operand):
//     acc = -0.0                   (or double(out[i]) in accumulate mode, float32 out, divisor 1)
//     for k in 0 .. K-1:  acc = acc + w_k * double(x_k[i])      each * and + rounded to binary64
//     acc = acc / divisor          (rounded to binary64; skipped when divisor == 1)
//   Compensated mode (an input or the output is float64): the sum is kept as s + c,
//     s = -0.0 (or out), c = 0; for k: p = w_k*x, e = fma(w_k, x, -p), TwoSum(s, p) -> (s, err),
//     c = c + (err + e); then q = s / d, and unless c == 0 and d_lo == 0 (or q is not finite)
//     the result is q + fma(-q, d_lo, fma(-q, d, s) + c) / d (q itself when that correction is 0):
//     the division by d + d_lo, the divisor's low part (divisor_lo) included.
//   out[i] = acc rounded once to nearest even in the output dtype: binary64 -> binary32 directly,
//     -> binary16 / bfloat16 through binary32 rounded to odd (which is the same as rounding the
//     binary64 value directly).
//
// Weights and the divisor are binary64. Inputs widen to binary64 exactly, and a product by 1 is
// exact, so weights of 1 and divisor K (what fastsoup.average passes for a uniform soup) give the
// mean rounded once whenever the sum itself is exact in binary64: always for K <= 2^13 float16
// inputs, and for float32 (bfloat16) inputs whose exponents lie within 53 - 24 - log2(K)
// (53 - 8 - log2(K)) binades of each other. Otherwise the error before the final rounding is at
// most about (K + 1) * 2^-53 * sum_k |w_k x_k| / |divisor| in plain mode (about K^2 * 2^-106
// times the same sum in compensated mode, plus half an ulp of binary64): less than half an ulp of
// a p-bit output (p = 11, 8, 24) unless the sum cancels, sum_k |w_k x_k| / |sum_k w_k x_k| above
// about 2^(52 - p) / (K + 1). In compensated mode, K identical float64 inputs average to
// themselves exactly. Skipping a product
// by 1 or a division by 1 does not change any bit; a NaN result is a NaN (its payload is not
// specified). -0.0 is the additive identity, so a single input with weight 1 is copied exactly.
// K == 0 writes +0.
//
// The CPU kernels compute blocks of 2-byte inputs in binary32 where that is exact (the inexact
// flag tells): then binary32 computes the same values, so the results are these bits either way.
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
  const double* weights = nullptr;      // K weights (binary64)
  int64_t num_inputs = 0;               // K, may be 0
  double divisor = 1.0;                 // the sum is divided by it once, before the final rounding
  double divisor_lo = 0.0;              // compensated mode: the divisor is divisor + divisor_lo
                                        // (|divisor_lo| <= ulp(divisor) / 2; the plain mode, whose
                                        // results have at most 24 bits, ignores it)
  void* out = nullptr;                  // n elements of out_dtype; may not overlap any input
  DType out_dtype = DType::kFloat32;
  int64_t n = 0;                        // elements per input and in out
  bool accumulate = false;              // out (float32 only) = round(out + sum): the sum starts from
                                        // out instead of -0.0 (divisor must be 1, divisor_lo 0)
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

// The checks of the primitives' parameters (csrc/cpu/checks.cpp), one place for the CPU and the
// CUDA entry points: sizes, dtype codes, null addresses (only where n > 0: an empty call reads
// nothing), the divisor and accumulate's conditions. Every entry point below calls its check first.
Status check_weighted_sum(const WeightedSumParams& p);
Status check_multi_dot(const MultiDotParams& p);
Status check_gram(const GramParams& p);

// weighted_sum: the order above, element by element, so every thread count and ISA gives the same
// bits. multi_dot/gram: products are binary32, summed in binary32 within fixed blocks of elements
// and across blocks in binary64, in an order that depends only on n: the same inputs give the same
// bits run to run, whatever the thread count.
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
  int64_t fast_blocks = 0;        // weighted_sum pieces (of 1024 elements) done exactly in binary32
  int64_t fallback_blocks = 0;    // pieces where binary32 was inexact, summed again in binary64
};
Counters counters();
void reset_counters();
void add_counters(int64_t read, int64_t written);
void add_mapped_read(int64_t bytes);

}  // namespace fastsoup
