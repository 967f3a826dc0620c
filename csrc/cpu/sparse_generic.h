// Internal: sparse_merge's block code (sparse_ops.h), in plain C++ written so that it vectorizes.
//
// Included INSIDE the anonymous namespace of each ISA file (sparse_scalar.cpp, sparse_avx2.cpp,
// sparse_avx512.cpp), after that file's target pragma, as kernel_generic.h is: every ISA gets its own
// copy, with internal linkage. The including file defines, before this header:
//   const KernelTable& kt();                            this ISA's loaders and stores
//   void scan_window(const uint32_t* keys, int64_t cnt, WindowCut& c);   the candidate scan
// Nothing here reorders floating-point work: every element sees sparse.h's operations in sparse.h's
// order (the file is compiled with -ffp-contract=off), loops only run over the elements of a block.
// (No include guard on purpose.)

constexpr int64_t kSB = kSparseBlock;  // elements per combine block (K blocks of binary64 terms)
constexpr int64_t kWB = 1024;  // elements per selection block

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline double dmask(double x, uint64_t mask) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  u &= mask;
  std::memcpy(&x, &u, sizeof u);
  return x;
}

inline uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// dst[j] = float(src[begin + j]), exact (fp16, bf16, fp32 sources), cnt <= kWB.
inline void load_f32(const void* src, DType d, int64_t begin, int64_t cnt, float* dst) {
  kt().load[static_cast<int>(d)](static_cast<const char*>(src) + begin * static_cast<int64_t>(itemsize(d)), dst, cnt);
}

// dst[j] = double(src[begin + j]), exact, cnt <= kWB.
inline void load_f64(const void* src, DType d, int64_t begin, int64_t cnt, double* dst) {
  if (d == DType::kFloat64) {
    std::memcpy(dst, static_cast<const double*>(src) + begin, static_cast<size_t>(cnt) * sizeof(double));
    return;
  }
  float tmp[kWB];
  load_f32(src, d, begin, cnt, tmp);
  for (int64_t j = 0; j < cnt; ++j) dst[j] = static_cast<double>(tmp[j]);
}

// sparse::magnitude_key of binary64 deltas.
inline void keys_of_f64(const double* d, int64_t cnt, uint32_t* keys) {
  for (int64_t j = 0; j < cnt; ++j) {
    const uint32_t u = fbits(static_cast<float>(d[j])) & 0x7FFFFFFFu;  // |float(d)| = float(|d|)
    keys[j] = u > 0x7F800000u ? sparse::kNanKey : u;
  }
}

// The same keys from binary32 operands (x and b binary32 values: fp16, bf16 or fp32 inputs):
// float(|double(x) - double(b)|) rounds the exact difference twice, to 53 then to 24 bits, and
// 53 >= 2 * 24 + 2 makes that double rounding innocuous (Figueroa 1995), so it is the correctly
// rounded binary32 difference x - b, and its magnitude (a difference below 2^-126 is exact in both).
inline void keys_of_f32(const float* x, const float* b, int64_t cnt, uint32_t* keys) {
  for (int64_t j = 0; j < cnt; ++j) {
    const uint32_t u = fbits(x[j] - b[j]) & 0x7FFFFFFFu;
    keys[j] = u > 0x7F800000u ? sparse::kNanKey : u;
  }
}

// The keys of one block of model x, base b (which may be given preloaded as floats or doubles).
struct BaseBlock {
  float f[kWB];
  double d[kWB];
  bool has_f = false, has_d = false;
};

inline void block_keys(const SparseBase& b, BaseBlock& bb, const void* x, DType dt, int64_t begin, int64_t cnt,
                       uint32_t* keys) {
  if (dt != DType::kFloat64 && b.base_dtype != DType::kFloat64) {
    if (!bb.has_f) {
      load_f32(b.base, b.base_dtype, begin, cnt, bb.f);
      bb.has_f = true;
    }
    float xf[kWB];
    load_f32(x, dt, begin, cnt, xf);
    keys_of_f32(xf, bb.f, cnt, keys);
  } else {
    if (!bb.has_d) {
      load_f64(b.base, b.base_dtype, begin, cnt, bb.d);
      bb.has_d = true;
    }
    double xd[kWB];
    load_f64(x, dt, begin, cnt, xd);
    for (int64_t j = 0; j < cnt; ++j) xd[j] = xd[j] - bb.d[j];
    keys_of_f64(xd, cnt, keys);
  }
}

void keys_impl(const SparseBase& b, const void* x, DType dt, int64_t begin, int64_t cnt, uint32_t* keys) {
  BaseBlock bb;
  for (int64_t i = 0; i < cnt; i += kWB) {
    const int64_t c = imin(kWB, cnt - i);
    bb.has_f = bb.has_d = false;
    block_keys(b, bb, x, dt, begin + i, c, keys + i);
  }
}

void window_impl(const SparseBase& b, const WindowModel* models, int64_t nmodels, int64_t begin, int64_t end) {
  BaseBlock bb;
  uint32_t keys[kWB];
  for (int64_t i = begin; i < end; i += kWB) {
    const int64_t cnt = imin(kWB, end - i);
    bb.has_f = bb.has_d = false;
    for (int64_t k = 0; k < nmodels; ++k) {
      const WindowModel& m = models[k];
      if (m.ncuts == 0) continue;
      block_keys(b, bb, m.x, m.dtype, i, cnt, keys);
      for (int c = 0; c < m.ncuts; ++c) scan_window(keys, cnt, m.cuts[c]);
    }
  }
}

void hist_hi_impl(const SparseBase& b, const void* x, DType dt, int64_t begin, int64_t end, uint32_t* h) {
  BaseBlock bb;
  uint32_t keys[kWB];
  for (int64_t i = begin; i < end; i += kWB) {
    const int64_t cnt = imin(kWB, end - i);
    bb.has_f = bb.has_d = false;
    block_keys(b, bb, x, dt, i, cnt, keys);
    for (int64_t j = 0; j < cnt; ++j) ++h[keys[j] >> 16];
  }
}

void hist_lo_impl(const SparseBase& b, const void* x, DType dt, int64_t begin, int64_t end, uint32_t b0, uint32_t b1,
                  uint32_t* h0, uint32_t* h1) {
  BaseBlock bb;
  uint32_t keys[kWB];
  for (int64_t i = begin; i < end; i += kWB) {
    const int64_t cnt = imin(kWB, end - i);
    bb.has_f = bb.has_d = false;
    block_keys(b, bb, x, dt, i, cnt, keys);
    for (int64_t j = 0; j < cnt; ++j) {
      const uint32_t key = keys[j];
      const uint32_t hi = key >> 16;
      if (hi == b0) ++h0[key & 0xFFFF];
      if (hi == b1) ++h1[key & 0xFFFF];
    }
  }
}

// One cut over a block of keys: mk[j] = all ones where the key is in top(T, m), counting the keys
// == T in `seen` (sparse::top_keep, element by element in index order). The common cases (no key of
// the block equals T, or all of them are in or out) take no per-element counter.
inline void top_mask(const uint32_t* keys, int64_t cnt, uint32_t T, int64_t m, int64_t& seen, uint64_t* mk) {
  int64_t eq = 0;
  for (int64_t j = 0; j < cnt; ++j) eq += keys[j] == T ? 1 : 0;
  if (eq == 0 || seen >= m) {
    for (int64_t j = 0; j < cnt; ++j) mk[j] = uint64_t(0) - static_cast<uint64_t>(keys[j] > T);
  } else if (seen + eq <= m) {
    for (int64_t j = 0; j < cnt; ++j) mk[j] = uint64_t(0) - static_cast<uint64_t>(keys[j] >= T);
  } else {
    int64_t s = seen;
    for (int64_t j = 0; j < cnt; ++j) mk[j] = uint64_t(0) - static_cast<uint64_t>(sparse::top_keep(keys[j], T, m, s));
  }
  seen += eq;
}

// Model m's mask over the deltas d[0, cnt) of the elements begin.. (kAll: not called).
inline void model_mask(const SparseModel& m, const double* d, int64_t begin, int64_t cnt, int64_t* seen, uint64_t* mk) {
  if (m.kind == SparseModel::kTop) {
    uint32_t keys[kSB];
    keys_of_f64(d, cnt, keys);
    top_mask(keys, cnt, m.T0, m.m0, seen[0], mk);
    if (m.band) {
      uint64_t drop[kSB];
      top_mask(keys, cnt, m.T1, m.m1, seen[1], drop);
      for (int64_t j = 0; j < cnt; ++j) mk[j] &= ~drop[j];
    }
  } else {  // kDare: u53(i) < threshold, i = begin + j (sparse::dare_u53)
    const uint64_t key = m.key, thr = m.threshold;
    const uint64_t first = static_cast<uint64_t>(begin) + 1;
    for (int64_t j = 0; j < cnt; ++j) {
      const uint64_t u = sparse::mix64(key + (first + static_cast<uint64_t>(j)) * sparse::kGamma) >> 11;
      mk[j] = uint64_t(0) - static_cast<uint64_t>(u < thr);
    }
  }
}

void combine_impl(const CombineArgs& a, int64_t begin, int64_t end, int64_t* seen, double* terms) {
  const int64_t K = a.K;
  alignas(64) double bd[kSB], s[kSB], num[kSB], den[kSB], res[kSB];
  alignas(64) uint64_t mk[kSB];
  const int64_t out_size = static_cast<int64_t>(itemsize(a.out_dtype));
  for (int64_t i = begin; i < end; i += kSB) {
    const int64_t cnt = imin(kSB, end - i);
    load_f64(a.b.base, a.b.base_dtype, i, cnt, bd);
    for (int64_t j = 0; j < cnt; ++j) s[j] = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const SparseModel& m = a.models[k];
      double* tk = terms + k * kSB;
      load_f64(m.x, m.dtype, i, cnt, tk);
      for (int64_t j = 0; j < cnt; ++j) tk[j] = tk[j] - bd[j];  // d
      if (m.kind != SparseModel::kAll) {
        model_mask(m, tk, i, cnt, seen + 2 * k, mk);
        for (int64_t j = 0; j < cnt; ++j) tk[j] = dmask(tk[j], mk[j]);  // kept: d or +0.0
      }
      const double w = m.weight;
      if (m.scale == Rescale::kDensity) {
        const double dv = m.divisor;
        for (int64_t j = 0; j < cnt; ++j) tk[j] = (tk[j] / dv) * w;
      } else if (m.scale == Rescale::kL1) {
        const double f = m.factor;
        for (int64_t j = 0; j < cnt; ++j) tk[j] = (tk[j] * f) * w;
      } else {
        for (int64_t j = 0; j < cnt; ++j) tk[j] = tk[j] * w;
      }
      for (int64_t j = 0; j < cnt; ++j) s[j] = s[j] + tk[j];
    }
    // sparse.h's combines, model by model over the block: a select adds +0.0, which changes no
    // partial sum here (num and den start at +0.0 and only gain nonzero terms, so they are never -0.0).
    if (a.consensus) {
      for (int64_t j = 0; j < cnt; ++j) num[j] = den[j] = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double* tk = terms + k * kSB;
        const double w = a.models[k].weight;
        for (int64_t j = 0; j < cnt; ++j) {
          const bool plus = s[j] >= 0;  // NaN: minus, as the reference
          const bool agree = (plus & (tk[j] > 0)) | (!plus & (tk[j] < 0));
          const uint64_t mask = uint64_t(0) - static_cast<uint64_t>(agree);
          num[j] = num[j] + dmask(tk[j], mask);
          den[j] = den[j] + dmask(w, mask);
        }
      }
      if (a.normalize) {
        for (int64_t j = 0; j < cnt; ++j) res[j] = num[j] / (den[j] == 0 ? 1.0 : den[j]);
      } else {
        for (int64_t j = 0; j < cnt; ++j) res[j] = num[j];
      }
    } else if (a.normalize) {
      const double dv = a.divisor;
      for (int64_t j = 0; j < cnt; ++j) res[j] = s[j] / dv;
    } else {
      for (int64_t j = 0; j < cnt; ++j) res[j] = s[j];
    }
    const double lam = a.lam;
    for (int64_t j = 0; j < cnt; ++j) res[j] = bd[j] + lam * res[j];
    // round_O(res): the linear kernels' one rounding (no inputs, divisor 1)
    kt().sum[static_cast<int>(DType::kFloat32)][static_cast<int>(a.out_dtype)](
        res, false, nullptr, nullptr, 0, cnt, static_cast<char*>(a.out) + i * out_size, 1.0);
  }
}

void l1_impl(const SparseBase& b, const SparseModel& m, int64_t begin, int64_t end, int64_t* seen, ExactSum& before,
             ExactSum& after) {
  alignas(64) double bd[kSB], d[kSB];
  alignas(64) uint64_t mk[kSB];
  for (int64_t i = begin; i < end; i += kSB) {
    const int64_t cnt = imin(kSB, end - i);
    load_f64(b.base, b.base_dtype, i, cnt, bd);
    load_f64(m.x, m.dtype, i, cnt, d);
    for (int64_t j = 0; j < cnt; ++j) d[j] = d[j] - bd[j];
    if (m.kind != SparseModel::kAll) {
      model_mask(m, d, i, cnt, seen, mk);
    } else {
      for (int64_t j = 0; j < cnt; ++j) mk[j] = ~uint64_t(0);
    }
    for (int64_t j = 0; j < cnt; ++j) {
      const double a = __builtin_fabs(d[j]);
      before.add(a);
      after.add(dmask(a, mk[j]));
    }
  }
}

const SparseOps kOps = {combine_impl, window_impl, hist_hi_impl, hist_lo_impl, keys_impl, l1_impl};
