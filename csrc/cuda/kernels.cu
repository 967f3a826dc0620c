// CUDA kernels: fused K-input weighted sum, multi_dot and gram.
//
// The per-element math (conversions, the binary64 steps of kernels.h, the final rounding) is
// dtype.h's, shared with the CPU kernels; it uses the _rn intrinsics, so nvcc cannot contract or
// reorder anything, which is what makes weighted_sum bit-identical to the CPU path and to the
// plain-torch reference. multi_dot uses __fmul_rn / __fadd_rn likewise.
#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "common.cuh"
#include "fastsoup/cuda.h"

namespace fastsoup {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per thread per iteration: one 16-byte load of 2-byte types

struct WeightedSumArgs {
  const void* in[kMaxInputs];
  int32_t dt[kMaxInputs];
  double w[kMaxInputs];
  int k;
  void* out;          // the result (out_dt), written by the last group only
  int32_t out_dt;
  int64_t n;
  double divisor, divisor_lo;
  bool accumulate;    // the first group starts from out (float32) instead of -0.0
  bool first, last;   // this launch's group is the first / the last of the sum
  bool compensated;   // kernels.h's compensated mode (a float64 operand)
  double* part_s;     // K > kMaxInputs: the running sum between groups (n doubles), else nullptr
  double* part_c;     // and its compensation (compensated mode)
};

__device__ __forceinline__ void load8(const void* base, int64_t i, DType d, float* x) {
  if (d == DType::kFloat32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    const float4 a = p[0], b = p[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    return;
  }
  const uint4 v = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + i);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint16_t lo = static_cast<uint16_t>(words[j] & 0xffffu), hi = static_cast<uint16_t>(words[j] >> 16);
    if (d == DType::kFloat16) {
      x[2 * j] = half_to_float(lo);
      x[2 * j + 1] = half_to_float(hi);
    } else {
      x[2 * j] = bf16_to_float(lo);
      x[2 * j + 1] = bf16_to_float(hi);
    }
  }
}

__device__ __forceinline__ void store8(void* base, int64_t i, DType d, const double* x) {
  if (d == DType::kFloat32) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + i);
    p[0] = make_float4(static_cast<float>(x[0]), static_cast<float>(x[1]), static_cast<float>(x[2]), static_cast<float>(x[3]));
    p[1] = make_float4(static_cast<float>(x[4]), static_cast<float>(x[5]), static_cast<float>(x[6]), static_cast<float>(x[7]));
    return;
  }
  uint32_t words[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float a = double_to_float_odd(x[2 * j]), b = double_to_float_odd(x[2 * j + 1]);
    const uint16_t lo = d == DType::kFloat16 ? float_to_half(a) : float_to_bf16(a);
    const uint16_t hi = d == DType::kFloat16 ? float_to_half(b) : float_to_bf16(b);
    words[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + i) = make_uint4(words[0], words[1], words[2], words[3]);
}

// One element of the compensated mode (any alignment, any dtype): start, this group, then finish
// into out or keep the running sum for the next group.
__device__ __forceinline__ void sum2_element(const WeightedSumArgs& a, int64_t i) {
  double s, c;
  if (!a.first) {
    s = a.part_s[i];
    c = a.part_c[i];
  } else {
    s = a.accumulate ? static_cast<double>(static_cast<const float*>(a.out)[i]) : -0.0;
    c = 0.0;
  }
  for (int k = 0; k < a.k; ++k) sum2_step(s, c, a.w[k], load_double(a.in[k], i, static_cast<DType>(a.dt[k])));
  if (a.last) {
    store_double(a.out, i, static_cast<DType>(a.out_dt), sum2_finish(s, c, a.divisor, a.divisor_lo));
  } else {
    a.part_s[i] = s;
    a.part_c[i] = c;
  }
}

__device__ __forceinline__ double sum_start(const WeightedSumArgs& a, int64_t i) {
  if (!a.first) return a.part_s[i];
  return a.accumulate ? static_cast<double>(static_cast<const float*>(a.out)[i]) : -0.0;
}

// kVectorized: every pointer 16-byte aligned, plain mode; the n % 8 tail is scalar.
template <bool kVectorized>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(const WeightedSumArgs a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const DType out_dt = static_cast<DType>(a.out_dt);
  if (a.compensated) {
    for (int64_t i = t; i < a.n; i += stride) sum2_element(a, i);
    return;
  }
  int64_t done = 0;
  if (kVectorized) {
    const int64_t nvec = a.n / kVec;
    for (int64_t v = t; v < nvec; v += stride) {
      const int64_t i = v * kVec;
      double acc[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = sum_start(a, i + j);
      for (int k = 0; k < a.k; ++k) {
        float x[kVec];
        load8(a.in[k], i, static_cast<DType>(a.dt[k]), x);
        const double w = a.w[k];
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] = sum_step(acc[j], w, static_cast<double>(x[j]));
      }
      if (a.last) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] = sum_finish(acc[j], a.divisor);
        store8(a.out, i, out_dt, acc);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) a.part_s[i + j] = acc[j];
      }
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + t; i < a.n; i += stride) {
    double acc = sum_start(a, i);
    for (int k = 0; k < a.k; ++k) acc = sum_step(acc, a.w[k], load_double(a.in[k], i, static_cast<DType>(a.dt[k])));
    if (a.last) store_double(a.out, i, out_dt, sum_finish(acc, a.divisor));
    else a.part_s[i] = acc;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void launch_group(WeightedSumArgs& a, int device, cudaStream_t stream) {
  bool vec = !a.compensated && aligned16(a.out);
  for (int k = 0; k < a.k && vec; ++k) vec = aligned16(a.in[k]);
  const int64_t work = vec ? std::max<int64_t>(a.n / kVec, 1) : a.n;
  const int blocks = grid_size(device, work, kThreads);
  if (vec) weighted_sum_kernel<true><<<blocks, kThreads, 0, stream>>>(a);
  else weighted_sum_kernel<false><<<blocks, kThreads, 0, stream>>>(a);
  FS_CUDA_CHECK(cudaGetLastError());
}

// ------------------------------------------------------------------------------------------------
// multi_dot: block c sums g[i] * in_k[i] over its kChunk elements in a fixed tree (binary32), one
// partial per (block, k); a second kernel adds the partials of each k in binary64, in a fixed tree.

constexpr int kPerThread = 16;
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kPerThread;
static_assert(kChunk == kDotChunk, "cuda.h's kDotChunk is the elements of one block's partial");

struct DotArgs {
  const void* in[kMaxInputs];
  int32_t dt[kMaxInputs];
  int k;
  const void* g;
  int32_t g_dt;
  int64_t n;
  double* partial;  // partial[c * stride + k] for chunk c of these n elements and input k of the launch
  int64_t stride;
};

__global__ void __launch_bounds__(kThreads) dot_partials_kernel(const DotArgs a) {
  __shared__ float red[kThreads];
  const int64_t nchunks = (a.n + kChunk - 1) / kChunk;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const int64_t base = c * kChunk;
    float gv[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = base + static_cast<int64_t>(j) * kThreads + threadIdx.x;  // coalesced
      gv[j] = i < a.n ? load_float(a.g, i, static_cast<DType>(a.g_dt)) : 0.0f;
    }
    for (int k = 0; k < a.k; ++k) {
      float s = 0.0f;
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int64_t i = base + static_cast<int64_t>(j) * kThreads + threadIdx.x;
        if (i < a.n) s = __fadd_rn(s, __fmul_rn(gv[j], load_float(a.in[k], i, static_cast<DType>(a.dt[k]))));
      }
      red[threadIdx.x] = s;
      __syncthreads();
      for (int w = kThreads / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) red[threadIdx.x] = __fadd_rn(red[threadIdx.x], red[threadIdx.x + w]);
        __syncthreads();
      }
      if (threadIdx.x == 0) a.partial[c * a.stride + k] = static_cast<double>(red[0]);
      __syncthreads();
    }
  }
}

__global__ void __launch_bounds__(kThreads) dot_finish_kernel(const double* partial, int64_t nchunks,
                                                              int64_t stride, double* out) {
  __shared__ double red[kThreads];
  const int col = blockIdx.x;
  double s = 0.0;
  for (int64_t c = threadIdx.x; c < nchunks; c += kThreads) s = __dadd_rn(s, partial[c * stride + col]);
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] = __dadd_rn(red[threadIdx.x], red[threadIdx.x + w]);
    __syncthreads();
  }
  if (threadIdx.x == 0) out[col] = red[0];
}

}  // namespace

void launch_dot_partials(const void* const* inputs, const DType* dtypes, int64_t k, const void* g, DType g_dtype,
                         int64_t n, double* partial, int64_t stride, int device, cudaStream_t stream) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  if (n == 0 || k == 0) return;
  for (int64_t g0 = 0; g0 < k; g0 += kMaxInputs) {
    DotArgs a{};
    a.k = static_cast<int>(std::min<int64_t>(kMaxInputs, k - g0));
    for (int j = 0; j < a.k; ++j) {
      a.in[j] = inputs[g0 + j];
      a.dt[j] = static_cast<int32_t>(dtypes[g0 + j]);
    }
    a.g = g;
    a.g_dt = static_cast<int32_t>(g_dtype);
    a.n = n;
    a.partial = partial + g0;
    a.stride = stride;
    const int blocks = static_cast<int>(std::min<int64_t>(nchunks, static_cast<int64_t>(grid_size(device, nchunks * kThreads, kThreads))));
    dot_partials_kernel<<<blocks, kThreads, 0, stream>>>(a);
    FS_CUDA_CHECK(cudaGetLastError());
  }
}

void launch_dot_finish(const double* partial, int64_t nchunks, int64_t stride, int64_t k, double* out,
                       cudaStream_t stream) {
  if (k == 0) return;
  dot_finish_kernel<<<static_cast<unsigned>(k), kThreads, 0, stream>>>(partial, nchunks, stride, out);
  FS_CUDA_CHECK(cudaGetLastError());
}

int grid_size(int device, int64_t work, int threads) {
  static std::mutex mu;
  static std::vector<int> sms;
  int count;
  {
    std::lock_guard<std::mutex> lk(mu);
    if (sms.empty()) sms.assign(64, 0);
    if (device < 0 || device >= static_cast<int>(sms.size())) throw std::invalid_argument("CUDA device index out of range");
    if (sms[device] == 0) FS_CUDA_CHECK(cudaDeviceGetAttribute(&sms[device], cudaDevAttrMultiProcessorCount, device));
    count = sms[device];
  }
  const int64_t want = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(count) * 8)));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  FS_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

bool is_device_pointer(const void* p, int device) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) && attr.device == device;
}

Status weighted_sum(const WeightedSumParams& p, int device, uintptr_t stream_handle) {
  Status st = check_weighted_sum(p);
  if (!st.ok) return st;
  if (p.n == 0) return Status::Ok();
  DeviceGuard guard(device);
  cudaStream_t stream = as_stream(stream_handle);
  const int64_t K = p.num_inputs;
  const size_t out_bytes = static_cast<size_t>(p.n) * itemsize(p.out_dtype);
  if (K == 0) {
    if (!p.accumulate) FS_CUDA_CHECK(cudaMemsetAsync(p.out, 0, out_bytes, stream));
    return Status::Ok();
  }
  // Groups of kMaxInputs: the first starts from -0.0 (or out); between groups the running sum
  // (and its compensation) stays in binary64 in a temporary; the last group rounds into out.
  const bool compensated = needs_compensated(p.input_dtypes, K, p.out_dtype);
  double* part = nullptr;
  if (K > kMaxInputs) {
    const size_t bytes = static_cast<size_t>(p.n) * sizeof(double) * (compensated ? 2 : 1);
    FS_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&part), bytes, stream));
  }
  for (int64_t g0 = 0; g0 < K; g0 += kMaxInputs) {
    WeightedSumArgs a{};
    a.k = static_cast<int>(std::min<int64_t>(kMaxInputs, K - g0));
    for (int j = 0; j < a.k; ++j) {
      a.in[j] = p.inputs[g0 + j];
      a.dt[j] = static_cast<int32_t>(p.input_dtypes[g0 + j]);
      a.w[j] = p.weights[g0 + j];
    }
    a.out = p.out;
    a.out_dt = static_cast<int32_t>(p.out_dtype);
    a.n = p.n;
    a.divisor = p.divisor;
    a.divisor_lo = p.divisor_lo;
    a.accumulate = p.accumulate;
    a.first = g0 == 0;
    a.last = g0 + kMaxInputs >= K;
    a.compensated = compensated;
    a.part_s = part;
    a.part_c = part != nullptr && compensated ? part + p.n : nullptr;
    launch_group(a, device, stream);
  }
  if (part != nullptr) FS_CUDA_CHECK(cudaFreeAsync(part, stream));
  return Status::Ok();
}

Status multi_dot(const MultiDotParams& p, int device, uintptr_t stream_handle) {
  Status st = check_multi_dot(p);
  if (!st.ok) return st;
  const int64_t K = p.num_inputs;
  for (int64_t k = 0; k < K; ++k) p.out[k] = 0.0;
  if (K == 0 || p.n == 0) return Status::Ok();
  DeviceGuard guard(device);
  cudaStream_t stream = as_stream(stream_handle);
  const int64_t nchunks = (p.n + kChunk - 1) / kChunk;
  double* partial = nullptr;
  double* dout = nullptr;
  const int64_t group = std::min<int64_t>(K, kMaxInputs);
  FS_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&partial), static_cast<size_t>(nchunks * group) * sizeof(double), stream));
  FS_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&dout), static_cast<size_t>(K) * sizeof(double), stream));
  // Groups of kMaxInputs, each through the partials (stride: the group's inputs) and their sums.
  for (int64_t g0 = 0; g0 < K; g0 += kMaxInputs) {
    const int64_t k = std::min<int64_t>(kMaxInputs, K - g0);
    launch_dot_partials(p.inputs + g0, p.input_dtypes + g0, k, p.g, p.g_dtype, p.n, partial, k, device, stream);
    launch_dot_finish(partial, nchunks, k, k, dout + g0, stream);
  }
  FS_CUDA_CHECK(cudaMemcpyAsync(p.out, dout, static_cast<size_t>(K) * sizeof(double), cudaMemcpyDeviceToHost, stream));
  FS_CUDA_CHECK(cudaFreeAsync(partial, stream));
  FS_CUDA_CHECK(cudaFreeAsync(dout, stream));
  FS_CUDA_CHECK(cudaStreamSynchronize(stream));
  return Status::Ok();
}

Status gram(const GramParams& p, int device, uintptr_t stream_handle) {
  Status st = check_gram(p);
  if (!st.ok) return st;
  const int64_t K = p.num_inputs;
  std::vector<double> row(static_cast<size_t>(K));
  for (int64_t a = 0; a < K; ++a) {
    MultiDotParams m;
    m.inputs = p.inputs;
    m.input_dtypes = p.input_dtypes;
    m.num_inputs = K;
    m.g = p.inputs[a];
    m.g_dtype = p.input_dtypes[a];
    m.n = p.n;
    m.out = row.data();
    st = multi_dot(m, device, stream_handle);
    if (!st.ok) return st;
    for (int64_t b = 0; b < K; ++b) p.out[a * K + b] = row[static_cast<size_t>(b)];
  }
  // Symmetric by construction up to the order of the two factors in each product: make it exact.
  for (int64_t a = 0; a < K; ++a)
    for (int64_t b = a + 1; b < K; ++b) p.out[b * K + a] = p.out[a * K + b];
  return Status::Ok();
}

}  // namespace cuda
}  // namespace fastsoup
