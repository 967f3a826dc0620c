// Internal: portable block code of weighted_sum, element by element in dtype.h's arithmetic.
//
// Included INSIDE the anonymous namespace of each ISA file, after that file's target pragma, so
// every ISA gets its own copy compiled (and auto-vectorized) for it, with internal linkage: no
// copy built for one ISA can be picked by the linker for another. The loops go input by input
// over the block (k outer, j inner), which keeps each element's order of operations and lets the
// compiler vectorize over j.
// (No include guard on purpose: one inclusion per ISA file, inside its namespace.)

template <DType I, DType O>
void sum_generic(double* acc, bool init, const void* const* x, const double* w, int g, int64_t n, void* out,
                 double divisor) {
  for (int i = 0; i < g; ++i) {
    const double wi = w[i];
    const bool first = init && i == 0;
    for (int64_t j = 0; j < n; ++j) acc[j] = sum_step(first ? -0.0 : acc[j], wi, load_double(x[i], j, I));
  }
  if (out == nullptr) return;
  for (int64_t j = 0; j < n; ++j) store_double(out, j, O, sum_finish(acc[j], divisor));
}

template <DType I, DType O>
void sum2_generic(double* s, double* c, bool init, const void* const* x, const double* w, int g, int64_t n,
                  void* out, double divisor, double divisor_lo) {
  if (init) {
    for (int64_t j = 0; j < n; ++j) {
      s[j] = -0.0;
      c[j] = 0.0;
    }
  }
  for (int i = 0; i < g; ++i) {
    const double wi = w[i];
    for (int64_t j = 0; j < n; ++j) sum2_step(s[j], c[j], wi, load_double(x[i], j, I));
  }
  if (out == nullptr) return;
  for (int64_t j = 0; j < n; ++j) store_double(out, j, O, sum2_finish(s[j], c[j], divisor, divisor_lo));
}

// Table rows: every (input, output) pair of the generic code.
#define FASTSOUP_GENERIC_ROW(fn, I)                                                                    \
  { fn<I, DType::kFloat16>, fn<I, DType::kBFloat16>, fn<I, DType::kFloat32>, fn<I, DType::kFloat64> }
#define FASTSOUP_GENERIC_TABLE(fn)                                                                     \
  {                                                                                                    \
    FASTSOUP_GENERIC_ROW(fn, DType::kFloat16), FASTSOUP_GENERIC_ROW(fn, DType::kBFloat16),             \
        FASTSOUP_GENERIC_ROW(fn, DType::kFloat32), FASTSOUP_GENERIC_ROW(fn, DType::kFloat64)           \
  }
