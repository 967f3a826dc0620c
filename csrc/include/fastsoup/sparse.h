// The sparse merge methods (task arithmetic, TIES, breadcrumbs, DARE) on one tensor: parameters,
// the per-element math (shared by the CPU code and, later, CUDA kernels: FS_HD), the exact top-k
// selection's pieces and the exactly rounded sum of the L1 rescale.
//
// The order of operations is fastsoup/_reference.py's, operation by operation (each one IEEE binary64
// operation rounded to nearest even, no contraction), so the results are its bits:
//   d_k[i]    = double(in_k[i]) - double(base[i])
//   kept_k[i] = mask_k(i) ? d_k[i] : +0.0
//               then DARE "density": kept / density_k (when 0 < density_k < 1);
//               "l1": kept * (fsum|d_k| / fsum|kept_k|) unless either sum < 1e-7
//   t_k       = kept_k * w_k
//   plain:     mixed = ((+0 + t_0) + t_1) + ...; normalize: mixed / (|sum w| < 1e-8 ? 1 : sum w)
//   consensus: s = sum t_k (from +0); plus = s >= 0; agree_k = plus ? t_k > 0 : t_k < 0;
//              num = sum of agreeing t_k, den = sum of agreeing w_k (both from +0, k ascending);
//              normalize: num / (den == 0 ? 1 : den), else num
//   out[i]    = round_to_out(base[i] + lam * mixed)
// mask_k: TIES: the top floor(density_k * n) entries of |d_k|; breadcrumbs: ranks
// [n_top, n_top + n_keep) (fastsoup/methods/select.py); DARE: u53(i) < ceil(density_k * 2^53) of the
// counter-based RNG (fastsoup/methods/rng.py); task arithmetic: every entry.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "fastsoup/dtype.h"
#include "fastsoup/kernels.h"

namespace fastsoup {

enum class SparseMethod : int {
  kTaskArithmetic = 0,
  kTies = 1,
  kBreadcrumbs = 2,
  kBreadcrumbsTies = 3,
  kDareLinear = 4,
  kDareTies = 5,
};
enum class Rescale : int { kNone = 0, kDensity = 1, kL1 = 2 };

struct SparseMergeParams {
  SparseMethod method = SparseMethod::kTies;
  int64_t n = 0;                          // elements of every input, of base and of out
  int64_t num_inputs = 0;                 // K >= 1 models (the base not counted)
  const void* const* inputs = nullptr;    // K addresses of n elements
  const DType* input_dtypes = nullptr;    // their element types
  const void* base = nullptr;             // n elements of base_dtype
  DType base_dtype = DType::kFloat32;
  void* out = nullptr;                    // n elements of out_dtype; overlaps no input nor the base
  DType out_dtype = DType::kFloat32;
  const double* weights = nullptr;        // K weights w_k
  const double* density = nullptr;        // K densities in [0, 1] (TIES, breadcrumbs, DARE)
  const double* gamma = nullptr;          // K gammas in [0, 1] (breadcrumbs)
  double lam = 1.0;                       // the task vectors' scale
  bool normalize = false;                 // divide by the weight total (consensus: the agreeing one)
  Rescale rescale = Rescale::kNone;       // DARE: density or l1; TIES, breadcrumbs: l1 or none
  uint64_t seed = 0;                      // DARE's RNG seed
  uint64_t name_hash = 0;                 // DARE: fnv1a64 of the tensor's name
  int threads = 0;                        // 0: every core this process may use
  int64_t chunk = 0;                      // elements per task (0: automatic); any value, same bits
};

// Checks the parameters (messages name sparse_merge and the argument), then merges; see the top.
Status sparse_merge_cpu(const SparseMergeParams& p);
Status check_sparse_merge(const SparseMergeParams& p);

// How the selection cuts of this process's sparse_merge calls were found (cumulative): by the sampled
// one-pass selection (window_cuts) or by the exact two histogram passes (exact_cuts, small tensors and
// missed windows). Either gives the same cut.
struct SparseCounters {
  int64_t window_cuts = 0;
  int64_t exact_cuts = 0;
};
SparseCounters sparse_counters();

// FNV-1a 64 of bytes (methods/rng.py's fnv1a64 of a name's UTF-8 bytes).
uint64_t fnv1a64(const char* data, size_t size);

// ---------------------------------------------------------------------------------------------
// Per-element pieces.

namespace sparse {

constexpr uint32_t kNanKey = 0x7FC00000u;
constexpr uint32_t kNothing = 0xFFFFFFFFu;  // the threshold of k = 0: above every key
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
constexpr double kL1Eps = 1e-7;
constexpr double kNormEps = 1e-8;

// The selection key of a task vector entry: the bits of float32(|d|), every NaN 0x7FC00000.
FS_HD uint32_t magnitude_key(double d) {
#if defined(__CUDA_ARCH__)
  const float f = static_cast<float>(fabs(d));  // nearest even, overflow to inf
#else
  const float f = static_cast<float>(std::fabs(d));
#endif
  return f != f ? kNanKey : float_bits(f);
}

FS_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
FS_HD uint64_t splitmix64(uint64_t x) { return mix64(x + kGamma); }

// The methods' families (host code: the CPU and the CUDA drivers).
inline bool is_dare(SparseMethod m) { return m == SparseMethod::kDareLinear || m == SparseMethod::kDareTies; }
inline bool is_band(SparseMethod m) {
  return m == SparseMethod::kBreadcrumbs || m == SparseMethod::kBreadcrumbsTies;
}
inline bool is_consensus(SparseMethod m) {
  return m == SparseMethod::kTies || m == SparseMethod::kBreadcrumbsTies || m == SparseMethod::kDareTies;
}
inline bool uses_density(SparseMethod m) { return m != SparseMethod::kTaskArithmetic; }

// Entries a trim keeps: floor(density * n) (the float64 product rounded, then floor), at most n.
inline int64_t trim_count(int64_t n, double density) {
  const int64_t k = static_cast<int64_t>(std::floor(density * static_cast<double>(n)));
  return k < n ? k : n;
}

// Breadcrumbs' band: drop the top n_top, keep the next n_keep (select.py's band).
inline void band_counts(int64_t n, double density, double gamma, int64_t& n_top, int64_t& n_keep) {
  n_keep = trim_count(n, density);
  const int64_t top = trim_count(n, gamma);
  n_top = top < n - n_keep ? top : n - n_keep;
}

// The key of model `model`'s stream for one tensor (rng.py's stream_key).
FS_HD uint64_t stream_key(uint64_t seed, uint64_t model, uint64_t name_hash) {
  return splitmix64(splitmix64(splitmix64(seed) ^ model) ^ name_hash);
}

// u53 of element i of a stream.
FS_HD uint64_t dare_u53(uint64_t key, uint64_t i) { return mix64(key + (i + 1) * kGamma) >> 11; }

// T = ceil(density * 2^53): element i is kept when u53(i) < T (density in [0, 1]).
FS_HD uint64_t dare_threshold(double density) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(ceil(ldexp(density, 53)));
#else
  return static_cast<uint64_t>(std::ceil(std::ldexp(density, 53)));
#endif
}

// One threshold cut of the top-k order: every key > T, and the first m keys == T (in index order).
// `seen` counts the keys == T met so far in this pass (from the entries before the task's start).
FS_HD bool top_keep(uint32_t key, uint32_t T, int64_t m, int64_t& seen) {
  if (key > T) return true;
  if (key != T) return false;
  return seen++ < m;
}

// The two combines of one element; t[k] = kept_k * w_k, computed by the caller.
FS_HD double combine_plain(const double* t, int64_t K, bool normalize, double weight_total) {
  double mixed = 0.0;
  for (int64_t k = 0; k < K; ++k) mixed = fs_add(mixed, t[k]);
  if (normalize) mixed = fs_div(mixed, (weight_total < kNormEps && weight_total > -kNormEps) ? 1.0 : weight_total);
  return mixed;
}

FS_HD double combine_consensus(const double* t, const double* w, int64_t K, bool normalize) {
  double s = 0.0;
  for (int64_t k = 0; k < K; ++k) s = fs_add(s, t[k]);
  const bool plus = s >= 0;
  double num = 0.0, den = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const bool agree = plus ? t[k] > 0 : t[k] < 0;
    if (agree) {
      num = fs_add(num, t[k]);
      den = fs_add(den, w[k]);
    }
  }
  return normalize ? fs_div(num, den == 0 ? 1.0 : den) : num;
}

}  // namespace sparse

// ---------------------------------------------------------------------------------------------
// An exact sum of non-negative binary64 values, rounded once to nearest even at the end (what
// math.fsum returns for them). A 35-limb fixed-point integer in units of 2^-1074: every finite
// binary64 is an integer multiple of it, and 2240 bits hold 2^64 values below 2^1024.
struct ExactSum {
  static constexpr int kLimbs = 35;
  uint64_t limb[kLimbs] = {};
  bool inf = false;
  bool nan = false;

  // x >= 0 (or +inf / NaN). Host and device code (the CUDA L1 sums add into a thread's own).
  FS_HD void add(double x) {
    if (x != x) {
      nan = true;
      return;
    }
#if defined(__CUDA_ARCH__)
    const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x));
#else
    uint64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
#endif
    const uint64_t e = (bits >> 52) & 0x7FF;
    if (e == 0x7FF) {  // +inf (x >= 0, not NaN)
      inf = true;
      return;
    }
    const uint64_t frac = bits & ((uint64_t(1) << 52) - 1);
    const uint64_t mant = e == 0 ? frac : (frac | (uint64_t(1) << 52));
    add_units(mant, e == 0 ? 0 : static_cast<int>(e) - 1);  // x = mant * 2^(pos - 1074)
  }

  // v * 2^(pos - 1074), 0 <= pos <= 2046 (any 64-bit v).
  FS_HD void add_units(uint64_t v, int pos) {
    if (v == 0) return;
    const int idx = pos >> 6, sh = pos & 63;
    const unsigned __int128 w = static_cast<unsigned __int128>(v) << sh;
    const uint64_t lo = static_cast<uint64_t>(w), hi = static_cast<uint64_t>(w >> 64);
    uint64_t s = limb[idx] + lo;
    const uint64_t carry = s < lo;
    limb[idx] = s;
    if (idx + 1 >= kLimbs) return;  // (unreachable for pos <= 2046: hi fits limb 32)
    s = limb[idx + 1] + hi;
    uint64_t c2 = s < hi;
    s += carry;
    c2 += s < carry;
    limb[idx + 1] = s;
    for (int j = idx + 2; c2 && j < kLimbs; ++j) {
      limb[j] += 1;
      c2 = limb[j] == 0;
    }
  }

  void merge(const ExactSum& o);
  double value() const;
};

// ---------------------------------------------------------------------------------------------
// The selection (fastsoup/methods/select.py): histograms of 2^16 bins, walked from the top.
namespace sparse {

// The bin b where the running count from the top first reaches rank (1 <= rank <= total), and the
// count of the bins above it.
inline void walk_down(const uint64_t* hist, int64_t rank, uint32_t& bin, int64_t& above) {
  int64_t acc = 0;
  for (int b = 0xFFFF; b >= 0; --b) {
    const int64_t next = acc + static_cast<int64_t>(hist[b]);
    if (next >= rank) {
      bin = static_cast<uint32_t>(b);
      above = acc;
      return;
    }
    acc = next;
  }
  bin = 0;
  above = acc;  // unreachable when rank <= total
}

}  // namespace sparse
}  // namespace fastsoup
