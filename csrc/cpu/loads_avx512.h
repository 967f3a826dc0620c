// Internal: 16 float16, bfloat16 or float32 values widened to binary32 (exact) in one AVX-512
// register, whole or masked (masked-off lanes read nothing and are 0). Shared by the linear kernels
// (kernels_avx512.cpp) and the sparse ones (sparse_avx512.cpp): included INSIDE their anonymous
// namespace, after their AVX-512 target pragma, as kernel_generic.h is. (No include guard on purpose.)

template <DType D>
inline __m512 load16(const void* p, int64_t j) {
  if constexpr (D == DType::kFloat16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + j)));
  } else if constexpr (D == DType::kBFloat16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + j));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(p) + j);
  }
}

template <DType D>
inline __m512 load16(const void* p, int64_t j, __mmask16 m) {
  if constexpr (D == DType::kFloat16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + j));
  } else if constexpr (D == DType::kBFloat16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + j);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + j);
  }
}
