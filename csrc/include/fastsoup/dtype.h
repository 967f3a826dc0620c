// Element types and the per-element math shared by every backend.
//
// Everything here is plain C++ that also compiles as CUDA device code (FS_HD), so the CPU tests
// exercise exactly the conversions and rounding that the GPU kernels run.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

namespace fastsoup {

// Floating-point element types the kernels read and write. The numeric codes are part of the
// Python <-> native ABI (fastsoup/_dtypes.py mirrors them): never renumber.
enum class DType : int32_t {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kFloat64 = 3,
};
constexpr int kNumDTypes = 4;

FS_HD bool valid_dtype_code(int code) { return code >= 0 && code < kNumDTypes; }

FS_HD size_t itemsize(DType d) {
  switch (d) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
  }
  return 0;
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
  }
  return "unknown";
}

FS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// IEEE binary16 -> binary32, exact.
FS_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in binary32.
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return bits_float(float_bits(mag) | sign);
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan (payload kept)
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// binary32 -> binary16, round to nearest even; the same bits as F16C's VCVTPS2PH and torch's .half().
FS_HD uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf, or nan made quiet with the top of its payload kept
    return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? (0x200u | ((ax >> 13) & 0x3ffu)) : 0u));
  }
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5 (whose ulp is 2^-24, the subnormal half
    // step) makes the FPU round the value to a multiple of 2^-24, nearest-even.
    const float r = bits_float(ax) + 0.5f;
    return static_cast<uint16_t>(sign | (float_bits(r) - 0x3f000000u));
  }
  const uint32_t odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + odd;  // rebias the exponent by (15 - 127) << 23 (mod 2^32) and round half-even
  return static_cast<uint16_t>(sign | (ax >> 13));
}

FS_HD float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN becomes 0x7fc0 (as c10::BFloat16 does).
// Integer rounding, not AVX512-BF16's VCVTNEPS2BF16: that instruction flushes subnormals to zero.
FS_HD uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

FS_HD float load_float(const void* base, int64_t i, DType d) {
  switch (d) {
    case DType::kFloat16:
      return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kFloat32:
      return static_cast<const float*>(base)[i];
    case DType::kFloat64:
      return static_cast<float>(static_cast<const double*>(base)[i]);
  }
  return 0.0f;
}

// ---------------------------------------------------------------------------------------------
// weighted_sum's arithmetic (kernels.h documents the order). Every operation is one IEEE binary64
// operation rounded to nearest even; on the device the _rn intrinsics keep nvcc from contracting
// or reassociating, on the host -ffp-contract=off does.

FS_HD double fs_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

FS_HD double fs_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

FS_HD double fs_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

FS_HD double fs_div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// a * b + c with one rounding (the exact error terms of the compensated sum need it).
FS_HD double fs_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

FS_HD bool fs_isfinite(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// Every input type widens to binary64 exactly.
FS_HD double load_double(const void* base, int64_t i, DType d) {
  if (d == DType::kFloat64) return static_cast<const double*>(base)[i];
  return static_cast<double>(load_float(base, i, d));
}

// binary64 -> binary32 rounded to odd: truncate, then set the last bit if anything was dropped.
// Rounding that result to nearest even in a format of at most 22 significant bits (binary16: 11,
// bfloat16: 8) gives the nearest-even rounding of the binary64 value itself, with no double rounding.
FS_HD float double_to_float_odd(double v) {
#if defined(__CUDA_ARCH__)
  const float t = __double2float_rz(v);
  const uint32_t inexact = static_cast<double>(t) != v ? 1u : 0u;  // nan: true (the bit keeps it a nan)
  return bits_float(float_bits(t) | inexact);
#else
  const float r = static_cast<float>(v);  // nearest even (binary32 overflow gives inf)
  const double back = static_cast<double>(r);
  uint32_t u = float_bits(r);
  if (back != v) {  // inexact (or nan)
    if (std::fabs(back) > std::fabs(v)) u -= 1;  // rounded away from zero: step back to the truncation
    u |= 1u;
  }
  return bits_float(u);
#endif
}

// The one rounding of a weighted_sum result to the output type.
FS_HD void store_double(void* base, int64_t i, DType d, double v) {
  switch (d) {
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[i] = float_to_half(double_to_float_odd(v));
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16(double_to_float_odd(v));
      return;
    case DType::kFloat32:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      return;
    case DType::kFloat64:
      static_cast<double*>(base)[i] = v;
      return;
  }
}

// Plain mode, one step: acc + w * x (the product is skipped when w == 1: the same bits).
FS_HD double sum_step(double acc, double w, double x) { return fs_add(acc, w == 1.0 ? x : fs_mul(w, x)); }

// Plain mode, the end: acc / divisor (skipped when the divisor is 1: the same bits).
FS_HD double sum_finish(double acc, double divisor) { return divisor == 1.0 ? acc : fs_div(acc, divisor); }

// Compensated mode, one step: the sum kept as s + c. The product's exact error (fma) and the
// addition's exact error (TwoSum, Knuth) go into c.
FS_HD void sum2_step(double& s, double& c, double w, double x) {
  const double p = fs_mul(w, x);
  const double e = fs_fma(w, x, -p);
  const double t = fs_add(s, p);
  const double z = fs_sub(t, s);
  const double err = fs_add(fs_sub(s, fs_sub(t, z)), fs_sub(p, z));
  s = t;
  c = fs_add(c, fs_add(err, e));
}

// Compensated mode, the end: (s + c) / (d + d_lo), rounded to binary64 (the divisor may carry a
// low part: a weight total is rarely a binary64 number). q = s / d is the answer when c and d_lo
// are 0 (an exact sum and divisor: then this equals the plain mode's finish) or q is not finite;
// else q has the exact remainder s - q * d (fma), and the correction
// fma(-q, d_lo, (s - q d) + c) / d is added last (a correction of zero leaves q as it is, so
// -0.0 stays -0.0).
FS_HD double sum2_finish(double s, double c, double d, double d_lo) {
  const double q = fs_div(s, d);
  if ((c == 0.0 && d_lo == 0.0) || !fs_isfinite(q)) return q;
  const double r = fs_fma(-q, d, s);
  const double corr = fs_div(fs_fma(-q, d_lo, fs_add(r, c)), d);
  return corr == 0.0 ? q : fs_add(q, corr);
}

// Which accumulation weighted_sum uses (kernels.h): compensated when an operand is float64.
FS_HD bool needs_compensated(const DType* in, int64_t k, DType out) {
  if (out == DType::kFloat64) return true;
  for (int64_t i = 0; i < k; ++i)
    if (in[i] == DType::kFloat64) return true;
  return false;
}

FS_HD void store_float(void* base, int64_t i, DType d, float v) {
  switch (d) {
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[i] = float_to_half(v);
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
      return;
    case DType::kFloat32:
      static_cast<float*>(base)[i] = v;
      return;
    case DType::kFloat64:
      static_cast<double*>(base)[i] = static_cast<double>(v);
      return;
  }
}

}  // namespace fastsoup
