// Internal: sparse_merge's block code (sparse_ops.h), in plain C++ written so that it vectorizes.
//
// Included INSIDE the anonymous namespace of each ISA file (sparse_scalar.cpp, sparse_avx2.cpp,
// sparse_avx512.cpp), after that file's target pragma, as kernel_generic.h is: every ISA gets its own
// copy, with internal linkage. The including file defines, before this header:
//   const KernelTable& kt();                            this ISA's loaders and stores
//   void scan_window(const uint32_t* keys, int64_t cnt, WindowCut& c);   the candidate scan
// and after it the table: const SparseOps kOps = {combine_impl, window_impl, ...} (or its own versions).
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

// One model's terms over a block, in one fused loop: t = scale(mask(x - b)) * w into tk, and
// s += t. The top-k masks are speculative here: keys == T are taken as out; eq[0], eq[1] count them,
// and the caller redoes the block exactly (redo_terms) when one of them is in. kSrc: 0: x as binary64
// (xd); 1: x as binary32 (xf), the key from the binary64 delta; 2: x and the base as binary32, the
// key from their binary32 difference (keys_of_f32: the same bits).
enum : int { kMaskAll = 0, kMaskTop = 1, kMaskBand = 2, kMaskDare = 3 };

template <int kKind, int kScale, int kSrc>
void terms_fused(const SparseModel& m, const float* xf, const double* xd, const float* bf, const double* bd,
                 int64_t begin, int64_t cnt, double* tk, double* s, int64_t* eq) {
  const uint32_t T0 = m.T0, T1 = m.T1;
  const double w = m.weight, dv = m.divisor, f = m.factor;
  const uint64_t rkey = m.key, thr = m.threshold, first = static_cast<uint64_t>(begin) + 1;
  uint32_t e0 = 0, e1 = 0;
  for (int64_t j = 0; j < cnt; ++j) {
    const double x = kSrc == 0 ? xd[j] : static_cast<double>(xf[j]);
    const double d = x - bd[j];
    uint64_t mask = ~uint64_t(0);
    if (kKind == kMaskTop || kKind == kMaskBand) {
      const uint32_t u = (kSrc == 2 ? fbits(xf[j] - bf[j]) : fbits(static_cast<float>(d))) & 0x7FFFFFFFu;
      const uint32_t key = u > 0x7F800000u ? sparse::kNanKey : u;
      e0 += key == T0 ? 1u : 0u;
      bool keep = key > T0;
      if (kKind == kMaskBand) {
        e1 += key == T1 ? 1u : 0u;
        keep = keep & !(key > T1);
      }
      mask = uint64_t(0) - static_cast<uint64_t>(keep);
    } else if (kKind == kMaskDare) {
      const uint64_t u = sparse::mix64(rkey + (first + static_cast<uint64_t>(j)) * sparse::kGamma) >> 11;
      mask = uint64_t(0) - static_cast<uint64_t>(u < thr);
    }
    const double kept = kKind == kMaskAll ? d : dmask(d, mask);
    const double t = kScale == 1 ? (kept / dv) * w : (kScale == 2 ? (kept * f) * w : kept * w);
    tk[j] = t;
    s[j] = s[j] + t;
  }
  eq[0] = e0;
  eq[1] = e1;
}

typedef void (*TermsFn)(const SparseModel&, const float*, const double*, const float*, const double*, int64_t, int64_t,
                        double*, double*, int64_t*);

template <int kKind, int kScale>
TermsFn terms_pick_src(int src) {
  return src == 0 ? terms_fused<kKind, kScale, 0> : (src == 1 ? terms_fused<kKind, kScale, 1> : terms_fused<kKind, kScale, 2>);
}
template <int kKind>
TermsFn terms_pick_scale(Rescale r, int src) {
  return r == Rescale::kDensity ? terms_pick_src<kKind, 1>(src)
                                : (r == Rescale::kL1 ? terms_pick_src<kKind, 2>(src) : terms_pick_src<kKind, 0>(src));
}
TermsFn terms_pick(const SparseModel& m, int src) {
  if (m.kind == SparseModel::kAll) return terms_pick_scale<kMaskAll>(m.scale, src);
  if (m.kind == SparseModel::kDare) return terms_pick_scale<kMaskDare>(m.scale, src);
  return m.band ? terms_pick_scale<kMaskBand>(m.scale, src) : terms_pick_scale<kMaskTop>(m.scale, src);
}

// The exact terms of model k over a block (keys == T in index order, sparse::top_keep), then s
// again from +0 over the models 0..k (the same additions in the same order as the fused loop's).
void redo_terms(const SparseModel& m, const double* x, const double* bd, int64_t begin, int64_t cnt, int64_t* seen,
                double* terms, int64_t k, double* s) {
  alignas(64) double d[kSB];
  alignas(64) uint64_t mk[kSB];
  for (int64_t j = 0; j < cnt; ++j) d[j] = x[j] - bd[j];
  model_mask(m, d, begin, cnt, seen, mk);
  double* tk = terms + k * kSB;
  const double w = m.weight;
  for (int64_t j = 0; j < cnt; ++j) {
    const double kept = dmask(d[j], mk[j]);
    tk[j] = m.scale == Rescale::kDensity ? (kept / m.divisor) * w
                                         : (m.scale == Rescale::kL1 ? (kept * m.factor) * w : kept * w);
  }
  for (int64_t j = 0; j < cnt; ++j) s[j] = 0.0;
  for (int64_t q = 0; q <= k; ++q) {
    const double* tq = terms + q * kSB;
    for (int64_t j = 0; j < cnt; ++j) s[j] = s[j] + tq[j];
  }
}

void combine_impl(const CombineArgs& a, int64_t begin, int64_t end, int64_t* seen, double* terms) {
  const int64_t K = a.K;
  alignas(64) double bd[kSB], s[kSB], num[kSB], den[kSB], res[kSB], xd[kSB];
  alignas(64) float bf[kSB], xf[kSB];
  const int64_t out_size = static_cast<int64_t>(itemsize(a.out_dtype));
  const bool base32 = a.b.base_dtype != DType::kFloat64;
  TermsFn fns[64];
  const int64_t nfn = K < 64 ? K : 64;
  for (int64_t k = 0; k < nfn; ++k) {
    const bool x32 = a.models[k].dtype != DType::kFloat64;
    fns[k] = terms_pick(a.models[k], !x32 ? 0 : (base32 ? 2 : 1));
  }
  for (int64_t i = begin; i < end; i += kSB) {
    const int64_t cnt = imin(kSB, end - i);
    if (base32) {
      load_f32(a.b.base, a.b.base_dtype, i, cnt, bf);
      for (int64_t j = 0; j < cnt; ++j) bd[j] = static_cast<double>(bf[j]);
    } else {
      load_f64(a.b.base, a.b.base_dtype, i, cnt, bd);
    }
    for (int64_t j = 0; j < cnt; ++j) s[j] = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const SparseModel& m = a.models[k];
      const bool x32 = m.dtype != DType::kFloat64;
      if (x32) load_f32(m.x, m.dtype, i, cnt, xf);
      else load_f64(m.x, m.dtype, i, cnt, xd);
      const TermsFn fn = k < nfn ? fns[k] : terms_pick(m, !x32 ? 0 : (base32 ? 2 : 1));
      int64_t eq[2];
      fn(m, xf, xd, bf, bd, i, cnt, terms + k * kSB, s, eq);
      if (m.kind == SparseModel::kTop) {
        int64_t* sk = seen + 2 * k;
        const bool redo = (eq[0] > 0 && sk[0] < m.m0) || (m.band && eq[1] > 0 && sk[1] < m.m1);
        if (redo) {
          if (x32)
            for (int64_t j = 0; j < cnt; ++j) xd[j] = static_cast<double>(xf[j]);
          redo_terms(m, xd, bd, i, cnt, sk, terms, k, s);  // counts seen itself
        } else {
          sk[0] += eq[0];
          sk[1] += eq[1];
        }
      }
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

// Adds the values a[0, cnt) (each >= 0, cnt <= 512) to s exactly, as s.add of each would: when the
// block holds no inf or NaN and every value is a multiple of 2^(B - 1074), B = pos(max) - 2 (pos as
// in ExactSum::add), the values are integers q < 2^55 in that unit and their sum, < 2^64, is added
// once (float16 and bfloat16 deltas always are: few significant bits); otherwise value by value.
// The integer work is branch-free, so it vectorizes.
#ifndef FS_SPARSE_BLOCK_UNITS
// The largest of bits[0, cnt) (bit patterns of doubles >= 0: as signed integers, in the same order).
inline int64_t block_top(const uint64_t* bits, int64_t cnt) {
  int64_t top = 0;
  for (int64_t j = 0; j < cnt; ++j) {
    const int64_t u = static_cast<int64_t>(bits[j]);
    top = u > top ? u : top;
  }
  return top;
}

// sum of the values bits[0, cnt) in units of 2^(B - 1074) (each below 2^55: pos <= B + 2), and in
// `lost` the bits below that unit (none: the sum is exact).
inline void block_units(const uint64_t* bits, int64_t cnt, int64_t B, uint64_t& sum, uint64_t& lost) {
  for (int64_t j = 0; j < cnt; ++j) {
    const int64_t e = static_cast<int64_t>(bits[j] >> 52);
    const int64_t normal = e != 0;
    const uint64_t mant = (bits[j] & ((uint64_t(1) << 52) - 1)) | (static_cast<uint64_t>(normal) << 52);
    const int64_t d = e - normal - B;  // pos - B <= 2
    const int64_t ls = d > 0 ? d : 0;
    int64_t rs = -d;
    rs = rs < 0 ? 0 : rs;
    rs = rs > 63 ? 63 : rs;  // mant < 2^53: a shift of 63 drops every bit
    sum += (mant << ls) >> rs;
    lost |= mant & ((uint64_t(1) << rs) - 1);
  }
}
#endif

// Adds the values a[0, cnt) (each >= 0, cnt <= 512) to s exactly, as s.add of each would: when the
// block holds no inf or NaN and every value is a multiple of 2^(B - 1074), B = pos(max) - 2 (pos as
// in ExactSum::add), the values are integers q < 2^55 in that unit and their sum, < 2^64, is added
// once (float16 and bfloat16 deltas always are: few significant bits); otherwise value by value.
// block_top and block_units are plain loops here, AVX-512 code in sparse_avx512.cpp.
inline void exact_add_block(ExactSum& s, const double* a, int64_t cnt) {
  static_assert(kSB <= 512, "the block sum of q < 2^55 must stay below 2^64");
  alignas(64) uint64_t bits[kSB];
  std::memcpy(bits, a, static_cast<size_t>(cnt) * sizeof(double));
  const int64_t top = block_top(bits, cnt);
  const int64_t e_top = top >> 52;
  const int64_t B = (e_top == 0 ? 0 : e_top - 1) - 2;
  if (top >= (int64_t(0x7FF) << 52) || B < 0) {  // inf or NaN (flags), or values near the subnormals
    for (int64_t j = 0; j < cnt; ++j) s.add(a[j]);
    return;
  }
  uint64_t sum = 0, lost = 0;
  block_units(bits, cnt, B, sum, lost);
  if (lost == 0) {
    s.add_units(sum, static_cast<int>(B));
  } else {
    for (int64_t j = 0; j < cnt; ++j) s.add(a[j]);
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
    alignas(64) double av[kSB], kv[kSB];
    for (int64_t j = 0; j < cnt; ++j) {
      av[j] = __builtin_fabs(d[j]);
      kv[j] = dmask(av[j], mk[j]);
    }
    exact_add_block(before, av, cnt);
    exact_add_block(after, kv, cnt);
  }
}

