// sparse_merge on the CPU: the exact top-k selection (no sort), the L1 sums, and one fused combine
// pass over the K inputs. sparse.h documents the arithmetic; the block code is per ISA (sparse_ops.h:
// sparse_generic.h compiled for scalar, AVX2 and AVX-512, the last with fused AVX-512 loops), the same
// bits on every ISA.
//
// The selection of a cut top(r) of a model's keys. Tensors of 2^18+ elements: a sample of 65536 keys
// gives a window [L, H] that holds the threshold with near certainty; one pass over the tensor, every
// model at once, counts the keys above H and collects the keys in the window (at most one uint32
// per element in all, the scratch of one fp32 tensor), and the cut is selected exactly among them
// (a window that misses or overflows: the exact two passes below). Smaller tensors, and the misses:
// two histogram passes (2^16 bins of the keys' high half, then of the low half in the chosen bin).
//
// Work is cut into tasks of contiguous elements. The tie-break at a selection threshold T (keep the
// first m entries equal to T, lowest index first) is exact for any cut: each task's count of the
// entries equal to T is kept (its low-half histogram, or its window candidates), so the entries
// equal to T before every task are known, and the apply pass starts each task's counter there.
// Results depend on nothing but the inputs.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <memory>
#include <vector>

#include "fastsoup/sparse.h"
#include "sparse_ops.h"
#include "threadpool.h"

namespace fastsoup {

uint64_t fnv1a64(const char* data, size_t size) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < size; ++i) h = (h ^ static_cast<unsigned char>(data[i])) * 0x100000001B3ull;
  return h;
}

// ---------------------------------------------------------------------------------------------
// ExactSum

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
std::atomic<int64_t> g_window_cuts{0}, g_exact_cuts{0};

using sparse::is_band;
using sparse::is_consensus;
using sparse::is_dare;
using sparse::trim_count;
using sparse::uses_density;

// The block code of the ISA set_isa chose (AVX-512 also needs DQ here: DARE's 64-bit multiplies).
const cpu::SparseOps& ops() {
  const Isa isa = current_isa();
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == Isa::kAvx512 && cpu::sparse_ops_avx512() && __builtin_cpu_supports("avx512dq"))
    return *cpu::sparse_ops_avx512();
  if (isa != Isa::kScalar && cpu::sparse_ops_avx2()) return *cpu::sparse_ops_avx2();
#endif
  (void)isa;
  return cpu::sparse_ops_scalar();
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
bool is_all(const Cut& c) { return c.T == 0 && c.m == std::numeric_limits<int64_t>::max(); }
bool is_none(const Cut& c) { return c.T == kNothing; }

// A cut still to be found: top(rank) of model k's keys, 1 <= rank < n, into *cut.
struct Want {
  int64_t k = 0;
  int64_t rank = 0;
  Cut* cut = nullptr;
};

// The exact selection of model k's cuts (1 or 2): two histogram passes over the tensor whatever its
// size (select.py's radix select). hist: tasks.count * 2 * 2^16 counters of scratch.
void select_exact(const SparseMergeParams& p, const cpu::SparseOps& op, int64_t k, const Tasks& tasks, int threads,
                  int R, const Want* wants, std::vector<uint32_t>& hist) {
  const cpu::SparseBase sb{p.base, p.base_dtype};
  const void* x = p.inputs[k];
  const DType dt = p.input_dtypes[k];
  const size_t per_task = static_cast<size_t>(R) * kBins;
  hist.assign(per_task * tasks.count, 0u);
  // Pass 1: the high 16 bits.
  cpu::parallel_for(tasks.count, threads, [&](int64_t t) {
    op.hist_hi(sb, x, dt, tasks.begin(t), tasks.end(t), hist.data() + per_task * t);
  });
  std::vector<uint64_t> total(kBins, 0);
  for (int64_t t = 0; t < tasks.count; ++t) {
    const uint32_t* h = hist.data() + per_task * t;
    for (int b = 0; b < kBins; ++b) total[b] += h[b];
  }
  uint32_t bin[2] = {0, 0};
  int64_t rem[2] = {0, 0};
  for (int j = 0; j < R; ++j) {
    int64_t above = 0;
    sparse::walk_down(total.data(), wants[j].rank, bin[j], above);
    rem[j] = wants[j].rank - above;
  }
  // Pass 2: the low 16 bits of the keys in the chosen bin(s), one histogram per task.
  const bool shared = R == 2 && bin[0] == bin[1];
  std::fill(hist.begin(), hist.end(), 0u);
  const uint32_t b0 = bin[0];
  const uint32_t b1 = (R == 2 && !shared) ? bin[1] : 0x10000u;
  cpu::parallel_for(tasks.count, threads, [&](int64_t t) {
    uint32_t* h0 = hist.data() + per_task * t;
    op.hist_lo(sb, x, dt, tasks.begin(t), tasks.end(t), b0, b1, h0, R == 2 ? h0 + kBins : h0);
  });
  for (int j = 0; j < R; ++j) {
    const size_t off = (j == 1 && !shared) ? kBins : 0;
    std::fill(total.begin(), total.end(), 0);
    for (int64_t t = 0; t < tasks.count; ++t) {
      const uint32_t* h = hist.data() + per_task * t + off;
      for (int b = 0; b < kBins; ++b) total[b] += h[b];
    }
    uint32_t low = 0;
    int64_t above = 0;
    sparse::walk_down(total.data(), rem[j], low, above);
    Cut& c = *wants[j].cut;
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

// ---------------------------------------------------------------------------------------------
// The one-pass selection (most cuts of large tensors): a sample of each model's keys gives, per cut, a
// window [L, H] of keys that holds the threshold with near certainty; one pass over the tensor (all
// models at once, the base read once) counts the keys above H and collects the keys inside the
// window, and the threshold is then selected exactly among those. The result is the exact cut
// whatever the sample: a window that turns out not to hold it (or overflows its buffer) sends that
// model to select_exact.

constexpr int64_t kWindowMinN = int64_t(1) << 18;  // smaller tensors: select_exact
constexpr int64_t kSampleRuns = 4096, kSampleRun = 16;  // 65536 sampled keys, in runs of 16

// Per want: the window from the sample (S keys, reordered here), and its expected fraction of the keys.
void window_of(std::vector<uint32_t>& sample, int64_t n, int64_t rank, uint32_t& L, uint32_t& H, double& frac) {
  const int64_t S = static_cast<int64_t>(sample.size());
  const double q = static_cast<double>(rank) / static_cast<double>(n);  // the fraction above the cut
  const double e = q * static_cast<double>(S);
  const double delta = 4.0 * std::sqrt(static_cast<double>(S) * q * (1.0 - q)) + 16.0;
  const int64_t a = static_cast<int64_t>(std::floor(e - delta));  // samples (descending) above H
  const int64_t z = static_cast<int64_t>(std::ceil(e + delta));   // samples (descending) at or above L
  // The ascending order statistics S - a (H: a samples are >= it) and S - 1 - z (L).
  auto kth = [&](int64_t i) {
    std::nth_element(sample.begin(), sample.begin() + i, sample.end());
    return sample[i];
  };
  H = a <= 0 ? sparse::kNanKey : kth(S - a);
  L = z >= S ? 0u : kth(S - 1 - z);
  if (L > H) L = H;
  // The expected share of the keys in [L, H]: the sample's own (keys often repeat: fp16 deltas take
  // few values, and a window's end keys then hold many entries).
  int64_t inside = 0;
  for (uint32_t key : sample) inside += (key >= L && key <= H) ? 1 : 0;
  frac = std::min(1.0, static_cast<double>(std::max(inside, std::min(z, S) - std::max<int64_t>(a, 0) + 1)) /
                           static_cast<double>(S));
}

// Tries the one-pass selection of every want; done[w] says which were found.
void select_window(const SparseMergeParams& p, const cpu::SparseOps& op, const Tasks& tasks, int threads,
                   std::vector<Want>& wants, std::vector<char>& done) {
  const int64_t n = p.n, W = static_cast<int64_t>(wants.size());
  const cpu::SparseBase sb{p.base, p.base_dtype};
  // The models involved and their wants.
  std::vector<int64_t> model_of_slot;  // slot -> model
  std::vector<int64_t> slot_of(p.num_inputs, -1);
  for (const Want& w : wants) {
    if (slot_of[w.k] < 0) {
      slot_of[w.k] = static_cast<int64_t>(model_of_slot.size());
      model_of_slot.push_back(w.k);
    }
  }
  const int64_t M = static_cast<int64_t>(model_of_slot.size());
  // The sample and the windows.
  std::vector<uint32_t> L(W), H(W);
  std::vector<double> frac(W);
  const int64_t stride = n / kSampleRuns;
  cpu::parallel_for(M, threads, [&](int64_t s) {
    const int64_t k = model_of_slot[s];
    std::vector<uint32_t> keys(kSampleRuns * kSampleRun);
    for (int64_t r = 0; r < kSampleRuns; ++r)
      op.keys(sb, p.inputs[k], p.input_dtypes[k], r * stride, kSampleRun, keys.data() + r * kSampleRun);
    for (int64_t w = 0; w < W; ++w)
      if (wants[w].k == k) window_of(keys, n, wants[w].rank, L[w], H[w], frac[w]);
  });
  // Candidate buffers: per want, per task, room for twice the expected share (+64), and all of
  // them together at most one uint32 per element (the memory statement: one fp32 tensor).
  double total_frac = 0;
  for (int64_t w = 0; w < W; ++w) total_frac += (L[w] == H[w]) ? 0.0 : std::min(1.0, 2.0 * frac[w]);
  const double shrink = total_frac > 1.0 ? 1.0 / total_frac : 1.0;
  std::vector<int64_t> cap_of(W * tasks.count), off_of(W * tasks.count);
  int64_t total_cap = 0;
  for (int64_t w = 0; w < W; ++w) {
    const bool store = L[w] != H[w];
    for (int64_t t = 0; t < tasks.count; ++t) {
      const int64_t len = tasks.end(t) - tasks.begin(t);
      const int64_t cap = store ? std::min<int64_t>(
                                      len, static_cast<int64_t>(std::ceil(len * std::min(1.0, 2.0 * frac[w]) * shrink)) + 64)
                                : 0;
      cap_of[w * tasks.count + t] = cap;
      off_of[w * tasks.count + t] = total_cap;
      total_cap += cap + 16;  // 16 spare: a vector scan may write 16 lanes at buf + len <= cap
    }
  }
  std::unique_ptr<uint32_t[]> buf(new uint32_t[static_cast<size_t>(std::max<int64_t>(total_cap, 1))]);
  std::vector<cpu::WindowCut> cuts(W * tasks.count);  // [t][w]
  std::vector<std::vector<int64_t>> wants_of(M);
  for (int64_t w = 0; w < W; ++w) wants_of[slot_of[wants[w].k]].push_back(w);
  cpu::parallel_for(tasks.count, threads, [&](int64_t t) {
    cpu::WindowCut* tc = cuts.data() + t * W;
    std::vector<cpu::WindowModel> wm(M);
    std::vector<cpu::WindowCut> local;  // this task's cuts, model by model (a model's cuts adjacent)
    local.reserve(W);
    std::vector<int64_t> order;
    for (int64_t s = 0; s < M; ++s) {
      for (int64_t w : wants_of[s]) {
        cpu::WindowCut c;
        c.L = L[w];
        c.H = H[w];
        c.store = L[w] != H[w];
        c.buf = buf.get() + off_of[w * tasks.count + t];
        c.cap = cap_of[w * tasks.count + t];
        local.push_back(c);
        order.push_back(w);
      }
    }
    int64_t pos = 0;
    for (int64_t s = 0; s < M; ++s) {
      wm[s].x = p.inputs[model_of_slot[s]];
      wm[s].dtype = p.input_dtypes[model_of_slot[s]];
      wm[s].ncuts = static_cast<int>(wants_of[s].size());
      wm[s].cuts = local.data() + pos;
      pos += wm[s].ncuts;
    }
    op.window(sb, wm.data(), M, tasks.begin(t), tasks.end(t));
    for (int64_t i = 0; i < W; ++i) tc[order[i]] = local[i];
  });
  // Resolve every want among its candidates.
  cpu::parallel_for(W, threads, [&](int64_t w) {
    int64_t above = 0, count = 0;
    bool overflow = false;
    for (int64_t t = 0; t < tasks.count; ++t) {
      const cpu::WindowCut& c = cuts[t * W + w];
      above += c.above;
      count += c.len;
      overflow = overflow || c.overflow;
    }
    const int64_t need = wants[w].rank - above;  // the rank among the window's keys
    if (overflow || need < 1 || need > count) return;  // the window missed: select_exact
    Cut& cut = *wants[w].cut;
    cut.before.assign(tasks.count, 0);
    if (L[w] == H[w]) {  // every key of the window is T
      cut.T = L[w];
      cut.m = need;
      int64_t acc = 0;
      for (int64_t t = 0; t < tasks.count; ++t) {
        cut.before[t] = acc;
        acc += cuts[t * W + w].len;
      }
      done[w] = 1;
      return;
    }
    std::vector<uint64_t> hist(kBins, 0);
    for (int64_t t = 0; t < tasks.count; ++t) {
      const cpu::WindowCut& c = cuts[t * W + w];
      for (int64_t j = 0; j < c.len; ++j) ++hist[c.buf[j] >> 16];
    }
    uint32_t bin = 0, low = 0;
    int64_t above_bin = 0, above_low = 0;
    sparse::walk_down(hist.data(), need, bin, above_bin);
    const int64_t rem = need - above_bin;
    std::fill(hist.begin(), hist.end(), 0);
    for (int64_t t = 0; t < tasks.count; ++t) {
      const cpu::WindowCut& c = cuts[t * W + w];
      for (int64_t j = 0; j < c.len; ++j)
        if ((c.buf[j] >> 16) == bin) ++hist[c.buf[j] & 0xFFFF];
    }
    sparse::walk_down(hist.data(), rem, low, above_low);
    cut.T = (bin << 16) | low;
    cut.m = rem - above_low;
    int64_t acc = 0;
    for (int64_t t = 0; t < tasks.count; ++t) {
      cut.before[t] = acc;
      const cpu::WindowCut& c = cuts[t * W + w];
      for (int64_t j = 0; j < c.len; ++j) acc += c.buf[j] == cut.T ? 1 : 0;
    }
    done[w] = 1;
  });
}

// Finds every want's cut: the one-pass selection where it applies, select_exact for the rest.
void select_all(const SparseMergeParams& p, const cpu::SparseOps& op, const Tasks& tasks, int threads,
                std::vector<Want>& wants) {
  if (wants.empty()) return;
  std::vector<char> done(wants.size(), 0);
  if (p.n >= kWindowMinN) select_window(p, op, tasks, threads, wants, done);
  std::vector<uint32_t> hist;
  for (int64_t k = 0; k < p.num_inputs; ++k) {
    Want left[2];
    int R = 0;
    for (size_t w = 0; w < wants.size(); ++w)
      if (wants[w].k == k && !done[w]) left[R++] = wants[w];
    if (R > 0) select_exact(p, op, k, tasks, threads, R, left, hist);
    g_exact_cuts += R;
  }
  for (char d : done) g_window_cuts += d;
}

bool overlaps(const void* a, size_t na, const void* b, size_t nb) {
  const uintptr_t x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return na > 0 && nb > 0 && x < y + nb && y < x + na;
}

}  // namespace

SparseCounters sparse_counters() { return {g_window_cuts.load(), g_exact_cuts.load()}; }

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
  const cpu::SparseOps& op = ops();
  const cpu::SparseBase sb{p.base, p.base_dtype};

  // The masks: the cuts to find first.
  std::vector<cpu::SparseModel> models(K);
  std::vector<Cut> keep(K), drop(K);
  std::vector<Want> wants;
  auto want = [&](int64_t k, int64_t rank, Cut& c) {
    if (rank == 0) cut_none(c, tasks);
    else if (rank == p.n) cut_all(c, tasks);
    else wants.push_back(Want{k, rank, &c});
  };
  for (int64_t k = 0; k < K; ++k) {
    cpu::SparseModel& m = models[k];
    m.x = p.inputs[k];
    m.dtype = p.input_dtypes[k];
    m.weight = p.weights[k];
    switch (p.method) {
      case SparseMethod::kTaskArithmetic:
        m.kind = cpu::SparseModel::kAll;
        break;
      case SparseMethod::kTies:
        m.kind = cpu::SparseModel::kTop;
        want(k, trim_count(p.n, p.density[k]), keep[k]);
        cut_none(drop[k], tasks);
        break;
      case SparseMethod::kBreadcrumbs:
      case SparseMethod::kBreadcrumbsTies: {
        m.kind = cpu::SparseModel::kTop;
        int64_t n_top, n_keep;
        sparse::band_counts(p.n, p.density[k], p.gamma[k], n_top, n_keep);
        want(k, n_top + n_keep, keep[k]);
        want(k, n_top, drop[k]);
        break;
      }
      case SparseMethod::kDareLinear:
      case SparseMethod::kDareTies:
        m.kind = cpu::SparseModel::kDare;
        m.key = sparse::stream_key(p.seed, static_cast<uint64_t>(k), p.name_hash);
        m.threshold = sparse::dare_threshold(p.density[k]);
        if (p.rescale == Rescale::kDensity && p.density[k] > 0.0 && p.density[k] < 1.0) {
          m.scale = Rescale::kDensity;
          m.divisor = p.density[k];
          int e = 0;
          if (std::frexp(m.divisor, &e) == 0.5) {  // a power of two: x / d is x * (1 / d), an exact factor
            m.scale = Rescale::kL1;                  // (the same real number, rounded once: the same bits)
            m.factor = 1.0 / m.divisor;
          }
        }
        break;
    }
  }
  select_all(p, op, tasks, threads, wants);
  for (int64_t k = 0; k < K; ++k) {
    cpu::SparseModel& m = models[k];
    if (m.kind != cpu::SparseModel::kTop) continue;
    m.T0 = keep[k].T;
    m.m0 = keep[k].m;
    m.T1 = drop[k].T;
    m.m1 = drop[k].m;
    m.band = !is_none(drop[k]);
    if (is_all(keep[k]) && !m.band) m.kind = cpu::SparseModel::kAll;  // top(n): every entry
  }
  auto seen_of = [&](int64_t k, int64_t t, int64_t* seen) {
    seen[0] = keep[k].before.empty() ? 0 : keep[k].before[t];
    seen[1] = drop[k].before.empty() ? 0 : drop[k].before[t];
  };

  // L1: the exact norms of each task vector before and after its mask.
  if (p.rescale == Rescale::kL1) {
    std::vector<ExactSum> before(tasks.count), after(tasks.count);
    for (int64_t k = 0; k < K; ++k) {
      cpu::SparseModel& m = models[k];
      cpu::parallel_for(tasks.count, threads, [&](int64_t t) {
        ExactSum sb_, sa_;
        int64_t seen[2];
        seen_of(k, t, seen);
        op.l1(sb, m, tasks.begin(t), tasks.end(t), seen, sb_, sa_);
        before[t] = sb_;
        after[t] = sa_;
      });
      ExactSum tb, ta;
      for (int64_t t = 0; t < tasks.count; ++t) {
        tb.merge(before[t]);
        ta.merge(after[t]);
      }
      const double nb = tb.value(), na = ta.value();
      if (!(nb < sparse::kL1Eps || na < sparse::kL1Eps)) {
        m.scale = Rescale::kL1;
        m.factor = fs_div(nb, na);
      }
    }
  }

  // The combine: one pass over the K inputs.
  double weight_total = 0.0;
  for (int64_t k = 0; k < K; ++k) weight_total = fs_add(weight_total, p.weights[k]);
  cpu::CombineArgs args;
  args.b = sb;
  args.models = models.data();
  args.K = K;
  args.out = p.out;
  args.out_dtype = p.out_dtype;
  args.consensus = is_consensus(p.method);
  args.normalize = p.normalize;
  args.lam = p.lam;
  args.divisor = (weight_total < sparse::kNormEps && weight_total > -sparse::kNormEps) ? 1.0 : weight_total;
  cpu::parallel_for(tasks.count, threads, [&](int64_t t) {
    std::vector<int64_t> seen(2 * K);
    for (int64_t k = 0; k < K; ++k) seen_of(k, t, seen.data() + 2 * k);
    std::vector<double> terms(static_cast<size_t>(K * cpu::kSparseBlock));
    op.combine(args, tasks.begin(t), tasks.end(t), seen.data(), terms.data());
  });
  return Status::Ok();
}

}  // namespace fastsoup
