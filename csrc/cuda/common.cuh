// Shared by the CUDA sources: error checks that become C++ exceptions (Python RuntimeError), the
// device guard, launch sizing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastsoup/dtype.h"

namespace fastsoup {
namespace cuda {

[[noreturn]] inline void fail(const char* call, cudaError_t err, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error in ") + call + ": " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ") at " + file + ":" + std::to_string(line));
}

#define FS_CUDA_CHECK(call)                                                   \
  do {                                                                        \
    cudaError_t fs_err_ = (call);                                             \
    if (fs_err_ != cudaSuccess) ::fastsoup::cuda::fail(#call, fs_err_, __FILE__, __LINE__); \
  } while (0)

// Makes `device` current for a scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FS_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) FS_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Blocks for a grid-stride loop over `work` items: enough to fill the device, no more.
int grid_size(int device, int64_t work, int threads);

// multi_dot in two launches (kernels.cu), for callers that stream the inputs in pieces (merge.cu's
// run_dots). Partials: for chunk c (kDotChunk elements) of the n elements of g and of the k inputs
// (device pointers), partial[c * stride + j] = the chunk's binary32 tree sum of g[i] * in_j[i], in
// groups of kMaxInputs launches. Finish: out[j] = the binary64 sum of partial[c * stride + j] over
// c < nchunks, in a fixed tree (k blocks). Partials of consecutive pieces of one tensor written at
// their chunks' places give exactly one whole-tensor multi_dot's bits. Both launch on `stream`.
void launch_dot_partials(const void* const* inputs, const DType* dtypes, int64_t k, const void* g, DType g_dtype,
                         int64_t n, double* partial, int64_t stride, int device, cudaStream_t stream);
void launch_dot_finish(const double* partial, int64_t nchunks, int64_t stride, int64_t k, double* out,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsoup
