// C++ tests of the merge plan (ctest): the checks of a plan, of a run and of the backends' options
// (plan.h), the step planner under the CPU and the CUDA rules, and one plan run twice with new
// weights.
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "expect.h"
#include "fastsoup/plan.h"

using namespace fastsoup;

namespace {

// The message of the std::invalid_argument that f throws ("" when it throws none).
template <class F>
std::string refusal(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_REFUSED(stmt, part)                                                                          \
  do {                                                                                                      \
    const std::string m_ = refusal([&] { stmt; });                                                          \
    EXPECT(!m_.empty() && m_.find(part) != std::string::npos, "%s: refused with '%s', expected '%s'", #stmt, \
           m_.c_str(), part);                                                                               \
  } while (0)

#define EXPECT_ACCEPTED(stmt)                                                           \
  do {                                                                                  \
    const std::string m_ = refusal([&] { stmt; });                                      \
    EXPECT(m_.empty(), "%s: refused with '%s', expected no refusal", #stmt, m_.c_str()); \
  } while (0)

constexpr int32_t F16 = static_cast<int32_t>(DType::kFloat16);
constexpr int32_t F32 = static_cast<int32_t>(DType::kFloat32);
constexpr int32_t F64 = static_cast<int32_t>(DType::kFloat64);
constexpr int32_t HOST = 0, MAPPED = 1, DEVICE = 2;

float g_buf[64];  // a valid address for the plans that are only checked, never run
const uintptr_t A = reinterpret_cast<uintptr_t>(g_buf);

MergeSegment seg(int64_t n, int32_t out_file = -1, int64_t out_offset = static_cast<int64_t>(A), int32_t out_dtype = F32,
                 SegmentKind kind = SegmentKind::kWeightedSum) {
  MergeSegment g;
  g.n = n;
  g.kind = kind;
  g.out_file = out_file;
  g.out_offset = out_offset;
  g.out_dtype = static_cast<DType>(out_dtype);
  return g;
}

// K inputs per segment, all at A, of one dtype and location.
MergePlan plan_of(int64_t K, const std::vector<MergeSegment>& segs, int32_t dtype = F32, int32_t loc = HOST) {
  const size_t SK = segs.size() * static_cast<size_t>(K);
  return MergePlan(K, segs, std::vector<uintptr_t>(SK, A), std::vector<int32_t>(SK, dtype),
                   std::vector<int32_t>(SK, loc));
}

void test_plan_refusals() {
  EXPECT_REFUSED(plan_of(-1, {}), "MergePlan: num_inputs must be >= 0");
  EXPECT_REFUSED(MergePlan(2, {seg(4)}, {A}, {F32}, {HOST}), "segments * num_inputs = 1 * 2 entries, got 1, 1 and 1");
  EXPECT_REFUSED(MergePlan(1, {seg(4)}, {A}, {F32, F32}, {HOST}), "segments * num_inputs");
  EXPECT_REFUSED(MergePlan(1, {seg(4)}, {A}, {F32}, {}), "segments * num_inputs");
  EXPECT_REFUSED(plan_of(1, {seg(4), seg(4, -1, A, F32, static_cast<SegmentKind>(2))}),
                 "MergePlan: segment 1: kind must be 0 (weighted sum) or 1 (copy), got 2");
  EXPECT_REFUSED(plan_of(1, {seg(-1)}), "segment 0: n must be >= 0");
  EXPECT_REFUSED(plan_of(1, {seg(4, -2)}), "segment 0: out_file must be -1");
  EXPECT_REFUSED(plan_of(1, {seg(4, -1, 0)}), "segment 0: null output address");
  EXPECT_REFUSED(plan_of(1, {seg(4, 0, -8)}), "segment 0: negative offset in the output file");
  EXPECT_REFUSED(plan_of(1, {seg(4, -1, A, 9)}), "segment 0: output has dtype code 9, expected 0 (float16)");
  EXPECT_REFUSED(MergePlan(2, {seg(4), seg(4)}, {A, A, A, A}, {F32, F32, F32, 7}, {HOST, HOST, HOST, HOST}),
                 "MergePlan: segment 1: input 1 has dtype code 7");
  EXPECT_REFUSED(MergePlan(2, {seg(4)}, {A, 0}, {F32, F32}, {HOST, HOST}), "segment 0: input 1 is a null address");
  EXPECT_REFUSED(MergePlan(2, {seg(4)}, {A, A}, {F32, F32}, {HOST, 3}),
                 "segment 0: input 1 has location 3, expected 0 (host), 1 (file mapping) or 2 (device)");
  EXPECT_REFUSED(MergePlan(1, {seg(4)}, {A}, {F32}, {-1}), "input 0 has location -1");
  EXPECT_REFUSED(plan_of(0, {seg(4, -1, A, F32, SegmentKind::kCopy)}), "segment 0: a copy needs an input");
  EXPECT_REFUSED(MergePlan(1, {seg(4, -1, A, F32, SegmentKind::kCopy)}, {0}, {F32}, {HOST}), "input 0 is a null address");
  // The inputs a copy does not read (1 ..) are not checked, nor its dtypes; nor the addresses of
  // an empty segment (it reads and writes nothing).
  EXPECT_ACCEPTED(MergePlan(2, {seg(4, -1, A, 77, SegmentKind::kCopy)}, {A, 0}, {55, 66}, {MAPPED, HOST}));
  EXPECT_ACCEPTED(MergePlan(2, {seg(0, -1, 0)}, {0, 0}, {F16, F64}, {HOST, DEVICE}));
  EXPECT_ACCEPTED(plan_of(0, {seg(4)}));  // K = 0: zeros
  EXPECT_ACCEPTED(plan_of(3, {}));        // no segment: nothing to do
  // A location is checked on every input, read or not.
  EXPECT_REFUSED(MergePlan(2, {seg(4, -1, A, F32, SegmentKind::kCopy)}, {A, 0}, {F32, F32}, {HOST, 5}), "has location 5");
}

void test_run_refusals() {
  const MergePlan p = plan_of(2, {seg(4), seg(4, 0, 0)});
  MergeRun r;
  r.weights = {1.0, 1.0};
  r.fds = {3};
  EXPECT_ACCEPTED(r.check(p, false, "run"));
  r.weights = {1.0, 2.0, 3.0, 4.0};  // K per segment
  EXPECT_ACCEPTED(r.check(p, false, "run"));
  r.weights = {1.0, 2.0, 3.0};
  EXPECT_REFUSED(r.check(p, false, "run"), "run: got 3 weights, expected 2 (num_inputs), or 2 per segment (4)");
  r.weights = {1.0, 1.0};
  r.fds = {};
  EXPECT_REFUSED(r.check(p, false, "run"), "run: the plan writes output file 0 but got 0 fds");
  r.fds = {3};
  r.fd_names = {"a", "b"};
  EXPECT_REFUSED(r.check(p, false, "run"), "fd_names must be empty or name every output file");
  r.fd_names = {"a"};
  EXPECT(r.fd_name(0) == "a" && r.fd_name(1) == "output file", "fd_name");
  for (double d : {0.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
    r.divisor = d;
    EXPECT_REFUSED(r.check(p, false, "run"), "divisor must be finite and nonzero");
  }
  r.divisor = 3.0;
  r.divisor_lo = std::nan("");
  EXPECT_REFUSED(r.check(p, false, "run"), "divisor must be finite and nonzero");
  r.divisor_lo = 0.0;
  // accumulate: weighted sums into float32 memory only, divisor 1.
  r.accumulate = true;
  EXPECT_REFUSED(r.check(p, false, "run"), "segment 1: accumulate needs weighted sums into float32 memory");
  EXPECT_REFUSED(r.check(p, true, "run_cuda"), "segment 1: accumulate needs weighted sums into float32 device memory");
  const MergePlan acc = plan_of(2, {seg(4), seg(8)});
  EXPECT_REFUSED(r.check(acc, false, "run"), "accumulate=True needs divisor 1");
  r.divisor = 1.0;
  EXPECT_ACCEPTED(r.check(acc, false, "run"));
  EXPECT_REFUSED(r.check(plan_of(2, {seg(4, -1, A, F16)}), false, "run"), "segment 0: accumulate");
  EXPECT_REFUSED(r.check(plan_of(2, {seg(4), seg(4, -1, A, F32, SegmentKind::kCopy)}), false, "run"), "segment 1: accumulate");
  r.accumulate = false;
  // Device inputs: CUDA runs only.
  MergeRun one;
  one.weights = {1.0};
  const MergePlan dev = MergePlan(1, {seg(4), seg(4)}, {A, A}, {F32, F32}, {HOST, DEVICE});
  EXPECT_REFUSED(one.check(dev, false, "MergePlan.run"),
                 "MergePlan.run: segment 1 has a device input, which a CPU run cannot read");
  EXPECT_ACCEPTED(one.check(dev, true, "MergePlan.run_cuda"));
}

void test_option_refusals() {
  CpuMergeOptions c;
  EXPECT_ACCEPTED(c.check("run"));
  c.threads = -1;
  EXPECT_REFUSED(c.check("run"), "run: threads must be >= 0");
  c = CpuMergeOptions();
  c.window_bytes = 0;
  EXPECT_REFUSED(c.check("run"), "window_bytes must be > 0");
  c = CpuMergeOptions();
  c.buffer_bytes = 7;
  EXPECT_REFUSED(c.check("run"), "buffer_bytes must be >= 8");
  c = CpuMergeOptions();
  c.nbuffers = 1;
  EXPECT_REFUSED(c.check("run"), "nbuffers must be >= 2");
  c = CpuMergeOptions();
  c.prefetch_steps = -1;
  EXPECT_REFUSED(c.check("run"), "prefetch_steps must be >= 0");

  CudaMergeOptions g;
  EXPECT_ACCEPTED(g.check("run_cuda"));
  g.slot_bytes = 255;
  EXPECT_REFUSED(g.check("run_cuda"), "run_cuda: slot_bytes must be >= 256");
  g = CudaMergeOptions();
  g.nslots = 1;
  EXPECT_REFUSED(g.check("run_cuda"), "nslots must be >= 2");
  g = CudaMergeOptions();
  g.fill_threads = -2;
  EXPECT_REFUSED(g.check("run_cuda"), "fill_threads must be >= 0");
  g = CudaMergeOptions();
  g.device = -1;
  EXPECT_REFUSED(g.check("run_cuda"), "device must be >= 0");
}

// The steps tile every segment exactly, in order; returns the steps of segment s.
std::vector<Step> steps_of(const StepPlan& sp, size_t s) {
  std::vector<Step> r;
  for (const Step& st : sp.steps)
    if (st.segment == s) r.push_back(st);
  return r;
}

bool tiles(const MergePlan& p, const StepPlan& sp) {
  size_t i = 0;
  for (size_t s = 0; s < p.num_segments(); ++s) {
    int64_t at = 0;
    while (i < sp.steps.size() && sp.steps[i].segment == s) {
      if (sp.steps[i].begin != at || sp.steps[i].count <= 0) return false;
      at += sp.steps[i].count;
      ++i;
    }
    if (at != p.segment(s).n) return false;
  }
  return i == sp.steps.size();
}

void test_cpu_steps() {
  CpuMergeOptions o;
  o.window_bytes = 1 << 16;
  o.buffer_bytes = 40000;
  // Two float16 inputs (4 bytes per element): 16384 elements per step; a float32 file output
  // bounds a step by the staging buffer (10000 elements), rounded down to whole 4096: 8192.
  const MergePlan p = plan_of(2, {seg(100000), seg(0), seg(50000, 0, 0), seg(70000, 0, 0, F32, SegmentKind::kCopy)}, F16);
  const StepPlan sp = plan_steps(p, cpu_step_rule(o));
  EXPECT(tiles(p, sp), "the CPU steps do not tile the segments");
  const std::vector<Step> a = steps_of(sp, 0), b = steps_of(sp, 2), c = steps_of(sp, 3);
  EXPECT(a.size() == 7 && a[0].count == 16384 && a[6].count == 100000 - 6 * 16384, "memory output: %zu steps of %lld",
         a.size(), static_cast<long long>(a.empty() ? 0 : a[0].count));
  EXPECT(steps_of(sp, 1).empty(), "an empty segment has steps");
  EXPECT(!b.empty() && b[0].count == 8192, "file output: steps of %lld", static_cast<long long>(b.empty() ? 0 : b[0].count));
  // A copy: min(window, buffer) bytes per step.
  EXPECT(c.size() == 2 && c[0].count == 40000, "copy: %zu steps of %lld", c.size(),
         static_cast<long long>(c.empty() ? 0 : c[0].count));
  EXPECT(sp.max_out_bytes == 40000, "max_out_bytes %lld", static_cast<long long>(sp.max_out_bytes));
  // A tiny window still takes 4096 elements a step; K = 0 takes a window of elements.
  o.window_bytes = 1024;
  const StepPlan tiny = plan_steps(plan_of(8, {seg(10000)}), cpu_step_rule(o));
  EXPECT(tiny.steps.size() == 3 && tiny.steps[0].count == 4096, "tiny window: %zu steps", tiny.steps.size());
  o.window_bytes = 1 << 20;
  const StepPlan none = plan_steps(plan_of(0, {seg(3 << 20)}), cpu_step_rule(o));
  EXPECT(none.steps.size() == 3 && none.steps[0].count == (1 << 20), "K = 0: %zu steps", none.steps.size());
}

void test_cuda_steps() {
  CudaMergeOptions o;
  o.slot_bytes = 1 << 20;
  // Two host float16 inputs and one device float32: only the host ones take slot room, after the
  // room for the alignment padding of K + 1 inputs: (2^20 - 4 * 256) / 4 = 261888 (a multiple of 64).
  const MergePlan p(3, {seg(1000000), seg(600000, 0, 0, F16)}, std::vector<uintptr_t>(6, A), {F16, F16, F32, F16, F16, F32},
                    {HOST, MAPPED, DEVICE, HOST, MAPPED, DEVICE});
  const StepPlan sp = plan_steps(p, cuda_step_rule(o));
  EXPECT(tiles(p, sp), "the CUDA steps do not tile the segments");
  const std::vector<Step> a = steps_of(sp, 0), b = steps_of(sp, 1);
  EXPECT(a.size() == 4 && a[0].count == 261888, "memory output: %zu steps of %lld", a.size(),
         static_cast<long long>(a.empty() ? 0 : a[0].count));
  EXPECT(!b.empty() && b[0].count == 261888 && sp.max_out_bytes == 261888 * 2, "file output: max_out %lld",
         static_cast<long long>(sp.max_out_bytes));
  EXPECT(sp.max_in_bytes == 2 * 261888 * 2 && sp.max_in_bytes <= o.slot_bytes, "max_in_bytes %lld",
         static_cast<long long>(sp.max_in_bytes));
  // Device inputs only: one step for the whole segment.
  const StepPlan dev = plan_steps(plan_of(2, {seg(5000000)}, F32, DEVICE), cuda_step_rule(o));
  EXPECT(dev.steps.size() == 1 && dev.max_in_bytes == 0, "device inputs: %zu steps", dev.steps.size());
  // A slot too small for the minimum step (64 elements of 4 float64 inputs, each padded to 256
  // bytes): max_in_bytes says how much the ring must hold.
  o.slot_bytes = 256;
  const StepPlan small = plan_steps(plan_of(4, {seg(1000)}, F64), cuda_step_rule(o));
  EXPECT(small.steps[0].count == 64 && small.max_in_bytes == 4 * 512, "tiny slot: steps of %lld, max_in %lld",
         static_cast<long long>(small.steps[0].count), static_cast<long long>(small.max_in_bytes));
  // A copy: slot_bytes per step, staged unless it comes from the device.
  o.slot_bytes = 1000;
  const MergePlan cp(1, {seg(2500, -1, A, 0, SegmentKind::kCopy), seg(2500, -1, A, 0, SegmentKind::kCopy)}, {A, A},
                     {0, 0}, {MAPPED, DEVICE});
  const StepPlan csp = plan_steps(cp, cuda_step_rule(o));
  EXPECT(csp.steps.size() == 6 && csp.steps[0].count == 1000 && csp.max_in_bytes == 1000, "copies: %zu steps, max_in %lld",
         csp.steps.size(), static_cast<long long>(csp.max_in_bytes));
}

// Random plans: the steps tile every segment under both rules, stay within the step bounds, and
// the CPU's file-output steps fit one staging buffer.
void test_random_plans_tile() {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t K = static_cast<int64_t>(rng() % 6);
    const size_t S = 1 + rng() % 5;
    std::vector<MergeSegment> segs;
    std::vector<uintptr_t> addr;
    std::vector<int32_t> dt, loc;
    for (size_t s = 0; s < S; ++s) {
      const bool copy = K > 0 && rng() % 4 == 0;
      const int32_t out_file = rng() % 2 ? -1 : 0;
      segs.push_back(seg(static_cast<int64_t>(rng() % 300000), out_file, out_file < 0 ? static_cast<int64_t>(A) : 0,
                         static_cast<int32_t>(rng() % 4), copy ? SegmentKind::kCopy : SegmentKind::kWeightedSum));
      for (int64_t k = 0; k < K; ++k) {
        addr.push_back(A);
        dt.push_back(static_cast<int32_t>(rng() % 4));
        loc.push_back(static_cast<int32_t>(rng() % 3));
      }
    }
    const MergePlan p(K, segs, addr, dt, loc);
    CpuMergeOptions c;
    c.window_bytes = 4096 + static_cast<int64_t>(rng() % (1 << 20));
    c.buffer_bytes = 8 + static_cast<int64_t>(rng() % (1 << 18));
    const StepPlan cs = plan_steps(p, cpu_step_rule(c));
    EXPECT(tiles(p, cs), "trial %d: CPU steps do not tile", trial);
    EXPECT(cs.max_out_bytes <= c.buffer_bytes, "trial %d: a CPU step writes %lld bytes into a %lld-byte buffer", trial,
           static_cast<long long>(cs.max_out_bytes), static_cast<long long>(c.buffer_bytes));
    CudaMergeOptions g;
    g.slot_bytes = 256 + static_cast<int64_t>(rng() % (1 << 20));
    const StepPlan gs = plan_steps(p, cuda_step_rule(g));
    EXPECT(tiles(p, gs), "trial %d: CUDA steps do not tile", trial);
  }
}

// One plan, two runs with new weights (and a divisor): the executor reads the run's weights.
void test_plan_runs_again_with_new_weights() {
  const int64_t n = 10000;
  std::vector<float> x(n), y(n), out(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(i % 97) * 0.25f;
    y[i] = static_cast<float>(i % 13) - 6.0f;
  }
  MergeSegment g = seg(n, -1, reinterpret_cast<int64_t>(out.data()));
  const MergePlan p(2, {g}, {reinterpret_cast<uintptr_t>(x.data()), reinterpret_cast<uintptr_t>(y.data())}, {F32, F32},
                    {HOST, HOST});
  CpuMergeOptions o;
  o.window_bytes = 1 << 14;  // several steps
  for (const auto& w : std::vector<std::vector<double>>{{1.0, 2.0}, {0.5, -1.0}}) {
    MergeRun r;
    r.weights = w;
    r.divisor = 2.0;
    run_merge(p, r, o, nullptr);
    bool same = true;
    for (int64_t i = 0; i < n && same; ++i)
      same = out[i] == static_cast<float>((w[0] * x[i] + w[1] * y[i]) / 2.0);
    EXPECT(same, "weights {%g, %g}: wrong result", w[0], w[1]);
  }
  MergeRun bad;
  bad.weights = {1.0};
  EXPECT_REFUSED(run_merge(p, bad, o, nullptr), "MergePlan.run: got 1 weights");
  o.nbuffers = 0;
  MergeRun ok;
  ok.weights = {1.0, 1.0};
  EXPECT_REFUSED(run_merge(p, ok, o, nullptr), "MergePlan.run: nbuffers must be >= 2");
}

}  // namespace

int main() {
  test_plan_refusals();
  test_run_refusals();
  test_option_refusals();
  test_cpu_steps();
  test_cuda_steps();
  test_random_plans_tile();
  test_plan_runs_again_with_new_weights();
  if (g_failures) {
    std::fprintf(stderr, "%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("plan tests passed\n");
  return 0;
}
