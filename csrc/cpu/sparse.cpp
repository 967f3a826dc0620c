// sparse_merge on the CPU: the exact top-k selection (two histogram passes per model, no sort), the
// L1 sums, and one fused combine pass over the K inputs. sparse.h documents the arithmetic.
//
// Work is cut into tasks of contiguous elements. The tie-break at a selection threshold T (keep the
// first m entries equal to T, lowest index first) is exact for any cut: the second histogram pass
// keeps each task's own low-half histogram, so the entries equal to T before every task are known,
// and the apply pass starts each task's counter there. Results depend on nothing but the inputs.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <immintrin.h>

#include "fastsoup/sparse.h"
#include "threadpool.h"

namespace fastsoup {

uint64_t fnv1a64(const char* data, size_t size) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < size; ++i) h = (h ^ static_cast<unsigned char>(data[i])) * 0x100000001B3ull;
  return h;
}

// ---------------------------------------------------------------------------------------------
// ExactSum

void ExactSum::add(double x) {
  if (x != x) {
    nan = true;
    return;
  }
  if (x == std::numeric_limits<double>::infinity()) {
    inf = true;
    return;
  }
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint64_t e = (bits >> 52) & 0x7FF;
  const uint64_t frac = bits & ((uint64_t(1) << 52) - 1);
  const uint64_t mant = e == 0 ? frac : (frac | (uint64_t(1) << 52));
  if (mant == 0) return;
  const int pos = e == 0 ? 0 : static_cast<int>(e) - 1;  // value = mant * 2^(pos - 1074)
  const int idx = pos >> 6, sh = pos & 63;
  const unsigned __int128 v = static_cast<unsigned __int128>(mant) << sh;
  const uint64_t lo = static_cast<uint64_t>(v), hi = static_cast<uint64_t>(v >> 64);
  uint64_t s = limb[idx] + lo;
  uint64_t carry = s < lo;
  limb[idx] = s;
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

void ExactSum::merge(const ExactSum& o) {
  nan |= o.nan;
  inf |= o.inf;
  uint64_t carry = 0;
  for (int j = 0; j < kLimbs; ++j) {
    const uint64_t a = limb[j] + o.limb[j];
    const uint64_t c1 = a < o.limb[j];
    limb[j] = a + carry;
    carry = c1 + (limb[j] < carry);
  }
}

double ExactSum::value() const {
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (inf) return std::numeric_limits<double>::infinity();
  int top = kLimbs - 1;
  while (top >= 0 && limb[top] == 0) --top;
  if (top < 0) return 0.0;
  const int H = top * 64 + 63 - __builtin_clzll(limb[top]);  // the highest set bit
  if (H < 53) return std::ldexp(static_cast<double>(limb[0]), -1074);  // exact
  auto bit = [&](int q) { return (limb[q >> 6] >> (q & 63)) & 1u; };
  const int lo = H - 52;  // the 53 bits [lo, H]
  uint64_t mant = limb[lo >> 6] >> (lo & 63);
  if ((lo & 63) != 0 && (lo >> 6) + 1 < kLimbs) mant |= limb[(lo >> 6) + 1] << (64 - (lo & 63));
  mant &= (uint64_t(1) << 53) - 1;
  const int r = lo - 1;  // the rounding bit (lo >= 1 here)
  bool sticky = false;
  if (r > 0) {
    const int full = r >> 6;  // limbs entirely below bit r
    for (int j = 0; j < full && !sticky; ++j) sticky = limb[j] != 0;
    if (!sticky && (r & 63) != 0) sticky = (limb[full] & ((uint64_t(1) << (r & 63)) - 1)) != 0;
  }
  if (bit(r) && (sticky || (mant & 1))) ++mant;  // nearest, ties to even (2^53 is still exact)
  return std::ldexp(static_cast<double>(mant), lo - 1074);
}

// ---------------------------------------------------------------------------------------------

namespace {

using sparse::kNothing;
constexpr int kBins = 1 << 16;
constexpr int64_t kBlock = 512;  // elements converted to binary64 at a time

bool is_dare(SparseMethod m) { return m == SparseMethod::kDareLinear || m == SparseMethod::kDareTies; }
bool is_band(SparseMethod m) { return m == SparseMethod::kBreadcrumbs || m == SparseMethod::kBreadcrumbsTies; }
bool is_consensus(SparseMethod m) {
  return m == SparseMethod::kTies || m == SparseMethod::kBreadcrumbsTies || m == SparseMethod::kDareTies;
}
bool uses_density(SparseMethod m) { return m != SparseMethod::kTaskArithmetic; }

// float16 -> binary64 with F16C (exact, as half_to_float; used unless set_isa chose scalar).
__attribute__((target("avx2,f16c"))) void half_block_f16c(const uint16_t* s, int64_t count, double* dst) {
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j)));
    _mm256_storeu_pd(dst + j, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
    _mm256_storeu_pd(dst + j + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
  }
  for (; j < count; ++j) dst[j] = static_cast<double>(half_to_float(s[j]));
}

bool use_f16c() { return current_isa() != Isa::kScalar; }  // AVX2 and AVX-512 machines have F16C

void load_block(const void* src, DType d, int64_t begin, int64_t count, double* dst) {
  switch (d) {
    case DType::kFloat16: {
      if (use_f16c()) {
        half_block_f16c(static_cast<const uint16_t*>(src) + begin, count, dst);
        return;
      }
      const uint16_t* s = static_cast<const uint16_t*>(src) + begin;
      for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<double>(half_to_float(s[j]));
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + begin;
      for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<double>(bf16_to_float(s[j]));
      return;
    }
    case DType::kFloat32: {
      const float* s = static_cast<const float*>(src) + begin;
      for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<double>(s[j]);
      return;
    }
    case DType::kFloat64: {
      const double* s = static_cast<const double*>(src) + begin;
      for (int64_t j = 0; j < count; ++j) dst[j] = s[j];
      return;
    }
  }
}

// x where mask is all ones, +0.0 where it is 0.
inline double masked(double x, uint64_t mask) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  u &= mask;
  std::memcpy(&x, &u, sizeof u);
  return x;
}

void store_block(void* dst, DType d, int64_t begin, int64_t count, const double* v) {
  switch (d) {
    case DType::kFloat16: {
      uint16_t* o = static_cast<uint16_t*>(dst) + begin;
      for (int64_t j = 0; j < count; ++j) o[j] = float_to_half(double_to_float_odd(v[j]));
      return;
    }
    case DType::kBFloat16: {
      uint16_t* o = static_cast<uint16_t*>(dst) + begin;
      for (int64_t j = 0; j < count; ++j) o[j] = float_to_bf16(double_to_float_odd(v[j]));
      return;
    }
    case DType::kFloat32: {
      float* o = static_cast<float*>(dst) + begin;
      for (int64_t j = 0; j < count; ++j) o[j] = static_cast<float>(v[j]);
      return;
    }
    case DType::kFloat64: {
      double* o = static_cast<double*>(dst) + begin;
      for (int64_t j = 0; j < count; ++j) o[j] = v[j];
      return;
    }
  }
}

struct Tasks {
  int64_t n = 0, size = 1, count = 0;
  int64_t begin(int64_t t) const { return t * size; }
  int64_t end(int64_t t) const { return std::min(n, (t + 1) * size); }
};

// One cut of the top-k order: every key > T and the first m keys == T; before[t] = the keys == T
// in the tasks before task t.
struct Cut {
  uint32_t T = kNothing;
  int64_t m = 0;
  std::vector<int64_t> before;
};

void cut_none(Cut& c, const Tasks& tasks) {
  c.T = kNothing;
  c.m = 0;
  c.before.assign(tasks.count, 0);
}
void cut_all(Cut& c, const Tasks& tasks) {
  c.T = 0;
  c.m = std::numeric_limits<int64_t>::max();
  c.before.assign(tasks.count, 0);
}

// Model k's deltas of [begin, begin + count): in_k - base, binary64.
void deltas(const SparseMergeParams& p, int64_t k, int64_t begin, int64_t count, double* base_buf, double* d) {
  load_block(p.base, p.base_dtype, begin, count, base_buf);
  load_block(p.inputs[k], p.input_dtypes[k], begin, count, d);
  for (int64_t j = 0; j < count; ++j) d[j] = fs_sub(d[j], base_buf[j]);
}

// The cuts top(ranks[0]) and (R == 2) top(ranks[1]) of model k's keys: two histogram passes over
// the tensor whatever its size. hist: tasks.count * 2 * 2^16 counters of scratch.
void select(const SparseMergeParams& p, int64_t k, const Tasks& tasks, int threads, int R, const int64_t* ranks,
            Cut* cuts, std::vector<uint32_t>& hist) {
  bool need[2] = {false, false};
  bool any = false;
  for (int j = 0; j < R; ++j) {
    if (ranks[j] == 0) {
      cut_none(cuts[j], tasks);
    } else if (ranks[j] == p.n) {
      cut_all(cuts[j], tasks);
    } else {
      need[j] = any = true;
    }
  }
  if (!any) return;
  const size_t per_task = static_cast<size_t>(need[0] && need[1] ? 2 : 1) * kBins;
  hist.assign(per_task * tasks.count, 0u);
  // Pass 1: the high 16 bits.
  cpu::parallel_for(tasks.count, threads, [&](int64_t t) {
    uint32_t* h = hist.data() + per_task * t;
    double b[kBlock], d[kBlock];
    for (int64_t i = tasks.begin(t); i < tasks.end(t); i += kBlock) {
      const int64_t cnt = std::min(kBlock, tasks.end(t) - i);
      deltas(p, k, i, cnt, b, d);
      uint32_t keys[kBlock];
      for (int64_t j = 0; j < cnt; ++j) keys[j] = sparse::magnitude_key(d[j]);
      for (int64_t j = 0; j < cnt; ++j) ++h[keys[j] >> 16];
    }
  });
  std::vector<uint64_t> total(kBins, 0);
  for (int64_t t = 0; t < tasks.count; ++t) {
    const uint32_t* h = hist.data() + per_task * t;
    for (int b = 0; b < kBins; ++b) total[b] += h[b];
  }
  uint32_t bin[2] = {0, 0};
  int64_t rem[2] = {0, 0};
  for (int j = 0; j < R; ++j) {
    if (!need[j]) continue;
    int64_t above = 0;
    sparse::walk_down(total.data(), ranks[j], bin[j], above);
    rem[j] = ranks[j] - above;
  }
  // Pass 2: the low 16 bits of the keys in the chosen bin(s), one histogram per task.
  const bool shared = R == 2 && need[0] && need[1] && bin[0] == bin[1];
  std::fill(hist.begin(), hist.end(), 0u);
  cpu::parallel_for(tasks.count, threads, [&](int64_t t) {
    uint32_t* h0 = hist.data() + per_task * t;
    uint32_t* h1 = h0 + kBins;
    // Cut j's histogram: the first one of the task's (the second when both cuts have their own).
    const uint32_t b0 = need[0] ? bin[0] : (need[1] ? bin[1] : 0x10000u);
    const uint32_t b1 = (need[0] && need[1] && !shared) ? bin[1] : 0x10000u;
    double b[kBlock], d[kBlock];
    for (int64_t i = tasks.begin(t); i < tasks.end(t); i += kBlock) {
      const int64_t cnt = std::min(kBlock, tasks.end(t) - i);
      deltas(p, k, i, cnt, b, d);
      uint32_t keys[kBlock];
      for (int64_t j = 0; j < cnt; ++j) keys[j] = sparse::magnitude_key(d[j]);
      for (int64_t j = 0; j < cnt; ++j) {
        const uint32_t key = keys[j];
        const uint32_t hi = key >> 16;
        if (hi == b0) ++h0[key & 0xFFFF];
        if (hi == b1) ++h1[key & 0xFFFF];
      }
    }
  });
  for (int j = 0; j < R; ++j) {
    if (!need[j]) continue;
    const size_t off = (j == 1 && need[0] && !shared) ? kBins : 0;
    std::fill(total.begin(), total.end(), 0);
    for (int64_t t = 0; t < tasks.count; ++t) {
      const uint32_t* h = hist.data() + per_task * t + off;
      for (int b = 0; b < kBins; ++b) total[b] += h[b];
    }
    uint32_t low = 0;
    int64_t above = 0;
    sparse::walk_down(total.data(), rem[j], low, above);
    Cut& c = cuts[j];
    c.T = (bin[j] << 16) | low;
    c.m = rem[j] - above;
    c.before.assign(tasks.count, 0);
    int64_t acc = 0;
    for (int64_t t = 0; t < tasks.count; ++t) {
      c.before[t] = acc;
      acc += hist[per_task * t + off + low];
    }
  }
}

// What model k keeps and how it scales the kept entries.
struct ModelMask {
  enum Kind { kAll, kTop, kDare } kind = kAll;
  Cut keep, drop;       // kTop: top(keep) minus (band) top(drop)
  bool band = false;
  uint64_t key = 0;     // kDare: the stream key and the threshold
  uint64_t threshold = 0;
  Rescale scale = Rescale::kNone;  // kDensity: / divisor; kL1: * factor
  double divisor = 1.0, factor = 1.0;
};

// The kept values (mask, no scale) of model k over one block; seen[2]: the cuts' running counts.
void kept_block(const ModelMask& mk, const double* d, int64_t begin, int64_t cnt, int64_t* seen, double* kept) {
  switch (mk.kind) {
    case ModelMask::kAll:
      for (int64_t j = 0; j < cnt; ++j) kept[j] = d[j];
      return;
    case ModelMask::kTop: {
      uint32_t keys[kBlock];
      for (int64_t j = 0; j < cnt; ++j) keys[j] = sparse::magnitude_key(d[j]);
      // Locals, so the running counts stay in registers (no aliasing with kept).
      const uint32_t T0 = mk.keep.T, T1 = mk.drop.T;
      const int64_t m0 = mk.keep.m, m1 = mk.drop.m;
      int64_t s0 = seen[0], s1 = seen[1];
      if (!mk.band) {
        for (int64_t j = 0; j < cnt; ++j) {
          const bool keep = sparse::top_keep(keys[j], T0, m0, s0);
          kept[j] = masked(d[j], uint64_t(0) - static_cast<uint64_t>(keep));
        }
      } else {
        for (int64_t j = 0; j < cnt; ++j) {
          const bool keep = sparse::top_keep(keys[j], T0, m0, s0);
          const bool drop = sparse::top_keep(keys[j], T1, m1, s1);
          kept[j] = masked(d[j], uint64_t(0) - static_cast<uint64_t>(keep && !drop));
        }
      }
      seen[0] = s0;
      seen[1] = s1;
      return;
    }
    case ModelMask::kDare:
      for (int64_t j = 0; j < cnt; ++j) {
        const bool keep = sparse::dare_u53(mk.key, static_cast<uint64_t>(begin + j)) < mk.threshold;
        kept[j] = masked(d[j], uint64_t(0) - static_cast<uint64_t>(keep));  // random: no branch
      }
      return;
  }
}

int64_t trim_count(int64_t n, double density) {
  return std::min<int64_t>(n, static_cast<int64_t>(std::floor(density * static_cast<double>(n))));
}

bool overlaps(const void* a, size_t na, const void* b, size_t nb) {
  const uintptr_t x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return na > 0 && nb > 0 && x < y + nb && y < x + na;
}

}  // namespace

Status check_sparse_merge(const SparseMergeParams& p) {
  const std::string op = "sparse_merge";
  const int m = static_cast<int>(p.method);
  if (m < 0 || m > 5) return Status::Error(op + ": unknown method code " + std::to_string(m));
  if (p.n < 0) return Status::Error(op + ": n must be >= 0");
  if (p.num_inputs < 1) return Status::Error(op + ": needs at least one model (inputs is empty)");
  for (int64_t k = 0; k < p.num_inputs; ++k)
    if (!valid_dtype_code(static_cast<int>(p.input_dtypes[k])))
      return Status::Error(op + ": inputs[" + std::to_string(k) + "] has an invalid dtype code");
  if (!valid_dtype_code(static_cast<int>(p.base_dtype))) return Status::Error(op + ": base has an invalid dtype code");
  if (!valid_dtype_code(static_cast<int>(p.out_dtype))) return Status::Error(op + ": out has an invalid dtype code");
  if (p.weights == nullptr) return Status::Error(op + ": weights missing");
  if (uses_density(p.method)) {
    if (p.density == nullptr) return Status::Error(op + ": this method needs a density per model");
    for (int64_t k = 0; k < p.num_inputs; ++k)
      if (!(p.density[k] >= 0.0 && p.density[k] <= 1.0))
        return Status::Error(op + ": density[" + std::to_string(k) + "] = " + std::to_string(p.density[k]) +
                             " is outside [0, 1]");
  }
  if (is_band(p.method)) {
    if (p.gamma == nullptr) return Status::Error(op + ": breadcrumbs needs a gamma per model");
    for (int64_t k = 0; k < p.num_inputs; ++k)
      if (!(p.gamma[k] >= 0.0 && p.gamma[k] <= 1.0))
        return Status::Error(op + ": gamma[" + std::to_string(k) + "] = " + std::to_string(p.gamma[k]) +
                             " is outside [0, 1]");
  }
  const int r = static_cast<int>(p.rescale);
  if (r < 0 || r > 2) return Status::Error(op + ": unknown rescale code " + std::to_string(r));
  if (p.method == SparseMethod::kTaskArithmetic && p.rescale != Rescale::kNone)
    return Status::Error(op + ": task_arithmetic takes no rescale");
  if (!is_dare(p.method) && p.rescale == Rescale::kDensity)
    return Status::Error(op + ": rescale='density' is DARE's; TIES and breadcrumbs take 'l1' or none");
  if (p.threads < 0) return Status::Error(op + ": threads must be >= 0 (0 = all cores)");
  if (p.chunk < 0) return Status::Error(op + ": chunk must be >= 0 (0 = automatic)");
  if (p.n == 0) return Status::Ok();
  if (p.base == nullptr) return Status::Error(op + ": base is a null address");
  if (p.out == nullptr) return Status::Error(op + ": out is a null address");
  const size_t out_bytes = static_cast<size_t>(p.n) * itemsize(p.out_dtype);
  if (overlaps(p.out, out_bytes, p.base, static_cast<size_t>(p.n) * itemsize(p.base_dtype)))
    return Status::Error(op + ": out overlaps base");
  for (int64_t k = 0; k < p.num_inputs; ++k) {
    if (p.inputs[k] == nullptr) return Status::Error(op + ": inputs[" + std::to_string(k) + "] is a null address");
    if (overlaps(p.out, out_bytes, p.inputs[k], static_cast<size_t>(p.n) * itemsize(p.input_dtypes[k])))
      return Status::Error(op + ": out overlaps inputs[" + std::to_string(k) + "]");
  }
  return Status::Ok();
}

Status sparse_merge_cpu(const SparseMergeParams& p) {
  Status st = check_sparse_merge(p);
  if (!st.ok) return st;
  if (p.n == 0) return Status::Ok();
  const int64_t K = p.num_inputs;
  const int threads = p.threads > 0 ? p.threads : cpu::available_threads();
  Tasks tasks;
  tasks.n = p.n;
  if (p.chunk > 0) {
    tasks.size = p.chunk;
  } else {
    tasks.size = std::max<int64_t>((p.n + threads - 1) / threads, int64_t(1) << 16);
  }
  tasks.size = std::min<int64_t>(tasks.size, int64_t(1) << 31);  // per-task histograms count in uint32
  tasks.count = (p.n + tasks.size - 1) / tasks.size;

  // The masks.
  std::vector<ModelMask> masks(K);
  std::vector<uint32_t> hist;
  for (int64_t k = 0; k < K; ++k) {
    ModelMask& mk = masks[k];
    switch (p.method) {
      case SparseMethod::kTaskArithmetic:
        mk.kind = ModelMask::kAll;
        break;
      case SparseMethod::kTies: {
        mk.kind = ModelMask::kTop;
        const int64_t r = trim_count(p.n, p.density[k]);
        select(p, k, tasks, threads, 1, &r, &mk.keep, hist);
        break;
      }
      case SparseMethod::kBreadcrumbs:
      case SparseMethod::kBreadcrumbsTies: {
        mk.kind = ModelMask::kTop;
        mk.band = true;
        const int64_t n_keep = trim_count(p.n, p.density[k]);
        const int64_t n_top = std::min(p.n - n_keep, trim_count(p.n, p.gamma[k]));
        const int64_t ranks[2] = {n_top + n_keep, n_top};
        Cut cuts[2];
        select(p, k, tasks, threads, 2, ranks, cuts, hist);
        mk.keep = std::move(cuts[0]);
        mk.drop = std::move(cuts[1]);
        break;
      }
      case SparseMethod::kDareLinear:
      case SparseMethod::kDareTies:
        mk.kind = ModelMask::kDare;
        mk.key = sparse::stream_key(p.seed, static_cast<uint64_t>(k), p.name_hash);
        mk.threshold = sparse::dare_threshold(p.density[k]);
        if (p.rescale == Rescale::kDensity && p.density[k] > 0.0 && p.density[k] < 1.0) {
          mk.scale = Rescale::kDensity;
          mk.divisor = p.density[k];
        }
        break;
    }
  }
  std::vector<uint32_t>().swap(hist);

  // L1: the exact norms of each task vector before and after its mask.
  if (p.rescale == Rescale::kL1) {
    std::vector<ExactSum> before(tasks.count), after(tasks.count);
    for (int64_t k = 0; k < K; ++k) {
      ModelMask& mk = masks[k];
      cpu::parallel_for(tasks.count, threads, [&](int64_t t) {
        ExactSum sb, sa;
        int64_t seen[2] = {mk.keep.before.empty() ? 0 : mk.keep.before[t], mk.drop.before.empty() ? 0 : mk.drop.before[t]};
        double b[kBlock], d[kBlock], kept[kBlock];
        for (int64_t i = tasks.begin(t); i < tasks.end(t); i += kBlock) {
          const int64_t cnt = std::min(kBlock, tasks.end(t) - i);
          deltas(p, k, i, cnt, b, d);
          kept_block(mk, d, i, cnt, seen, kept);
          for (int64_t j = 0; j < cnt; ++j) {
            sb.add(std::fabs(d[j]));
            sa.add(std::fabs(kept[j]));
          }
        }
        before[t] = sb;
        after[t] = sa;
      });
      ExactSum tb, ta;
      for (int64_t t = 0; t < tasks.count; ++t) {
        tb.merge(before[t]);
        ta.merge(after[t]);
      }
      const double nb = tb.value(), na = ta.value();
      if (!(nb < sparse::kL1Eps || na < sparse::kL1Eps)) {
        mk.scale = Rescale::kL1;
        mk.factor = fs_div(nb, na);
      }
    }
  }

  // The combine: one pass over the K inputs.
  double weight_total = 0.0;
  for (int64_t k = 0; k < K; ++k) weight_total = fs_add(weight_total, p.weights[k]);
  const bool consensus = is_consensus(p.method);
  cpu::parallel_for(tasks.count, threads, [&](int64_t t) {
    std::vector<int64_t> seen(2 * K);
    for (int64_t k = 0; k < K; ++k) {
      seen[2 * k] = masks[k].keep.before.empty() ? 0 : masks[k].keep.before[t];
      seen[2 * k + 1] = masks[k].drop.before.empty() ? 0 : masks[k].drop.before[t];
    }
    std::vector<double> terms(static_cast<size_t>(K) * kBlock);
    double b[kBlock], d[kBlock];
    for (int64_t i = tasks.begin(t); i < tasks.end(t); i += kBlock) {
      const int64_t cnt = std::min(kBlock, tasks.end(t) - i);
      for (int64_t k = 0; k < K; ++k) {
        const ModelMask& mk = masks[k];
        double* tk = terms.data() + k * kBlock;
        deltas(p, k, i, cnt, b, d);
        kept_block(mk, d, i, cnt, seen.data() + 2 * k, tk);
        if (mk.scale == Rescale::kDensity) {
          for (int64_t j = 0; j < cnt; ++j) tk[j] = fs_div(tk[j], mk.divisor);
        } else if (mk.scale == Rescale::kL1) {
          for (int64_t j = 0; j < cnt; ++j) tk[j] = fs_mul(tk[j], mk.factor);
        }
        const double w = p.weights[k];
        for (int64_t j = 0; j < cnt; ++j) tk[j] = fs_mul(tk[j], w);
      }
      // sparse.h's combines, model by model over the block (the same operations in the same order
      // for every element, so they vectorize): a select adds +0.0, which changes no partial sum
      // here (num and den start at +0.0 and only gain nonzero terms, so they are never -0.0).
      double s[kBlock], num[kBlock], den[kBlock], res[kBlock];
      for (int64_t j = 0; j < cnt; ++j) s[j] = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double* tk = terms.data() + k * kBlock;
        for (int64_t j = 0; j < cnt; ++j) s[j] = fs_add(s[j], tk[j]);
      }
      if (consensus) {
        for (int64_t j = 0; j < cnt; ++j) num[j] = den[j] = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          const double* tk = terms.data() + k * kBlock;
          const double w = p.weights[k];
          for (int64_t j = 0; j < cnt; ++j) {
            const bool plus = s[j] >= 0;  // NaN: minus, as the reference
            const bool agree = (plus & (tk[j] > 0)) | (!plus & (tk[j] < 0));
            const uint64_t mask = uint64_t(0) - static_cast<uint64_t>(agree);  // no branch: it vectorizes
            num[j] = fs_add(num[j], masked(tk[j], mask));
            den[j] = fs_add(den[j], masked(w, mask));
          }
        }
        if (p.normalize) {
          for (int64_t j = 0; j < cnt; ++j) res[j] = fs_div(num[j], den[j] == 0 ? 1.0 : den[j]);
        } else {
          for (int64_t j = 0; j < cnt; ++j) res[j] = num[j];
        }
      } else if (p.normalize) {
        const double div = (weight_total < sparse::kNormEps && weight_total > -sparse::kNormEps) ? 1.0 : weight_total;
        for (int64_t j = 0; j < cnt; ++j) res[j] = fs_div(s[j], div);
      } else {
        for (int64_t j = 0; j < cnt; ++j) res[j] = s[j];
      }
      for (int64_t j = 0; j < cnt; ++j) res[j] = fs_add(b[j], fs_mul(p.lam, res[j]));
      store_block(p.out, p.out_dtype, i, cnt, res);
    }
  });
  return Status::Ok();
}

}  // namespace fastsoup
