// sparse_merge's block code for CPUs without AVX2 (and the reference the vector builds must equal):
// sparse_generic.h compiled for the baseline ISA.
#include <cstring>

#include "kernel_table.h"
#include "sparse_ops.h"

namespace fastsoup {
namespace cpu {
namespace {

const KernelTable& kt() { return scalar_table(); }

inline void scan_window(const uint32_t* keys, int64_t cnt, WindowCut& c) {
  int64_t above = 0, len = c.len;
  bool overflow = c.overflow;
  scan_window_keys(keys, 0, cnt, c, above, len, overflow);
  c.above += above;
  c.len = len;
  c.overflow = overflow;
}

#include "sparse_generic.h"

const SparseOps kOps = {combine_impl, window_impl, hist_hi_impl, hist_lo_impl, keys_impl, l1_impl};

}  // namespace

const SparseOps& sparse_ops_scalar() { return kOps; }

}  // namespace cpu
}  // namespace fastsoup
