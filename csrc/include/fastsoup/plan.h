// The merge plan: a list of output segments, each computed from K inputs and written to memory or to
// a file, in order, with bounded memory. Plain host C++ shared by the CPU executor (csrc/cpu/merge.cpp)
// and the CUDA pipeline (csrc/cuda/merge.cu): the plan is checked here once, when it is built, each
// run's arguments are checked here against it, and both executors cut it into steps with the one
// planner below (csrc/cpu/plan.cpp), so the two cannot drift apart.
//
// A plan is immutable and runs any number of times, with new weights each time (a greedy search's
// candidates, a learned soup's steps): construction does the per-segment checks, a run only the few
// checks of its own arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "fastsoup/dtype.h"

namespace fastsoup {

enum class SegmentKind : int32_t {
  kWeightedSum = 0,  // out = cast(sum_k w_k * in_k / divisor), n elements
  kCopy = 1,         // out = bytes of input 0, n bytes (tensors that are not averaged)
};

// Where an input's bytes are.
enum class InputLocation : uint8_t {
  kHost = 0,    // host memory (a tensor, a pinned buffer)
  kMapped = 1,  // a range of a guarded file mapping (MappedFile, FaultGuard): advised, its faults watched
  kDevice = 2,  // memory of the CUDA device the plan runs on (CUDA runs only; used in place)
};

struct MergeSegment {
  int64_t n = 0;  // elements (kWeightedSum) or bytes (kCopy)
  SegmentKind kind = SegmentKind::kWeightedSum;
  int32_t out_file = -1;   // -1: out_offset is an address (host, or device on CUDA); else an index into the run's fds
  int64_t out_offset = 0;  // that address, or a byte offset in that file
  DType out_dtype = DType::kFloat32;  // weighted sums (ignored for copies)
};

class MergePlan {
 public:
  // S segments and, segment-major (S * num_inputs entries each), every input's address, dtype code
  // (ignored for copies, whose input is input 0) and InputLocation code. Checks all of it here:
  // throws std::invalid_argument("MergePlan: segment 3: input 1 ...") for the first problem.
  MergePlan(int64_t num_inputs, std::vector<MergeSegment> segments, std::vector<uintptr_t> in_addr,
            std::vector<int32_t> in_dtype, std::vector<int32_t> in_loc);

  int64_t num_inputs() const { return k_; }
  size_t num_segments() const { return segments_.size(); }
  const MergeSegment& segment(size_t s) const { return segments_[s]; }
  const void* input(size_t s, int64_t k) const { return reinterpret_cast<const void*>(in_addr_[at(s, k)]); }
  DType input_dtype(size_t s, int64_t k) const { return static_cast<DType>(in_dtype_[at(s, k)]); }
  InputLocation input_location(size_t s, int64_t k) const { return static_cast<InputLocation>(in_loc_[at(s, k)]); }
  // The inputs that are file mappings (for a FaultWatch).
  std::vector<const void*> mapped_inputs() const;

 private:
  friend struct MergeRun;
  size_t at(size_t s, int64_t k) const { return s * static_cast<size_t>(k_) + static_cast<size_t>(k); }

  int64_t k_;
  std::vector<MergeSegment> segments_;
  std::vector<uintptr_t> in_addr_;
  std::vector<int32_t> in_dtype_;
  std::vector<int32_t> in_loc_;
  // Facts the checks of a run need, found once by the constructor:
  int32_t max_out_file_ = -1;        // the largest output file index (-1: every output is memory)
  int64_t not_accumulable_ = -1;     // the first segment that is not a weighted sum into float32 memory
  int64_t device_input_ = -1;        // the first segment with a device input
};

// What one run takes besides the plan, on either backend.
struct MergeRun {
  std::vector<double> weights;         // K (every segment), or segments * K (segment-major, each its own)
  std::vector<int> fds;                // output files (opened for writing), indexed by MergeSegment::out_file
  std::vector<std::string> fd_names;   // their paths, for error messages (empty, or one per fd)
  bool accumulate = false;             // out += sum: float32 memory outputs, weighted sums, divisor 1
  double divisor = 1.0;                // weighted sums: out = round(sum_k w_k in_k / divisor)
  double divisor_lo = 0.0;             // its low part (kernels.h, WeightedSumParams)

  // The K weights of segment s.
  const double* weights_of(const MergePlan& plan, size_t s) const {
    return weights.data() + (static_cast<int64_t>(weights.size()) == plan.num_inputs() ? 0 : plan.at(s, 0));
  }
  // The name of output file f for error messages.
  std::string fd_name(int32_t f) const;
  // Checks this run against `plan` on a backend (`device`: CUDA, where device inputs are allowed);
  // `op` names the entry point in the message. Throws std::invalid_argument.
  void check(const MergePlan& plan, bool device, const char* op) const;
};

// Called after each step with the input bytes consumed and the output bytes produced so far; it may
// throw to abort the merge (the binding checks for Ctrl-C here).
using MergeProgress = std::function<void(int64_t bytes_in, int64_t bytes_out)>;

// The CPU executor's knobs (see csrc/cpu/merge.cpp).
struct CpuMergeOptions {
  int threads = 0;                    // compute threads, 0 = all
  int64_t window_bytes = 64ll << 20;  // input bytes per step (all K inputs together): bounds resident memory
  int64_t buffer_bytes = 16ll << 20;  // one staging buffer of file output (at least one float64 element)
  int nbuffers = 4;                   // staging buffers in the writer's ring (>= 2: one fills while one is written)
  int prefetch_steps = 2;             // steps whose input is requested ahead (MADV_WILLNEED)
  bool release = true;                // MADV_DONTNEED the input of each finished step
  void check(const char* op) const;   // throws std::invalid_argument
};

// The CUDA pipeline's knobs (see fastsoup/cuda.h).
struct CudaMergeOptions {
  int device = 0;
  uintptr_t stream = 0;             // a cudaStream_t as an integer (0: the legacy default stream)
  int64_t slot_bytes = 32ll << 20;  // host input bytes per step (all host inputs together), >= 256
  int nslots = 3;                   // pinned slots (>= 2: fill j+1 while j is copied and summed)
  int fill_threads = 0;             // CPU threads filling the pinned slots (0: all)
  void check(const char* op) const;  // throws std::invalid_argument
};

// Runs `plan` on the CPU (checks `run` against it first). Throws std::invalid_argument for bad
// arguments, OsError for I/O, InputFault when an input faulted (see FaultGuard) during the merge.
void run_merge(const MergePlan& plan, const MergeRun& run, const CpuMergeOptions& options,
               const MergeProgress& progress);

// ---------------------------------------------------------------------------------------------
// The step planner: every segment is cut into steps of a bounded number of input and output bytes.
// One planner, two rules: the CPU executor bounds the input a step maps (window_bytes) and the
// output it stages (buffer_bytes); the CUDA pipeline bounds what one pinned slot holds.

struct Step {
  size_t segment;
  int64_t begin;  // element (or byte, for a copy) offset within the segment
  int64_t count;  // elements (or bytes)
};

struct StepRule {
  int64_t in_bytes = 0;        // bytes of the staged inputs of one step, all together (device inputs are not staged)
  int64_t align = 0;           // each staged input starts at a multiple of this many bytes (0: packed); the
                               // room for that padding, (K + 1) * align, is kept out of in_bytes
  int64_t no_input_elems = 0;  // elements per step of a weighted sum with nothing staged
  int64_t min_elems = 0;       // a weighted-sum step is at least this many elements (before the file-output bound)
  int64_t out_bytes = 0;       // bytes of one step's output into a file
  int64_t copy_bytes = 0;      // bytes per step of a copy
  int64_t granule = 1;         // weighted-sum steps are whole multiples of this many elements ...
  int64_t min_step = 1;        // ... and at least this many
};

// The CPU executor's rule: steps of about window_bytes of input (at least 4096 elements: fewer cost
// more in dispatch to the thread pool than they save in resident memory), whole 4096-element
// multiples (whole kernel blocks), and at most one staging buffer of file output.
StepRule cpu_step_rule(const CpuMergeOptions& o);
// The CUDA pipeline's rule: the host inputs of a step fill at most one slot, each at a 256-byte
// aligned offset (the kernel's 16-byte loads; DMA), in whole 64-element groups; a file output step
// holds at most slot_bytes; all-device inputs are not staged (one step per 2^40 elements).
StepRule cuda_step_rule(const CudaMergeOptions& o);

struct StepPlan {
  std::vector<Step> steps;  // in output order; empty segments have none
  int64_t max_in_bytes = 0;   // the most staged input bytes of a step (aligned as the rule says)
  int64_t max_out_bytes = 0;  // the most output bytes of a step into a file
};
StepPlan plan_steps(const MergePlan& plan, const StepRule& rule);

}  // namespace fastsoup
