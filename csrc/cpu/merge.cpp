// The streaming merge executor. One thread (the caller's) walks the output in steps of about
// window_bytes of input; each step's kernel runs on the thread pool, writes into the destination
// (memory) or into a staging buffer that a writer thread pwrite()s while the next step computes.
// A prefetch thread asks the kernel to read ahead (MADV_WILLNEED) the inputs of the next steps; the
// inputs of a finished step are released (MADV_DONTNEED) so resident memory stays near one window.
#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fastsoup/io.h"
#include "fastsoup/kernels.h"
#include "fastsoup/plan.h"

namespace fastsoup {

namespace {

// A ring of staging buffers drained by one writer thread.
class Writer {
 public:
  Writer(int64_t cap, int nbuffers, const MergeRun& run) : cap_(cap), nbuffers_(nbuffers), run_(run) {}
  ~Writer() {
    stop_and_join();
    for (char* b : all_) std::free(b);
  }

  // Room for len bytes at (output file `file`, offset) in the current buffer (contiguous with what it holds).
  char* reserve(int file, int64_t offset, int64_t len) {
    if (cur_.data && (cur_.file != file || cur_.offset + cur_.len != offset || cur_.len + len > cap_)) submit();
    if (!cur_.data) {
      cur_.data = acquire();
      cur_.file = file;
      cur_.offset = offset;
      cur_.len = 0;
    }
    char* p = cur_.data + cur_.len;
    cur_.len += len;
    return p;
  }

  void finish() {
    submit();
    std::unique_lock<std::mutex> lk(mu_);
    idle_cv_.wait(lk, [this] { return (queue_.empty() && !busy_) || error_; });
    lk.unlock();
    stop_and_join();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  struct Job {
    char* data = nullptr;
    int file = -1;  // index into the run's fds
    int64_t offset = 0;
    int64_t len = 0;
  };

  char* acquire() {
    std::unique_lock<std::mutex> lk(mu_);
    if (error_) std::rethrow_exception(error_);
    if (free_.empty() && static_cast<int>(all_.size()) < nbuffers_) {
      char* b = static_cast<char*>(std::aligned_alloc(4096, static_cast<size_t>((cap_ + 4095) / 4096 * 4096)));
      if (!b) throw std::bad_alloc();
      all_.push_back(b);
      return b;
    }
    free_cv_.wait(lk, [this] { return !free_.empty() || error_; });
    if (error_) std::rethrow_exception(error_);
    char* b = free_.back();
    free_.pop_back();
    return b;
  }

  void submit() {
    if (!cur_.data) return;
    if (cur_.len == 0) {
      std::lock_guard<std::mutex> lk(mu_);
      free_.push_back(cur_.data);
    } else {
      std::lock_guard<std::mutex> lk(mu_);
      if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
      queue_.push_back(cur_);
      work_cv_.notify_one();
    }
    cur_ = Job{};
  }

  void loop() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      work_cv_.wait(lk, [this] { return !queue_.empty() || stop_; });
      if (queue_.empty()) return;
      Job j = queue_.front();
      queue_.pop_front();
      busy_ = true;
      lk.unlock();
      std::exception_ptr err;
      try {
        if (!error_) {
          pwrite_all(run_.fds[static_cast<size_t>(j.file)], j.data, static_cast<size_t>(j.len), j.offset,
                     run_.fd_name(j.file));
        }
      } catch (...) {
        err = std::current_exception();
      }
      lk.lock();
      busy_ = false;
      if (err && !error_) error_ = err;
      free_.push_back(j.data);
      free_cv_.notify_all();
      idle_cv_.notify_all();
    }
  }

  void stop_and_join() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      work_cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

  const int64_t cap_;
  const int nbuffers_;
  const MergeRun& run_;
  Job cur_;
  std::vector<char*> all_, free_;
  std::deque<Job> queue_;
  std::mutex mu_;
  std::condition_variable work_cv_, free_cv_, idle_cv_;
  std::thread thread_;
  bool stop_ = false;
  bool busy_ = false;
  std::exception_ptr error_;
};

// Issues MADV_WILLNEED on a thread of its own (a cold read can block in the kernel).
class Prefetcher {
 public:
  ~Prefetcher() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }
  void post(const void* addr, size_t len) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
    queue_.emplace_back(addr, len);
    cv_.notify_one();
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [this] { return !queue_.empty() || stop_; });
      if (stop_) return;
      auto r = queue_.front();
      queue_.pop_front();
      lk.unlock();
      advise_range(r.first, r.second, Advice::kWillNeed);
      lk.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<const void*, size_t>> queue_;
  std::thread thread_;
  bool stop_ = false;
};

}  // namespace

void run_merge(const MergePlan& p, const MergeRun& run, const CpuMergeOptions& o, const MergeProgress& progress) {
  run.check(p, /*device=*/false, "MergePlan.run");
  o.check("MergePlan.run");
  const int64_t K = p.num_inputs();
  const std::vector<Step> steps = plan_steps(p, cpu_step_rule(o)).steps;

  // Where input k of a step is; true when it is a file mapping to advise (a copy reads input 0 only).
  auto input_range = [&](const Step& st, int64_t k, const void** addr, size_t* len) {
    const MergeSegment& g = p.segment(st.segment);
    const bool copy = g.kind == SegmentKind::kCopy;
    const int64_t unit = copy ? 1 : static_cast<int64_t>(itemsize(p.input_dtype(st.segment, k)));
    *addr = static_cast<const char*>(p.input(st.segment, k)) + st.begin * unit;
    *len = static_cast<size_t>(st.count * unit);
    return p.input_location(st.segment, k) == InputLocation::kMapped && (!copy || k == 0);
  };

  Prefetcher prefetcher;
  auto prefetch = [&](size_t idx) {
    if (idx >= steps.size()) return;
    for (int64_t k = 0; k < K; ++k) {
      const void* a;
      size_t len;
      if (input_range(steps[idx], k, &a, &len)) prefetcher.post(a, len);
    }
  };
  for (int i = 0; i < o.prefetch_steps; ++i) prefetch(static_cast<size_t>(i));

  Writer writer(o.buffer_bytes, o.nbuffers, run);
  FaultWatch watch(p.mapped_inputs());
  std::vector<const void*> ins(static_cast<size_t>(K));
  std::vector<DType> dts(static_cast<size_t>(K));
  int64_t done_in = 0, done_out = 0;

  for (size_t idx = 0; idx < steps.size(); ++idx) {
    prefetch(idx + static_cast<size_t>(o.prefetch_steps));
    const Step& st = steps[idx];
    const MergeSegment& g = p.segment(st.segment);
    const int64_t out_unit = g.kind == SegmentKind::kCopy ? 1 : static_cast<int64_t>(itemsize(g.out_dtype));
    const int64_t out_len = st.count * out_unit;
    char* dst;
    if (g.out_file < 0) dst = reinterpret_cast<char*>(g.out_offset) + st.begin * out_unit;
    else dst = writer.reserve(g.out_file, g.out_offset + st.begin * out_unit, out_len);

    int64_t step_in = 0;
    if (g.kind == SegmentKind::kCopy) {
      std::memcpy(dst, static_cast<const char*>(p.input(st.segment, 0)) + st.begin, static_cast<size_t>(st.count));
      add_counters(st.count, st.count);
      if (p.input_location(st.segment, 0) == InputLocation::kMapped) add_mapped_read(st.count);
      step_in = st.count;
    } else {
      for (int64_t k = 0; k < K; ++k) {
        size_t len;
        if (input_range(st, k, &ins[static_cast<size_t>(k)], &len)) add_mapped_read(static_cast<int64_t>(len));
        dts[static_cast<size_t>(k)] = p.input_dtype(st.segment, k);
        step_in += static_cast<int64_t>(len);
      }
      WeightedSumParams wp;
      wp.inputs = ins.data();
      wp.input_dtypes = dts.data();
      wp.weights = run.weights_of(p, st.segment);
      wp.num_inputs = K;
      wp.out = dst;
      wp.out_dtype = g.out_dtype;
      wp.n = st.count;
      wp.threads = o.threads;
      wp.accumulate = run.accumulate;
      wp.divisor = run.divisor;
      wp.divisor_lo = run.divisor_lo;
      Status s = weighted_sum_cpu(wp);
      if (!s.ok) throw std::invalid_argument("MergePlan.run: " + s.message);
    }
    for (int64_t k = 0; k < K; ++k) {
      const void* a;
      size_t len;
      if (o.release && input_range(st, k, &a, &len)) advise_range(a, len, Advice::kDontNeed);
    }
    // An input truncated (or unreadable) while this step read it: stop, nothing is to be trusted.
    if (watch.faulted()) throw InputFault(watch.path());
    done_in += step_in;
    done_out += out_len;
    if (progress) progress(done_in, done_out);
  }
  writer.finish();
}

}  // namespace fastsoup
