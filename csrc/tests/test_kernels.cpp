// C++ tests of the native core (ctest). The Python suite checks the kernels against torch; these
// check what is cheaper to check here: every conversion exhaustively, and every vector path against
// the scalar one on the same data.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fastsoup/dtype.h"
#include "fastsoup/kernels.h"
#include "expect.h"

using namespace fastsoup;


// Reference binary32 -> binary16 by exact arithmetic in double: the nearest half, ties to even.
static uint16_t half_ref(float f) {
  if (std::isnan(f)) return 0;  // not used for nan
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7c00;
  // Enumerate: find the two neighbouring halves by scanning the exponent.
  uint16_t best = 0;
  double lo = 0;
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const double v = half_to_float(static_cast<uint16_t>(h));
    if (v <= a) {
      best = static_cast<uint16_t>(h);
      lo = v;
    } else {
      const double d_lo = a - lo, d_hi = v - a;
      if (d_hi < d_lo || (d_hi == d_lo && (h & 1) == 0)) best = static_cast<uint16_t>(h);
      break;
    }
  }
  return sign | best;
}

static void test_half_roundtrip_exhaustive() {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = half_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT(std::isnan(f) && (float_to_half(f) & 0x7c00) == 0x7c00 && (float_to_half(f) & 0x3ff) != 0, "nan %04x", h);
      continue;
    }
    EXPECT(float_to_half(f) == h, "half %04x -> %g -> %04x", h, f, float_to_half(f));
  }
}

static void test_half_rounding() {
  // Every binary32 between consecutive halves near a few binades, plus random values, against the
  // exhaustive reference (slow reference: sample).
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> bits(0, 0x477fffffu);
  for (int i = 0; i < 3000; ++i) {
    const float f = bits_float(bits(rng) | (i & 1 ? 0x80000000u : 0u));
    EXPECT(float_to_half(f) == half_ref(f), "%a -> %04x, expected %04x", f, float_to_half(f), half_ref(f));
  }
  // Ties: halfway between halves 1 and 1+2^-10 rounds to even (1), and 1+3*2^-11 to 1+2^-9.
  EXPECT(float_to_half(1.0f + 0x1p-11f) == 0x3c00, "tie to even (down)");
  EXPECT(float_to_half(1.0f + 3 * 0x1p-11f) == 0x3c02, "tie to even (up)");
  EXPECT(float_to_half(65519.0f) == 0x7bff, "65519 -> max half");
  EXPECT(float_to_half(65520.0f) == 0x7c00, "65520 -> inf");
  EXPECT(float_to_half(0x1p-25f) == 0x0000, "2^-25 ties to zero");
  EXPECT(float_to_half(0x1.8p-25f) == 0x0001, "1.5*2^-25 -> smallest subnormal");
}

static void test_bf16() {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    EXPECT(float_to_bf16(f) == b, "bf16 %04x roundtrip", b);
  }
  EXPECT(float_to_bf16(bits_float(0x3f808000u)) == 0x3f80, "tie to even (down)");
  EXPECT(float_to_bf16(bits_float(0x3f818000u)) == 0x3f82, "tie to even (up)");
  EXPECT(float_to_bf16(bits_float(0x3f808001u)) == 0x3f81, "above tie rounds up");
  EXPECT(float_to_bf16(bits_float(0x00008000u)) == 0x0000, "subnormal tie to even");
  EXPECT(float_to_bf16(bits_float(0x00018000u)) == 0x0002, "subnormal tie up");
  EXPECT(float_to_bf16(std::nanf("")) == 0x7fc0, "nan");
}

// The nearest-even binary16 / bfloat16 of a binary64 value, by exact arithmetic (long double is
// not needed: both neighbours and their midpoint are exact doubles).
static double round_ref(double v, int p, int emin, int emax) {
  if (v == 0 || std::isinf(v)) return v;
  const double a = std::fabs(v);
  int e = std::ilogb(a);
  if (e < emin) e = emin;
  const double q = std::ldexp(1.0, e - (p - 1));  // the spacing at a
  const double lo = std::floor(a / q) * q, hi = lo + q;
  double r;
  if (a - lo < hi - a) r = lo;
  else if (a - lo > hi - a) r = hi;
  else r = std::fmod(lo / q, 2.0) == 0.0 ? lo : hi;
  const double max = std::ldexp(2.0 - std::ldexp(1.0, 1 - p), emax);
  if (r > max) r = INFINITY;
  return std::copysign(r, v);
}

static void test_double_rounding_is_single() {
  // Round to odd through binary32, then nearest even, must equal rounding the double directly,
  // including the doubles just beside a binary16/bfloat16 midpoint, where a plain
  // double -> float -> half conversion rounds twice.
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> mant(1.0, 2.0);
  std::uniform_int_distribution<int> ex(-30, 17), ex_bf(-140, 128);
  int checked = 0;
  for (int i = 0; i < 400000; ++i) {
    const bool bf = i & 1;
    double v = std::ldexp(mant(rng), bf ? ex_bf(rng) : ex(rng));
    if (i % 4 >= 2) {  // a midpoint of the target format, nudged by a few binary64 ulps
      const int p = bf ? 8 : 11;
      const int e = std::max(std::ilogb(v), bf ? -126 : -14);
      const double q = std::ldexp(1.0, e - (p - 1));
      v = (std::floor(v / q) + 0.5) * q;
      v = std::nextafter(v, (i % 8 < 4) ? 0.0 : INFINITY);
      if (i % 16 < 8) v = std::nextafter(v, (i % 8 < 4) ? 0.0 : INFINITY);
    }
    if (rng() & 1) v = -v;
    const float odd = double_to_float_odd(v);
    if (bf) {
      const double want = round_ref(v, 8, -126, 127);
      const double got = bf16_to_float(float_to_bf16(odd));
      EXPECT(got == want || (std::isnan(got) && std::isnan(want)), "bf16(%a) = %a, expected %a", v, got, want);
    } else {
      const double want = round_ref(v, 11, -14, 15);
      const double got = half_to_float(float_to_half(odd));
      EXPECT(got == want, "half(%a) = %a, expected %a", v, got, want);
    }
    ++checked;
  }
  // Edge values: zeros keep their sign, inf stays inf, beyond the binary32 range rounds to inf.
  EXPECT(float_bits(double_to_float_odd(-0.0)) == 0x80000000u, "-0.0");
  EXPECT(double_to_float_odd(INFINITY) == INFINITY, "inf");
  EXPECT(float_to_half(double_to_float_odd(1e300)) == 0x7c00, "1e300 -> half inf");
  EXPECT(float_to_bf16(double_to_float_odd(-1e300)) == 0xff80, "-1e300 -> bf16 -inf");
  EXPECT(float_to_bf16(double_to_float_odd(1e-300)) == 0x0000, "1e-300 -> bf16 +0");
  EXPECT(std::isnan(double_to_float_odd(NAN)), "nan");
  EXPECT(checked == 400000, "count");
}

static void test_compensated_exact_cases() {
  // K identical float64 inputs, weights 1, divisor K: the input itself.
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> dist(-1e6, 1e6);
  for (int i = 0; i < 20000; ++i) {
    const double x = i == 0 ? 1.0 / 3.0 : i == 1 ? 123456789.12 : dist(rng);
    for (int K = 2; K <= 17; ++K) {
      double s = -0.0, c = 0.0;
      for (int k = 0; k < K; ++k) sum2_step(s, c, 1.0, x);
      const double got = sum2_finish(s, c, static_cast<double>(K), 0.0);
      EXPECT(got == x, "mean of %d x %a = %a", K, x, got);
    }
  }
}

static void test_isas_agree() {
  const DType dts[] = {DType::kFloat16, DType::kBFloat16, DType::kFloat32, DType::kFloat64};
  std::mt19937 rng(7);
  const int64_t sizes[] = {0, 1, 7, 15, 16, 17, 31, 32, 33, 2047, 2048, 2049, 70001};
  for (int64_t n : sizes) {
    for (int K : {0, 1, 3, 8, 9, 17}) {
      // Every input twice: as drawn (some float64: the compensated mode), and with float64 inputs
      // stored as float32 instead (only the plain mode's vector code).
      std::vector<std::vector<double>> storage, storage_plain;  // 8-byte aligned backing
      std::vector<const void*> ptrs, ptrs_plain;
      std::vector<DType> in_dt, in_dt_plain;
      std::vector<double> w;
      for (int k = 0; k < K; ++k) {
        const DType d = dts[(k * 7 + n) % 4];
        const DType dp = d == DType::kFloat64 ? DType::kFloat32 : d;
        storage.emplace_back(static_cast<size_t>(n) + 1);
        storage_plain.emplace_back(static_cast<size_t>(n) + 1);
        std::normal_distribution<double> dist(0.0, 1.0);
        for (int64_t i = 0; i < n; ++i) {
          const double v = dist(rng);
          if (d == DType::kFloat64) storage.back()[i] = v;
          else store_float(storage.back().data(), i, d, static_cast<float>(v));
          store_float(storage_plain.back().data(), i, dp, static_cast<float>(v));
        }
        ptrs.push_back(storage.back().data());
        ptrs_plain.push_back(storage_plain.back().data());
        in_dt.push_back(d);
        in_dt_plain.push_back(dp);
        w.push_back(k % 3 == 2 ? -0.37 : 1.0 / (k + 1));
      }
      for (int variant = 0; variant < 6; ++variant) {
        const std::vector<DType>& dt = variant % 2 ? in_dt_plain : in_dt;
        const std::vector<const void*>& xs = variant % 2 ? ptrs_plain : ptrs;
        std::vector<double> wv = w;
        if (variant >= 2)  // weights 1 (the unit fast path) and a divisor
          for (auto& x : wv) x = 1.0;
        const double divisor = variant >= 4 ? 7.0 : variant >= 2 ? static_cast<double>(K > 0 ? K : 1) : 1.0;
        const double divisor_lo = variant >= 4 ? 0x1p-52 * 3.0 : 0.0;  // a low part (compensated mode)
        for (DType od : dts) {
          std::vector<std::vector<char>> outs;
          for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
            if (!isa_supported(isa)) continue;
            set_isa(isa);
            outs.emplace_back(static_cast<size_t>(n) * itemsize(od) + 1);
            WeightedSumParams p;
            p.inputs = xs.data();
            p.input_dtypes = dt.data();
            p.weights = wv.data();
            p.num_inputs = K;
            p.divisor = divisor;
            p.divisor_lo = divisor_lo;
            p.out = outs.back().data();
            p.out_dtype = od;
            p.n = n;
            Status s = weighted_sum_cpu(p);
            EXPECT(s.ok, "weighted_sum failed: %s", s.message.c_str());
            // The scalar reference, element by element, in the documented order.
            const bool comp = needs_compensated(dt.data(), K, od);
            for (int64_t i = 0; i < n && isa == Isa::kScalar; ++i) {
              double a = -0.0, c = 0.0;
              for (int k = 0; k < K; ++k) {
                const double x = load_double(xs[k], i, dt[k]);
                if (comp) sum2_step(a, c, wv[k], x);
                else a = sum_step(a, wv[k], x);
              }
              std::vector<char> one(8);
              if (K == 0) store_double(one.data(), 0, od, 0.0);
              else store_double(one.data(), 0, od, comp ? sum2_finish(a, c, divisor, divisor_lo) : sum_finish(a, divisor));
              if (std::memcmp(one.data(), outs.back().data() + i * itemsize(od), itemsize(od)) != 0) {
                EXPECT(false, "scalar n=%lld K=%d out=%s element %lld", (long long)n, K, dtype_name(od), (long long)i);
                break;
              }
            }
          }
          for (size_t j = 1; j < outs.size(); ++j)
            EXPECT(outs[j] == outs[0], "ISA %zu differs from scalar: n=%lld K=%d out=%s variant %d", j, (long long)n, K,
                   dtype_name(od), variant);
        }
      }
      // Accumulate mode (float32 out += sum): every ISA, from the same start.
      {
        std::vector<std::vector<float>> outs;
        for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
          if (!isa_supported(isa)) continue;
          set_isa(isa);
          outs.emplace_back(static_cast<size_t>(n) + 1);
          for (int64_t i = 0; i < n; ++i) outs.back()[i] = static_cast<float>(i % 13) * 0.37f - 2.0f;
          WeightedSumParams p;
          p.inputs = ptrs.data();
          p.input_dtypes = in_dt.data();
          p.weights = w.data();
          p.num_inputs = K;
          p.out = outs.back().data();
          p.out_dtype = DType::kFloat32;
          p.n = n;
          p.accumulate = true;
          EXPECT(weighted_sum_cpu(p).ok, "accumulate");
        }
        for (size_t j = 1; j < outs.size(); ++j)
          EXPECT(std::memcmp(outs[j].data(), outs[0].data(), static_cast<size_t>(n) * 4) == 0,
                 "accumulate: ISA %zu differs n=%lld K=%d", j, (long long)n, K);
      }
      // multi_dot and gram: every ISA gives the same bits.
      if (K > 0) {
        std::vector<std::vector<double>> dots, grams;
        std::vector<float> g(static_cast<size_t>(n) + 1);
        std::normal_distribution<float> dist(0.0f, 1.0f);
        for (auto& x : g) x = dist(rng);
        for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
          if (!isa_supported(isa)) continue;
          set_isa(isa);
          dots.emplace_back(K);
          MultiDotParams mp;
          mp.inputs = ptrs.data();
          mp.input_dtypes = in_dt.data();
          mp.num_inputs = K;
          mp.g = g.data();
          mp.n = n;
          mp.out = dots.back().data();
          EXPECT(multi_dot_cpu(mp).ok, "multi_dot");
          grams.emplace_back(static_cast<size_t>(K * K));
          GramParams gp;
          gp.inputs = ptrs.data();
          gp.input_dtypes = in_dt.data();
          gp.num_inputs = K;
          gp.n = n;
          gp.out = grams.back().data();
          EXPECT(gram_cpu(gp).ok, "gram");
        }
        for (size_t j = 1; j < dots.size(); ++j) {
          EXPECT(dots[j] == dots[0], "multi_dot differs between ISAs n=%lld K=%d", (long long)n, K);
          EXPECT(grams[j] == grams[0], "gram differs between ISAs n=%lld K=%d", (long long)n, K);
        }
      }
    }
  }
  set_isa(best_supported_isa());
}

// The binary32 fast path (2-byte inputs, short weights) against the element-by-element binary64
// order, on data whose blocks are exact in binary32 (fine-tune-like values) and on data where
// some are not (mixed magnitudes): every ISA must give the reference bits either way, and the
// counters must show which path ran.
static void test_fast_path() {
  std::mt19937 rng(3);
  std::normal_distribution<float> base(0.0f, 0.02f), noise(0.0f, 0.002f);
  std::uniform_real_distribution<float> mag(-30.0f, 10.0f);
  const int64_t n = 5 * 2048 + 37;  // 11 pieces of at most 1024 elements (kernels.cpp kCheck)
  for (DType in : {DType::kFloat16, DType::kBFloat16}) {
    for (int K : {2, 3, 8, 9, 17}) {
      for (int mixed = 0; mixed < 2; ++mixed) {
        std::vector<float> b(static_cast<size_t>(n));
        for (auto& v : b) v = base(rng);
        std::vector<std::vector<uint16_t>> st(static_cast<size_t>(K), std::vector<uint16_t>(static_cast<size_t>(n)));
        std::vector<const void*> ptrs;
        std::vector<DType> dt(static_cast<size_t>(K), in);
        for (int k = 0; k < K; ++k) {
          for (int64_t i = 0; i < n; ++i) {
            float v = b[i] + noise(rng);
            // mixed: in the second block only, some values of very different magnitude (and in
            // a few elements a large and a small one: a binary32 sum of them is inexact)
            if (mixed && i >= 2048 && i < 4096 && i % 97 == k) v = std::ldexp(1.0f, static_cast<int>(mag(rng))) * 1.37f;
            if (mixed && i >= 2048 && i < 4096 && i % 301 == 0 && k < 2) v = k == 0 ? 1537.0f : 0.0123f;
            st[k][i] = in == DType::kFloat16 ? float_to_half(v) : float_to_bf16(v);
          }
          ptrs.push_back(st[k].data());
        }
        for (int wkind = 0; wkind < 3; ++wkind) {
          std::vector<double> w(static_cast<size_t>(K), 1.0);
          double divisor = K;  // uniform: weights 1, divisor K (a power of two for K = 2, 8)
          if (wkind == 1) {    // short weights (exact products), the total as divisor
            divisor = 0;
            for (int k = 0; k < K; ++k) divisor += (w[k] = 0.25 * (k % 4 + 1));
          } else if (wkind == 2) {  // long weights: the binary64 path from the start
            for (int k = 0; k < K; ++k) w[k] = 1.0 / (k + 3);
            divisor = 1.0;
          }
          for (DType od : {DType::kFloat16, DType::kBFloat16, DType::kFloat32, DType::kFloat64}) {
            std::vector<char> ref(static_cast<size_t>(n) * itemsize(od));
            const bool comp = needs_compensated(dt.data(), K, od);
            for (int64_t i = 0; i < n; ++i) {
              double a = -0.0, c = 0.0;
              for (int k = 0; k < K; ++k) {
                const double x = load_double(ptrs[k], i, in);
                if (comp) sum2_step(a, c, w[k], x);
                else a = sum_step(a, w[k], x);
              }
              store_double(ref.data(), i, od, comp ? sum2_finish(a, c, divisor, 0.0) : sum_finish(a, divisor));
            }
            for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
              if (!isa_supported(isa)) continue;
              set_isa(isa);
              std::vector<char> got(ref.size());
              WeightedSumParams p;
              p.inputs = ptrs.data();
              p.input_dtypes = dt.data();
              p.weights = w.data();
              p.num_inputs = K;
              p.divisor = divisor;
              p.out = got.data();
              p.out_dtype = od;
              p.n = n;
              p.threads = 2;
              reset_counters();
              EXPECT(weighted_sum_cpu(p).ok, "fast path call");
              const Counters c = counters();
              EXPECT(got == ref, "fast path: %s in=%s out=%s K=%d mixed=%d weights=%d", isa_name(isa), dtype_name(in),
                     dtype_name(od), K, mixed, wkind);
              const bool eligible = isa != Isa::kScalar && wkind < 2 && od != DType::kFloat64;
              if (!eligible) {
                EXPECT(c.fast_blocks == 0 && c.fallback_blocks == 0, "no fast path expected: %s", isa_name(isa));
              } else if (in == DType::kFloat16 && !mixed) {
                EXPECT(c.fast_blocks == 11 && c.fallback_blocks == 0, "fast path expected (%lld fast, %lld fallback)",
                       (long long)c.fast_blocks, (long long)c.fallback_blocks);
              } else if (mixed) {
                EXPECT(c.fallback_blocks >= 1 && c.fast_blocks + c.fallback_blocks == 11,
                       "a fallback expected (%lld fast, %lld fallback): %s in=%s out=%s K=%d weights=%d",
                       (long long)c.fast_blocks, (long long)c.fallback_blocks, isa_name(isa), dtype_name(in),
                       dtype_name(od), K, wkind);
              }
            }
          }
        }
      }
    }
  }
  set_isa(best_supported_isa());
}

int main() {
  test_half_roundtrip_exhaustive();
  test_half_rounding();
  test_bf16();
  test_double_rounding_is_single();
  test_compensated_exact_cases();
  test_isas_agree();
  test_fast_path();
  std::printf("fastsoup C++ tests: best ISA %s, %d failure(s)\n", isa_name(best_supported_isa()), g_failures);
  return g_failures == 0 ? 0 : 1;
}
