// Files: read-only mappings the kernels read from, and the streaming merge executor that writes
// results with pwrite from reused buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastsoup/dtype.h"

namespace fastsoup {

// An operating-system error: errno plus the file it concerns (becomes Python's OSError).
struct OsError : std::runtime_error {
  OsError(int err, std::string what, std::string path)
      : std::runtime_error(std::move(what)), err(err), path(std::move(path)) {}
  int err;
  std::string path;
};

enum class Advice : int { kNormal = 0, kSequential = 1, kWillNeed = 2, kDontNeed = 3 };

// madvise over [addr, addr+len) widened to whole pages. Only for ranges of file mappings: on
// anonymous memory kDontNeed would discard data. Failures are ignored (advice is a hint).
void advise_range(const void* addr, size_t len, Advice advice);

// A whole file mapped read-only and shared: page-cache pages, no copy. Empty files map nothing.
class MappedFile {
 public:
  explicit MappedFile(std::string path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(base_); }
  size_t size() const { return size_; }
  // Advice over a byte range of the file (checked against its size).
  void advise(size_t offset, size_t length, Advice advice) const;

 private:
  std::string path_;
  void* base_ = nullptr;
  size_t size_ = 0;
};

// Writes all n bytes at offset (retrying short writes and EINTR); throws OsError.
void pwrite_all(int fd, const void* buf, size_t n, int64_t offset, const std::string& what);

// ---------------------------------------------------------------------------------------------
// The merge executor: a list of output segments, each computed from K inputs and written to
// memory or to a file, in order, with bounded memory.

enum class SegmentKind : int32_t {
  kWeightedSum = 0,  // out = cast(sum_k w_k * in_k), n elements
  kCopy = 1,         // out = bytes of input 0, n bytes (tensors that are not averaged)
};

struct MergeSegment {
  int64_t n = 0;           // elements (kWeightedSum) or bytes (kCopy)
  SegmentKind kind = SegmentKind::kWeightedSum;
  int32_t out_file = -1;   // -1: out_offset is an address; else an index into MergePlan::fds
  int64_t out_offset = 0;  // address, or byte offset in that file
  DType out_dtype = DType::kFloat32;
};

struct MergePlan {
  int64_t num_inputs = 0;                 // K
  std::vector<double> weights;            // K (all segments), or segments.size() * K (segment-major)
  double divisor = 1.0;                   // weighted sums: out = round(sum_k w_k in_k / divisor)
  double divisor_lo = 0.0;                // its low part (kernels.h, WeightedSumParams)
  std::vector<MergeSegment> segments;     // in output order
  std::vector<uintptr_t> in_addr;         // segments.size() * K, segment-major
  std::vector<int32_t> in_dtype;          // segments.size() * K (ignored for kCopy)
  std::vector<uint8_t> in_mapped;         // segments.size() * K: a range of a MappedFile (may be advised)
  std::vector<int> fds;                   // output files, opened for writing
  int threads = 0;                        // compute threads, 0 = all
  int64_t window_bytes = 64ll << 20;      // input bytes per step (all K inputs together)
  int64_t buffer_bytes = 16ll << 20;      // one staging buffer for file output
  int nbuffers = 4;                       // staging buffers in the ring
  int prefetch_steps = 2;                 // steps whose input is requested ahead (MADV_WILLNEED)
  bool release = true;                    // MADV_DONTNEED the input of each finished step
  bool accumulate = false;                // out += sum (float32 memory outputs, weighted sums only)
};

// Called after each step with the input bytes consumed and the output bytes produced so far;
// it may throw to abort the merge.
using MergeProgress = std::function<void(int64_t bytes_in, int64_t bytes_out)>;

// Checks the plan, then runs it. Throws std::invalid_argument for a bad plan, OsError for I/O.
void run_merge(const MergePlan& plan, const MergeProgress& progress);

}  // namespace fastsoup
