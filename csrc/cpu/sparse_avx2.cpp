// sparse_merge's block code for AVX2 + F16C CPUs: sparse_generic.h compiled (and auto-vectorized) under
// the AVX2 target, with the linear kernels' AVX2 loaders and stores and a vector candidate scan.
// Headers come before the target pragma, so nothing outside this file is emitted for AVX2 (as in
// kernels_avx2.cpp). No FMA contraction (-ffp-contract=off): the same bits as the scalar build.
#include <cstring>

#include "kernel_table.h"
#include "sparse_ops.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt")

namespace fastsoup {
namespace cpu {
namespace {

const KernelTable& kt() { return *avx2_table(); }

// Keys > H counted, keys in [L, H] appended in index order (keys, L and H are below 2^31: signed
// compares are the unsigned order).
inline void scan_window(const uint32_t* keys, int64_t cnt, WindowCut& c) {
  const __m256i hv = _mm256_set1_epi32(static_cast<int>(c.H));
  const __m256i lv = _mm256_set1_epi32(static_cast<int>(c.L) - 1);
  int64_t above = 0, len = c.len;
  bool overflow = c.overflow;
  int64_t j = 0;
  for (; j + 8 <= cnt; j += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
    const __m256i gt = _mm256_cmpgt_epi32(v, hv);
    const __m256i ge = _mm256_cmpgt_epi32(v, lv);
    above += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(gt))));
    unsigned in = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(gt, ge))));
    if (in == 0) continue;
    if (!c.store) {
      len += __builtin_popcount(in);
      continue;
    }
    if (overflow || len + __builtin_popcount(in) > c.cap) {
      overflow = true;
      continue;
    }
    while (in) {
      c.buf[len++] = keys[j + __builtin_ctz(in)];
      in &= in - 1;
    }
  }
  scan_window_keys(keys, j, cnt, c, above, len, overflow);
  c.above += above;
  c.len = len;
  c.overflow = overflow;
}

#include "sparse_generic.h"

const SparseOps kOps = {combine_impl, window_impl, hist_hi_impl, hist_lo_impl, keys_impl, l1_impl};

}  // namespace

const SparseOps* sparse_ops_avx2() { return &kOps; }

}  // namespace cpu
}  // namespace fastsoup

#pragma GCC pop_options

#else
namespace fastsoup {
namespace cpu {
const SparseOps* sparse_ops_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace fastsoup
#endif
