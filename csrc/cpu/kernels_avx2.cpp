// AVX2 + FMA + F16C building blocks (8 binary32 / 4 binary64 lanes), for x86 CPUs without AVX-512.
// Same target-pragma rule as kernels_avx512.cpp; tails are done element by element with the same
// binary64 arithmetic (dtype.h). FMA is used only where kernels.h says so (the compensated mode).
#include "kernel_table.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace fastsoup {
namespace cpu {
namespace {

constexpr int64_t kPrefetchElems = 256;  // as in kernels_avx512.cpp

template <DType D>
inline __m256 load8(const void* p, int64_t j) {
  if constexpr (D == DType::kFloat16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + j)));
  } else if constexpr (D == DType::kBFloat16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + j));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(p) + j);
  }
}

#include "kernel_generic.h"

// Plain mode: 8 inputs of type D widened to binary64 (exact), as two vectors of 4.
template <DType D>
inline void load8d(const void* p, int64_t j, __m256d& lo, __m256d& hi) {
  if constexpr (D == DType::kFloat32) {
    lo = _mm256_cvtps_pd(_mm_loadu_ps(static_cast<const float*>(p) + j));
    hi = _mm256_cvtps_pd(_mm_loadu_ps(static_cast<const float*>(p) + j + 4));
  } else {
    const __m256 v = load8<D>(p, j);
    lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  }
}

// The low 32 bits of each 64-bit lane (a compare mask of 4 doubles as 4 int32 lanes).
inline __m128i lanes32(__m256d m) {
  const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(m), idx));
}

// binary64 -> binary32 rounded to odd, as dtype.h double_to_float_odd computes it: round to
// nearest, step back toward zero where that went away from zero, set the last bit if inexact.
inline __m128 to_float_odd(__m256d v) {
  const __m128 r = _mm256_cvtpd_ps(v);
  const __m256d back = _mm256_cvtps_pd(r);
  const __m256d abs = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffll));
  const __m256d away = _mm256_cmp_pd(_mm256_and_pd(back, abs), _mm256_and_pd(v, abs), _CMP_GT_OQ);
  const __m256d inexact = _mm256_cmp_pd(back, v, _CMP_NEQ_UQ);
  __m128i u = _mm_add_epi32(_mm_castps_si128(r), lanes32(away));  // -1 where rounded away
  u = _mm_or_si128(u, _mm_and_si128(lanes32(inexact), _mm_set1_epi32(1)));
  return _mm_castsi128_ps(u);
}

// out[j .. j+4) = round_O(v): the one rounding of the result.
template <DType O>
inline void store4d(void* out, int64_t j, __m256d v) {
  if constexpr (O == DType::kFloat32) {
    _mm_storeu_ps(static_cast<float*>(out) + j, _mm256_cvtpd_ps(v));
  } else if constexpr (O == DType::kFloat16) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + j),
                     _mm_cvtps_ph(to_float_odd(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m128 f = to_float_odd(v);
    const __m128i x = _mm_castps_si128(f);
    const __m128i lsb = _mm_and_si128(_mm_srli_epi32(x, 16), _mm_set1_epi32(1));
    __m128i r = _mm_srli_epi32(_mm_add_epi32(x, _mm_add_epi32(lsb, _mm_set1_epi32(0x7fff))), 16);
    const __m128 nan = _mm_cmp_ps(f, f, _CMP_UNORD_Q);
    r = _mm_castps_si128(_mm_blendv_ps(_mm_castsi128_ps(r), _mm_castsi128_ps(_mm_set1_epi32(0x7fc0)), nan));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + j), _mm_packus_epi32(r, r));
  }
}

// Plain mode over a block, 16 elements per step (four binary64 vectors). kUnit: every weight of
// the group is 1, so the products are skipped (the same bits).
template <DType D, DType O, bool kUnit>
void sum_vec(double* acc, bool init, const void* const* x, const double* w, int g, int64_t n, void* out,
             double divisor) {
  __m256d wv[kGroup];
  for (int i = 0; i < g; ++i) wv[i] = _mm256_set1_pd(w[i]);
  const __m256d neg_zero = _mm256_set1_pd(-0.0);
  const __m256d dv = _mm256_set1_pd(divisor);
  const bool divide = divisor != 1.0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256d a[4];
    for (int q = 0; q < 4; ++q) a[q] = init ? neg_zero : _mm256_loadu_pd(acc + j + 4 * q);
    for (int i = 0; i < g; ++i) {
      _mm_prefetch(static_cast<const char*>(x[i]) + (j + kPrefetchElems) * (D == DType::kFloat32 ? 4 : 2), _MM_HINT_T0);
      __m256d v[4];
      load8d<D>(x[i], j, v[0], v[1]);
      load8d<D>(x[i], j + 8, v[2], v[3]);
      for (int q = 0; q < 4; ++q) a[q] = _mm256_add_pd(a[q], kUnit ? v[q] : _mm256_mul_pd(wv[i], v[q]));
    }
    if (out != nullptr) {
      for (int q = 0; q < 4; ++q) store4d<O>(out, j + 4 * q, divide ? _mm256_div_pd(a[q], dv) : a[q]);
    } else {
      for (int q = 0; q < 4; ++q) _mm256_storeu_pd(acc + j + 4 * q, a[q]);
    }
  }
  for (; j < n; ++j) {  // the tail, element by element in the same arithmetic
    double a = init ? -0.0 : acc[j];
    for (int i = 0; i < g; ++i) a = sum_step(a, w[i], load_double(x[i], j, D));
    if (out != nullptr) store_double(out, j, O, sum_finish(a, divisor));
    else acc[j] = a;
  }
}

template <DType D, DType O>
void sum(double* acc, bool init, const void* const* x, const double* w, int g, int64_t n, void* out, double divisor) {
  bool unit = true;
  for (int i = 0; i < g; ++i) unit = unit && w[i] == 1.0;
  if (unit) sum_vec<D, O, true>(acc, init, x, w, g, n, out, divisor);
  else sum_vec<D, O, false>(acc, init, x, w, g, n, out, divisor);
}

// ---- The binary32 fast path (the fp32 kernel of before, with a final exact scale) -----------------

template <DType D, bool kUnit>
void sum32_vec(float* acc, bool init, const void* const* x, const float* w, int g, int64_t n, float scale) {
  __m256 wv[kGroup];
  for (int i = 0; i < g; ++i) wv[i] = _mm256_set1_ps(w[i]);
  const __m256 neg_zero = _mm256_set1_ps(-0.0f);
  const __m256 sv = _mm256_set1_ps(scale);
  const bool scaled = scale != 1.0f;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256 a0 = init ? neg_zero : _mm256_loadu_ps(acc + j);
    __m256 a1 = init ? neg_zero : _mm256_loadu_ps(acc + j + 8);
    for (int i = 0; i < g; ++i) {
      _mm_prefetch(static_cast<const char*>(x[i]) + (j + kPrefetchElems) * (D == DType::kFloat32 ? 4 : 2), _MM_HINT_T0);
      const __m256 v0 = load8<D>(x[i], j), v1 = load8<D>(x[i], j + 8);
      a0 = _mm256_add_ps(a0, kUnit ? v0 : _mm256_mul_ps(wv[i], v0));
      a1 = _mm256_add_ps(a1, kUnit ? v1 : _mm256_mul_ps(wv[i], v1));
    }
    if (scaled) {
      a0 = _mm256_mul_ps(a0, sv);
      a1 = _mm256_mul_ps(a1, sv);
    }
    _mm256_storeu_ps(acc + j, a0);
    _mm256_storeu_ps(acc + j + 8, a1);
  }
  for (; j < n; ++j) {
    float a = init ? -0.0f : acc[j];
    for (int i = 0; i < g; ++i) a = a + w[i] * load_float(x[i], j, D);
    acc[j] = scaled ? a * scale : a;
  }
}

template <DType D>
void sum32(float* acc, bool init, const void* const* x, const float* w, int g, int64_t n, float scale) {
  bool unit = true;
  for (int i = 0; i < g; ++i) unit = unit && w[i] == 1.0f;
  if (unit) sum32_vec<D, true>(acc, init, x, w, g, n, scale);
  else sum32_vec<D, false>(acc, init, x, w, g, n, scale);
}

template <DType O>
inline void store8(void* p, int64_t j, __m256 v) {
  if constexpr (O == DType::kFloat16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + j),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (O == DType::kBFloat16) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + j), _mm256_castsi256_si128(packed));
  } else {
    _mm256_storeu_ps(static_cast<float*>(p) + j, v);
  }
}

template <DType O>
void store32(const float* acc, void* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8<O>(out, j, _mm256_loadu_ps(acc + j));
  for (; j < n; ++j) store_float(out, j, O, acc[j]);
}

template <DType O>
void finish32(const float* acc, void* out, int64_t n, double divisor) {
  const __m256d dv = _mm256_set1_pd(divisor);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) store4d<O>(out, j, _mm256_div_pd(_mm256_cvtps_pd(_mm_loadu_ps(acc + j)), dv));
  for (; j < n; ++j) store_double(out, j, O, sum_finish(static_cast<double>(acc[j]), divisor));
}

template <DType D>
void load(const void* x, float* acc, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(acc + j, load8<D>(x, j));
  for (; j < n; ++j) acc[j] = load_float(x, j, D);
}

double dot(const float* a, const float* b, int64_t n) {
  __m256 s[8];
  for (int v = 0; v < 8; ++v) s[v] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 64 <= n; j += 64)
    for (int v = 0; v < 8; ++v)
      s[v] = _mm256_add_ps(s[v], _mm256_mul_ps(_mm256_loadu_ps(a + j + 8 * v), _mm256_loadu_ps(b + j + 8 * v)));
  alignas(32) float lane[64];
  for (int v = 0; v < 8; ++v) _mm256_store_ps(lane + 8 * v, s[v]);
  for (; j < n; ++j) lane[j & 63] = lane[j & 63] + a[j] * b[j];
  double r = 0.0;
  for (int l = 0; l < 64; ++l) r += lane[l];
  return r;
}

// Vector code for the 2- and 4-byte types; float64 never takes the plain mode.
#define FASTSOUP_VEC_ROW(I) \
  { sum<I, DType::kFloat16>, sum<I, DType::kBFloat16>, sum<I, DType::kFloat32>, sum_generic<I, DType::kFloat64> }

const KernelTable kTable = {
    {FASTSOUP_VEC_ROW(DType::kFloat16), FASTSOUP_VEC_ROW(DType::kBFloat16), FASTSOUP_VEC_ROW(DType::kFloat32),
     FASTSOUP_GENERIC_ROW(sum_generic, DType::kFloat64)},
    FASTSOUP_GENERIC_TABLE(sum2_generic),
    {sum32<DType::kFloat16>, sum32<DType::kBFloat16>, sum32<DType::kFloat32>, nullptr},
    {store32<DType::kFloat16>, store32<DType::kBFloat16>, store32<DType::kFloat32>, nullptr},
    {finish32<DType::kFloat16>, finish32<DType::kBFloat16>, finish32<DType::kFloat32>, nullptr},
    {load<DType::kFloat16>, load<DType::kBFloat16>, load<DType::kFloat32>, nullptr},
    dot,
};

}  // namespace

const KernelTable* avx2_table() { return &kTable; }

}  // namespace cpu
}  // namespace fastsoup

#pragma GCC pop_options

#else
namespace fastsoup {
namespace cpu {
const KernelTable* avx2_table() { return nullptr; }
}  // namespace cpu
}  // namespace fastsoup
#endif
