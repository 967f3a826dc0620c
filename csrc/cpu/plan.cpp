// The merge plan's checks and the step planner (plan.h), shared by the CPU executor and the CUDA
// pipeline: host code only, compiled once into fastsoup_native.
#include "fastsoup/plan.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

namespace fastsoup {

namespace {

[[noreturn]] void bad(const char* op, const std::string& m) { throw std::invalid_argument(std::string(op) + ": " + m); }

std::string dtype_code_error(int code) {
  return "dtype code " + std::to_string(code) + ", expected 0 (float16), 1 (bfloat16), 2 (float32) or 3 (float64)";
}

int64_t align_up(int64_t x, int64_t a) { return a > 1 ? (x + a - 1) / a * a : x; }

}  // namespace

MergePlan::MergePlan(int64_t num_inputs, std::vector<MergeSegment> segments, std::vector<uintptr_t> in_addr,
                     std::vector<int32_t> in_dtype, std::vector<int32_t> in_loc)
    : k_(num_inputs),
      segments_(std::move(segments)),
      in_addr_(std::move(in_addr)),
      in_dtype_(std::move(in_dtype)),
      in_loc_(std::move(in_loc)) {
  const char* op = "MergePlan";
  const int64_t K = k_;
  if (K < 0) bad(op, "num_inputs must be >= 0");
  const size_t S = segments_.size();
  const size_t SK = S * static_cast<size_t>(K);
  if (in_addr_.size() != SK || in_dtype_.size() != SK || in_loc_.size() != SK)
    bad(op, "in_addr, in_dtype and in_loc must have segments * num_inputs = " + std::to_string(S) + " * " +
                std::to_string(K) + " entries, got " + std::to_string(in_addr_.size()) + ", " +
                std::to_string(in_dtype_.size()) + " and " + std::to_string(in_loc_.size()));
  for (size_t s = 0; s < S; ++s) {
    const MergeSegment& g = segments_[s];
    const std::string where = "segment " + std::to_string(s) + ": ";
    const int kind = static_cast<int>(g.kind);
    if (kind != 0 && kind != 1) bad(op, where + "kind must be 0 (weighted sum) or 1 (copy), got " + std::to_string(kind));
    if (g.n < 0) bad(op, where + "n must be >= 0");
    if (g.out_file < -1) bad(op, where + "out_file must be -1 (an address) or a file index >= 0");
    if (g.out_file == -1 && g.out_offset == 0 && g.n > 0) bad(op, where + "null output address");
    if (g.out_file >= 0 && g.out_offset < 0) bad(op, where + "negative offset in the output file");
    const bool copy = g.kind == SegmentKind::kCopy;
    if (!copy && !valid_dtype_code(static_cast<int>(g.out_dtype)))
      bad(op, where + "output has " + dtype_code_error(static_cast<int>(g.out_dtype)));
    if (copy && K < 1) bad(op, where + "a copy needs an input");
    for (int64_t k = 0; k < K; ++k) {
      const size_t i = at(s, k);
      const std::string in = where + "input " + std::to_string(k);
      if (in_loc_[i] < 0 || in_loc_[i] > static_cast<int32_t>(InputLocation::kDevice))
        bad(op, in + " has location " + std::to_string(in_loc_[i]) + ", expected 0 (host), 1 (file mapping) or 2 (device)");
      if (copy && k > 0) continue;  // a copy reads input 0 only
      if (!copy && !valid_dtype_code(in_dtype_[i])) bad(op, in + " has " + dtype_code_error(in_dtype_[i]));
      if (g.n > 0 && in_addr_[i] == 0) bad(op, in + " is a null address");
      if (in_loc_[i] == static_cast<int32_t>(InputLocation::kDevice) && device_input_ < 0)
        device_input_ = static_cast<int64_t>(s);
    }
    max_out_file_ = std::max(max_out_file_, g.out_file);
    if (not_accumulable_ < 0 && (copy || g.out_file != -1 || g.out_dtype != DType::kFloat32))
      not_accumulable_ = static_cast<int64_t>(s);
  }
}

std::vector<const void*> MergePlan::mapped_inputs() const {
  std::vector<const void*> r;
  for (size_t i = 0; i < in_addr_.size(); ++i)
    if (in_loc_[i] == static_cast<int32_t>(InputLocation::kMapped)) r.push_back(reinterpret_cast<const void*>(in_addr_[i]));
  return r;
}

std::string MergeRun::fd_name(int32_t f) const {
  const size_t i = static_cast<size_t>(f);
  return f >= 0 && i < fd_names.size() ? fd_names[i] : std::string("output file");
}

void MergeRun::check(const MergePlan& plan, bool device, const char* op) const {
  const int64_t K = plan.num_inputs();
  const size_t S = plan.num_segments();
  if (static_cast<int64_t>(weights.size()) != K && weights.size() != S * static_cast<size_t>(K))
    bad(op, "got " + std::to_string(weights.size()) + " weights, expected " + std::to_string(K) + " (num_inputs), or " +
                std::to_string(K) + " per segment (" + std::to_string(S * static_cast<size_t>(K)) + ")");
  if (static_cast<int64_t>(fds.size()) <= plan.max_out_file_)
    bad(op, "the plan writes output file " + std::to_string(plan.max_out_file_) + " but got " +
                std::to_string(fds.size()) + " fds");
  if (!fd_names.empty() && fd_names.size() != fds.size()) bad(op, "fd_names must be empty or name every output file");
  if (!device && plan.device_input_ >= 0)
    bad(op, "segment " + std::to_string(plan.device_input_) +
                " has a device input, which a CPU run cannot read (run it on that CUDA device)");
  if (!std::isfinite(divisor) || divisor == 0.0 || !std::isfinite(divisor_lo))
    bad(op, "divisor must be finite and nonzero");
  if (accumulate) {
    if (plan.not_accumulable_ >= 0)
      bad(op, "segment " + std::to_string(plan.not_accumulable_) + ": accumulate needs weighted sums into float32 " +
                  (device ? "device " : "") + "memory");
    if (divisor != 1.0 || divisor_lo != 0.0) bad(op, "accumulate=True needs divisor 1");
  }
}

void CpuMergeOptions::check(const char* op) const {
  if (threads < 0) bad(op, "threads must be >= 0 (0 = all cores)");
  if (window_bytes <= 0) bad(op, "window_bytes must be > 0");
  // A step writes at least one element into a staging buffer: the widest is a float64.
  if (buffer_bytes < 8) bad(op, "buffer_bytes must be >= 8 (one float64 element)");
  if (nbuffers < 2) bad(op, "nbuffers must be >= 2 (one is filled while another is written)");
  if (prefetch_steps < 0) bad(op, "prefetch_steps must be >= 0");
}

void CudaMergeOptions::check(const char* op) const {
  if (device < 0) bad(op, "device must be >= 0");
  if (slot_bytes < 256) bad(op, "slot_bytes must be >= 256");
  if (nslots < 2) bad(op, "nslots must be >= 2 (one is filled while another is copied and summed)");
  if (fill_threads < 0) bad(op, "fill_threads must be >= 0 (0 = all cores)");
}

StepRule cpu_step_rule(const CpuMergeOptions& o) {
  StepRule r;
  r.in_bytes = o.window_bytes;
  r.align = 0;
  r.no_input_elems = o.window_bytes;
  r.min_elems = 4096;
  r.out_bytes = o.buffer_bytes;
  r.copy_bytes = std::min(o.window_bytes, o.buffer_bytes);
  r.granule = 4096;
  r.min_step = 1;
  return r;
}

StepRule cuda_step_rule(const CudaMergeOptions& o) {
  StepRule r;
  r.in_bytes = o.slot_bytes;
  r.align = 256;
  r.no_input_elems = int64_t(1) << 40;
  r.min_elems = 0;
  r.out_bytes = o.slot_bytes;
  r.copy_bytes = o.slot_bytes;
  r.granule = 64;
  r.min_step = 64;
  return r;
}

StepPlan plan_steps(const MergePlan& p, const StepRule& rule) {
  const int64_t K = p.num_inputs();
  const int64_t kDevice = static_cast<int64_t>(InputLocation::kDevice);
  StepPlan r;
  for (size_t s = 0; s < p.num_segments(); ++s) {
    const MergeSegment& g = p.segment(s);
    if (g.n == 0) continue;
    const bool copy = g.kind == SegmentKind::kCopy;
    int64_t per;
    int64_t staged_unit = 0;  // staged input bytes per element
    if (copy) {
      per = rule.copy_bytes;
      if (static_cast<int64_t>(p.input_location(s, 0)) != kDevice) staged_unit = 1;
    } else {
      for (int64_t k = 0; k < K; ++k)
        if (static_cast<int64_t>(p.input_location(s, k)) != kDevice)
          staged_unit += static_cast<int64_t>(itemsize(p.input_dtype(s, k)));
      const int64_t room = rule.in_bytes - (K + 1) * rule.align;
      per = staged_unit > 0 ? room / staged_unit : rule.no_input_elems;
      per = std::max(per, rule.min_elems);
      if (g.out_file >= 0) per = std::min<int64_t>(per, rule.out_bytes / static_cast<int64_t>(itemsize(g.out_dtype)));
      per = std::max(per / rule.granule * rule.granule, rule.min_step);
    }
    const int64_t out_unit = copy ? 1 : static_cast<int64_t>(itemsize(g.out_dtype));
    for (int64_t b = 0; b < g.n; b += per) {
      const int64_t c = std::min(per, g.n - b);
      r.steps.push_back({s, b, c});
      if (g.out_file >= 0) r.max_out_bytes = std::max(r.max_out_bytes, c * out_unit);
      int64_t staged = 0;
      if (copy) {
        staged = staged_unit * c;
      } else {
        for (int64_t k = 0; k < K; ++k)
          if (static_cast<int64_t>(p.input_location(s, k)) != kDevice)
            staged = align_up(staged + c * static_cast<int64_t>(itemsize(p.input_dtype(s, k))), rule.align);
      }
      r.max_in_bytes = std::max(r.max_in_bytes, staged);
    }
  }
  return r;
}

}  // namespace fastsoup
