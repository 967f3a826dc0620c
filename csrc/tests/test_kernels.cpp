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

using namespace fastsoup;

static int g_failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++g_failures;                                         \
      std::fprintf(stderr, "%s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                    \
      std::fprintf(stderr, "\n");                           \
    }                                                       \
  } while (0)

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

static void test_isas_agree() {
  const DType dts[] = {DType::kFloat16, DType::kBFloat16, DType::kFloat32, DType::kFloat64};
  std::mt19937 rng(7);
  const int64_t sizes[] = {0, 1, 7, 15, 16, 17, 31, 33, 2047, 2048, 2049, 70001};
  for (int64_t n : sizes) {
    for (int K : {0, 1, 3, 8, 9, 17}) {
      std::vector<std::vector<double>> storage;  // 8-byte aligned backing for every dtype
      std::vector<const void*> ptrs;
      std::vector<DType> in_dt;
      std::vector<float> w;
      for (int k = 0; k < K; ++k) {
        const DType d = dts[(k * 7 + n) % 4];
        storage.emplace_back(static_cast<size_t>(n) + 1);
        std::normal_distribution<float> dist(0.0f, 1.0f);
        for (int64_t i = 0; i < n; ++i) store_float(storage.back().data(), i, d, dist(rng));
        ptrs.push_back(storage.back().data());
        in_dt.push_back(d);
        w.push_back(k % 3 == 2 ? -0.37f : 1.0f / (k + 1));
      }
      for (DType od : dts) {
        std::vector<std::vector<char>> outs;
        for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
          if (!isa_supported(isa)) continue;
          set_isa(isa);
          outs.emplace_back(static_cast<size_t>(n) * itemsize(od) + 1);
          WeightedSumParams p;
          p.inputs = ptrs.data();
          p.input_dtypes = in_dt.data();
          p.weights = w.data();
          p.num_inputs = K;
          p.out = outs.back().data();
          p.out_dtype = od;
          p.n = n;
          Status s = weighted_sum_cpu(p);
          EXPECT(s.ok, "weighted_sum failed: %s", s.message.c_str());
          // The scalar reference, element by element, in the documented order.
          for (int64_t i = 0; i < n && isa == Isa::kScalar; ++i) {
            float a = K ? -0.0f : 0.0f;
            for (int k = 0; k < K; ++k) a = a + w[k] * load_float(ptrs[k], i, in_dt[k]);
            std::vector<char> one(8);
            store_float(one.data(), 0, od, a);
            if (std::memcmp(one.data(), outs.back().data() + i * itemsize(od), itemsize(od)) != 0) {
              EXPECT(false, "scalar n=%lld K=%d out=%s element %lld", (long long)n, K, dtype_name(od), (long long)i);
              break;
            }
          }
        }
        for (size_t j = 1; j < outs.size(); ++j)
          EXPECT(outs[j] == outs[0], "ISA %zu differs from scalar: n=%lld K=%d out=%s", j, (long long)n, K, dtype_name(od));
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

int main() {
  test_half_roundtrip_exhaustive();
  test_half_rounding();
  test_bf16();
  test_isas_agree();
  std::printf("fastsoup C++ tests: best ISA %s, %d failure(s)\n", isa_name(best_supported_isa()), g_failures);
  return g_failures == 0 ? 0 : 1;
}
