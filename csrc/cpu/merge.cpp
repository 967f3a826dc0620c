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

namespace fastsoup {

namespace {

void check_plan(const MergePlan& p) {
  const int64_t K = p.num_inputs;
  const size_t S = p.segments.size();
  auto bad = [](const std::string& m) { throw std::invalid_argument("merge: " + m); };
  if (K < 0) bad("num_inputs must be >= 0");
  if (static_cast<int64_t>(p.weights.size()) != K && p.weights.size() != p.segments.size() * static_cast<size_t>(K))
    bad("expected " + std::to_string(K) + " weights, or " + std::to_string(K) + " per segment");
  const size_t SK = S * static_cast<size_t>(K);
  if (p.in_addr.size() != SK || p.in_dtype.size() != SK || p.in_mapped.size() != SK)
    bad("in_addr, in_dtype and in_mapped must have segments * num_inputs = " + std::to_string(SK) + " entries");
  if (p.window_bytes <= 0 || p.buffer_bytes <= 0 || p.nbuffers < 2) bad("window/buffer sizes must be positive, nbuffers >= 2");
  if (!p.fd_names.empty() && p.fd_names.size() != p.fds.size()) bad("fd_names must be empty or name every output file");
  for (size_t s = 0; s < S; ++s) {
    const MergeSegment& g = p.segments[s];
    const std::string at = "segment " + std::to_string(s) + ": ";
    if (g.n < 0) bad(at + "n must be >= 0");
    if (g.out_file < -1 || g.out_file >= static_cast<int32_t>(p.fds.size())) bad(at + "out_file out of range");
    if (g.out_file == -1 && g.out_offset == 0 && g.n > 0) bad(at + "null output address");
    if (p.accumulate && (g.kind != SegmentKind::kWeightedSum || g.out_file != -1 || g.out_dtype != DType::kFloat32))
      bad(at + "accumulate needs weighted sums into float32 memory");
    if (g.kind == SegmentKind::kCopy) {
      if (K < 1) bad(at + "a copy needs an input");
      if (g.n > 0 && p.in_addr[s * K] == 0) bad(at + "null input address");
      continue;
    }
    if (g.kind != SegmentKind::kWeightedSum) bad(at + "unknown kind");
    if (!valid_dtype_code(static_cast<int>(g.out_dtype))) bad(at + "invalid output dtype code");
    for (int64_t k = 0; k < K; ++k) {
      if (!valid_dtype_code(p.in_dtype[s * K + k])) bad(at + "input " + std::to_string(k) + " has an invalid dtype code");
      if (g.n > 0 && p.in_addr[s * K + k] == 0) bad(at + "input " + std::to_string(k) + " is a null address");
    }
  }
}

// A ring of staging buffers drained by one writer thread.
class Writer {
 public:
  Writer(int64_t cap, int nbuffers, const MergePlan& plan) : cap_(cap), nbuffers_(nbuffers), plan_(plan) {}
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
    int file = -1;  // index into the plan's fds
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
          const size_t f = static_cast<size_t>(j.file);
          pwrite_all(plan_.fds[f], j.data, static_cast<size_t>(j.len), j.offset,
                     f < plan_.fd_names.size() ? plan_.fd_names[f] : std::string("output file"));
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
  const MergePlan& plan_;
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

struct Step {
  size_t segment;
  int64_t begin;  // element (or byte, for a copy) offset within the segment
  int64_t count;
};

}  // namespace

void run_merge(const MergePlan& p, const MergeProgress& progress) {
  check_plan(p);
  const int64_t K = p.num_inputs;

  // Cut the segments into steps of about window_bytes of input (and at most one staging buffer of
  // output when the output is a file).
  std::vector<Step> steps;
  for (size_t s = 0; s < p.segments.size(); ++s) {
    const MergeSegment& g = p.segments[s];
    if (g.n == 0) continue;
    int64_t per;
    if (g.kind == SegmentKind::kCopy) {
      per = std::min(p.window_bytes, p.buffer_bytes);
    } else {
      int64_t in_elem = 0;
      for (int64_t k = 0; k < K; ++k) in_elem += static_cast<int64_t>(itemsize(static_cast<DType>(p.in_dtype[s * K + k])));
      per = std::max<int64_t>(4096, p.window_bytes / std::max<int64_t>(in_elem, 1));
      if (g.out_file >= 0) per = std::min<int64_t>(per, p.buffer_bytes / static_cast<int64_t>(itemsize(g.out_dtype)));
      per = std::max<int64_t>(per / 4096 * 4096, 1);
    }
    for (int64_t b = 0; b < g.n; b += per) steps.push_back({s, b, std::min(per, g.n - b)});
  }

  auto input_range = [&](const Step& st, int64_t k, const void** addr, size_t* len) {
    const MergeSegment& g = p.segments[st.segment];
    const size_t i = st.segment * static_cast<size_t>(K) + static_cast<size_t>(k);
    const int64_t unit = g.kind == SegmentKind::kCopy ? 1 : static_cast<int64_t>(itemsize(static_cast<DType>(p.in_dtype[i])));
    *addr = reinterpret_cast<const char*>(p.in_addr[i]) + st.begin * unit;
    *len = static_cast<size_t>(st.count * unit);
    return p.in_mapped[i] != 0 && (g.kind == SegmentKind::kWeightedSum || k == 0);
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
  for (int i = 0; i < p.prefetch_steps; ++i) prefetch(static_cast<size_t>(i));

  Writer writer(p.buffer_bytes, p.nbuffers, p);
  std::vector<const void*> mapped_inputs;
  for (size_t i = 0; i < p.in_addr.size(); ++i)
    if (p.in_mapped[i] == 1) mapped_inputs.push_back(reinterpret_cast<const void*>(p.in_addr[i]));
  FaultWatch watch(mapped_inputs);
  std::vector<const void*> ins(static_cast<size_t>(K));
  std::vector<DType> dts(static_cast<size_t>(K));
  int64_t done_in = 0, done_out = 0;

  for (size_t idx = 0; idx < steps.size(); ++idx) {
    prefetch(idx + static_cast<size_t>(p.prefetch_steps));
    const Step& st = steps[idx];
    const MergeSegment& g = p.segments[st.segment];
    const size_t base = st.segment * static_cast<size_t>(K);
    const int64_t out_unit = g.kind == SegmentKind::kCopy ? 1 : static_cast<int64_t>(itemsize(g.out_dtype));
    const int64_t out_len = st.count * out_unit;
    char* dst;
    if (g.out_file < 0) dst = reinterpret_cast<char*>(g.out_offset) + st.begin * out_unit;
    else dst = writer.reserve(g.out_file, g.out_offset + st.begin * out_unit, out_len);

    int64_t step_in = 0;
    if (g.kind == SegmentKind::kCopy) {
      std::memcpy(dst, reinterpret_cast<const char*>(p.in_addr[base]) + st.begin, static_cast<size_t>(st.count));
      add_counters(st.count, st.count);
      if (p.in_mapped[base] != 0) add_mapped_read(st.count);
      step_in = st.count;
    } else {
      for (int64_t k = 0; k < K; ++k) {
        size_t len;
        if (input_range(st, k, &ins[static_cast<size_t>(k)], &len)) add_mapped_read(static_cast<int64_t>(len));
        dts[static_cast<size_t>(k)] = static_cast<DType>(p.in_dtype[base + static_cast<size_t>(k)]);
        step_in += static_cast<int64_t>(len);
      }
      WeightedSumParams wp;
      wp.inputs = ins.data();
      wp.input_dtypes = dts.data();
      wp.weights = p.weights.data() + (static_cast<int64_t>(p.weights.size()) == K ? 0 : base);
      wp.num_inputs = K;
      wp.out = dst;
      wp.out_dtype = g.out_dtype;
      wp.n = st.count;
      wp.threads = p.threads;
      wp.accumulate = p.accumulate;
      wp.divisor = p.divisor;
      wp.divisor_lo = p.divisor_lo;
      Status s = weighted_sum_cpu(wp);
      if (!s.ok) throw std::invalid_argument("merge: " + s.message);
    }
    for (int64_t k = 0; k < K; ++k) {
      const void* a;
      size_t len;
      if (p.release && input_range(st, k, &a, &len)) advise_range(a, len, Advice::kDontNeed);
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
