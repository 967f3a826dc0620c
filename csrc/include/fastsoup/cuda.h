// The CUDA backend's host API. Plain C++ (no CUDA types, streams are passed as integers), so the
// bindings compile with the host compiler; the implementations are in csrc/cuda/*.cu.
//
// Numerics are the CPU kernels' (kernels.h): weighted_sum gives the same bits (the same binary64
// steps from dtype.h, the plain or the compensated mode, one rounding to the output type);
// multi_dot sums binary32 products in a fixed tree per block and block partials in binary64 in a
// fixed order, so results are bit-identical run to run (and within rounding of the CPU's).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fastsoup/dtype.h"
#include "fastsoup/io.h"
#include "fastsoup/kernels.h"
#include "fastsoup/plan.h"
#include "fastsoup/sparse.h"

namespace fastsoup {
namespace cuda {

// Inputs per kernel launch (their pointers, dtypes and weights travel by value in the launch).
constexpr int kMaxInputs = 16;

// multi_dot's unit: one block sums g[i] * in_k[i] over kDotChunk elements in a fixed binary32 tree.
constexpr int64_t kDotChunk = 4096;

// Devices present (0 when the driver or a device is missing: the CPU path keeps working).
int device_count();
std::string device_name(int device);

// Where a pointer lives, for the boundary checks: 0 host/unknown, 1 device memory of `device`.
bool is_device_pointer(const void* p, int device);

// out = round(sum_k w_k * in_k / divisor) on `device`, launched on `stream` (a cudaStream_t as an integer;
// 0 is the legacy default stream). Inputs and out are device pointers. Any K: for K > kMaxInputs
// the running sum stays in binary64 between groups of kMaxInputs, in a temporary allocated and
// freed on the stream. Returns after the launch (asynchronous).
Status weighted_sum(const WeightedSumParams& p, int device, uintptr_t stream);

// K dot products with g, on the device; waits for the result (synchronizes `stream`).
Status multi_dot(const MultiDotParams& p, int device, uintptr_t stream);

// The K x K Gram matrix (K multi_dot passes over the inputs).
Status gram(const GramParams& p, int device, uintptr_t stream);

// sparse_merge_cpu's merge of one tensor (sparse.h), bit for bit, on `device`, launched on `stream`;
// synchronizes it before returning. Inputs, base and out may be device or host memory (host
// tensors are copied in; model by model, so GPU memory is the base, one model's tensor, one float64
// array of n (three for the TIES-like methods), a 2^16-bin histogram and 8 bytes per 4096 elements
// per model, whatever K). The implementation and its passes: csrc/cuda/sparse.cu.
Status sparse_merge(const SparseMergeParams& p, int device, uintptr_t stream);

// Runs a merge plan (plan.h) through the GPU, on options.device and options.stream. Inputs: device
// memory is used in place; host inputs (memory or file mappings) go through a ring of pinned slots:
// CPU threads fill slot j+1 while slot j is copied (copy stream) and slot j-1 is summed (`stream`),
// with events between them. Outputs: out_file -1 is a device address (the result stays on the
// GPU); otherwise a file, written through pinned memory by pwrite. GPU memory used: the ring,
// whatever K and the model size. Checks `run` and `options` first (the same checks as the CPU's, in
// plan.h, device inputs allowed); synchronizes `stream` before returning. Merges are serialized
// (one ring).
void run_merge(const MergePlan& plan, const MergeRun& run, const CudaMergeOptions& options,
               const MergeProgress& progress);

// One tensor of a streamed gradient pass (run_dots): K inputs of n elements, each in host memory,
// a guarded file mapping or device memory of options.device (as a merge plan's inputs), and g, n
// elements in device memory.
struct DotTensor {
  std::vector<const void*> inputs;
  std::vector<DType> dtypes;
  std::vector<InputLocation> locations;
  const void* g = nullptr;
  DType g_dtype = DType::kFloat32;
  int64_t n = 0;
};

// out[t][k] = <g_t, inputs_t[k]> for every tensor t: a learned soup's dL/dalpha on the GPU, the
// inputs streamed as run_merge streams them. Host inputs go through the merge ring (the same
// pinned slots, serialized with the merges): pieces of whole kDotChunk-element chunks of all K
// host inputs of a tensor fill a slot (mapped pages are released after they are read), are copied
// on the copy stream and multiplied with g's piece on `stream`; device inputs are read in place.
// The partials of every chunk land at their place and are summed once per tensor, so the results
// are exactly multi_dot's (the device-memory one) bits. GPU memory: the ring, plus K doubles per
// kDotChunk elements of the largest tensor; never a copy of an input. Synchronizes `stream`.
// Throws std::invalid_argument for bad arguments, InputFault when a mapped input faulted.
std::vector<std::vector<double>> run_dots(const std::vector<DotTensor>& tensors, const CudaMergeOptions& options);

// Frees the ring's pinned and device memory now (it is kept between merges, and otherwise until
// the process exits; the next merge allocates it again). Waits for a merge in progress. Returns
// the bytes freed (0 when there was no ring).
int64_t release_buffers();

}  // namespace cuda
}  // namespace fastsoup
