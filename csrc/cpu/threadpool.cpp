#include "threadpool.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fastsoup {
namespace cpu {

int available_threads() {
  if (const char* env = std::getenv("FASTSOUP_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}

namespace {

class Pool {
 public:
  explicit Pool(int workers) : pid_(getpid()) {
    for (int i = 0; i < workers; ++i) std::thread([this, i] { loop(i); }).detach();
    workers_ = workers;
  }

  pid_t pid() const { return pid_; }

  // Returns false (running nothing) when another parallel region holds the pool.
  bool run(int64_t ntasks, int threads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const int helpers = std::min<int64_t>({static_cast<int64_t>(threads) - 1, workers_, ntasks - 1});
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      ntasks_ = ntasks;
      next_.store(0);
      active_ = helpers;
      running_ = helpers;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return running_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  void work() {
    for (;;) {
      const int64_t t = next_.fetch_add(1);
      if (t >= ntasks_) return;
      try {
        (*fn_)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(ntasks_);  // hand out nothing more
      }
    }
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= active_) continue;
      }
      work();
      std::lock_guard<std::mutex> lk(mu_);
      if (--running_ == 0) done_cv_.notify_all();
    }
  }

  const pid_t pid_;
  int workers_ = 0;
  std::mutex busy_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  uint64_t generation_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t ntasks_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  int running_ = 0;
  std::exception_ptr error_;
};

// Never destroyed: detached workers may still wait on it while the process exits. After fork()
// the child has none of the parent's threads, so a child makes its own pool.
Pool* get_pool() {
  static std::mutex m;
  static Pool* pool = nullptr;
  std::lock_guard<std::mutex> lk(m);
  if (pool == nullptr || pool->pid() != getpid()) pool = new Pool(std::max(0, available_threads() - 1));
  return pool;
}

}  // namespace

void parallel_for(int64_t ntasks, int threads, const std::function<void(int64_t)>& fn) {
  if (ntasks <= 0) return;
  if (threads <= 0) threads = available_threads();
  if (threads > 1 && ntasks > 1 && get_pool()->run(ntasks, threads, fn)) return;
  for (int64_t t = 0; t < ntasks; ++t) fn(t);
}

}  // namespace cpu
}  // namespace fastsoup
