// C++ tests of the CUDA pipeline's ring (ring.h) with a fake allocator, so no GPU is needed: an
// allocation that fails at any point leaves the ring released and nothing allocated, a later
// ensure succeeds, every buffer is freed on the device it was allocated on, and release and the
// destructor free everything.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>

#include "expect.h"
#include "fastsoup/ring.h"

using namespace fastsoup;

namespace {

// What the fake allocator did, kept outside it (the ring owns its allocator).
struct Ledger {
  int attempts = 0;  // allocation calls, failed ones included
  int fail_at = 0;   // the attempt (1-based) that fails; 0: none
  int allocs = 0, frees = 0;
  int wrong_device_frees = 0;
  std::map<const void*, int> live;  // what is allocated now -> its device
  std::map<int, int> live_handles;  // events and streams now -> their device
  int next_handle = 1;
  size_t live_count() const { return live.size() + live_handles.size(); }
};

struct FakeAllocator {
  using Event = int;   // 0: none
  using Stream = int;  // 0: none
  Ledger* l;

  void attempt() {
    if (++l->attempts == l->fail_at) throw std::runtime_error("fake allocator: out of memory");
    ++l->allocs;
  }
  void* memory(int dev, size_t bytes) {
    attempt();
    void* p = std::malloc(bytes);
    l->live[p] = dev;
    return p;
  }
  int handle(int dev) {
    attempt();
    const int h = l->next_handle++;
    l->live_handles[h] = dev;
    return h;
  }
  void forget(int dev, const void* p) noexcept {
    auto it = l->live.find(p);
    if (it == l->live.end() || it->second != dev) ++l->wrong_device_frees;
    if (it != l->live.end()) l->live.erase(it);
    ++l->frees;
  }
  void forget_handle(int dev, int h) noexcept {
    auto it = l->live_handles.find(h);
    if (it == l->live_handles.end() || it->second != dev) ++l->wrong_device_frees;
    if (it != l->live_handles.end()) l->live_handles.erase(it);
    ++l->frees;
  }

  void* host(int dev, size_t bytes) { return memory(dev, bytes); }
  void* device(int dev, size_t bytes) { return memory(dev, bytes); }
  Event event(int dev) { return handle(dev); }
  Stream stream(int dev) { return handle(dev); }
  void free_host(int dev, void* p) noexcept {
    forget(dev, p);
    std::free(p);
  }
  void free_device(int dev, void* p) noexcept {
    forget(dev, p);
    std::free(p);
  }
  void free_event(int dev, Event e) noexcept { forget_handle(dev, e); }
  void free_stream(int dev, Stream s) noexcept { forget_handle(dev, s); }
};

using FakeRing = Ring<FakeAllocator>;

constexpr int kPerSlot = 6;  // 2 pinned + 2 device buffers + 2 events; plus one stream per ring

bool complete(const FakeRing& r, int slots) {
  if (!r.ready() || r.nslots() != slots || r.copy_stream() == 0) return false;
  for (int s = 0; s < slots; ++s) {
    const FakeRing::Slot& q = r.slot(s);
    if (!q.pinned_in || !q.pinned_out || !q.dev_in || !q.dev_out || q.copied == 0 || q.done == 0) return false;
  }
  return true;
}

void test_ensure_allocates_and_keeps() {
  Ledger l;
  FakeRing r(FakeAllocator{&l});
  EXPECT(!r.ready() && r.nslots() == 0 && r.bytes() == 0, "a new ring holds something");
  r.ensure(0, 3, 1000, 500);
  EXPECT(complete(r, 3) && r.in_bytes() == 1000 && r.out_bytes() == 500 && r.device() == 0, "ensure: incomplete ring");
  EXPECT(l.live_count() == 1 + 3 * kPerSlot, "%zu allocations live", l.live_count());
  EXPECT(r.bytes() == 2 * 3 * 1500, "bytes() = %lld", static_cast<long long>(r.bytes()));
  const int before = l.attempts;
  r.ensure(0, 2, 800, 500);  // fits: kept
  EXPECT(l.attempts == before && complete(r, 3), "a ring large enough was reallocated");
  r.ensure(0, 3, 1001, 500);  // larger: reallocated, the old one freed first
  EXPECT(complete(r, 3) && r.in_bytes() == 1001 && l.live_count() == 1 + 3 * kPerSlot, "growth: %zu live",
         l.live_count());
  r.ensure(1, 3, 1001, 500);  // another device
  EXPECT(complete(r, 3) && r.device() == 1, "device change");
  r.ensure(1, 2, 10, 0);  // sizes below 256 become 256 (kept here: the ring already fits)
  FakeRing small(FakeAllocator{&l});
  small.ensure(0, 2, 10, 0);
  EXPECT(small.in_bytes() == 256 && small.out_bytes() == 256, "minimum sizes %lld %lld",
         static_cast<long long>(small.in_bytes()), static_cast<long long>(small.out_bytes()));
  EXPECT(small.release() == 2 * 2 * 512, "release() of the small ring");
  const int64_t held = r.bytes();
  EXPECT(r.release() == held && !r.ready() && r.nslots() == 0, "release");
  EXPECT(r.release() == 0, "a second release freed something");
  EXPECT(l.live_count() == 0 && l.allocs == l.frees, "leak: %zu live, %d allocs, %d frees", l.live_count(), l.allocs,
         l.frees);
  EXPECT(l.wrong_device_frees == 0, "%d frees on the wrong device", l.wrong_device_frees);
}

// Every allocation of a 3-slot ring fails in turn (1 + 3 * 6 of them), from empty and while
// growing a ready ring: each time the ring ends released, nothing stays allocated, and the next
// ensure succeeds.
void test_failed_allocation_leaves_nothing() {
  const int total = 1 + 3 * kPerSlot;
  for (int grow = 0; grow < 2; ++grow) {
    for (int n = 1; n <= total; ++n) {
      Ledger l;
      FakeRing r(FakeAllocator{&l});
      if (grow) r.ensure(0, 2, 600, 300);
      l.fail_at = l.attempts + n;
      bool thrown = false;
      try {
        r.ensure(0, 3, 1000, 500);
      } catch (const std::runtime_error&) {
        thrown = true;
      }
      EXPECT(thrown, "grow %d, failure %d: no error", grow, n);
      EXPECT(!r.ready() && r.nslots() == 0 && r.bytes() == 0 && r.copy_stream() == 0,
             "grow %d, failure %d: the ring is left ready=%d with %d slots", grow, n, r.ready(), r.nslots());
      EXPECT(l.live_count() == 0 && l.allocs == l.frees, "grow %d, failure %d: %zu allocations leaked", grow, n,
             l.live_count());
      l.fail_at = 0;
      r.ensure(0, 3, 1000, 500);
      EXPECT(complete(r, 3) && r.in_bytes() == 1000 && r.out_bytes() == 500, "grow %d, failure %d: no ring after", grow,
             n);
      EXPECT(l.live_count() == static_cast<size_t>(total), "grow %d, failure %d: %zu live after", grow, n,
             l.live_count());
      EXPECT(l.wrong_device_frees == 0, "grow %d, failure %d: frees on the wrong device", grow, n);
    }
  }
}

void test_destructor_frees_everything() {
  Ledger l;
  {
    FakeRing r(FakeAllocator{&l});
    r.ensure(2, 4, 4096, 4096);
  }
  EXPECT(l.live_count() == 0 && l.allocs == 1 + 4 * kPerSlot && l.frees == l.allocs, "destructor: %zu live",
         l.live_count());
  EXPECT(l.wrong_device_frees == 0, "destructor: frees on the wrong device");
  static_assert(noexcept(std::declval<FakeRing&>().~FakeRing()), "~Ring must not throw");
  static_assert(noexcept(std::declval<FakeRing&>().release()), "Ring::release must not throw");
}

}  // namespace

int main() {
  test_ensure_allocates_and_keeps();
  test_failed_allocation_leaves_nothing();
  test_destructor_frees_everything();
  if (g_failures) {
    std::fprintf(stderr, "%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("ring tests passed\n");
  return 0;
}
