// Internal: the per-ISA block code of sparse_merge (sparse.cpp is the driver). Each entry works on a
// range of elements [begin, end) of one parallel task, block by block, with sparse.h's arithmetic:
// every ISA file compiles the same C++ (sparse_generic.h) under its own target, so the results are
// the same bits on every ISA; only the loaders/stores (kernel_table.h) and the candidate scan are
// written per ISA.
#pragma once

#include <cstdint>

#include "fastsoup/dtype.h"
#include "fastsoup/sparse.h"

namespace fastsoup {
namespace cpu {

constexpr int64_t kSparseBlock = 256;  // elements per combine block

// What one model keeps and how the kept entries are scaled (sparse.h).
struct SparseModel {
  enum Kind : int { kAll = 0, kTop = 1, kDare = 2 };
  const void* x = nullptr;
  DType dtype = DType::kFloat32;
  int kind = kAll;
  bool band = false;                     // kTop: top(T0, m0) minus top(T1, m1)
  uint32_t T0 = sparse::kNothing, T1 = sparse::kNothing;
  int64_t m0 = 0, m1 = 0;
  uint64_t key = 0, threshold = 0;       // kDare
  Rescale scale = Rescale::kNone;        // kDensity: / divisor; kL1: * factor
  double divisor = 1.0, factor = 1.0;
  double weight = 1.0;
};

struct SparseBase {
  const void* base = nullptr;
  DType base_dtype = DType::kFloat32;
};

struct CombineArgs {
  SparseBase b;
  const SparseModel* models = nullptr;
  int64_t K = 0;
  void* out = nullptr;
  DType out_dtype = DType::kFloat32;
  bool consensus = false, normalize = false;
  double lam = 1.0;
  double divisor = 1.0;  // plain + normalize: the guarded weight total
};

// One selection window of one cut of one model: keys > H are counted, keys in [L, H] are appended
// to buf (capacity cap; more sets overflow). 0 <= L <= H <= sparse::kNanKey.
struct WindowCut {
  uint32_t L = 0, H = 0;
  int64_t above = 0;
  uint32_t* buf = nullptr;
  int64_t len = 0, cap = 0;
  bool overflow = false;
  bool store = true;  // false (L == H): only count the window's keys
};

// The candidate scan of keys[j, cnt), key by key: the scalar build's whole scan and every ISA's tail.
// above, len and overflow are the scan's running counts (WindowCut's, written back by the caller).
inline void scan_window_keys(const uint32_t* keys, int64_t j, int64_t cnt, const WindowCut& c, int64_t& above,
                             int64_t& len, bool& overflow) {
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
}

struct WindowModel {
  const void* x = nullptr;
  DType dtype = DType::kFloat32;
  int ncuts = 0;
  WindowCut* cuts = nullptr;  // ncuts of them (this task's)
};

struct SparseOps {
  // The combine of [begin, end) into out; seen[2k], seen[2k+1]: model k's running counts of the
  // keys equal to T0 / T1 before begin (updated); terms: K * kSparseBlock binary64 of scratch.
  void (*combine)(const CombineArgs& a, int64_t begin, int64_t end, int64_t* seen, double* terms);
  // The window scan of every model's cuts over [begin, end) (one pass, the base read once per block).
  void (*window)(const SparseBase& b, const WindowModel* models, int64_t nmodels, int64_t begin, int64_t end);
  // Exact selection passes (the fallback): h[key >> 16] += 1; and the low halves of the keys whose high
  // half is b0 (into h0) or b1 (into h1; b = 0x10000: none).
  void (*hist_hi)(const SparseBase& b, const void* x, DType dt, int64_t begin, int64_t end, uint32_t* h);
  void (*hist_lo)(const SparseBase& b, const void* x, DType dt, int64_t begin, int64_t end, uint32_t b0,
                  uint32_t b1, uint32_t* h0, uint32_t* h1);
  // The keys of [begin, begin + cnt) (cnt <= 1024).
  void (*keys)(const SparseBase& b, const void* x, DType dt, int64_t begin, int64_t cnt, uint32_t* keys);
  // L1: the exact sums of |d| and of |kept| of model m over [begin, end); seen[2] as in combine.
  void (*l1)(const SparseBase& b, const SparseModel& m, int64_t begin, int64_t end, int64_t* seen, ExactSum& before,
             ExactSum& after);
};

const SparseOps& sparse_ops_scalar();
const SparseOps* sparse_ops_avx2();    // nullptr where not compiled (non-x86)
const SparseOps* sparse_ops_avx512();  // nullptr where not compiled (non-x86)

}  // namespace cpu
}  // namespace fastsoup
