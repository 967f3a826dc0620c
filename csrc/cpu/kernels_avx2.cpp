// AVX2 + F16C building blocks (8 lanes), for x86 CPUs without AVX-512. Same target-pragma rule as
// kernels_avx512.cpp; tails are done element by element with the same binary32 arithmetic.
#include "kernel_table.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,f16c")

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

template <DType D>
inline void store8(void* p, int64_t j, __m256 v) {
  if constexpr (D == DType::kFloat16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + j),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (D == DType::kBFloat16) {
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

template <DType D>
void accumulate(float* acc, bool init, const void* const* x, const float* w, int g, int64_t n) {
  __m256 wv[kGroup];
  for (int i = 0; i < g; ++i) wv[i] = _mm256_set1_ps(w[i]);
  const __m256 neg_zero = _mm256_set1_ps(-0.0f);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256 a0 = init ? neg_zero : _mm256_loadu_ps(acc + j);
    __m256 a1 = init ? neg_zero : _mm256_loadu_ps(acc + j + 8);
    for (int i = 0; i < g; ++i) {
      _mm_prefetch(static_cast<const char*>(x[i]) + (j + kPrefetchElems) * (D == DType::kFloat32 ? 4 : 2), _MM_HINT_T0);
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(wv[i], load8<D>(x[i], j)));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(wv[i], load8<D>(x[i], j + 8)));
    }
    _mm256_storeu_ps(acc + j, a0);
    _mm256_storeu_ps(acc + j + 8, a1);
  }
  for (; j < n; ++j) {
    float a = init ? -0.0f : acc[j];
    for (int i = 0; i < g; ++i) a = a + w[i] * load_float(x[i], j, D);
    acc[j] = a;
  }
}

template <DType D>
void store(const float* acc, void* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8<D>(out, j, _mm256_loadu_ps(acc + j));
  for (; j < n; ++j) store_float(out, j, D, acc[j]);
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

const KernelTable kTable = {
    {accumulate<DType::kFloat16>, accumulate<DType::kBFloat16>, accumulate<DType::kFloat32>, nullptr},
    {store<DType::kFloat16>, store<DType::kBFloat16>, store<DType::kFloat32>, nullptr},
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
