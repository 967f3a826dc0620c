// The CUDA pipeline's ring of buffers (csrc/cuda/merge.cu): per slot a pinned input and output
// buffer, a device input and output buffer and two events, plus one copy stream; kept between
// merges because allocating pinned memory is slow (a greedy search runs a merge per candidate).
//
// Plain C++ over an allocator, so that the all-or-nothing logic is tested without a GPU
// (csrc/tests/test_ring.cpp, with a fake allocator that fails on the n-th call). The allocator:
//   using Event = ...; using Stream = ...;        value-initialized (Event{}) means "none"
//   void* host(int device, size_t bytes);         pinned host memory   } each throws on failure
//   void* device(int device, size_t bytes);       device memory        }
//   Event event(int device);                                           }
//   Stream stream(int device);                                         }
//   void free_host(int device, void*) noexcept;   ... and the four frees, which never throw
//   void free_device(int device, void*) noexcept;     (errors are ignored: at process exit the
//   void free_event(int device, Event) noexcept;       CUDA runtime may already be gone)
//   void free_stream(int device, Stream) noexcept;
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastsoup {

template <class Alloc>
class Ring {
 public:
  using Event = typename Alloc::Event;
  using Stream = typename Alloc::Stream;
  struct Slot {
    char* pinned_in = nullptr;   // in_bytes: the host inputs of a step, filled by CPU threads
    char* pinned_out = nullptr;  // out_bytes: a step's result on its way to a file
    char* dev_in = nullptr;      // in_bytes: the host inputs after their copy to the device
    char* dev_out = nullptr;     // out_bytes: the kernel's result for a file output
    Event copied{};              // dev_in holds the step's inputs
    Event done{};                // the step's kernel (and its copy back) finished: the slot is free
  };

  explicit Ring(Alloc alloc = Alloc()) : alloc_(std::move(alloc)) {}
  ~Ring() noexcept { release(); }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  bool ready() const { return device_ >= 0; }
  int device() const { return device_; }
  int nslots() const { return static_cast<int>(slots_.size()); }
  int64_t in_bytes() const { return in_bytes_; }
  int64_t out_bytes() const { return out_bytes_; }
  const Slot& slot(int s) const { return slots_[static_cast<size_t>(s)]; }
  Stream copy_stream() const { return stream_; }
  // Pinned plus device memory held, in bytes.
  int64_t bytes() const { return 2 * static_cast<int64_t>(slots_.size()) * (in_bytes_ + out_bytes_); }
  Alloc& allocator() { return alloc_; }

  // On return the ring holds at least `slots` slots of at least in_b input and out_b output bytes
  // (each at least 256) on `dev`. A ring that is large enough is kept; otherwise it is freed and a
  // new one allocated (freed first: the old and the new ring never hold memory together, which
  // would double the peak). Everything is allocated before anything is committed: when an
  // allocation fails, what this call allocated is freed, the ring is left released (not ready,
  // no slots) and the error propagates; a later ensure starts afresh.
  void ensure(int dev, int slots, int64_t in_b, int64_t out_b) {
    if (ready() && device_ == dev && nslots() >= slots && in_bytes_ >= in_b && out_bytes_ >= out_b) return;
    release();
    const int64_t in_sz = in_b > kMinBytes ? in_b : kMinBytes;
    const int64_t out_sz = out_b > kMinBytes ? out_b : kMinBytes;
    Stream stream{};
    std::vector<Slot> made;
    made.reserve(static_cast<size_t>(slots > 0 ? slots : 0));
    try {
      stream = alloc_.stream(dev);
      for (int s = 0; s < slots; ++s) {
        made.emplace_back();  // filled field by field: a failure frees exactly what was allocated
        Slot& q = made.back();
        q.pinned_in = static_cast<char*>(alloc_.host(dev, static_cast<size_t>(in_sz)));
        q.pinned_out = static_cast<char*>(alloc_.host(dev, static_cast<size_t>(out_sz)));
        q.dev_in = static_cast<char*>(alloc_.device(dev, static_cast<size_t>(in_sz)));
        q.dev_out = static_cast<char*>(alloc_.device(dev, static_cast<size_t>(out_sz)));
        q.copied = alloc_.event(dev);
        q.done = alloc_.event(dev);
      }
    } catch (...) {
      free_all(dev, stream, made);
      throw;
    }
    // Commit: nothing below can fail.
    device_ = dev;
    in_bytes_ = in_sz;
    out_bytes_ = out_sz;
    stream_ = stream;
    slots_ = std::move(made);
  }

  // Frees everything (a no-op when not ready); returns the bytes of pinned and device memory freed.
  int64_t release() noexcept {
    if (!ready()) return 0;
    const int64_t held = bytes();
    free_all(device_, stream_, slots_);
    slots_.clear();
    stream_ = Stream{};
    device_ = -1;
    in_bytes_ = out_bytes_ = 0;
    return held;
  }

 private:
  static constexpr int64_t kMinBytes = 256;

  void free_all(int dev, Stream stream, std::vector<Slot>& slots) noexcept {
    for (Slot& q : slots) {
      if (q.pinned_in) alloc_.free_host(dev, q.pinned_in);
      if (q.pinned_out) alloc_.free_host(dev, q.pinned_out);
      if (q.dev_in) alloc_.free_device(dev, q.dev_in);
      if (q.dev_out) alloc_.free_device(dev, q.dev_out);
      if (q.copied != Event{}) alloc_.free_event(dev, q.copied);
      if (q.done != Event{}) alloc_.free_event(dev, q.done);
      q = Slot{};
    }
    if (stream != Stream{}) alloc_.free_stream(dev, stream);
  }

  Alloc alloc_;
  int device_ = -1;
  int64_t in_bytes_ = 0, out_bytes_ = 0;
  Stream stream_{};
  std::vector<Slot> slots_;
};

}  // namespace fastsoup
