// CPU drivers: split the elements over threads, walk each thread's range in L1-sized blocks, and
// inside a block read every input once (a group of up to kGroup inputs summed in registers per
// pass over the block's binary64 accumulator; the last group rounds straight into the output).
// Arithmetic comes from the ISA table chosen at run time.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastsoup/kernels.h"
#include "kernel_table.h"
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif
#include "threadpool.h"

namespace fastsoup {

// ---------------------------------------------------------------------------------------------
// ISA selection

namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return cpu::avx2_table() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return cpu::avx512_table() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

Isa detect_isa() {
  Isa best = Isa::kScalar;
  if (cpu_has(Isa::kAvx2)) best = Isa::kAvx2;
  if (cpu_has(Isa::kAvx512)) best = Isa::kAvx512;
  if (const char* env = std::getenv("FASTSOUP_ISA")) {
    const std::string s(env);
    Isa cap = best;
    if (s == "scalar") cap = Isa::kScalar;
    else if (s == "avx2") cap = Isa::kAvx2;
    else if (s == "avx512") cap = Isa::kAvx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

// The table of an ISA with the holes (float64) filled from the scalar table.
cpu::KernelTable complete(const cpu::KernelTable* t) {
  const cpu::KernelTable& s = cpu::scalar_table();
  cpu::KernelTable r = t ? *t : s;
  for (int d = 0; d < kNumDTypes; ++d) {
    for (int o = 0; o < kNumDTypes; ++o) {
      if (!r.sum[d][o]) r.sum[d][o] = s.sum[d][o];
      if (!r.sum2[d][o]) r.sum2[d][o] = s.sum2[d][o];
    }
    if (!r.load[d]) r.load[d] = s.load[d];
  }
  if (!r.dot) r.dot = s.dot;
  for (DType d : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {  // all or nothing per ISA
    const int i = static_cast<int>(d);
    if (!r.sum32[i] || !r.store32[i] || !r.finish32[i]) r.sum32[0] = nullptr;
  }
  return r;
}

struct IsaState {
  cpu::KernelTable tables[3];
  std::atomic<int> current;
  IsaState() {
    tables[0] = complete(nullptr);
    tables[1] = complete(cpu::avx2_table());
    tables[2] = complete(cpu::avx512_table());
    current.store(static_cast<int>(detect_isa()));
  }
};

IsaState& isa_state() {
  static IsaState s;
  return s;
}

const cpu::KernelTable& table() {
  IsaState& s = isa_state();
  return s.tables[s.current.load(std::memory_order_relaxed)];
}

std::atomic<int64_t> g_read{0}, g_written{0}, g_calls{0}, g_mapped{0}, g_fast{0}, g_fallback{0};

}  // namespace

Isa current_isa() { return static_cast<Isa>(isa_state().current.load()); }
Isa best_supported_isa() { return detect_isa(); }
bool isa_supported(Isa isa) { return cpu_has(isa); }

void set_isa(Isa isa) {
  if (!cpu_has(isa)) throw std::invalid_argument(std::string("set_isa: this CPU (or build) has no ") + isa_name(isa));
  isa_state().current.store(static_cast<int>(isa));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

int default_threads() { return cpu::available_threads(); }

Counters counters() {
  return {g_read.load(), g_written.load(), g_calls.load(), g_mapped.load(), g_fast.load(), g_fallback.load()};
}
void reset_counters() {
  g_fast.store(0);
  g_fallback.store(0);
  g_read.store(0);
  g_written.store(0);
  g_calls.store(0);
  g_mapped.store(0);
}
void add_mapped_read(int64_t bytes) { g_mapped.fetch_add(bytes, std::memory_order_relaxed); }
void add_counters(int64_t read, int64_t written) {
  g_read.fetch_add(read, std::memory_order_relaxed);
  g_written.fetch_add(written, std::memory_order_relaxed);
  g_calls.fetch_add(1, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------------
// weighted_sum

namespace {

const char* ptr_at(const void* base, int64_t elem, DType d) {
  return static_cast<const char*>(base) + elem * static_cast<int64_t>(itemsize(d));
}

// Elements per parallel task: whole blocks, at least ~64K elements, about 4 tasks per thread.
int64_t task_size(int64_t n, int threads, int64_t min_elems) {
  int64_t t = (n + 4 * threads - 1) / (4 * threads);
  t = std::max(t, min_elems);
  return (t + cpu::kBlock - 1) / cpu::kBlock * cpu::kBlock;
}

// ---- The binary32 fast path -------------------------------------------------------------------
//
// The plain mode is defined in binary64 (kernels.h) and costs about 3.6x the arithmetic of binary32
// per 2-byte input here (the widening conversions), which the hot K = 8 merge measurably felt. But
// whenever every binary32 operation of a computation is exact, binary32 computes exactly the
// values the binary64 order computes (both are then the exact values), so the results are the same
// bits. The hardware says whether that happened: MXCSR's inexact flag (PE) is sticky and set by any
// rounded SSE/AVX operation. So a block is summed in binary32 with the flag cleared; if the flag is
// still clear, the (exact) sum is rounded into the output, else the block is summed again in
// binary64. Taken only where binary32 products are exact (float16/bfloat16 inputs, weights of few
// significant bits: 1 for a uniform soup) and where the division is an exact scaling (a power of
// two) or done in binary64 afterwards; never for float32/float64 inputs (their binary32 sums are
// rarely exact) nor in accumulate mode. Measured on the benchmark soups: no fallback for float16,
// 2.3 % of the elements for bfloat16 (kernels.h has the bound that holds either way).

#if defined(__x86_64__) || defined(_M_X64)
constexpr unsigned kInexact = 0x20;  // MXCSR.PE
unsigned read_csr() { return _mm_getcsr(); }
void write_csr(unsigned v) { _mm_setcsr(v); }
#endif

// w has at most `bits` significant bits (and is a binary32 value): w * x is exact in binary32 for
// any x of 24 - bits significant bits, barring overflow and underflow (which raise the flag).
bool short_weight(double w, int bits) {
  const float f = static_cast<float>(w);
  if (static_cast<double>(f) != w) return false;
  if (f == 0.0f) return true;
  uint32_t m = (float_bits(f) & 0x7fffffu) | 0x800000u;
  int tz = 0;
  while ((m & 1u) == 0) {
    m >>= 1;
    ++tz;
  }
  return 24 - tz <= bits;
}

struct FastPath {
  bool on = false;
  float w[64];           // binary32 weights (K <= 64 for the fast path)
  float scale = 1.0f;    // 1 / divisor when that is a power of two (exact), else 1
  bool divide = false;   // divisor is not a power of two: finish32 divides in binary64
};

FastPath fast_path(const WeightedSumParams& p, const cpu::KernelTable& tab) {
  FastPath f;
#if defined(__x86_64__) || defined(_M_X64)
  const int64_t K = p.num_inputs;
  if (tab.sum32[0] == nullptr || p.accumulate || K > 64 || p.out_dtype == DType::kFloat64) return f;
  for (int64_t k = 0; k < K; ++k) {
    const DType d = p.input_dtypes[k];
    if (d != DType::kFloat16 && d != DType::kBFloat16) return f;
    if (!short_weight(p.weights[k], 24 - (d == DType::kFloat16 ? 11 : 8))) return f;
    f.w[k] = static_cast<float>(p.weights[k]);
  }
  int e;
  const double m = std::frexp(p.divisor, &e);
  if (std::fabs(m) == 0.5 && e > -125 && e < 127) {
    f.scale = static_cast<float>(1.0 / p.divisor);  // exact: a power of two
  } else {
    f.divide = true;
  }
  f.on = true;
#else
  (void)p;
  (void)tab;
#endif
  return f;
}

// Elements per check of the inexact flag: a failed check sends only these to binary64. A check
// (clear, read, restore MXCSR) costs about 6 ns here, 1-2 % of a 1024-element piece of K = 8
// inputs; 1024 rather than 2048 halved the binary64 work of the bfloat16 benchmark soups (4.7 ->
// 2.3 % of the elements). 256 was slower (in cache, K = 8 bfloat16: 23-26 against 28-34 GB/s).
constexpr int64_t kCheck = 1024;
static_assert(cpu::kBlock % kCheck == 0 && cpu::kBlock / kCheck <= 32, "kCheck");

// One block in binary32, checked every kCheck elements: returns the mask of the pieces that were
// inexact (nothing written for them; the others are rounded into the output).
uint32_t block_fast(const WeightedSumParams& p, const cpu::KernelTable& tab, const FastPath& f, int64_t b,
                    int64_t n, float* acc, char* out) {
#if defined(__x86_64__) || defined(_M_X64)
  const int64_t K = p.num_inputs;
  const void* ptrs[cpu::kGroup];
  const int o = static_cast<int>(p.out_dtype);
  const int64_t osize = static_cast<int64_t>(itemsize(p.out_dtype));
  const unsigned csr = read_csr();
  uint32_t failed = 0;
  for (int64_t q = 0; q * kCheck < n; ++q) {
    const int64_t b0 = b + q * kCheck, m = std::min(kCheck, n - q * kCheck);
    write_csr(csr & ~kInexact);
    bool init = true;
    for (int64_t k = 0; k < K;) {
      const DType d = p.input_dtypes[k];
      int g = 0;
      while (k + g < K && g < cpu::kGroup && p.input_dtypes[k + g] == d) {
        ptrs[g] = ptr_at(p.inputs[k + g], b0, d);
        ++g;
      }
      tab.sum32[static_cast<int>(d)](acc, init, ptrs, f.w + k, g, m, k + g == K ? f.scale : 1.0f);
      init = false;
      k += g;
    }
    std::atomic_signal_fence(std::memory_order_seq_cst);  // the sums are in memory before the flag is read
    if (read_csr() & kInexact) {
      failed |= 1u << q;
      continue;
    }
    char* dst = out + q * kCheck * osize;
    if (f.divide) tab.finish32[o](acc, dst, m, p.divisor);
    else tab.store32[o](acc, dst, m);
  }
  write_csr(csr);
  return failed;
#else
  (void)p, (void)tab, (void)f, (void)b, (void)n, (void)acc, (void)out;
  return ~0u;
#endif
}

// The binary64 order over elements [b, b + n) of the call (n <= kBlock).
void block64(const WeightedSumParams& p, const cpu::KernelTable& tab, bool compensated, int64_t b, int64_t n,
             double* s, double* c, char* out) {
  const void* ptrs[cpu::kGroup];
  const int64_t K = p.num_inputs;
  const int o = static_cast<int>(p.out_dtype);
  bool init = !p.accumulate;
  if (p.accumulate) {  // float32 out: the sum starts from it
    const float* acc = static_cast<const float*>(p.out) + b;
    for (int64_t j = 0; j < n; ++j) s[j] = acc[j];
    if (compensated) std::memset(c, 0, static_cast<size_t>(n) * sizeof(double));
  }
  for (int64_t k = 0; k < K;) {
    // A group: consecutive inputs of one dtype, at most kGroup of them (summation order kept).
    const DType d = p.input_dtypes[k];
    int g = 0;
    while (k + g < K && g < cpu::kGroup && p.input_dtypes[k + g] == d) {
      ptrs[g] = ptr_at(p.inputs[k + g], b, d);
      ++g;
    }
    void* dst = k + g == K ? out : nullptr;
    if (compensated)
      tab.sum2[static_cast<int>(d)][o](s, c, init, ptrs, p.weights + k, g, n, dst, p.divisor, p.divisor_lo);
    else tab.sum[static_cast<int>(d)][o](s, init, ptrs, p.weights + k, g, n, dst, p.divisor);
    init = false;
    k += g;
  }
}

void weighted_sum_range(const WeightedSumParams& p, const cpu::KernelTable& tab, const FastPath& fast,
                        int64_t begin, int64_t end) {
  const bool compensated = needs_compensated(p.input_dtypes, p.num_inputs, p.out_dtype);
  alignas(64) double s[cpu::kBlock];
  alignas(64) double c[cpu::kBlock];  // compensated mode only
  const int64_t osize = static_cast<int64_t>(itemsize(p.out_dtype));
  int64_t fast_pieces = 0, fallbacks = 0;
  for (int64_t b = begin; b < end; b += cpu::kBlock) {
    const int64_t n = std::min(cpu::kBlock, end - b);
    char* out_b = static_cast<char*>(p.out) + b * osize;
    if (!fast.on) {
      block64(p, tab, compensated, b, n, s, c, out_b);
      continue;
    }
    const uint32_t failed = block_fast(p, tab, fast, b, n, reinterpret_cast<float*>(s), out_b);
    const int64_t pieces = (n + kCheck - 1) / kCheck;
    for (int64_t q = 0; q < pieces; ++q) {
      if (!(failed >> q & 1u)) {
        ++fast_pieces;
        continue;
      }
      ++fallbacks;
      block64(p, tab, compensated, b + q * kCheck, std::min(kCheck, n - q * kCheck), s, c, out_b + q * kCheck * osize);
    }
  }
  if (fast_pieces) g_fast.fetch_add(fast_pieces, std::memory_order_relaxed);
  if (fallbacks) g_fallback.fetch_add(fallbacks, std::memory_order_relaxed);
}

}  // namespace

Status weighted_sum_cpu(const WeightedSumParams& p) {
  Status st = check_weighted_sum(p);
  if (!st.ok) return st;
  if (p.n == 0) return Status::Ok();
  int64_t in_bytes = 0;
  for (int64_t k = 0; k < p.num_inputs; ++k) in_bytes += p.n * static_cast<int64_t>(itemsize(p.input_dtypes[k]));
  const int64_t out_bytes = p.n * static_cast<int64_t>(itemsize(p.out_dtype));

  if (p.num_inputs == 0) {
    if (!p.accumulate) std::memset(p.out, 0, static_cast<size_t>(out_bytes));
    add_counters(0, p.accumulate ? 0 : out_bytes);
    return Status::Ok();
  }
  const cpu::KernelTable& tab = table();
  const FastPath fast = fast_path(p, tab);
  const int threads = p.threads > 0 ? p.threads : cpu::available_threads();
  const int64_t chunk = task_size(p.n, threads, 16 * cpu::kBlock);
  const int64_t ntasks = (p.n + chunk - 1) / chunk;
  cpu::parallel_for(ntasks, threads, [&](int64_t t) {
    const int64_t begin = t * chunk;
    weighted_sum_range(p, tab, fast, begin, std::min(p.n, begin + chunk));
  });
  add_counters(in_bytes, out_bytes);
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// multi_dot and gram: fixed super-chunks (a function of n only), block partials in binary64,
// super-chunk partials added in order.

namespace {

int64_t super_chunk(int64_t n) {
  // At most 256 super-chunks, each a whole number of blocks, at least 32 blocks.
  int64_t s = (n + 255) / 256;
  s = std::max<int64_t>(s, 32 * cpu::kBlock);
  return (s + cpu::kBlock - 1) / cpu::kBlock * cpu::kBlock;
}

}  // namespace

Status multi_dot_cpu(const MultiDotParams& p) {
  Status st = check_multi_dot(p);
  if (!st.ok) return st;
  const int64_t K = p.num_inputs;
  for (int64_t k = 0; k < K; ++k) p.out[k] = 0.0;
  if (p.n == 0 || K == 0) return Status::Ok();
  const cpu::KernelTable& tab = table();
  const int threads = p.threads > 0 ? p.threads : cpu::available_threads();
  const int64_t sc = super_chunk(p.n);
  const int64_t nsc = (p.n + sc - 1) / sc;
  std::vector<double> partial(static_cast<size_t>(nsc * K), 0.0);
  cpu::parallel_for(nsc, threads, [&](int64_t s) {
    alignas(64) float gbuf[cpu::kBlock];
    alignas(64) float xbuf[cpu::kBlock];
    double* part = partial.data() + s * K;
    const int64_t end = std::min(p.n, (s + 1) * sc);
    for (int64_t b = s * sc; b < end; b += cpu::kBlock) {
      const int64_t n = std::min(cpu::kBlock, end - b);
      const float* gv = gbuf;
      if (p.g_dtype == DType::kFloat32) gv = static_cast<const float*>(p.g) + b;
      else tab.load[static_cast<int>(p.g_dtype)](ptr_at(p.g, b, p.g_dtype), gbuf, n);
      for (int64_t k = 0; k < K; ++k) {
        const DType d = p.input_dtypes[k];
        const float* xv = xbuf;
        if (d == DType::kFloat32) xv = static_cast<const float*>(p.inputs[k]) + b;
        else tab.load[static_cast<int>(d)](ptr_at(p.inputs[k], b, d), xbuf, n);
        part[k] += tab.dot(gv, xv, n);
      }
    }
  });
  for (int64_t s = 0; s < nsc; ++s)
    for (int64_t k = 0; k < K; ++k) p.out[k] += partial[s * K + k];
  int64_t in_bytes = p.n * static_cast<int64_t>(itemsize(p.g_dtype));
  for (int64_t k = 0; k < K; ++k) in_bytes += p.n * static_cast<int64_t>(itemsize(p.input_dtypes[k]));
  add_counters(in_bytes, 0);
  return Status::Ok();
}

Status gram_cpu(const GramParams& p) {
  Status st = check_gram(p);
  if (!st.ok) return st;
  const int64_t K = p.num_inputs;
  for (int64_t i = 0; i < K * K; ++i) p.out[i] = 0.0;
  if (p.n == 0 || K == 0) return Status::Ok();
  const cpu::KernelTable& tab = table();
  const int threads = p.threads > 0 ? p.threads : cpu::available_threads();
  constexpr int64_t kGramBlock = 512;  // K blocks of binary32 must stay near L1/L2
  const int64_t sc = super_chunk(p.n);
  const int64_t nsc = (p.n + sc - 1) / sc;
  const int64_t npairs = K * (K + 1) / 2;
  std::vector<double> partial(static_cast<size_t>(nsc * npairs), 0.0);
  cpu::parallel_for(nsc, threads, [&](int64_t s) {
    std::vector<float> buf(static_cast<size_t>(K * kGramBlock));
    std::vector<const float*> view(static_cast<size_t>(K));
    double* part = partial.data() + s * npairs;
    const int64_t end = std::min(p.n, (s + 1) * sc);
    for (int64_t b = s * sc; b < end; b += kGramBlock) {
      const int64_t n = std::min(kGramBlock, end - b);
      for (int64_t k = 0; k < K; ++k) {
        const DType d = p.input_dtypes[k];
        if (d == DType::kFloat32) {
          view[k] = static_cast<const float*>(p.inputs[k]) + b;
        } else {
          tab.load[static_cast<int>(d)](ptr_at(p.inputs[k], b, d), buf.data() + k * kGramBlock, n);
          view[k] = buf.data() + k * kGramBlock;
        }
      }
      int64_t pair = 0;
      for (int64_t a = 0; a < K; ++a)
        for (int64_t c = a; c < K; ++c) part[pair++] += tab.dot(view[a], view[c], n);
    }
  });
  int64_t pair = 0;
  for (int64_t a = 0; a < K; ++a)
    for (int64_t c = a; c < K; ++c, ++pair) {
      double v = 0.0;
      for (int64_t s = 0; s < nsc; ++s) v += partial[s * npairs + pair];
      p.out[a * K + c] = v;
      p.out[c * K + a] = v;
    }
  int64_t in_bytes = 0;
  for (int64_t k = 0; k < K; ++k) in_bytes += p.n * static_cast<int64_t>(itemsize(p.input_dtypes[k]));
  add_counters(in_bytes, 0);
  return Status::Ok();
}

}  // namespace fastsoup
