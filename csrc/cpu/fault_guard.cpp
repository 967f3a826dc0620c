// The SIGBUS guard of file mappings (see io.h, FaultGuard).
//
// Why a handler that patches the page rather than sigsetjmp/siglongjmp around reads: faults happen
// on any thread that reads a mapping (the kernel's pool, the CUDA fill threads, the prefetcher,
// Python code copying from a mapping through ctypes or torch), and jumping out of code we do not
// own (CPython, torch) is not safe. Mapping a zero page over the faulting page lets every reader
// finish normally; what it read is then refused by whoever checks the counters. The hot path pays
// nothing: no per-read check, one atomic load per merge step.
#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <string>

#include "fastsoup/io.h"

namespace fastsoup {

namespace {

constexpr int kSlots = 16384;  // guarded ranges at once (one per mapped file)

struct Slot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<int> state{0};  // 0 free, 1 being set up, 2 live
  std::atomic<int> prot{PROT_READ};
  std::atomic<uint32_t> faults{0};
  const std::string* path = nullptr;  // owned by the FaultGuard; read outside the handler only
};

Slot g_slots[kSlots];
std::atomic<int> g_high{0};  // slots in use are below this index
std::atomic<uint64_t> g_faults{0};
std::atomic<int> g_last{-1};
std::atomic<uintptr_t> g_page{4096};
std::mutex g_mu;  // registration and installation (never taken in the handler)
struct sigaction g_prev;  // the disposition found when the handler was installed
thread_local int t_depth = 0;

void on_sigbus(int sig, siginfo_t* info, void* ctx);

void fall_through(int sig, siginfo_t* info, void* ctx) {
  // Not a fault of a guarded range: behave as if the handler were not there.
  const struct sigaction prev = g_prev;
  const bool is_handler = (prev.sa_flags & SA_SIGINFO) ? prev.sa_sigaction != nullptr
                                                        : (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN);
  if (t_depth > 1 || !is_handler || ((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction == on_sigbus)) {
    struct sigaction dfl;
    dfl.sa_handler = SIG_DFL;
    dfl.sa_flags = 0;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, nullptr);
    // A fault re-executes the instruction and takes the default action; a SIGBUS sent by kill()
    // is raised again (pending until this handler returns).
    if (info == nullptr || info->si_code <= 0) raise(sig);
    return;
  }
  if (prev.sa_flags & SA_SIGINFO) prev.sa_sigaction(sig, info, ctx);
  else prev.sa_handler(sig);
}

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  const int saved_errno = errno;
  ++t_depth;
  if (info != nullptr && info->si_code == BUS_ADRERR) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
    const int high = g_high.load(std::memory_order_acquire);
    for (int i = 0; i < high; ++i) {
      Slot& s = g_slots[i];
      if (s.state.load(std::memory_order_acquire) != 2) continue;
      if (a < s.begin.load(std::memory_order_relaxed) || a >= s.end.load(std::memory_order_relaxed)) continue;
      const uintptr_t ps = g_page.load(std::memory_order_relaxed);
      void* page = reinterpret_cast<void*>(a & ~(ps - 1));
      // The page is past the end of the file (or unreadable): zeros in its place, private.
      void* r = mmap(page, ps, s.prot.load(std::memory_order_relaxed), MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (r == page) {
        s.faults.fetch_add(1, std::memory_order_relaxed);
        g_last.store(i, std::memory_order_relaxed);
        g_faults.fetch_add(1, std::memory_order_release);
        --t_depth;
        errno = saved_errno;
        return;
      }
      break;
    }
  }
  fall_through(sig, info, ctx);
  --t_depth;
  errno = saved_errno;
}

// Installs the handler unless it is the current one (called with g_mu held).
void ensure_handler() {
  struct sigaction cur;
  if (sigaction(SIGBUS, nullptr, &cur) != 0) return;
  if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus) return;
  struct sigaction sa;
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  g_prev = cur;
  sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace

FaultGuard::FaultGuard(const void* begin, size_t length, std::string path, bool writable) : path_(std::move(path)) {
  if (begin == nullptr || length == 0) return;
  std::lock_guard<std::mutex> lk(g_mu);
  g_page.store(static_cast<uintptr_t>(sysconf(_SC_PAGESIZE)), std::memory_order_relaxed);
  ensure_handler();
  const int high = g_high.load(std::memory_order_relaxed);
  int i = 0;
  while (i < high && g_slots[i].state.load(std::memory_order_relaxed) != 0) ++i;
  if (i == kSlots) return;  // full: this range is not guarded (a fault then takes the default action)
  Slot& s = g_slots[i];
  s.state.store(1, std::memory_order_relaxed);
  s.begin.store(reinterpret_cast<uintptr_t>(begin), std::memory_order_relaxed);
  s.end.store(reinterpret_cast<uintptr_t>(begin) + length, std::memory_order_relaxed);
  s.prot.store(writable ? (PROT_READ | PROT_WRITE) : PROT_READ, std::memory_order_relaxed);
  s.faults.store(0, std::memory_order_relaxed);
  s.path = &path_;
  s.state.store(2, std::memory_order_release);
  if (i >= high) g_high.store(i + 1, std::memory_order_release);
  slot_ = i;
}

FaultGuard::~FaultGuard() {
  if (slot_ < 0) return;
  std::lock_guard<std::mutex> lk(g_mu);
  Slot& s = g_slots[slot_];
  s.state.store(0, std::memory_order_release);
  s.path = nullptr;
  if (g_last.load(std::memory_order_relaxed) == slot_) g_last.store(-1, std::memory_order_relaxed);
}

uint32_t FaultGuard::faults() const {
  return slot_ < 0 ? 0 : g_slots[slot_].faults.load(std::memory_order_relaxed);
}

uint64_t fault_count() { return g_faults.load(std::memory_order_acquire); }

std::string last_fault_path() {
  std::lock_guard<std::mutex> lk(g_mu);
  const int i = g_last.load(std::memory_order_relaxed);
  if (i < 0 || g_slots[i].state.load(std::memory_order_relaxed) != 2 || g_slots[i].path == nullptr) return "";
  return *g_slots[i].path;
}

std::string guarded_path(const void* addr) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  std::lock_guard<std::mutex> lk(g_mu);
  const int high = g_high.load(std::memory_order_relaxed);
  for (int i = 0; i < high; ++i) {
    const Slot& s = g_slots[i];
    if (s.state.load(std::memory_order_relaxed) == 2 && a >= s.begin.load() && a < s.end.load() && s.path) return *s.path;
  }
  return "";
}

FaultWatch::FaultWatch(const std::vector<const void*>& addresses) {
  std::lock_guard<std::mutex> lk(g_mu);
  seen_ = g_faults.load(std::memory_order_acquire);
  const int high = g_high.load(std::memory_order_relaxed);
  std::vector<char> mine(static_cast<size_t>(high), 0);
  int last = -1;
  for (const void* p : addresses) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a == 0) continue;
    if (last >= 0 && a >= g_slots[last].begin.load() && a < g_slots[last].end.load()) continue;  // inputs come in runs
    for (int i = 0; i < high; ++i) {
      const Slot& s = g_slots[i];
      if (s.state.load(std::memory_order_relaxed) == 2 && a >= s.begin.load() && a < s.end.load()) {
        mine[static_cast<size_t>(i)] = 1;
        last = i;
        break;
      }
    }
  }
  for (int i = 0; i < high; ++i) {
    if (mine[static_cast<size_t>(i)]) {
      slots_.push_back(i);
      base_.push_back(g_slots[i].faults.load(std::memory_order_relaxed));
    }
  }
}

bool FaultWatch::faulted() {
  const uint64_t now = g_faults.load(std::memory_order_acquire);
  if (now == seen_) return false;
  for (size_t j = 0; j < slots_.size(); ++j) {
    const Slot& s = g_slots[slots_[j]];
    if (s.faults.load(std::memory_order_relaxed) != base_[j]) {
      std::lock_guard<std::mutex> lk(g_mu);
      path_ = s.path ? *s.path : std::string("an input file");
      return true;
    }
  }
  seen_ = now;  // faults elsewhere only
  return false;
}

}  // namespace fastsoup
