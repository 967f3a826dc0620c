// C++ tests of sparse_merge's exact pieces (ctest): the top-k selection through the kernel (the
// threshold, ties at it kept lowest index first, all-zero and NaN keys, bands, any task size, thread
// count and ISA, small tensors and the one-pass selection of large ones) against a sort, and ExactSum
// against references that round once (the hardware's correctly rounded a + b, and a 128-bit
// fixed-point sum converted by the correctly rounded __int128 -> double).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "expect.h"
#include "fastsoup/kernels.h"
#include "fastsoup/sparse.h"

using namespace fastsoup;

namespace {

// The mask sparse_merge keeps for one fp32 model over a zero base: breadcrumbs (plain sum, weight 1,
// lam 1) with gamma giving n_top, out in float64, so out[i] is d[i] where kept and +0.0 elsewhere.
std::vector<char> kernel_mask(const std::vector<float>& d, double density, double gamma, int threads, int64_t chunk,
                              std::vector<double>* out_values = nullptr) {
  const int64_t n = static_cast<int64_t>(d.size());
  std::vector<float> base(d.size(), 0.0f);
  std::vector<double> out(d.size(), -1.0);
  const void* in[1] = {d.data()};
  const DType dt[1] = {DType::kFloat32};
  const double w[1] = {1.0}, dens[1] = {density}, gam[1] = {gamma};
  SparseMergeParams p;
  p.method = SparseMethod::kBreadcrumbs;
  p.n = n;
  p.num_inputs = 1;
  p.inputs = in;
  p.input_dtypes = dt;
  p.base = base.data();
  p.base_dtype = DType::kFloat32;
  p.out = out.data();
  p.out_dtype = DType::kFloat64;
  p.weights = w;
  p.density = dens;
  p.gamma = gam;
  p.threads = threads;
  p.chunk = chunk;
  const Status st = sparse_merge_cpu(p);
  EXPECT(st.ok, "sparse_merge_cpu failed: %s", st.message.c_str());
  std::vector<char> mask(d.size());
  for (int64_t i = 0; i < n; ++i) {
    uint64_t u;
    std::memcpy(&u, &out[i], sizeof u);
    mask[i] = u != 0;  // +0.0: dropped (every test delta here is nonzero, or all are zero)
  }
  if (out_values) *out_values = out;
  return mask;
}

// The reference: ranks [n_top, n_top + n_keep) of the order key descending, index ascending.
std::vector<char> sorted_mask(const std::vector<float>& d, double density, double gamma) {
  const int64_t n = static_cast<int64_t>(d.size());
  std::vector<uint32_t> key(d.size());
  for (int64_t i = 0; i < n; ++i) key[i] = sparse::magnitude_key(static_cast<double>(d[i]));
  std::vector<int64_t> idx(d.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return key[a] > key[b]; });
  const int64_t n_keep = std::min<int64_t>(n, static_cast<int64_t>(std::floor(density * static_cast<double>(n))));
  const int64_t n_top =
      std::min(n - n_keep, std::min<int64_t>(n, static_cast<int64_t>(std::floor(gamma * static_cast<double>(n)))));
  std::vector<char> mask(d.size(), 0);
  for (int64_t r = n_top; r < n_top + n_keep; ++r) mask[idx[r]] = 1;
  return mask;
}

std::vector<float> make(const std::string& kind, int64_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(0, 3);
  std::vector<float> d(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (kind == "normal") {
      float v = normal(g) * 0.01f;
      d[i] = v == 0.0f ? 1e-9f : v;
    } else if (kind == "ties") {  // four magnitudes, both signs: most keys equal some threshold
      const float mags[4] = {0.25f, 0.5f, 1.0f, 2.0f};
      d[i] = (g() & 1 ? -1.0f : 1.0f) * mags[small(g)];
    } else if (kind == "one") {  // every key the same
      d[i] = (i & 1) ? -0.75f : 0.75f;
    } else if (kind == "nan") {  // NaN keys are the largest (0x7FC00000), then inf
      d[i] = normal(g);
      if (g() % 50 == 0) d[i] = std::numeric_limits<float>::quiet_NaN();
      if (g() % 97 == 0) d[i] = -std::numeric_limits<float>::infinity();
      if (d[i] == 0.0f) d[i] = 1.0f;
    } else {  // "runs": magnitudes changing along the tensor, with runs of equal values
      const float scale = std::ldexp(1.0f, static_cast<int>((i / 4096) % 13) - 6);
      d[i] = (i % 7 == 0) ? scale : scale * (0.5f + 0.001f * static_cast<float>(i % 1000));
    }
  }
  return d;
}

void test_selection() {
  const int64_t sizes[] = {1, 7, 1000, 5003, (int64_t(1) << 18) + 333};
  const char* kinds[] = {"normal", "ties", "one", "nan", "runs"};
  const std::pair<double, double> cuts[] = {{0.5, 0.0}, {0.1, 0.0}, {0.999, 0.0}, {1e-3, 0.0}, {0.3, 0.05}, {0.5, 0.5},
                                            {0.0, 0.0}, {1.0, 0.0}, {0.9, 0.2}};
  const Isa before = current_isa();
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) continue;
    set_isa(isa);
    for (int64_t n : sizes) {
      for (const char* kind : kinds) {
        const std::vector<float> d = make(kind, n, static_cast<uint32_t>(n) * 31u + static_cast<uint32_t>(kind[0]));
        for (const auto& c : cuts) {
          const bool big = n > 100000;
          if (big && isa == Isa::kScalar && c.first != 0.5) continue;  // keep the scalar runs short
          const std::vector<char> ref = sorted_mask(d, c.first, c.second);
          struct Run {
            int threads;
            int64_t chunk;
          };
          const Run runs[] = {{1, 0}, {2, 0}, {3, 33}, {2, 4096}, {3, 100003}};
          for (const Run& r : runs) {
            if (!big && r.chunk > 10000) continue;
            if (big && r.chunk == 33) continue;
            const std::vector<char> got = kernel_mask(d, c.first, c.second, r.threads, r.chunk);
            int64_t bad = -1;
            for (int64_t i = 0; i < n && bad < 0; ++i)
              if (got[i] != ref[i]) bad = i;
            EXPECT(bad < 0, "selection %s isa=%s n=%lld density=%g gamma=%g threads=%d chunk=%lld: differs at %lld",
                   kind, isa_name(isa), static_cast<long long>(n), c.first, c.second, r.threads,
                   static_cast<long long>(r.chunk), static_cast<long long>(bad));
          }
        }
      }
    }
  }
  set_isa(before);
}

void test_all_zero() {
  // every delta zero: whatever is kept, the output is the base (+0.0 here), for every density
  for (int64_t n : {int64_t(5), int64_t(3000), (int64_t(1) << 18) + 5}) {
    const std::vector<float> d(static_cast<size_t>(n), 0.0f);
    for (double density : {0.0, 0.3, 1.0}) {
      std::vector<double> out;
      kernel_mask(d, density, 0.0, 2, 0, &out);
      bool ok = true;
      for (double v : out) ok = ok && v == 0.0 && !std::signbit(v);
      EXPECT(ok, "all-zero deltas, n=%lld density=%g: output is not the +0.0 base", static_cast<long long>(n), density);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ExactSum

double exact_sum(const std::vector<double>& v) {
  ExactSum s;
  for (double x : v) s.add(x);
  return s.value();
}

bool same_bits(double a, double b) {
  uint64_t x, y;
  std::memcpy(&x, &a, sizeof x);
  std::memcpy(&y, &b, sizeof y);
  return x == y;
}

void test_exact_sum_pairs() {
  // Two values: the correctly rounded sum is the hardware's a + b (IEEE addition rounds once).
  std::mt19937_64 g(7);
  std::vector<double> hard = {0.0,
                              std::numeric_limits<double>::denorm_min(),
                              std::numeric_limits<double>::min(),
                              std::nextafter(std::numeric_limits<double>::min(), 0.0),
                              1.0,
                              std::nextafter(1.0, 2.0),
                              std::ldexp(1.0, 53),
                              std::ldexp(1.0, -53),
                              std::ldexp(1.0, -54),
                              std::ldexp(3.0, -54),
                              std::numeric_limits<double>::max(),
                              std::ldexp(1.0, 970),
                              std::ldexp(1.0, 971),
                              std::ldexp(1.0, -1074 + 60)};
  for (double a : hard)
    for (double b : hard) {
      const double got = exact_sum({a, b}), want = a + b;
      EXPECT(same_bits(got, want), "ExactSum(%a, %a) = %a, want %a", a, b, got, want);
    }
  for (int i = 0; i < 200000; ++i) {
    // random bit patterns, often with exponents close together (the rounding bits matter) or far
    // apart (the sticky bit), and subnormals
    uint64_t ua = g() & 0x7FFFFFFFFFFFFFFFull, ub;
    const int mode = static_cast<int>(g() % 4);
    if (mode == 0) ub = g() & 0x7FFFFFFFFFFFFFFFull;
    else if (mode == 1) ub = (ua & 0x7FF0000000000000ull) - ((g() % 60) << 52) + (g() & 0xFFFFFFFFFFFFFull);
    else if (mode == 2) ub = g() & 0x000FFFFFFFFFFFFFull;  // subnormal
    else ub = (ua & 0x7FFFFFFFFFFFF800ull) | (g() & 0x7FF);
    ub &= 0x7FFFFFFFFFFFFFFFull;
    double a, b;
    std::memcpy(&a, &ua, sizeof a);
    std::memcpy(&b, &ub, sizeof b);
    if (!(std::isfinite(a) && std::isfinite(b))) continue;
    const double got = exact_sum({a, b}), want = a + b;
    EXPECT(same_bits(got, want), "ExactSum(%a, %a) = %a, want %a", a, b, got, want);
    if (!same_bits(got, want)) break;
  }
  // inf and NaN
  EXPECT(std::isinf(exact_sum({1.0, std::numeric_limits<double>::infinity()})), "ExactSum with +inf");
  EXPECT(std::isnan(exact_sum({1.0, std::numeric_limits<double>::quiet_NaN(), 2.0})), "ExactSum with NaN");
  EXPECT(std::isnan(exact_sum({std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()})),
         "ExactSum with inf and NaN");
  EXPECT(std::isinf(exact_sum({std::numeric_limits<double>::max(), std::numeric_limits<double>::max()})),
         "ExactSum overflowing to inf");
  EXPECT(same_bits(exact_sum({}), 0.0), "ExactSum of nothing is +0.0");
}

void test_exact_sum_many() {
  // Many values m * 2^(e0 + s), m < 2^53, s in [0, 60): the exact sum is an unsigned __int128 in
  // units of 2^e0 (below 2^123 for 1000 values), which converts to double correctly rounded.
  std::mt19937_64 g(11);
  for (int trial = 0; trial < 3000; ++trial) {
    const int e0 = static_cast<int>(g() % 1800) - 1074;  // the unit, 2^e0, from subnormal to large
    const int count = 1 + static_cast<int>(g() % 1000);
    const int spread = 1 + static_cast<int>(g() % 60);
    std::vector<double> v;
    unsigned __int128 total = 0;
    bool in_range = true;
    for (int i = 0; i < count; ++i) {
      uint64_t m = g() >> (11 + g() % 53);  // < 2^53, of any length
      if (trial % 3 == 0) m = (m | 1) & ((uint64_t(1) << (1 + g() % 53)) - 1);  // odd: the low bits count
      const int s = static_cast<int>(g() % spread);
      const int e = e0 + s;
      const double x = std::ldexp(static_cast<double>(m), e);  // exact: m < 2^53, e >= -1074
      if (e + 53 > 1023 || !std::isfinite(x)) {
        in_range = false;
        break;
      }
      v.push_back(x);
      total += static_cast<unsigned __int128>(m) << s;
    }
    if (!in_range) continue;
    // Midpoint cases: make the total an exact tie between two doubles now and then.
    if (trial % 5 == 0 && total != 0) {
      int top = 127;
      while (!((total >> top) & 1)) --top;
      if (top >= 54) {
        const int half = top - 53;  // the bit just below the 53 kept ones
        const unsigned __int128 low = total & ((static_cast<unsigned __int128>(1) << (half + 1)) - 1);
        const unsigned __int128 tie = static_cast<unsigned __int128>(1) << half;
        if (low < tie && half + e0 >= -1074) {  // add (tie - low) as values of at most 53 bits
          unsigned __int128 add = tie - low;
          int pos = 0;
          while (add != 0) {
            const uint64_t part = static_cast<uint64_t>(add & ((uint64_t(1) << 52) - 1));
            if (part) v.push_back(std::ldexp(static_cast<double>(part), e0 + pos));
            add >>= 52;
            pos += 52;
          }
          total += tie - low;
        }
      }
    }
    const double want = std::ldexp(static_cast<double>(total), e0);  // one rounding (then exact scaling)
    const bool normal_result = total == 0 || std::fabs(want) >= std::numeric_limits<double>::min();
    if (!normal_result || !std::isfinite(want)) continue;  // ldexp would round again
    const double got = exact_sum(v);
    EXPECT(same_bits(got, want), "ExactSum of %zu values (unit 2^%d) = %a, want %a", v.size(), e0, got, want);
    // merge() of two halves gives the same
    ExactSum a, b;
    for (size_t i = 0; i < v.size(); ++i) (i % 2 ? a : b).add(v[i]);
    a.merge(b);
    EXPECT(same_bits(a.value(), want), "ExactSum merged halves = %a, want %a", a.value(), want);
    if (!same_bits(got, want)) break;
  }
  // Subnormals only: the sum in units of 2^-1074 is exact in 64 bits.
  std::vector<double> sub;
  unsigned __int128 units = 0;
  for (int i = 0; i < 5000; ++i) {
    const uint64_t m = g() & ((uint64_t(1) << 52) - 1);
    sub.push_back(std::ldexp(static_cast<double>(m), -1074));
    units += m;
  }
  const double w2 = std::ldexp(static_cast<double>(units), -1074);  // a normal result: exact scaling
  EXPECT(same_bits(exact_sum(sub), w2), "ExactSum of subnormals = %a, want %a", exact_sum(sub), w2);
}

}  // namespace

int main() {
  test_selection();
  test_all_zero();
  test_exact_sum_pairs();
  test_exact_sum_many();
  if (g_failures) {
    std::fprintf(stderr, "%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("sparse tests passed\n");
  return 0;
}
