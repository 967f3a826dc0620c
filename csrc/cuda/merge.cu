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
#include "fastsoup/plan.h"
#include "fastsoup/ring.h"

namespace fastsoup {
namespace cuda {

namespace {

constexpr int64_t kAlign = 256;  // each host input's offset in a slot (cuda_step_rule's alignment)

int64_t align_up(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

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

}  // namespace

int64_t release_buffers() {
  std::lock_guard<std::mutex> lock(ring_mutex());
  return ring().release();
}

void run_merge(const MergePlan& p, const MergeRun& run, const CudaMergeOptions& o, const MergeProgress& progress) {
  run.check(p, /*device=*/true, "MergePlan.run_cuda");
  o.check("MergePlan.run_cuda");
  const int64_t K = p.num_inputs();
  const StepPlan plan = plan_steps(p, cuda_step_rule(o));
  const std::vector<Step>& steps = plan.steps;

  std::lock_guard<std::mutex> lock(ring_mutex());
  DeviceGuard guard(o.device);
  cudaStream_t stream = as_stream(o.stream);
  // The planner's largest step, not slot_bytes alone: with a tiny slot_bytes its minimum step (64
  // elements) may need more.
  CudaRing& r = ring();
  r.ensure(o.device, o.nslots, std::max(o.slot_bytes, plan.max_in_bytes), plan.max_out_bytes);
  struct Pending {
    bool busy = false;
    int fd = -1;
    int64_t offset = 0, len = 0;
    std::string name;  // the output file, for error messages
  };
  FaultWatch watch(p.mapped_inputs());
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
  std::vector<const void*> dev_ptr(static_cast<size_t>(K));
  std::vector<DType> dts(static_cast<size_t>(K));
  try {
    for (size_t j = 0; j < steps.size(); ++j) {
      const int s = static_cast<int>(j % static_cast<size_t>(o.nslots));
      finish(s);
      const Step& st = steps[j];
      const MergeSegment& g = p.segment(st.segment);
      const CudaRing::Slot& slot = r.slot(s);
      char* pin = slot.pinned_in;
      char* dev = slot.dev_in;
      const int64_t out_unit = g.kind == SegmentKind::kCopy ? 1 : static_cast<int64_t>(itemsize(g.out_dtype));
      const int64_t out_len = st.count * out_unit;

      if (g.kind == SegmentKind::kCopy) {
        const char* src = static_cast<const char*>(p.input(st.segment, 0)) + st.begin;
        const InputLocation loc = p.input_location(st.segment, 0);
        if (g.out_file >= 0) {  // host bytes to a file: no GPU involved
          const int fd = run.fds[static_cast<size_t>(g.out_file)];
          if (loc == InputLocation::kDevice) {
            FS_CUDA_CHECK(cudaMemcpyAsync(slot.pinned_out, src, static_cast<size_t>(st.count), cudaMemcpyDeviceToHost, stream));
            FS_CUDA_CHECK(cudaEventRecord(slot.done, stream));
            pending[static_cast<size_t>(s)] = {true, fd, g.out_offset + st.begin, st.count, run.fd_name(g.out_file)};
          } else {
            try {
              pwrite_all(fd, src, static_cast<size_t>(st.count), g.out_offset + st.begin, run.fd_name(g.out_file));
            } catch (const OsError& e) {
              // The kernel reads a mapped source for pwrite: a truncated one gives EFAULT, not SIGBUS.
              if (e.err == EFAULT && loc == InputLocation::kMapped) throw InputFault(guarded_path(src));
              throw;
            }
          }
        } else {
          char* dst = reinterpret_cast<char*>(g.out_offset) + st.begin;
          if (loc == InputLocation::kDevice) {
            FS_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(st.count), cudaMemcpyDeviceToDevice, stream));
          } else {
            std::memcpy(pin, src, static_cast<size_t>(st.count));
            if (loc == InputLocation::kMapped) advise_range(src, static_cast<size_t>(st.count), Advice::kDontNeed);
            FS_CUDA_CHECK(cudaMemcpyAsync(dst, pin, static_cast<size_t>(st.count), cudaMemcpyHostToDevice, stream));
          }
          FS_CUDA_CHECK(cudaEventRecord(slot.done, stream));
          pending[static_cast<size_t>(s)] = {true, -1, 0, 0};
        }
        if (watch.faulted()) throw InputFault(watch.path());
        done_in += st.count;
        done_out += st.count;
        if (progress) progress(done_in, done_out);
        continue;
      }

      // Weighted sum: host inputs into the pinned slot, each at a 256-byte aligned offset.
      struct Piece { const char* src; char* dst; int64_t len; bool mapped; };
      std::vector<Piece> pieces;
      int64_t off = 0;
      for (int64_t k = 0; k < K; ++k) {
        const DType dt = p.input_dtype(st.segment, k);
        const InputLocation loc = p.input_location(st.segment, k);
        const int64_t unit = static_cast<int64_t>(itemsize(dt));
        const char* src = static_cast<const char*>(p.input(st.segment, k)) + st.begin * unit;
        dts[static_cast<size_t>(k)] = dt;
        if (loc == InputLocation::kDevice) {
          dev_ptr[static_cast<size_t>(k)] = src;
          continue;
        }
        const int64_t len = st.count * unit;
        for (int64_t b = 0; b < len; b += (1 << 20))  // 1 MiB pieces spread over the fill threads
          pieces.push_back({src + b, pin + off + b, std::min<int64_t>(1 << 20, len - b), loc == InputLocation::kMapped});
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
        FS_CUDA_CHECK(cudaEventRecord(slot.copied, r.copy_stream()));
        FS_CUDA_CHECK(cudaStreamWaitEvent(stream, slot.copied, 0));
      }
      void* out = g.out_file >= 0 ? static_cast<void*>(slot.dev_out)
                                  : static_cast<void*>(reinterpret_cast<char*>(g.out_offset) + st.begin * out_unit);
      WeightedSumParams wp;
      wp.inputs = dev_ptr.data();
      wp.input_dtypes = dts.data();
      wp.weights = run.weights_of(p, st.segment);
      wp.num_inputs = K;
      wp.out = out;
      wp.out_dtype = g.out_dtype;
      wp.n = st.count;
      wp.accumulate = run.accumulate;
      wp.divisor = run.divisor;
      wp.divisor_lo = run.divisor_lo;
      Status ks = weighted_sum(wp, o.device, o.stream);
      if (!ks.ok) throw std::invalid_argument("MergePlan.run_cuda: " + ks.message);
      if (g.out_file >= 0) {
        FS_CUDA_CHECK(cudaMemcpyAsync(slot.pinned_out, out, static_cast<size_t>(out_len), cudaMemcpyDeviceToHost, stream));
        pending[static_cast<size_t>(s)] = {true, run.fds[static_cast<size_t>(g.out_file)], g.out_offset + st.begin * out_unit,
                                           out_len, run.fd_name(g.out_file)};
      } else {
        pending[static_cast<size_t>(s)] = {true, -1, 0, 0};
      }
      FS_CUDA_CHECK(cudaEventRecord(slot.done, stream));
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

std::vector<std::vector<double>> run_dots(const std::vector<DotTensor>& tensors, const CudaMergeOptions& o) {
  o.check("run_dots");
  // Check everything before any work: one piece of a tensor per step needs at least one chunk of its
  // host inputs in a slot.
  int64_t max_chunks = 0, max_k = 0, min_slot = 0;
  std::vector<const void*> mapped;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const DotTensor& d = tensors[t];
    const std::string at = "run_dots: tensor " + std::to_string(t) + ": ";
    const size_t K = d.inputs.size();
    if (d.dtypes.size() != K || d.locations.size() != K)
      throw std::invalid_argument(at + "inputs, dtypes and locations differ in length");
    if (d.n < 0) throw std::invalid_argument(at + "n < 0");
    if (!valid_dtype_code(static_cast<int>(d.g_dtype))) throw std::invalid_argument(at + "invalid dtype code of g");
    if (d.n > 0 && K > 0 && d.g == nullptr) throw std::invalid_argument(at + "g is a null address");
    int64_t host_chunk = 0;
    for (size_t k = 0; k < K; ++k) {
      if (!valid_dtype_code(static_cast<int>(d.dtypes[k]))) throw std::invalid_argument(at + "invalid dtype code");
      if (d.n > 0 && d.inputs[k] == nullptr) throw std::invalid_argument(at + "an input is a null address");
      const InputLocation loc = d.locations[k];
      if (loc != InputLocation::kHost && loc != InputLocation::kMapped && loc != InputLocation::kDevice)
        throw std::invalid_argument(at + "invalid input location");
      if (loc != InputLocation::kDevice) host_chunk += align_up(kDotChunk * static_cast<int64_t>(itemsize(d.dtypes[k])));
      if (loc == InputLocation::kMapped) mapped.push_back(d.inputs[k]);
    }
    max_chunks = std::max<int64_t>(max_chunks, (d.n + kDotChunk - 1) / kDotChunk);
    max_k = std::max<int64_t>(max_k, static_cast<int64_t>(K));
    min_slot = std::max(min_slot, host_chunk);
  }
  std::vector<std::vector<double>> out(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) out[t].assign(tensors[t].inputs.size(), 0.0);
  if (max_chunks == 0 || max_k == 0) return out;

  std::lock_guard<std::mutex> lock(ring_mutex());
  DeviceGuard guard(o.device);
  cudaStream_t stream = as_stream(o.stream);
  CudaRing& r = ring();
  // Steps of at most slot_bytes of host inputs (the ring may be larger, from an earlier merge).
  const int64_t slot_bytes = std::max(o.slot_bytes, min_slot);
  r.ensure(o.device, o.nslots, slot_bytes, 0);
  FaultWatch watch(mapped);
  const int fill_threads = o.fill_threads > 0 ? o.fill_threads : cpu::available_threads();
  double* partial = nullptr;
  double* dout = nullptr;
  std::vector<int64_t> first(tensors.size());  // each tensor's first result in dout
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    first[t] = total;
    total += static_cast<int64_t>(tensors[t].inputs.size());
  }
  std::vector<bool> busy(static_cast<size_t>(r.nslots()), false);
  auto wait_slot = [&](int s) {
    if (busy[static_cast<size_t>(s)]) FS_CUDA_CHECK(cudaEventSynchronize(r.slot(s).done));
    busy[static_cast<size_t>(s)] = false;
  };
  try {
    FS_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&partial),
                                  static_cast<size_t>(max_chunks * max_k) * sizeof(double), stream));
    FS_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&dout), static_cast<size_t>(total) * sizeof(double), stream));
    size_t j = 0;  // steps so far: step j uses slot j % nslots
    std::vector<const void*> dev_ptr;
    for (size_t t = 0; t < tensors.size(); ++t) {
      const DotTensor& d = tensors[t];
      const int64_t K = static_cast<int64_t>(d.inputs.size());
      if (d.n == 0 || K == 0) continue;  // zeros (already in out)
      const int64_t nchunks = (d.n + kDotChunk - 1) / kDotChunk;
      int64_t host_chunk = 0;  // slot bytes of one chunk of every host input
      for (int64_t k = 0; k < K; ++k)
        if (d.locations[static_cast<size_t>(k)] != InputLocation::kDevice)
          host_chunk += align_up(kDotChunk * static_cast<int64_t>(itemsize(d.dtypes[static_cast<size_t>(k)])));
      // Chunks per step: as many as the slot holds (all of them when every input is on the device).
      const int64_t per_step = host_chunk == 0 ? nchunks : std::max<int64_t>(1, slot_bytes / host_chunk);
      dev_ptr.assign(static_cast<size_t>(K), nullptr);
      const size_t g_unit = itemsize(d.g_dtype);
      for (int64_t c0 = 0; c0 < nchunks; c0 += per_step, ++j) {
        const int64_t begin = c0 * kDotChunk;
        const int64_t count = std::min<int64_t>(per_step * kDotChunk, d.n - begin);
        const int s = static_cast<int>(j % static_cast<size_t>(r.nslots()));
        const CudaRing::Slot& slot = r.slot(s);
        struct Piece { const char* src; char* dst; int64_t len; bool mapped; };
        std::vector<Piece> pieces;
        int64_t off = 0;
        if (host_chunk > 0) wait_slot(s);  // its previous step's copy and kernels are done with it
        for (int64_t k = 0; k < K; ++k) {
          const DType dt = d.dtypes[static_cast<size_t>(k)];
          const int64_t unit = static_cast<int64_t>(itemsize(dt));
          const char* src = static_cast<const char*>(d.inputs[static_cast<size_t>(k)]) + begin * unit;
          if (d.locations[static_cast<size_t>(k)] == InputLocation::kDevice) {
            dev_ptr[static_cast<size_t>(k)] = src;
            continue;
          }
          const int64_t len = count * unit;
          for (int64_t b = 0; b < len; b += (1 << 20))  // 1 MiB pieces spread over the fill threads
            pieces.push_back({src + b, slot.pinned_in + off + b, std::min<int64_t>(1 << 20, len - b),
                              d.locations[static_cast<size_t>(k)] == InputLocation::kMapped});
          dev_ptr[static_cast<size_t>(k)] = slot.dev_in + off;
          off = align_up(off + len);
        }
        if (!pieces.empty()) {
          cpu::parallel_for(static_cast<int64_t>(pieces.size()), fill_threads, [&](int64_t i) {
            const Piece& q = pieces[static_cast<size_t>(i)];
            std::memcpy(q.dst, q.src, static_cast<size_t>(q.len));
            if (q.mapped) advise_range(q.src, static_cast<size_t>(q.len), Advice::kDontNeed);
          });
          if (watch.faulted()) throw InputFault(watch.path());
          FS_CUDA_CHECK(cudaMemcpyAsync(slot.dev_in, slot.pinned_in, static_cast<size_t>(off), cudaMemcpyHostToDevice,
                                        r.copy_stream()));
          FS_CUDA_CHECK(cudaEventRecord(slot.copied, r.copy_stream()));
          FS_CUDA_CHECK(cudaStreamWaitEvent(stream, slot.copied, 0));
        }
        launch_dot_partials(dev_ptr.data(), d.dtypes.data(), K, static_cast<const char*>(d.g) + begin * g_unit,
                            d.g_dtype, count, partial + c0 * K, K, o.device, stream);
        if (!pieces.empty()) {
          FS_CUDA_CHECK(cudaEventRecord(slot.done, stream));
          busy[static_cast<size_t>(s)] = true;
          add_counters(off, 0);
        }
      }
      launch_dot_finish(partial, nchunks, K, K, dout + first[t], stream);  // after the tensor's partials (one stream)
    }
    std::vector<double> host(static_cast<size_t>(total));
    FS_CUDA_CHECK(cudaMemcpyAsync(host.data(), dout, static_cast<size_t>(total) * sizeof(double), cudaMemcpyDeviceToHost,
                                  stream));
    FS_CUDA_CHECK(cudaFreeAsync(partial, stream));
    partial = nullptr;
    FS_CUDA_CHECK(cudaFreeAsync(dout, stream));
    dout = nullptr;
    FS_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (size_t t = 0; t < tensors.size(); ++t)
      for (size_t k = 0; k < out[t].size(); ++k) out[t][k] = host[static_cast<size_t>(first[t]) + k];
  } catch (...) {
    // Leave no work in flight that reads the ring, then free the temporaries.
    cudaStreamSynchronize(stream);
    cudaStreamSynchronize(r.copy_stream());
    if (partial != nullptr) cudaFree(partial);
    if (dout != nullptr) cudaFree(dout);
    cudaGetLastError();  // the error travels in the exception; a later check must not see it again
    throw;
  }
  return out;
}

}  // namespace cuda
}  // namespace fastsoup
