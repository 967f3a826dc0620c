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
  scan_window_keys(keys, j, cnt, c, above, len, overflow);
  c.above += above;
  c.len = len;
  c.overflow = overflow;
}

// The L1 sums' block code (sparse_generic.h's exact_add_block), 8 lanes at a time; a masked tail.
#define FS_SPARSE_BLOCK_UNITS 1
// GCC 12 flags the "undefined" vector its own _mm512_reduce_* intrinsics start from (-Wuninitialized,
// inside avx512fintrin.h, once inlined here): silenced for these two functions only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
inline int64_t block_top(const uint64_t* bits, int64_t cnt) {
  __m512i top = _mm512_setzero_si512();
  for (int64_t j = 0; j < cnt; j += 8) {
    const __mmask8 m = cnt - j >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << (cnt - j)) - 1);
    top = _mm512_max_epi64(top, _mm512_maskz_loadu_epi64(m, bits + j));
  }
  return _mm512_reduce_max_epi64(top);
}

inline void block_units(const uint64_t* bits, int64_t cnt, int64_t B, uint64_t& sum, uint64_t& lost) {
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi64(1), c63 = _mm512_set1_epi64(63);
  const __m512i frac = _mm512_set1_epi64((int64_t(1) << 52) - 1), hidden = _mm512_set1_epi64(int64_t(1) << 52);
  const __m512i vb = _mm512_set1_epi64(B);
  __m512i acc = zero, lo = zero;
  for (int64_t j = 0; j < cnt; j += 8) {
    const __mmask8 m = cnt - j >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << (cnt - j)) - 1);
    const __m512i b = _mm512_maskz_loadu_epi64(m, bits + j);  // lanes past cnt: +0.0, adding nothing
    const __m512i e = _mm512_srli_epi64(b, 52);
    const __mmask8 normal = _mm512_cmpneq_epi64_mask(e, zero);
    const __m512i mant = _mm512_mask_or_epi64(_mm512_and_si512(b, frac), normal, _mm512_and_si512(b, frac), hidden);
    const __m512i d = _mm512_sub_epi64(_mm512_mask_sub_epi64(e, normal, e, one), vb);  // pos - B
    const __m512i ls = _mm512_max_epi64(d, zero);
    const __m512i rs = _mm512_min_epi64(_mm512_max_epi64(_mm512_sub_epi64(zero, d), zero), c63);
    acc = _mm512_add_epi64(acc, _mm512_srlv_epi64(_mm512_sllv_epi64(mant, ls), rs));
    lo = _mm512_or_si512(lo, _mm512_and_si512(mant, _mm512_sub_epi64(_mm512_sllv_epi64(one, rs), one)));
  }
  sum += static_cast<uint64_t>(_mm512_reduce_add_epi64(acc));
  lost |= static_cast<uint64_t>(_mm512_reduce_or_epi64(lo));
}
#pragma GCC diagnostic pop

#include "sparse_generic.h"
#include "loads_avx512.h"

// The window pass fused for binary32-exact inputs and base (fp16, bf16, fp32): 16 keys at a time
// from the loads to the counts and the compressed candidates, in registers (keys_of_f32's keys).
template <DType D>
void window_model(const WindowModel& m, const float* bf, int64_t i, int64_t cnt) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i nan_key = _mm512_set1_epi32(static_cast<int>(sparse::kNanKey)), one = _mm512_set1_epi32(1);
  for (int c = 0; c < m.ncuts; ++c) {
    WindowCut& wc = m.cuts[c];
    const __m512i hv = _mm512_set1_epi32(static_cast<int>(wc.H)), lv = _mm512_set1_epi32(static_cast<int>(wc.L));
    __m512i above = _mm512_setzero_si512();
    int64_t len = wc.len;
    bool overflow = wc.overflow;
    const bool store = wc.store;
    for (int64_t j = 0; j < cnt; j += 16) {
      const __mmask16 lanes = cnt - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (cnt - j)) - 1u);
      const __m512 x = load16<D>(m.x, i + j, lanes);
      const __m512 b = _mm512_maskz_loadu_ps(lanes, bf + j);
      const __m512i u = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(x, b)), abs_mask);
      const __m512i key = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(u, inf), u, nan_key);
      const __mmask16 gt = _mm512_mask_cmpgt_epi32_mask(lanes, key, hv);
      above = _mm512_mask_add_epi32(above, gt, above, one);
      const __mmask16 in = _mm512_mask_cmpge_epi32_mask(static_cast<__mmask16>(lanes & ~gt), key, lv);
      const int n_in = __builtin_popcount(static_cast<unsigned>(in));
      if (!store) {
        len += n_in;
      } else if (overflow || len + n_in > wc.cap) {
        overflow = overflow || n_in > 0;
      } else {  // 16 lanes written at buf + len <= cap: each buffer has 16 spare entries
        _mm512_storeu_si512(wc.buf + len, _mm512_maskz_compress_epi32(in, key));
        len += n_in;
      }
    }
    wc.above += static_cast<int64_t>(_mm512_reduce_add_epi32(above));  // < 2^31: at most one block's
    wc.len = len;
    wc.overflow = overflow;
  }
}

void window_avx512(const SparseBase& b, const WindowModel* models, int64_t nmodels, int64_t begin, int64_t end) {
  bool fast = b.base_dtype != DType::kFloat64;
  for (int64_t k = 0; k < nmodels; ++k) fast = fast && models[k].dtype != DType::kFloat64;
  if (!fast) return window_impl(b, models, nmodels, begin, end);
  alignas(64) float bf[kWB];
  for (int64_t i = begin; i < end; i += kWB) {
    const int64_t cnt = imin(kWB, end - i);
    load_f32(b.base, b.base_dtype, i, cnt, bf);
    for (int64_t k = 0; k < nmodels; ++k) {
      const WindowModel& m = models[k];
      if (m.ncuts == 0) continue;
      if (m.dtype == DType::kFloat16) window_model<DType::kFloat16>(m, bf, i, cnt);
      else if (m.dtype == DType::kBFloat16) window_model<DType::kBFloat16>(m, bf, i, cnt);
      else window_model<DType::kFloat32>(m, bf, i, cnt);
    }
  }
}

// The combine fused for binary32-exact inputs and base: 16 elements at a time through every model in
// registers (sparse.h's operations in its order; the keys as keys_of_f32). A cut's keys == T are
// decided lane by lane in index order with the model's running count, as sparse::top_keep.
inline __mmask16 top_lanes(__m512i key, __mmask16 lanes, uint32_t T, int64_t m, int64_t& seen) {
  const __m512i tv = _mm512_set1_epi32(static_cast<int>(T));
  __mmask16 in = _mm512_mask_cmpgt_epu32_mask(lanes, key, tv);
  const __mmask16 eq = _mm512_mask_cmpeq_epu32_mask(lanes, key, tv);
  if (eq) {
    const int ne = __builtin_popcount(static_cast<unsigned>(eq));
    if (seen < m) {
      if (seen + ne <= m) {
        in = static_cast<__mmask16>(in | eq);
      } else {
        unsigned e = eq;
        for (int64_t left = m - seen; left > 0; --left) {  // the lowest lanes (indices) first
          const unsigned low = e & (0u - e);
          in = static_cast<__mmask16>(in | low);
          e ^= low;
        }
      }
    }
    seen += ne;
  }
  return in;
}

inline __m512i mix64v(__m512i z) {
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64(static_cast<int64_t>(0xBF58476D1CE4E5B9ull)));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64(static_cast<int64_t>(0x94D049BB133111EBull)));
  return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

// DARE's keep lanes of the 16 elements idx0 .. idx0 + 15 (sparse::dare_u53(i) < threshold): the
// counters key + (i + 1) * GAMMA from one scalar product and the lanes' multiples of GAMMA (mod 2^64).
inline __mmask16 dare_lanes(const SparseModel& m, uint64_t idx0) {
  const __m512i lane_g = _mm512_setr_epi64(0, static_cast<int64_t>(sparse::kGamma), static_cast<int64_t>(2 * sparse::kGamma),
                                           static_cast<int64_t>(3 * sparse::kGamma), static_cast<int64_t>(4 * sparse::kGamma),
                                           static_cast<int64_t>(5 * sparse::kGamma), static_cast<int64_t>(6 * sparse::kGamma),
                                           static_cast<int64_t>(7 * sparse::kGamma));
  const uint64_t z = m.key + (idx0 + 1) * sparse::kGamma;
  const __m512i thr = _mm512_set1_epi64(static_cast<int64_t>(m.threshold));
  const __m512i z0 = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(z)), lane_g);
  const __m512i z1 = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(z + 8 * sparse::kGamma)), lane_g);
  const __mmask8 k0 = _mm512_cmplt_epu64_mask(_mm512_srli_epi64(mix64v(z0), 11), thr);
  const __mmask8 k1 = _mm512_cmplt_epu64_mask(_mm512_srli_epi64(mix64v(z1), 11), thr);
  return static_cast<__mmask16>(static_cast<unsigned>(k0) | (static_cast<unsigned>(k1) << 8));
}

template <DType D>
inline __m512 load_x16(const SparseModel& m, int64_t idx, __mmask16 lanes) {
  return load16<D>(m.x, idx, lanes);
}

void combine_avx512(const CombineArgs& a, int64_t begin, int64_t end, int64_t* seen, double* terms) {
  bool fast = a.b.base_dtype != DType::kFloat64;
  for (int64_t k = 0; k < a.K; ++k) fast = fast && a.models[k].dtype != DType::kFloat64;
  if (!fast) return combine_impl(a, begin, end, seen, terms);
  const int64_t K = a.K;
  alignas(64) float bf[kSB];
  alignas(64) double res[kSB];
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i nan_key = _mm512_set1_epi32(static_cast<int>(sparse::kNanKey));
  const __m512d zero = _mm512_setzero_pd(), onev = _mm512_set1_pd(1.0), lam = _mm512_set1_pd(a.lam);
  const __m512d divv = _mm512_set1_pd(a.divisor);
  const int64_t out_size = static_cast<int64_t>(itemsize(a.out_dtype));
  for (int64_t i = begin; i < end; i += kSB) {
    const int64_t cnt = imin(kSB, end - i);
    load_f32(a.b.base, a.b.base_dtype, i, cnt, bf);
    for (int64_t j = 0; j < cnt; j += 16) {
      const __mmask16 lanes = cnt - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (cnt - j)) - 1u);
      const __m512 b = _mm512_maskz_loadu_ps(lanes, bf + j);
      const __m512d b0 = _mm512_cvtps_pd(_mm512_castps512_ps256(b));
      const __m512d b1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
      __m512d s0 = zero, s1 = zero;
      for (int64_t k = 0; k < K; ++k) {
        const SparseModel& m = a.models[k];
        __m512 x;
        if (m.dtype == DType::kFloat16) x = load_x16<DType::kFloat16>(m, i + j, lanes);
        else if (m.dtype == DType::kBFloat16) x = load_x16<DType::kBFloat16>(m, i + j, lanes);
        else x = load_x16<DType::kFloat32>(m, i + j, lanes);
        __mmask16 keep = static_cast<__mmask16>(0xFFFF);
        if (m.kind == SparseModel::kTop) {
          const __m512i u = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(x, b)), abs_mask);
          const __m512i key = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(u, inf), u, nan_key);
          keep = top_lanes(key, lanes, m.T0, m.m0, seen[2 * k]);
          if (m.band) keep = static_cast<__mmask16>(keep & ~top_lanes(key, lanes, m.T1, m.m1, seen[2 * k + 1]));
        } else if (m.kind == SparseModel::kDare) {
          keep = dare_lanes(m, static_cast<uint64_t>(i + j));
        }
        const __m512d x0 = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
        const __m512d x1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
        __m512d t0 = _mm512_maskz_mov_pd(static_cast<__mmask8>(keep), _mm512_sub_pd(x0, b0));  // kept: d or +0.0
        __m512d t1 = _mm512_maskz_mov_pd(static_cast<__mmask8>(keep >> 8), _mm512_sub_pd(x1, b1));
        if (m.scale == Rescale::kDensity) {
          const __m512d dv = _mm512_set1_pd(m.divisor);
          t0 = _mm512_div_pd(t0, dv);
          t1 = _mm512_div_pd(t1, dv);
        } else if (m.scale == Rescale::kL1) {
          const __m512d f = _mm512_set1_pd(m.factor);
          t0 = _mm512_mul_pd(t0, f);
          t1 = _mm512_mul_pd(t1, f);
        }
        const __m512d w = _mm512_set1_pd(m.weight);
        t0 = _mm512_mul_pd(t0, w);
        t1 = _mm512_mul_pd(t1, w);
        _mm512_storeu_pd(terms + 16 * k, t0);
        _mm512_storeu_pd(terms + 16 * k + 8, t1);
        s0 = _mm512_add_pd(s0, t0);
        s1 = _mm512_add_pd(s1, t1);
      }
      __m512d r0, r1;
      if (a.consensus) {
        const __mmask8 p0 = _mm512_cmp_pd_mask(s0, zero, _CMP_GE_OQ), p1 = _mm512_cmp_pd_mask(s1, zero, _CMP_GE_OQ);
        __m512d n0 = zero, n1 = zero, d0 = zero, d1 = zero;
        for (int64_t k = 0; k < K; ++k) {
          const __m512d t0 = _mm512_loadu_pd(terms + 16 * k), t1 = _mm512_loadu_pd(terms + 16 * k + 8);
          const __m512d w = _mm512_set1_pd(a.models[k].weight);
          const __mmask8 g0 = static_cast<__mmask8>((p0 & _mm512_cmp_pd_mask(t0, zero, _CMP_GT_OQ)) |
                                                    (~p0 & _mm512_cmp_pd_mask(t0, zero, _CMP_LT_OQ)));
          const __mmask8 g1 = static_cast<__mmask8>((p1 & _mm512_cmp_pd_mask(t1, zero, _CMP_GT_OQ)) |
                                                    (~p1 & _mm512_cmp_pd_mask(t1, zero, _CMP_LT_OQ)));
          n0 = _mm512_mask_add_pd(n0, g0, n0, t0);
          n1 = _mm512_mask_add_pd(n1, g1, n1, t1);
          d0 = _mm512_mask_add_pd(d0, g0, d0, w);
          d1 = _mm512_mask_add_pd(d1, g1, d1, w);
        }
        if (a.normalize) {
          r0 = _mm512_div_pd(n0, _mm512_mask_blend_pd(_mm512_cmp_pd_mask(d0, zero, _CMP_EQ_OQ), d0, onev));
          r1 = _mm512_div_pd(n1, _mm512_mask_blend_pd(_mm512_cmp_pd_mask(d1, zero, _CMP_EQ_OQ), d1, onev));
        } else {
          r0 = n0;
          r1 = n1;
        }
      } else if (a.normalize) {
        r0 = _mm512_div_pd(s0, divv);
        r1 = _mm512_div_pd(s1, divv);
      } else {
        r0 = s0;
        r1 = s1;
      }
      r0 = _mm512_add_pd(b0, _mm512_mul_pd(lam, r0));
      r1 = _mm512_add_pd(b1, _mm512_mul_pd(lam, r1));
      _mm512_store_pd(res + j, r0);  // res has room for whole groups (kSB is a multiple of 16)
      _mm512_store_pd(res + j + 8, r1);
    }
    kt().sum[static_cast<int>(DType::kFloat32)][static_cast<int>(a.out_dtype)](
        res, false, nullptr, nullptr, 0, cnt, static_cast<char*>(a.out) + i * out_size, 1.0);
  }
}

const SparseOps kOps = {combine_avx512, window_avx512, hist_hi_impl, hist_lo_impl, keys_impl, l1_impl};

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
