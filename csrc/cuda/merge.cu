// The file -> GPU streaming merge: a ring of pinned slots filled by CPU threads from the mapped
// files, copied on a copy stream, summed by the fused kernel on the caller's stream.
//
//   step j:  [host] fill slot j%S  ->  [copy stream] H2D slot j%S  ->  [stream] kernel (+ D2H for files)
//
// The host waits only for the previous use of the slot it is about to fill (step j-S), so filling
// step j overlaps the copy of j-1 and the kernel of j-2. Never DMA from pageable or mapped memory:
// the fill is an explicit CPU copy into pinned memory (also what lets the kernel page-cache reads
// run on every core).
#include <errno.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../cpu/threadpool.h"
#include "common.cuh"
#include "fastsoup/cuda.h"
#include "fastsoup/ring.h"

namespace fastsoup {
namespace cuda {

namespace {

constexpr int64_t kAlign = 256;
constexpr uint8_t kMapped = 1, kDevice = 2;  // in_mapped: 0 host memory, 1 file mapping, 2 device

int64_t align_up(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct Step {
  size_t segment;
  int64_t begin;  // element (or byte, for copies) offset in the segment
  int64_t count;
};

// Makes `device` current for a scope without ever throwing (for the frees, which run in
// destructors and at exit, when the runtime may be gone); the errors are cleared so that a later
// cudaGetLastError() does not report them as a kernel's.
class QuietDeviceGuard {
 public:
  explicit QuietDeviceGuard(int device) noexcept {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) cudaSetDevice(device);
    cudaGetLastError();
  }
  ~QuietDeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
    cudaGetLastError();
  }
  QuietDeviceGuard(const QuietDeviceGuard&) = delete;
  QuietDeviceGuard& operator=(const QuietDeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// The CUDA runtime as the ring's allocator (ring.h): allocations throw (FS_CUDA_CHECK), frees
// ignore errors.
struct CudaAllocator {
  using Event = cudaEvent_t;
  using Stream = cudaStream_t;
  void* host(int dev, size_t bytes) {
    DeviceGuard g(dev);
    void* p = nullptr;
    FS_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocDefault));
    return p;
  }
  void* device(int dev, size_t bytes) {
    DeviceGuard g(dev);
    void* p = nullptr;
    FS_CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
  }
  Event event(int dev) {
    DeviceGuard g(dev);
    cudaEvent_t e = nullptr;
    FS_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
  }
  Stream stream(int dev) {
    DeviceGuard g(dev);
    cudaStream_t s = nullptr;
    FS_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return s;
  }
  void free_host(int dev, void* p) noexcept {
    QuietDeviceGuard g(dev);
    cudaFreeHost(p);
  }
  void free_device(int dev, void* p) noexcept {
    QuietDeviceGuard g(dev);
    cudaFree(p);
  }
  void free_event(int dev, Event e) noexcept {
    QuietDeviceGuard g(dev);
    cudaEventDestroy(e);
  }
  void free_stream(int dev, Stream s) noexcept {
    QuietDeviceGuard g(dev);
    cudaStreamDestroy(s);
  }
};

using CudaRing = Ring<CudaAllocator>;

// One ring for the process, its merges serialized by ring_mutex(). Allocated once and never
// destroyed: a static object owning CUDA memory would be freed at exit, after (or while) the CUDA
// runtime shuts down; the process's exit returns the memory instead, and release_buffers() frees it
// earlier on request.
std::mutex& ring_mutex() {
  static std::mutex* mu = new std::mutex;
  return *mu;
}
CudaRing& ring() {
  static CudaRing* r = new CudaRing;
  return *r;
}

void check_plan(const MergePlan& p) {
  const int64_t K = p.num_inputs;
  const size_t S = p.segments.size();
  auto bad = [](const std::string& m) { throw std::invalid_argument("merge (cuda): " + m); };
  if (K < 0) bad("num_inputs must be >= 0");
  if (static_cast<int64_t>(p.weights.size()) != K && p.weights.size() != S * static_cast<size_t>(K))
    bad("expected " + std::to_string(K) + " weights, or " + std::to_string(K) + " per segment");
  const size_t SK = S * static_cast<size_t>(K);
  if (p.in_addr.size() != SK || p.in_dtype.size() != SK || p.in_mapped.size() != SK)
    bad("in_addr, in_dtype and in_mapped must have segments * num_inputs entries");
  if (p.accumulate) {
    for (const auto& g : p.segments)
      if (g.kind != SegmentKind::kWeightedSum || g.out_file != -1 || g.out_dtype != DType::kFloat32)
        bad("accumulate needs weighted sums into float32 device memory");
  }
  for (size_t s = 0; s < S; ++s) {
    const MergeSegment& g = p.segments[s];
    if (g.n < 0) bad("segment " + std::to_string(s) + ": n must be >= 0");
    if (g.out_file < -1 || g.out_file >= static_cast<int32_t>(p.fds.size())) bad("segment " + std::to_string(s) + ": out_file out of range");
    if (g.n > 0 && g.out_file == -1 && g.out_offset == 0) bad("segment " + std::to_string(s) + ": null output address");
    for (int64_t k = 0; k < K; ++k) {
      const size_t i = s * static_cast<size_t>(K) + static_cast<size_t>(k);
      if (p.in_mapped[i] > kDevice) bad("segment " + std::to_string(s) + ": unknown input location");
      if (g.kind == SegmentKind::kCopy && k > 0) continue;
      if (g.kind == SegmentKind::kWeightedSum && !valid_dtype_code(p.in_dtype[i])) bad("invalid input dtype code");
      if (g.n > 0 && p.in_addr[i] == 0) bad("segment " + std::to_string(s) + ": input " + std::to_string(k) + " is a null address");
    }
  }
}

}  // namespace

int64_t release_buffers() {
  std::lock_guard<std::mutex> lock(ring_mutex());
  return ring().release();
}

void run_merge(const MergePlan& p, const CudaMergeOptions& o, const MergeProgress& progress) {
  check_plan(p);
  if (o.slot_bytes < kAlign || o.nslots < 2) throw std::invalid_argument("merge (cuda): slot_bytes >= 256 and nslots >= 2 needed");
  const int64_t K = p.num_inputs;
  const bool per_segment_weights = static_cast<int64_t>(p.weights.size()) != K;

  // Steps: as many elements of a segment as the host inputs of one slot hold.
  std::vector<Step> steps;
  int64_t max_out = 0;
  for (size_t s = 0; s < p.segments.size(); ++s) {
    const MergeSegment& g = p.segments[s];
    if (g.n == 0) continue;
    int64_t per;
    if (g.kind == SegmentKind::kCopy) {
      per = o.slot_bytes;
    } else {
      int64_t host_elem = 0;
      for (int64_t k = 0; k < K; ++k) {
        const size_t i = s * static_cast<size_t>(K) + static_cast<size_t>(k);
        if (p.in_mapped[i] != kDevice) host_elem += static_cast<int64_t>(itemsize(static_cast<DType>(p.in_dtype[i])));
      }
      // Room for the per-input alignment padding, then whole 64-element groups.
      const int64_t room = o.slot_bytes - (K + 1) * kAlign;
      per = host_elem > 0 ? room / host_elem : (int64_t(1) << 40);
      if (g.out_file >= 0) per = std::min<int64_t>(per, o.slot_bytes / static_cast<int64_t>(itemsize(g.out_dtype)));
      per = std::max<int64_t>(per / 64 * 64, 64);
    }
    for (int64_t b = 0; b < g.n; b += per) {
      const int64_t c = std::min(per, g.n - b);
      steps.push_back({s, b, c});
      if (g.out_file >= 0) max_out = std::max(max_out, c * static_cast<int64_t>(g.kind == SegmentKind::kCopy ? 1 : itemsize(g.out_dtype)));
    }
  }

  std::lock_guard<std::mutex> lock(ring_mutex());
  DeviceGuard guard(o.device);
  cudaStream_t stream = as_stream(o.stream);
  CudaRing& r = ring();
  r.ensure(o.device, o.nslots, o.slot_bytes, max_out);
  struct Pending {
    bool busy = false;
    int fd = -1;
    int64_t offset = 0, len = 0;
    std::string name;  // the output file, for error messages
  };
  auto fd_name = [&](int32_t file) {
    const size_t f = static_cast<size_t>(file);
    return f < p.fd_names.size() ? p.fd_names[f] : std::string("output file");
  };
  std::vector<const void*> mapped_inputs;
  for (size_t i = 0; i < p.in_addr.size(); ++i)
    if (p.in_mapped[i] == kMapped) mapped_inputs.push_back(reinterpret_cast<const void*>(p.in_addr[i]));
  FaultWatch watch(mapped_inputs);
  std::vector<Pending> pending(static_cast<size_t>(o.nslots));
  auto finish = [&](int s) {
    Pending& q = pending[static_cast<size_t>(s)];
    if (!q.busy) return;
    FS_CUDA_CHECK(cudaEventSynchronize(r.slot(s).done));
    if (q.fd >= 0) pwrite_all(q.fd, r.slot(s).pinned_out, static_cast<size_t>(q.len), q.offset, q.name);
    q = Pending{};
  };

  int64_t done_in = 0, done_out = 0;
  const int fill_threads = o.fill_threads > 0 ? o.fill_threads : cpu::available_threads();
  try {
    for (size_t j = 0; j < steps.size(); ++j) {
      const int s = static_cast<int>(j % static_cast<size_t>(o.nslots));
      finish(s);
      const Step& st = steps[j];
      const MergeSegment& g = p.segments[st.segment];
      const size_t base = st.segment * static_cast<size_t>(K);
      char* pin = r.slot(s).pinned_in;
      char* dev = r.slot(s).dev_in;
      cudaEvent_t copied = r.slot(s).copied, done = r.slot(s).done;
      const int64_t out_unit = g.kind == SegmentKind::kCopy ? 1 : static_cast<int64_t>(itemsize(g.out_dtype));
      const int64_t out_len = st.count * out_unit;

      if (g.kind == SegmentKind::kCopy) {
        const char* src = reinterpret_cast<const char*>(p.in_addr[base]) + st.begin;
        const uint8_t loc = p.in_mapped[base];
        if (g.out_file >= 0) {  // host bytes to a file: no GPU involved
          if (loc == kDevice) {
            FS_CUDA_CHECK(cudaMemcpyAsync(r.slot(s).pinned_out, src, static_cast<size_t>(st.count), cudaMemcpyDeviceToHost, stream));
            FS_CUDA_CHECK(cudaEventRecord(done, stream));
            pending[static_cast<size_t>(s)] = {true, p.fds[static_cast<size_t>(g.out_file)], g.out_offset + st.begin, st.count,
                                               fd_name(g.out_file)};
          } else {
            try {
              pwrite_all(p.fds[static_cast<size_t>(g.out_file)], src, static_cast<size_t>(st.count), g.out_offset + st.begin,
                         fd_name(g.out_file));
            } catch (const OsError& e) {
              // The kernel reads a mapped source for pwrite: a truncated one gives EFAULT, not SIGBUS.
              if (e.err == EFAULT && loc == kMapped) throw InputFault(guarded_path(src));
              throw;
            }
          }
        } else {
          char* dst = reinterpret_cast<char*>(g.out_offset) + st.begin;
          if (loc == kDevice) {
            FS_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(st.count), cudaMemcpyDeviceToDevice, stream));
          } else {
            std::memcpy(pin, src, static_cast<size_t>(st.count));
            if (loc == kMapped) advise_range(src, static_cast<size_t>(st.count), Advice::kDontNeed);
            FS_CUDA_CHECK(cudaMemcpyAsync(dst, pin, static_cast<size_t>(st.count), cudaMemcpyHostToDevice, stream));
          }
          FS_CUDA_CHECK(cudaEventRecord(done, stream));
          pending[static_cast<size_t>(s)] = {true, -1, 0, 0};
        }
        if (watch.faulted()) throw InputFault(watch.path());
        done_in += st.count;
        done_out += st.count;
        if (progress) progress(done_in, done_out);
        continue;
      }

      // Weighted sum: host inputs into the pinned slot, each at a 256-byte aligned offset.
      std::vector<const void*> dev_ptr(static_cast<size_t>(K));
      struct Piece { const char* src; char* dst; int64_t len; bool mapped; };
      std::vector<Piece> pieces;
      int64_t off = 0;
      for (int64_t k = 0; k < K; ++k) {
        const size_t i = base + static_cast<size_t>(k);
        const int64_t unit = static_cast<int64_t>(itemsize(static_cast<DType>(p.in_dtype[i])));
        const char* src = reinterpret_cast<const char*>(p.in_addr[i]) + st.begin * unit;
        if (p.in_mapped[i] == kDevice) {
          dev_ptr[static_cast<size_t>(k)] = src;
          continue;
        }
        const int64_t len = st.count * unit;
        for (int64_t b = 0; b < len; b += (1 << 20))  // 1 MiB pieces spread over the fill threads
          pieces.push_back({src + b, pin + off + b, std::min<int64_t>(1 << 20, len - b), p.in_mapped[i] == kMapped});
        dev_ptr[static_cast<size_t>(k)] = dev + off;
        off = align_up(off + len);
        done_in += len;
      }
      if (!pieces.empty()) {
        cpu::parallel_for(static_cast<int64_t>(pieces.size()), fill_threads, [&](int64_t t) {
          const Piece& q = pieces[static_cast<size_t>(t)];
          std::memcpy(q.dst, q.src, static_cast<size_t>(q.len));
          if (q.mapped) advise_range(q.src, static_cast<size_t>(q.len), Advice::kDontNeed);
        });
        // A fill thread read an input truncated under it (zeros were read): stop before using it.
        if (watch.faulted()) throw InputFault(watch.path());
        FS_CUDA_CHECK(cudaMemcpyAsync(dev, pin, static_cast<size_t>(off), cudaMemcpyHostToDevice, r.copy_stream()));
        FS_CUDA_CHECK(cudaEventRecord(copied, r.copy_stream()));
        FS_CUDA_CHECK(cudaStreamWaitEvent(stream, copied, 0));
      }
      void* out = g.out_file >= 0 ? static_cast<void*>(r.slot(s).dev_out)
                                  : static_cast<void*>(reinterpret_cast<char*>(g.out_offset) + st.begin * out_unit);
      std::vector<DType> dts(static_cast<size_t>(K));
      for (int64_t k = 0; k < K; ++k) dts[static_cast<size_t>(k)] = static_cast<DType>(p.in_dtype[base + static_cast<size_t>(k)]);
      WeightedSumParams wp;
      wp.inputs = dev_ptr.data();
      wp.input_dtypes = dts.data();
      wp.weights = p.weights.data() + (per_segment_weights ? base : 0);
      wp.num_inputs = K;
      wp.out = out;
      wp.out_dtype = g.out_dtype;
      wp.n = st.count;
      wp.accumulate = p.accumulate;
      wp.divisor = p.divisor;
      wp.divisor_lo = p.divisor_lo;
      Status ks = weighted_sum(wp, o.device, o.stream);
      if (!ks.ok) throw std::invalid_argument("merge (cuda): " + ks.message);
      if (g.out_file >= 0) {
        FS_CUDA_CHECK(cudaMemcpyAsync(r.slot(s).pinned_out, out, static_cast<size_t>(out_len), cudaMemcpyDeviceToHost, stream));
        pending[static_cast<size_t>(s)] = {true, p.fds[static_cast<size_t>(g.out_file)], g.out_offset + st.begin * out_unit, out_len,
                                           fd_name(g.out_file)};
      } else {
        pending[static_cast<size_t>(s)] = {true, -1, 0, 0};
      }
      FS_CUDA_CHECK(cudaEventRecord(done, stream));
      add_counters(off, out_len);
      done_out += out_len;
      if (progress) progress(done_in, done_out);
    }
    for (int s = 0; s < o.nslots; ++s) finish(s);
    FS_CUDA_CHECK(cudaStreamSynchronize(stream));
  } catch (...) {
    // Leave no work in flight that reads the ring or writes the output.
    cudaStreamSynchronize(stream);
    cudaStreamSynchronize(r.copy_stream());
    cudaGetLastError();  // the error travels in the exception; a later check must not see it again
    for (auto& q : pending) q = Pending{};
    throw;
  }
}

}  // namespace cuda
}  // namespace fastsoup
