// Shared by the CUDA sources: error checks that become C++ exceptions (Python RuntimeError), the
// device guard, launch sizing.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

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

}  // namespace cuda
}  // namespace fastsoup
