// sparse_merge's block code for AVX-512 (F, BW, VL, DQ) CPUs: sparse_generic.h compiled (and
// auto-vectorized) under the AVX-512 target (DQ for the 64-bit multiplies of DARE's RNG), with the
// linear kernels' AVX-512 loaders and stores and a compress-store candidate scan. Headers come before
// the target pragma (as in kernels_avx512.cpp). No FMA contraction: the same bits as the scalar build.
#include <cstring>

#include "kernel_table.h"
#include "sparse_ops.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt")

namespace fastsoup {
namespace cpu {
namespace {

const KernelTable& kt() { return *avx512_table(); }

// Keys > H counted, keys in [L, H] appended in index order (signed compares: every value < 2^31).
inline void scan_window(const uint32_t* keys, int64_t cnt, WindowCut& c) {
  const __m512i hv = _mm512_set1_epi32(static_cast<int>(c.H));
  const __m512i lv = _mm512_set1_epi32(static_cast<int>(c.L));
  int64_t above = 0, len = c.len;
  bool overflow = c.overflow;
  int64_t j = 0;
  for (; j + 16 <= cnt; j += 16) {
    const __m512i v = _mm512_loadu_si512(keys + j);
    const __mmask16 gt = _mm512_cmpgt_epi32_mask(v, hv);
    const __mmask16 in = _mm512_mask_cmpge_epi32_mask(static_cast<__mmask16>(~gt), v, lv);
    above += __builtin_popcount(static_cast<unsigned>(gt));
    if (in == 0) continue;
    const int n_in = __builtin_popcount(static_cast<unsigned>(in));
    if (!c.store) {
      len += n_in;
      continue;
    }
    if (overflow || len + n_in > c.cap) {
      overflow = true;
      continue;
    }
    _mm512_mask_compressstoreu_epi32(c.buf + len, in, v);
    len += n_in;
  }
  for (; j < cnt; ++j) {
    const uint32_t key = keys[j];
    if (key > c.H) {
      ++above;
    } else if (key >= c.L) {
      if (!c.store) ++len;
      else if (overflow || len >= c.cap) overflow = true;
      else c.buf[len++] = key;
    }
  }
  c.above += above;
  c.len = len;
  c.overflow = overflow;
}

#include "sparse_generic.h"

}  // namespace

const SparseOps* sparse_ops_avx512() { return &kOps; }

}  // namespace cpu
}  // namespace fastsoup

#pragma GCC pop_options

#else
namespace fastsoup {
namespace cpu {
const SparseOps* sparse_ops_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace fastsoup
#endif
