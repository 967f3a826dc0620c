// sparse_merge on a GPU: the same bits as sparse_merge_cpu (csrc/cpu/sparse.cpp) for every method.
//
// One tensor at a time, model after model, so GPU memory does not grow with K: the base and one
// model's tensor (device inputs are used in place, host ones are copied in), the running sum s of
// the weighted kept terms (float64, n), for the TIES-like methods num and den (float64, n each),
// a 2^16-bin histogram and, per model, one int64 per 4096-element tile (the tie-break's offsets).
//
//   per model k:  selection (TIES, breadcrumbs): two histogram passes over |d_k| keys (high 16 bits,
//                 then the low 16 bits within the chosen bin), walked on the host as the CPU does;
//                 when some keys equal to the threshold T are kept and some not, the keys == T of
//                 each tile are counted and scanned on the host, so each element knows its rank
//                 among them (index order: the CPU's tie-break, lower index first);
//                 L1 rescale: exact sums of |d_k| and |kept_k| (fixed-point limbs, atomics with
//                 carries: any order gives the same integer), rounded once on the host;
//                 then s += t_k (k ascending, the CPU's order of additions).
//   consensus:    a second pass over the models (host inputs copied in again): num and den.
//   finish:       out = round(base + lam * mixed), sparse.h's arithmetic.
// Every step is sparse.h's FS_HD code or the same IEEE operations (the _rn intrinsics of dtype.h).
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "common.cuh"
#include "fastsoup/cuda.h"
#include "fastsoup/sparse.h"

namespace fastsoup {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kItems = 16;
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kItems;  // elements per tile (block)
constexpr int kBins = 1 << 16;
constexpr int kLimbs = ExactSum::kLimbs;

// A cut of the top-k order (sparse_merge_cpu's Cut): every key > T and the first m keys == T.
// before: per tile, the keys == T in the tiles before it (device), or nullptr when the rank does
// not matter (m covers every key == T, or none).
struct DevCut {
  uint32_t T = sparse::kNothing;
  int64_t m = 0;
  const int64_t* before = nullptr;
};

// One model's mask and scale, by value in each launch.
struct ModelArgs {
  const void* in = nullptr;
  DType in_dt = DType::kFloat32;
  const void* base = nullptr;
  DType base_dt = DType::kFloat32;
  int64_t n = 0;
  int kind = 0;  // 0 every entry, 1 top-k cut(s), 2 DARE
  bool band = false;
  DevCut keep, drop;
  uint64_t key = 0, threshold = 0;
  int scale = 0;  // 0 none, 1 divide by divisor (DARE density), 2 multiply by factor (L1)
  double divisor = 1.0, factor = 1.0;
  double w = 1.0;
};

__device__ __forceinline__ double delta_at(const ModelArgs& a, int64_t i) {
  return fs_sub(load_double(a.in, i, a.in_dt), load_double(a.base, i, a.base_dt));
}

// kept_k[i] (mask only, no scale); s0, s1: the cuts' running counts of keys == T.
__device__ __forceinline__ double kept_at(const ModelArgs& a, int64_t i, double d, int64_t& s0, int64_t& s1) {
  if (a.kind == 0) return d;
  if (a.kind == 2) return sparse::dare_u53(a.key, static_cast<uint64_t>(i)) < a.threshold ? d : 0.0;
  const uint32_t key = sparse::magnitude_key(d);
  bool keep = sparse::top_keep(key, a.keep.T, a.keep.m, s0);
  if (a.band) {
    const bool dropped = sparse::top_keep(key, a.drop.T, a.drop.m, s1);  // always evaluated: counts
    keep = keep && !dropped;
  }
  return keep ? d : 0.0;
}

__device__ __forceinline__ double term_of(const ModelArgs& a, double kept) {
  double t = kept;
  if (a.scale == 1) t = fs_div(t, a.divisor);
  else if (a.scale == 2) t = fs_mul(t, a.factor);
  return fs_mul(t, a.w);
}

// Each thread's first rank among the keys == T of both cuts: the tile's offset plus the keys == T
// of the threads before it in the tile (thread j holds elements [j * kItems, (j + 1) * kItems)).
using Scan = cub::BlockScan<int, kThreads>;

__device__ void thread_ranks(const ModelArgs& a, int64_t begin, int64_t end, Scan::TempStorage& tmp, int64_t& s0,
                             int64_t& s1) {
  s0 = s1 = 0;
  if (a.kind != 1 || (a.keep.before == nullptr && a.drop.before == nullptr)) return;
  int c0 = 0, c1 = 0;
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t key = sparse::magnitude_key(delta_at(a, i));
    c0 += key == a.keep.T;
    c1 += key == a.drop.T;
  }
  int p0 = 0, p1 = 0;
  Scan(tmp).ExclusiveSum(c0, p0);
  __syncthreads();
  Scan(tmp).ExclusiveSum(c1, p1);
  if (a.keep.before != nullptr) s0 = a.keep.before[blockIdx.x] + p0;
  if (a.drop.before != nullptr) s1 = a.drop.before[blockIdx.x] + p1;
}

// The histogram passes: hist[key >> 16] (bin == kBins) or, for keys in `bin`, hist[key & 0xFFFF].
__global__ void hist_kernel(ModelArgs a, uint32_t bin, unsigned long long* hist) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.n; i += stride) {
    const uint32_t key = sparse::magnitude_key(delta_at(a, i));
    if (bin == static_cast<uint32_t>(kBins)) {
      atomicAdd(&hist[key >> 16], 1ull);
    } else if ((key >> 16) == bin) {
      atomicAdd(&hist[key & 0xFFFFu], 1ull);
    }
  }
}

// The keys == T of each tile (one block per tile).
__global__ void count_eq_kernel(ModelArgs a, uint32_t T, long long* counts) {
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * kTile + static_cast<int64_t>(threadIdx.x) * kItems;
  const int64_t end = begin + kItems < a.n ? begin + kItems : a.n;
  int c = 0;
  for (int64_t i = begin; i < end; ++i) c += sparse::magnitude_key(delta_at(a, i)) == T;
  if (c) atomicAdd(&total, c);
  __syncthreads();
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

// Adds v at limb j of a fixed-point integer with carries (any order of additions: the same integer).
__device__ __forceinline__ void limb_add(unsigned long long* limbs, int j, unsigned long long v) {
  while (v != 0 && j < kLimbs) {
    const unsigned long long old = atomicAdd(&limbs[j], v);
    v = old + v < old ? 1ull : 0ull;
    ++j;
  }
}

// The L1 sums of one model: sum |d| into sums[0..kLimbs), sum |kept| into sums[kLimbs..2 kLimbs),
// flags[0], flags[1] their inf/NaN bits.
__global__ void l1_kernel(ModelArgs a, unsigned long long* sums, int* flags) {
  __shared__ Scan::TempStorage tmp;
  __shared__ unsigned long long block[2 * kLimbs];
  __shared__ int bflags[2];
  for (int j = threadIdx.x; j < 2 * kLimbs; j += blockDim.x) block[j] = 0;
  if (threadIdx.x < 2) bflags[threadIdx.x] = 0;
  const int64_t begin = blockIdx.x * kTile + static_cast<int64_t>(threadIdx.x) * kItems;
  const int64_t end = begin < a.n ? (begin + kItems < a.n ? begin + kItems : a.n) : begin;
  int64_t s0, s1;
  thread_ranks(a, begin, end, tmp, s0, s1);
  ExactSum la, lb;  // this thread's sums (ExactSum::add, the CPU's code)
  for (int64_t i = begin; i < end; ++i) {
    const double d = delta_at(a, i);
    const double kept = kept_at(a, i, d, s0, s1);
    la.add(fabs(d));
    lb.add(fabs(kept));
  }
  const int fa = (la.inf ? 1 : 0) | (la.nan ? 2 : 0), fb = (lb.inf ? 1 : 0) | (lb.nan ? 2 : 0);
  __syncthreads();  // block[] is zeroed
  for (int j = 0; j < kLimbs; ++j) {
    limb_add(block, j, la.limb[j]);
    limb_add(block + kLimbs, j, lb.limb[j]);
  }
  if (fa) atomicOr(&bflags[0], fa);
  if (fb) atomicOr(&bflags[1], fb);
  __syncthreads();
  for (int j = threadIdx.x; j < 2 * kLimbs; j += blockDim.x) {
    if (j < kLimbs) limb_add(sums, j, block[j]);
    else limb_add(sums + kLimbs, j - kLimbs, block[j]);
  }
  if (threadIdx.x < 2 && bflags[threadIdx.x]) atomicOr(&flags[threadIdx.x], bflags[threadIdx.x]);
}

// s[i] = s[i] + t_k[i] (pass 1), or the consensus sums (pass 2) given the final s.
template <bool kConsensus>
__global__ void accumulate_kernel(ModelArgs a, double* s, double* num, double* den) {
  __shared__ Scan::TempStorage tmp;
  const int64_t begin = blockIdx.x * kTile + static_cast<int64_t>(threadIdx.x) * kItems;
  const int64_t end = begin < a.n ? (begin + kItems < a.n ? begin + kItems : a.n) : begin;
  int64_t s0, s1;
  thread_ranks(a, begin, end, tmp, s0, s1);
  for (int64_t i = begin; i < end; ++i) {
    const double d = delta_at(a, i);
    const double t = term_of(a, kept_at(a, i, d, s0, s1));
    if (!kConsensus) {
      s[i] = fs_add(s[i], t);
    } else {
      const bool plus = s[i] >= 0;  // NaN: minus, as the CPU
      const bool agree = (plus && t > 0) || (!plus && t < 0);
      num[i] = fs_add(num[i], agree ? t : 0.0);
      den[i] = fs_add(den[i], agree ? a.w : 0.0);
    }
  }
}

struct FinishArgs {
  const void* base;
  DType base_dt;
  void* out;
  DType out_dt;
  int64_t n;
  const double *s, *num, *den;
  bool consensus, normalize;
  double divisor;  // plain normalize: the weight total, or 1
  double lam;
};

__global__ void finish_kernel(FinishArgs f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < f.n; i += stride) {
    double res;
    if (f.consensus) {
      res = f.normalize ? fs_div(f.num[i], f.den[i] == 0 ? 1.0 : f.den[i]) : f.num[i];
    } else {
      res = f.normalize ? fs_div(f.s[i], f.divisor) : f.s[i];
    }
    store_double(f.out, i, f.out_dt, fs_add(load_double(f.base, i, f.base_dt), fs_mul(f.lam, res)));
  }
}

// Device memory freed on scope exit (after the stream is synchronized by the caller's last step).
struct DeviceBuffer {
  void* ptr = nullptr;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes) FS_CUDA_CHECK(cudaMalloc(&ptr, bytes));
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr) { o.ptr = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr, o.ptr);
    return *this;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

class Merger {
 public:
  Merger(const SparseMergeParams& p, int device, cudaStream_t stream)
      : p_(p), device_(device), stream_(stream), tiles_((p.n + kTile - 1) / kTile) {}

  void run() {
    const int64_t K = p_.num_inputs;
    const int64_t n = p_.n;
    // The base, the output, the model slot.
    const void* base = p_.base;
    DeviceBuffer base_buf;
    if (!is_device_pointer(p_.base, device_)) {
      base_buf = DeviceBuffer(n * itemsize(p_.base_dtype));
      copy_in(base_buf.ptr, p_.base, n * itemsize(p_.base_dtype));
      base = base_buf.ptr;
    }
    size_t slot_bytes = 0;
    for (int64_t k = 0; k < K; ++k)
      if (!is_device_pointer(p_.inputs[k], device_))
        slot_bytes = std::max(slot_bytes, static_cast<size_t>(n) * itemsize(p_.input_dtypes[k]));
    slot_ = DeviceBuffer(slot_bytes);
    hist_ = DeviceBuffer(kBins * sizeof(unsigned long long));
    counts_ = DeviceBuffer(tiles_ * sizeof(long long));
    const bool consensus = sparse::is_consensus(p_.method);
    DeviceBuffer s(n * sizeof(double));
    DeviceBuffer num(consensus ? n * sizeof(double) : 0), den(consensus ? n * sizeof(double) : 0);
    FS_CUDA_CHECK(cudaMemsetAsync(s.ptr, 0, n * sizeof(double), stream_));  // +0.0
    if (consensus) {
      FS_CUDA_CHECK(cudaMemsetAsync(num.ptr, 0, n * sizeof(double), stream_));
      FS_CUDA_CHECK(cudaMemsetAsync(den.ptr, 0, n * sizeof(double), stream_));
    }
    std::vector<ModelArgs> masks(K);
    for (int64_t k = 0; k < K; ++k) {
      ModelArgs& a = masks[k];
      a.in = model(k);
      a.in_dt = p_.input_dtypes[k];
      a.base = base;
      a.base_dt = p_.base_dtype;
      a.n = n;
      a.w = p_.weights[k];
      make_mask(k, a);
      if (p_.rescale == Rescale::kL1) l1_scale(a);
      accumulate_kernel<false><<<static_cast<unsigned>(tiles_), kThreads, 0, stream_>>>(a, s.as<double>(), nullptr,
                                                                                      nullptr);
      FS_CUDA_CHECK(cudaGetLastError());
    }
    if (consensus) {
      for (int64_t k = 0; k < K; ++k) {
        ModelArgs& a = masks[k];
        a.in = model(k);
        accumulate_kernel<true><<<static_cast<unsigned>(tiles_), kThreads, 0, stream_>>>(a, s.as<double>(),
                                                                                       num.as<double>(),
                                                                                       den.as<double>());
        FS_CUDA_CHECK(cudaGetLastError());
      }
    }
    double weight_total = 0.0;
    for (int64_t k = 0; k < K; ++k) weight_total = fs_add(weight_total, p_.weights[k]);
    FinishArgs f;
    f.base = base;
    f.base_dt = p_.base_dtype;
    f.n = n;
    f.s = s.as<double>();
    f.num = num.as<double>();
    f.den = den.as<double>();
    f.consensus = consensus;
    f.normalize = p_.normalize;
    f.divisor = (weight_total < sparse::kNormEps && weight_total > -sparse::kNormEps) ? 1.0 : weight_total;
    f.lam = p_.lam;
    f.out_dt = p_.out_dtype;
    const size_t out_bytes = static_cast<size_t>(n) * itemsize(p_.out_dtype);
    const bool out_on_device = is_device_pointer(p_.out, device_);
    DeviceBuffer out_buf(out_on_device ? 0 : out_bytes);
    f.out = out_on_device ? p_.out : out_buf.ptr;
    finish_kernel<<<grid_size(device_, n, kThreads), kThreads, 0, stream_>>>(f);
    FS_CUDA_CHECK(cudaGetLastError());
    if (!out_on_device) FS_CUDA_CHECK(cudaMemcpyAsync(p_.out, out_buf.ptr, out_bytes, cudaMemcpyDeviceToHost, stream_));
    FS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

 private:
  // Model k's tensor on the device: in place, or copied into the slot (after the slot's last use:
  // the copy is ordered on the stream).
  const void* model(int64_t k) {
    if (is_device_pointer(p_.inputs[k], device_)) return p_.inputs[k];
    copy_in(slot_.ptr, p_.inputs[k], static_cast<size_t>(p_.n) * itemsize(p_.input_dtypes[k]));
    return slot_.ptr;
  }

  void copy_in(void* dst, const void* src, size_t bytes) {
    FS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  }

  std::vector<unsigned long long> histogram(const ModelArgs& a, uint32_t bin) {
    FS_CUDA_CHECK(cudaMemsetAsync(hist_.ptr, 0, kBins * sizeof(unsigned long long), stream_));
    hist_kernel<<<grid_size(device_, a.n, kThreads), kThreads, 0, stream_>>>(a, bin, hist_.as<unsigned long long>());
    FS_CUDA_CHECK(cudaGetLastError());
    std::vector<unsigned long long> h(kBins);
    FS_CUDA_CHECK(cudaMemcpyAsync(h.data(), hist_.ptr, kBins * sizeof(unsigned long long), cudaMemcpyDeviceToHost,
                                  stream_));
    FS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return h;
  }

  // The cut top(rank) of a's keys (sparse_merge_cpu's select), its tile offsets when they matter.
  DevCut cut(const ModelArgs& a, int64_t rank) {
    DevCut c;
    if (rank == 0) return c;  // T = kNothing: nothing kept
    if (rank == p_.n) {
      c.T = 0;
      c.m = std::numeric_limits<int64_t>::max();
      return c;
    }
    std::vector<unsigned long long> h = histogram(a, kBins);
    std::vector<uint64_t> total(h.begin(), h.end());
    uint32_t bin = 0, low = 0;
    int64_t above = 0;
    sparse::walk_down(total.data(), rank, bin, above);
    const int64_t rem = rank - above;
    h = histogram(a, bin);
    std::copy(h.begin(), h.end(), total.begin());
    int64_t above_low = 0;
    sparse::walk_down(total.data(), rem, low, above_low);
    c.T = (bin << 16) | low;
    c.m = rem - above_low;
    if (c.m >= static_cast<int64_t>(total[low])) {  // every key == T is kept: no ranks needed
      c.m = std::numeric_limits<int64_t>::max();
      return c;
    }
    // The keys == T before each tile.
    count_eq_kernel<<<static_cast<unsigned>(tiles_), kThreads, 0, stream_>>>(a, c.T, counts_.as<long long>());
    FS_CUDA_CHECK(cudaGetLastError());
    std::vector<long long> counts(tiles_);
    FS_CUDA_CHECK(cudaMemcpyAsync(counts.data(), counts_.ptr, tiles_ * sizeof(long long), cudaMemcpyDeviceToHost,
                                  stream_));
    FS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<int64_t> before(tiles_);
    int64_t acc = 0;
    for (int64_t t = 0; t < tiles_; ++t) {
      before[t] = acc;
      acc += counts[t];
    }
    offsets_.push_back(std::make_unique<DeviceBuffer>(tiles_ * sizeof(int64_t)));
    FS_CUDA_CHECK(cudaMemcpyAsync(offsets_.back()->ptr, before.data(), tiles_ * sizeof(int64_t),
                                  cudaMemcpyHostToDevice, stream_));
    FS_CUDA_CHECK(cudaStreamSynchronize(stream_));  // `before` is freed on return
    c.before = offsets_.back()->as<int64_t>();
    return c;
  }

  void make_mask(int64_t k, ModelArgs& a) {
    switch (p_.method) {
      case SparseMethod::kTaskArithmetic:
        a.kind = 0;
        return;
      case SparseMethod::kTies:
        a.kind = 1;
        a.keep = cut(a, sparse::trim_count(p_.n, p_.density[k]));
        return;
      case SparseMethod::kBreadcrumbs:
      case SparseMethod::kBreadcrumbsTies: {
        a.kind = 1;
        a.band = true;
        int64_t n_top, n_keep;
        sparse::band_counts(p_.n, p_.density[k], p_.gamma[k], n_top, n_keep);
        a.keep = cut(a, n_top + n_keep);
        a.drop = cut(a, n_top);
        return;
      }
      case SparseMethod::kDareLinear:
      case SparseMethod::kDareTies:
        a.kind = 2;
        a.key = sparse::stream_key(p_.seed, static_cast<uint64_t>(k), p_.name_hash);
        a.threshold = sparse::dare_threshold(p_.density[k]);
        if (p_.rescale == Rescale::kDensity && p_.density[k] > 0.0 && p_.density[k] < 1.0) {
          a.scale = 1;
          a.divisor = p_.density[k];
        }
        return;
    }
  }

  void l1_scale(ModelArgs& a) {
    DeviceBuffer sums(2 * kLimbs * sizeof(unsigned long long)), flags(2 * sizeof(int));
    FS_CUDA_CHECK(cudaMemsetAsync(sums.ptr, 0, 2 * kLimbs * sizeof(unsigned long long), stream_));
    FS_CUDA_CHECK(cudaMemsetAsync(flags.ptr, 0, 2 * sizeof(int), stream_));
    l1_kernel<<<static_cast<unsigned>(tiles_), kThreads, 0, stream_>>>(a, sums.as<unsigned long long>(), flags.as<int>());
    FS_CUDA_CHECK(cudaGetLastError());
    unsigned long long limbs[2 * kLimbs];
    int f[2];
    FS_CUDA_CHECK(cudaMemcpyAsync(limbs, sums.ptr, sizeof limbs, cudaMemcpyDeviceToHost, stream_));
    FS_CUDA_CHECK(cudaMemcpyAsync(f, flags.ptr, sizeof f, cudaMemcpyDeviceToHost, stream_));
    FS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    ExactSum before, after;
    for (int j = 0; j < kLimbs; ++j) {
      before.limb[j] = limbs[j];
      after.limb[j] = limbs[kLimbs + j];
    }
    before.inf = f[0] & 1;
    before.nan = f[0] & 2;
    after.inf = f[1] & 1;
    after.nan = f[1] & 2;
    const double nb = before.value(), na = after.value();
    if (!(nb < sparse::kL1Eps || na < sparse::kL1Eps)) {
      a.scale = 2;
      a.factor = fs_div(nb, na);
    }
  }

  const SparseMergeParams& p_;
  int device_;
  cudaStream_t stream_;
  int64_t tiles_;
  DeviceBuffer slot_, hist_, counts_;
  std::vector<std::unique_ptr<DeviceBuffer>> offsets_;
};

}  // namespace

Status sparse_merge(const SparseMergeParams& p, int device, uintptr_t stream) {
  Status st = check_sparse_merge(p);
  if (!st.ok) return st;
  if (p.n == 0) return Status::Ok();
  if ((p.n + kTile - 1) / kTile > std::numeric_limits<int>::max())
    return Status::Error("sparse_merge_cuda: the tensor has too many elements for one grid");
  DeviceGuard guard(device);
  Merger(p, device, as_stream(stream)).run();
  return Status::Ok();
}

}  // namespace cuda
}  // namespace fastsoup
