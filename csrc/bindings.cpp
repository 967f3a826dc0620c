// fastsoup._core: the one Python binding of the native core. Plain values only (addresses, byte
// counts, dtype codes); no torch. Every entry point releases the GIL around the native work.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <utility>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastsoup/io.h"
#include "fastsoup/kernels.h"
#include "fastsoup/plan.h"
#include "fastsoup/sparse.h"
#ifdef FASTSOUP_WITH_CUDA
#include "fastsoup/cuda.h"
#endif

namespace py = pybind11;
using namespace fastsoup;

#ifndef FASTSOUP_VERSION
#define FASTSOUP_VERSION "0.0.0"
#endif

namespace {

void check(const Status& s) {
  if (!s.ok) throw std::invalid_argument(s.message);
}

DType to_dtype(const char* op, const std::string& what, int code) {
  if (!valid_dtype_code(code))
    throw std::invalid_argument(std::string(op) + ": " + what + " has dtype code " + std::to_string(code) +
                                ", expected 0 (float16), 1 (bfloat16), 2 (float32) or 3 (float64)");
  return static_cast<DType>(code);
}

struct Inputs {
  std::vector<const void*> ptrs;
  std::vector<DType> dtypes;
};

Inputs make_inputs(const char* op, const std::vector<uintptr_t>& addrs, const std::vector<int>& codes) {
  if (addrs.size() != codes.size())
    throw std::invalid_argument(std::string(op) + ": got " + std::to_string(addrs.size()) + " input addresses and " +
                                std::to_string(codes.size()) + " dtypes");
  Inputs in;
  for (size_t k = 0; k < addrs.size(); ++k) {
    in.ptrs.push_back(reinterpret_cast<const void*>(addrs[k]));
    in.dtypes.push_back(to_dtype(op, "inputs[" + std::to_string(k) + "]", codes[k]));
  }
  return in;
}

// Parameters of the three primitives from the binding's plain values; `in` (and `weights`, `out`)
// must outlive them. Shared by the CPU and the CUDA entry points.
WeightedSumParams weighted_sum_params(const char* op, const Inputs& in, const std::vector<double>& weights, int64_t n,
                                      uintptr_t out, int out_dtype, bool accumulate, double divisor,
                                      double divisor_lo) {
  if (weights.size() != in.ptrs.size())
    throw std::invalid_argument(std::string(op) + ": got " + std::to_string(in.ptrs.size()) + " inputs and " +
                                std::to_string(weights.size()) + " weights");
  WeightedSumParams p;
  p.inputs = in.ptrs.data();
  p.input_dtypes = in.dtypes.data();
  p.weights = weights.data();
  p.num_inputs = static_cast<int64_t>(in.ptrs.size());
  p.out = reinterpret_cast<void*>(out);
  p.out_dtype = to_dtype(op, "out", out_dtype);
  p.n = n;
  p.accumulate = accumulate;
  p.divisor = divisor;
  p.divisor_lo = divisor_lo;
  return p;
}

MultiDotParams multi_dot_params(const char* op, const Inputs& in, uintptr_t g, int g_dtype, int64_t n,
                                std::vector<double>& out) {
  out.assign(in.ptrs.size(), 0.0);
  MultiDotParams p;
  p.inputs = in.ptrs.data();
  p.input_dtypes = in.dtypes.data();
  p.num_inputs = static_cast<int64_t>(in.ptrs.size());
  p.g = reinterpret_cast<const void*>(g);
  p.g_dtype = to_dtype(op, "g", g_dtype);
  p.n = n;
  p.out = out.data();
  return p;
}

GramParams gram_params(const Inputs& in, int64_t n, std::vector<double>& flat) {
  flat.assign(in.ptrs.size() * in.ptrs.size(), 0.0);
  GramParams p;
  p.inputs = in.ptrs.data();
  p.input_dtypes = in.dtypes.data();
  p.num_inputs = static_cast<int64_t>(in.ptrs.size());
  p.n = n;
  p.out = flat.data();
  return p;
}

std::vector<std::vector<double>> square(const std::vector<double>& flat, size_t K) {
  std::vector<std::vector<double>> out(K, std::vector<double>(K));
  for (size_t a = 0; a < K; ++a)
    for (size_t b = 0; b < K; ++b) out[a][b] = flat[a * K + b];
  return out;
}

// sparse_merge's per-model list: one value per model, or empty when the method takes none.
std::vector<double> per_model(const char* what, const std::vector<double>& v, size_t K) {
  if (!v.empty() && v.size() != K)
    throw std::invalid_argument(std::string("sparse_merge: ") + what + " has " + std::to_string(v.size()) +
                                " values for " + std::to_string(K) + " models");
  return v;
}

SparseMethod sparse_method(const std::string& name) {
  if (name == "task_arithmetic") return SparseMethod::kTaskArithmetic;
  if (name == "ties") return SparseMethod::kTies;
  if (name == "breadcrumbs") return SparseMethod::kBreadcrumbs;
  if (name == "breadcrumbs_ties") return SparseMethod::kBreadcrumbsTies;
  if (name == "dare_linear") return SparseMethod::kDareLinear;
  if (name == "dare_ties") return SparseMethod::kDareTies;
  throw std::invalid_argument("sparse_merge: unknown method '" + name +
                              "', expected task_arithmetic, ties, breadcrumbs, breadcrumbs_ties, dare_linear or "
                              "dare_ties");
}

Rescale sparse_rescale(const std::optional<std::string>& r) {
  if (!r) return Rescale::kNone;
  if (*r == "density") return Rescale::kDensity;
  if (*r == "l1") return Rescale::kL1;
  throw std::invalid_argument("sparse_merge: rescale must be None, 'density' or 'l1', got '" + *r + "'");
}

void check_threads(const char* op, int threads) {
  if (threads < 0) throw std::invalid_argument(std::string(op) + ": threads must be >= 0 (0 = all cores)");
}

// The segment lists of fastsoup.engine._Segments -> a MergePlan (which checks everything else).
std::shared_ptr<MergePlan> make_plan(int64_t num_inputs, const std::vector<int64_t>& n, const std::vector<int>& kind,
                                     const std::vector<int>& out_file, const std::vector<int64_t>& out_offset,
                                     const std::vector<int>& out_dtype, std::vector<uintptr_t> in_addr,
                                     std::vector<int32_t> in_dtype, std::vector<int32_t> in_loc) {
  const size_t S = n.size();
  if (kind.size() != S || out_file.size() != S || out_offset.size() != S || out_dtype.size() != S)
    throw std::invalid_argument("MergePlan: n, kind, out_file, out_offset and out_dtype must have one entry per segment, got " +
                                std::to_string(S) + ", " + std::to_string(kind.size()) + ", " +
                                std::to_string(out_file.size()) + ", " + std::to_string(out_offset.size()) + " and " +
                                std::to_string(out_dtype.size()));
  std::vector<MergeSegment> segments(S);
  for (size_t s = 0; s < S; ++s) {
    MergeSegment& g = segments[s];
    g.n = n[s];
    g.kind = static_cast<SegmentKind>(kind[s]);
    g.out_file = out_file[s];
    g.out_offset = out_offset[s];
    g.out_dtype = static_cast<DType>(out_dtype[s]);
  }
  return std::make_shared<MergePlan>(num_inputs, std::move(segments), std::move(in_addr), std::move(in_dtype),
                                     std::move(in_loc));
}

MergeRun make_run(std::vector<double> weights, std::vector<int> fds, std::vector<std::string> fd_names, bool accumulate,
                  double divisor, double divisor_lo) {
  MergeRun r;
  r.weights = std::move(weights);
  r.fds = std::move(fds);
  r.fd_names = std::move(fd_names);
  r.accumulate = accumulate;
  r.divisor = divisor;
  r.divisor_lo = divisor_lo;
  return r;
}

// After every step: give Python a chance to see Ctrl-C, and report progress.
MergeProgress progress_callback(const py::object& progress) {
  return [&progress](int64_t bytes_in, int64_t bytes_out) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (!progress.is_none()) progress(bytes_in, bytes_out);
  };
}

// sparse_merge's arguments -> SparseMergeParams (the vectors it points into live in the struct).
struct SparseArgs {
  SparseMergeParams p;
  std::vector<const void*> ptrs;
  std::vector<DType> dtypes;
  std::vector<double> weights, dens, gams;
};

std::unique_ptr<SparseArgs> sparse_args(const std::string& method, int64_t n,
                                        const std::vector<std::pair<uintptr_t, int>>& inputs,
                                        std::pair<uintptr_t, int> base, std::pair<uintptr_t, int> out,
                                        const std::vector<double>& weights, const std::vector<double>& density,
                                        const std::vector<double>& gamma, double lam, bool normalize,
                                        const std::optional<std::string>& rescale, uint64_t seed, uint64_t name_hash,
                                        int threads, int64_t chunk) {
  auto a = std::make_unique<SparseArgs>();
  SparseMergeParams& p = a->p;
  std::vector<const void*>& ptrs = a->ptrs;
  std::vector<DType>& dtypes = a->dtypes;
  const size_t K = inputs.size();
  p.method = sparse_method(method);
  p.n = n;
  for (size_t k = 0; k < K; ++k) {
    ptrs.push_back(reinterpret_cast<const void*>(inputs[k].first));
    dtypes.push_back(to_dtype("sparse_merge", "inputs[" + std::to_string(k) + "]", inputs[k].second));
  }
  p.num_inputs = static_cast<int64_t>(K);
  p.inputs = ptrs.data();
  p.input_dtypes = dtypes.data();
  p.base = reinterpret_cast<const void*>(base.first);
  p.base_dtype = to_dtype("sparse_merge", "base", base.second);
  p.out = reinterpret_cast<void*>(out.first);
  p.out_dtype = to_dtype("sparse_merge", "out", out.second);
  if (weights.size() != K)
    throw std::invalid_argument("sparse_merge: got " + std::to_string(K) + " inputs and " +
                                std::to_string(weights.size()) + " weights");
  a->dens = per_model("density", density, K);
  a->gams = per_model("gamma", gamma, K);
  a->weights = weights;
  const std::vector<double>& dens = a->dens;
  const std::vector<double>& gams = a->gams;
  const bool is_ta = p.method == SparseMethod::kTaskArithmetic;
  const bool is_band = p.method == SparseMethod::kBreadcrumbs || p.method == SparseMethod::kBreadcrumbsTies;
  if (is_ta && !dens.empty()) throw std::invalid_argument("sparse_merge: task_arithmetic takes no density");
  if (!is_ta && dens.empty()) throw std::invalid_argument("sparse_merge: " + method + " needs a density per model");
  if (is_band && gams.empty()) throw std::invalid_argument("sparse_merge: " + method + " needs a gamma per model");
  if (!is_band && !gams.empty()) throw std::invalid_argument("sparse_merge: " + method + " takes no gamma");
  p.weights = a->weights.data();
  p.density = dens.empty() ? nullptr : dens.data();
  p.gamma = gams.empty() ? nullptr : gams.data();
  p.lam = lam;
  p.normalize = normalize;
  p.rescale = sparse_rescale(rescale);
  p.seed = seed;
  p.name_hash = name_hash;
  p.threads = threads;
  p.chunk = chunk;
  return a;
}

[[noreturn]] void no_cuda(const char* op) {
  throw std::runtime_error(std::string(op) + ": this build of fastsoup has no CUDA (rebuild where nvcc is found, "
                           "with FASTSOUP_CUDA=ON)");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastsoup native core: mapped files, fused CPU kernels, the streaming merge executor (no torch).";
  m.attr("__version__") = FASTSOUP_VERSION;

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InputFault& e) {
      py::object err = py::module_::import("fastsoup._core").attr("InputFaultError")(e.err, e.what(), e.path);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
    } catch (const OsError& e) {
      py::object err = py::module_::import("builtins").attr("OSError")(e.err, e.what(), e.path);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
    }
  });

  // OSError raised when an input faulted during a merge (truncated while mapped, or unreadable).
  m.attr("InputFaultError") = py::reinterpret_steal<py::object>(
      PyErr_NewExceptionWithDoc("fastsoup._core.InputFaultError",
                                "An input file was truncated (or could not be read) while it was being read.",
                                PyExc_OSError, nullptr));

  py::class_<MappedFile, std::shared_ptr<MappedFile>>(m, "MappedFile", py::buffer_protocol(),
                                                      "A regular file mapped (read-only and shared, or private "
                                                      "copy-on-write), guarded against truncation (see io.h).")
      .def(py::init<std::string, bool>(), py::arg("path"), py::arg("writable") = false,
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("path", &MappedFile::path)
      .def_property_readonly("address", &MappedFile::address, "Address of byte 0 (0 for an empty file).")
      .def_property_readonly("size", &MappedFile::size)
      .def_property_readonly("writable", &MappedFile::writable)
      .def("fileno", &MappedFile::fileno, "The descriptor the file was opened with (kept open; for fstat).")
      .def_property_readonly("faults", &MappedFile::faults,
                             "Reads of this mapping that faulted (a page past the end of a truncated file, or an "
                             "I/O error) and read zeros instead.")
      .def(
          "advise",
          [](const MappedFile& f, size_t offset, size_t length, const std::string& advice) {
            Advice a;
            if (advice == "normal") a = Advice::kNormal;
            else if (advice == "sequential") a = Advice::kSequential;
            else if (advice == "willneed") a = Advice::kWillNeed;
            else if (advice == "dontneed") a = Advice::kDontNeed;
            else throw std::invalid_argument("advise: advice must be normal, sequential, willneed or dontneed");
            py::gil_scoped_release release;
            f.advise(offset, length, a);
          },
          py::arg("offset"), py::arg("length"), py::arg("advice"))
      .def_buffer([](MappedFile& f) -> py::buffer_info {
        static const char empty = 0;
        void* ptr = f.size() ? reinterpret_cast<void*>(f.address()) : const_cast<char*>(&empty);
        return py::buffer_info(ptr, 1, py::format_descriptor<uint8_t>::format(), 1, {static_cast<py::ssize_t>(f.size())},
                               {static_cast<py::ssize_t>(1)}, /*readonly=*/!f.writable());
      });

  py::class_<FaultGuard, std::shared_ptr<FaultGuard>>(
      m, "FaultGuard", "Catches the faults of reads of a range of a file mapping made by someone else (torch.load's "
                       "mmap): zeros are read instead and counted. Keep it alive no longer than the mapping.")
      .def(py::init([](uintptr_t begin, size_t length, std::string path) {
             return std::make_shared<FaultGuard>(reinterpret_cast<const void*>(begin), length, std::move(path));
           }),
           py::arg("begin"), py::arg("length"), py::arg("path"))
      .def_property_readonly("faults", &FaultGuard::faults)
      .def_property_readonly("active", &FaultGuard::active)
      .def_property_readonly("path", &FaultGuard::path);
  m.def("fault_count", &fault_count, "Faults caught in guarded mappings since the process started.");

  m.def(
      "weighted_sum",
      [](const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, const std::vector<double>& weights,
         int64_t n, uintptr_t out, int out_dtype, bool accumulate, int threads, double divisor,
         double divisor_lo) {
        Inputs in = make_inputs("weighted_sum", inputs, dtypes);
        check_threads("weighted_sum", threads);
        WeightedSumParams p =
            weighted_sum_params("weighted_sum", in, weights, n, out, out_dtype, accumulate, divisor, divisor_lo);
        p.threads = threads;
        check(weighted_sum_cpu(p));
      },
      py::arg("inputs"), py::arg("dtypes"), py::arg("weights"), py::arg("n"), py::arg("out"), py::arg("out_dtype"),
      py::arg("accumulate") = false, py::arg("threads") = 0, py::arg("divisor") = 1.0, py::arg("divisor_lo") = 0.0,
      py::call_guard<py::gil_scoped_release>(),
      "out[i] = round(sum_k weights[k] * inputs[k][i] / divisor) over n elements at raw addresses (binary64 "
      "arithmetic, one rounding; see csrc/include/fastsoup/kernels.h).");

  m.def(
      "sparse_merge",
      [](const std::string& method, int64_t n, const std::vector<std::pair<uintptr_t, int>>& inputs,
         std::pair<uintptr_t, int> base, std::pair<uintptr_t, int> out, const std::vector<double>& weights,
         const std::vector<double>& density, const std::vector<double>& gamma, double lam, bool normalize,
         const std::optional<std::string>& rescale, uint64_t seed, uint64_t name_hash, int threads, int64_t chunk) {
        check(sparse_merge_cpu(sparse_args(method, n, inputs, base, out, weights, density, gamma, lam, normalize,
                                           rescale, seed, name_hash, threads, chunk)->p));
      },
      py::arg("method"), py::arg("n"), py::arg("inputs"), py::arg("base"), py::arg("out"), py::arg("weights"),
      py::kw_only(), py::arg("density") = std::vector<double>(), py::arg("gamma") = std::vector<double>(),
      py::arg("lam") = 1.0, py::arg("normalize") = false, py::arg("rescale") = py::none(), py::arg("seed") = 0,
      py::arg("name_hash") = 0, py::arg("threads") = 0, py::arg("chunk") = 0,
      py::call_guard<py::gil_scoped_release>(),
      R"doc(sparse_merge(method, n, inputs, base, out, weights, *, density=[], gamma=[], lam=1.0, normalize=False,
rescale=None, seed=0, name_hash=0, threads=0, chunk=0)

One tensor of a task-vector merge over host memory, bit for bit fastsoup._reference's method of the
same name (csrc/include/fastsoup/sparse.h gives the order of operations).

method: "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear" or "dare_ties".
n: elements of every tensor. inputs: K >= 1 (address, dtype code) of the models' tensors; base and
out: (address, dtype code); dtype codes 0 float16, 1 bfloat16, 2 float32, 3 float64; out overlaps
nothing. weights: K floats. density: K floats in [0, 1] (every method but task_arithmetic: TIES and
breadcrumbs keep floor(density * n) entries, DARE keeps each with probability density). gamma: K
floats in [0, 1] (breadcrumbs only: drop the floor(gamma * n) largest). lam: the scale of the merged
task vector. normalize: divide by the weight total (TIES-like methods: the agreeing weights).
rescale: None, "density" (DARE: kept / density) or "l1" (kept * |delta|_1 / |kept|_1, both sums
exactly rounded). seed, name_hash: DARE's counter-based RNG (fastsoup/methods/rng.py; name_hash =
fnv1a64(tensor name)); model k's stream is its position in inputs. threads: 0 = all cores. chunk:
elements per task (0: automatic); the results do not depend on it nor on threads.

Selection: exact top-k by |delta| (ties at the threshold: lower flat index first), no sort. Tensors of
2^18+ elements: a sample of 65536 keys per model gives each cut a window of keys; one pass over all
models (the base read once) counts the keys above it and collects those inside, and the cut is
selected exactly among them (a window that misses: the two passes below). Smaller tensors: two 2^16-bin
histogram passes per model. Memory: the window candidates, at most one uint32 per element in all
(about 4 % of n per TIES model with the default density), 256 KiB of sample per model, 512 KiB per
task for the histograms (tasks = one per thread, at least 65536 elements each) plus K * 2 KiB per
task. Reads each model's tensor and the base once for the selection (TIES, breadcrumbs), once more
for rescale="l1", and once in the fused combine pass. Same bits for any ISA (sparse_counters() says
which selection ran).)doc");
  m.def(
      "fnv1a64", [](const py::bytes& data) {
        const std::string s = data;
        return fnv1a64(s.data(), s.size());
      },
      py::arg("data"), "FNV-1a 64 of bytes (fastsoup.methods.rng.fnv1a64 of name.encode()).");

  m.def(
      "multi_dot",
      [](const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t g, int g_dtype, int64_t n,
         int threads) {
        Inputs in = make_inputs("multi_dot", inputs, dtypes);
        check_threads("multi_dot", threads);
        std::vector<double> out;
        MultiDotParams p = multi_dot_params("multi_dot", in, g, g_dtype, n, out);
        p.threads = threads;
        check(multi_dot_cpu(p));
        return out;
      },
      py::arg("inputs"), py::arg("dtypes"), py::arg("g"), py::arg("g_dtype"), py::arg("n"), py::arg("threads") = 0,
      py::call_guard<py::gil_scoped_release>(), "[sum_i g[i] * inputs[k][i] for each k] (float64 results).");

  m.def(
      "gram",
      [](const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, int64_t n, int threads) {
        Inputs in = make_inputs("gram", inputs, dtypes);
        check_threads("gram", threads);
        std::vector<double> flat;
        GramParams p = gram_params(in, n, flat);
        p.threads = threads;
        check(gram_cpu(p));
        return square(flat, inputs.size());
      },
      py::arg("inputs"), py::arg("dtypes"), py::arg("n"), py::arg("threads") = 0,
      py::call_guard<py::gil_scoped_release>(), "K x K matrix of pairwise dot products, one pass.");

  m.def(
      "copy",
      [](uintptr_t dst, uintptr_t src, int64_t nbytes) {
        if (nbytes < 0) throw std::invalid_argument("copy: nbytes must be >= 0");
        if (nbytes > 0 && (dst == 0 || src == 0)) throw std::invalid_argument("copy: null address");
        if (nbytes > 0) std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), static_cast<size_t>(nbytes));
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "pwrite",
      [](int fd, int64_t offset, uintptr_t addr, int64_t nbytes, const std::string& what) {
        if (nbytes < 0 || offset < 0) throw std::invalid_argument("pwrite: offset and nbytes must be >= 0");
        if (nbytes > 0 && addr == 0) throw std::invalid_argument("pwrite: null address");
        pwrite_all(fd, reinterpret_cast<const void*>(addr), static_cast<size_t>(nbytes), offset, what);
        add_counters(0, nbytes);
      },
      py::arg("fd"), py::arg("offset"), py::arg("addr"), py::arg("nbytes"), py::arg("what") = "output file",
      py::call_guard<py::gil_scoped_release>(), "Write nbytes at addr to fd at offset (all of it, or OSError).");

  m.def(
      "rename_noreplace", [](const std::string& from, const std::string& to) { rename2(from, to, RenameFlag::kNoReplace); },
      py::arg("src"), py::arg("dst"), py::call_guard<py::gil_scoped_release>(),
      "rename(src, dst) that fails with EEXIST when dst exists (renameat2 RENAME_NOREPLACE).");
  m.def(
      "rename_exchange", [](const std::string& a, const std::string& b) { rename2(a, b, RenameFlag::kExchange); },
      py::arg("a"), py::arg("b"), py::call_guard<py::gil_scoped_release>(),
      "Swap two existing paths atomically (renameat2 RENAME_EXCHANGE).");

  // run_cuda is added with the CUDA entry points below.
  py::class_<MergePlan, std::shared_ptr<MergePlan>> merge_plan(
      m, "MergePlan",
      "A streaming merge plan: output segments, each a weighted sum of K inputs or a copy of one, "
      "checked once here and run any number of times (new weights each time) with run() on the CPU "
      "or run_cuda() on a GPU. See csrc/include/fastsoup/plan.h.");
  merge_plan
      .def(py::init(&make_plan), py::arg("num_inputs"), py::arg("n"), py::arg("kind"), py::arg("out_file"),
           py::arg("out_offset"), py::arg("out_dtype"), py::arg("in_addr"), py::arg("in_dtype"), py::arg("in_loc"),
           py::call_guard<py::gil_scoped_release>(),
           "Per segment (S of them): n (elements, or bytes for a copy), kind (0 weighted sum, 1 copy of input "
           "0), out_file (-1: out_offset is an address; else an index into run's fds), out_offset (address "
           "or byte offset), out_dtype (dtype code; ignored for copies). Per segment and input, "
           "segment-major (S * num_inputs each): in_addr, in_dtype (dtype code), in_loc (0 host memory, 1 a "
           "guarded file mapping, 2 CUDA device memory). Raises ValueError naming the segment and input.")
      .def_property_readonly("num_inputs", &MergePlan::num_inputs)
      .def_property_readonly("num_segments", &MergePlan::num_segments)
      .def(
          "run",
          [](const MergePlan& plan, std::vector<double> weights, std::vector<int> fds, int threads,
             int64_t window_bytes, int64_t buffer_bytes, int nbuffers, const py::object& progress,
             int prefetch_steps, bool release, bool accumulate, std::vector<std::string> fd_names, double divisor,
             double divisor_lo) {
            const MergeRun r = make_run(std::move(weights), std::move(fds), std::move(fd_names), accumulate, divisor,
                                        divisor_lo);
            CpuMergeOptions o;
            o.threads = threads;
            o.window_bytes = window_bytes;
            o.buffer_bytes = buffer_bytes;
            o.nbuffers = nbuffers;
            o.prefetch_steps = prefetch_steps;
            o.release = release;
            MergeProgress cb = progress_callback(progress);
            py::gil_scoped_release nogil;
            run_merge(plan, r, o, cb);
          },
          py::arg("weights"), py::kw_only(), py::arg("fds") = std::vector<int>(), py::arg("threads") = 0,
          py::arg("window_bytes") = CpuMergeOptions().window_bytes,
          py::arg("buffer_bytes") = CpuMergeOptions().buffer_bytes, py::arg("nbuffers") = CpuMergeOptions().nbuffers,
          py::arg("progress") = py::none(), py::arg("prefetch_steps") = CpuMergeOptions().prefetch_steps,
          py::arg("release") = true, py::arg("accumulate") = false, py::arg("fd_names") = std::vector<std::string>(),
          py::arg("divisor") = 1.0, py::arg("divisor_lo") = 0.0,
          "Runs the plan on the CPU with K weights (or K per segment, segment-major); fds: the output files. "
          "out = round(sum_k w_k in_k / (divisor + divisor_lo)); accumulate: out += sum (float32 memory "
          "outputs, divisor 1). progress(bytes_in, bytes_out) after each step, where Ctrl-C is also seen. "
          "The GIL is released meanwhile. Raises ValueError (bad arguments), OSError (writes) or "
          "InputFaultError (an input changed under the read).");

  m.def("isa", [] { return std::string(isa_name(current_isa())); }, "The CPU instruction set the kernels use now.");
  m.def("best_isa", [] { return std::string(isa_name(best_supported_isa())); });
  m.def("supported_isas", [] {
    std::vector<std::string> r;
    for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
      if (isa_supported(i)) r.emplace_back(isa_name(i));
    return r;
  });
  m.def(
      "set_isa",
      [](const std::string& name) {
        for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
          if (name == isa_name(i)) return set_isa(i);
        throw std::invalid_argument("set_isa: unknown ISA '" + name + "', expected scalar, avx2 or avx512");
      },
      py::arg("name"));
  m.def("default_threads", &default_threads);
  m.def("counters", [] {
    Counters c = counters();
    py::dict d;
    d["bytes_read"] = c.bytes_read;
    d["bytes_written"] = c.bytes_written;
    d["calls"] = c.calls;
    d["mapped_bytes_read"] = c.mapped_bytes_read;
    d["fast_blocks"] = c.fast_blocks;
    d["fallback_blocks"] = c.fallback_blocks;
    return d;
  });
  m.def("reset_counters", &reset_counters);
  m.def(
      "sparse_counters",
      [] {
        SparseCounters c = sparse_counters();
        py::dict d;
        d["window_cuts"] = c.window_cuts;
        d["exact_cuts"] = c.exact_cuts;
        return d;
      },
      "How sparse_merge's selection cuts were found so far in this process (cumulative): window_cuts by the "
      "sampled one-pass selection, exact_cuts by the exact two histogram passes (the same cuts either way).");
  // ---- CUDA ---------------------------------------------------------------------------------
#ifdef FASTSOUP_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", &cuda::device_count, "CUDA devices present (0 without a driver or a device).");
  m.def("cuda_device_name", &cuda::device_name, py::arg("device"));
  m.def(
      "cuda_is_device_pointer",
      [](uintptr_t addr, int device) { return cuda::is_device_pointer(reinterpret_cast<const void*>(addr), device); },
      py::arg("addr"), py::arg("device"));
  m.def(
      "weighted_sum_cuda",
      [](const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, const std::vector<double>& weights,
         int64_t n, uintptr_t out, int out_dtype, bool accumulate, int device, uintptr_t stream, double divisor,
         double divisor_lo) {
        Inputs in = make_inputs("weighted_sum_cuda", inputs, dtypes);
        WeightedSumParams p =
            weighted_sum_params("weighted_sum_cuda", in, weights, n, out, out_dtype, accumulate, divisor,
                                divisor_lo);
        check(cuda::weighted_sum(p, device, stream));
      },
      py::arg("inputs"), py::arg("dtypes"), py::arg("weights"), py::arg("n"), py::arg("out"), py::arg("out_dtype"),
      py::arg("accumulate"), py::arg("device"), py::arg("stream"), py::arg("divisor") = 1.0,
      py::arg("divisor_lo") = 0.0, py::call_guard<py::gil_scoped_release>(),
      "weighted_sum over device addresses, launched on `stream` (asynchronous).");
  m.def(
      "multi_dot_cuda",
      [](const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t g, int g_dtype, int64_t n,
         int device, uintptr_t stream) {
        Inputs in = make_inputs("multi_dot_cuda", inputs, dtypes);
        std::vector<double> out;
        MultiDotParams p = multi_dot_params("multi_dot_cuda", in, g, g_dtype, n, out);
        check(cuda::multi_dot(p, device, stream));
        return out;
      },
      py::arg("inputs"), py::arg("dtypes"), py::arg("g"), py::arg("g_dtype"), py::arg("n"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(), "multi_dot over device addresses (synchronizes).");
  m.def(
      "sparse_merge_cuda",
      [](const std::string& method, int64_t n, const std::vector<std::pair<uintptr_t, int>>& inputs,
         std::pair<uintptr_t, int> base, std::pair<uintptr_t, int> out, const std::vector<double>& weights,
         const std::vector<double>& density, const std::vector<double>& gamma, double lam, bool normalize,
         const std::optional<std::string>& rescale, uint64_t seed, uint64_t name_hash, int device, uintptr_t stream) {
        check(cuda::sparse_merge(sparse_args(method, n, inputs, base, out, weights, density, gamma, lam, normalize,
                                             rescale, seed, name_hash, 0, 0)->p,
                                 device, stream));
      },
      py::arg("method"), py::arg("n"), py::arg("inputs"), py::arg("base"), py::arg("out"), py::arg("weights"),
      py::kw_only(), py::arg("density") = std::vector<double>(), py::arg("gamma") = std::vector<double>(),
      py::arg("lam") = 1.0, py::arg("normalize") = false, py::arg("rescale") = py::none(), py::arg("seed") = 0,
      py::arg("name_hash") = 0, py::arg("device") = 0, py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "sparse_merge on the GPU `device`, launched on `stream` (synchronized before it returns): the same "
      "arguments (no threads, chunk) and the same bits. Addresses may be device or host memory (host "
      "tensors are copied in, model by model). GPU memory: see csrc/include/fastsoup/cuda.h.");
  m.def(
      "gram_cuda",
      [](const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, int64_t n, int device, uintptr_t stream) {
        Inputs in = make_inputs("gram_cuda", inputs, dtypes);
        std::vector<double> flat;
        GramParams p = gram_params(in, n, flat);
        check(cuda::gram(p, device, stream));
        return square(flat, inputs.size());
      },
      py::arg("inputs"), py::arg("dtypes"), py::arg("n"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(), "K x K Gram matrix over device addresses.");
  merge_plan.def(
          "run_cuda",
          [](const MergePlan& plan, std::vector<double> weights, int device, uintptr_t stream, std::vector<int> fds,
             int64_t slot_bytes, int nslots, int fill_threads, const py::object& progress, bool accumulate,
             std::vector<std::string> fd_names, double divisor, double divisor_lo) {
            const MergeRun r = make_run(std::move(weights), std::move(fds), std::move(fd_names), accumulate, divisor,
                                        divisor_lo);
            CudaMergeOptions o;
            o.device = device;
            o.stream = stream;
            o.slot_bytes = slot_bytes;
            o.nslots = nslots;
            o.fill_threads = fill_threads;
            MergeProgress cb = progress_callback(progress);
            py::gil_scoped_release nogil;
            cuda::run_merge(plan, r, o, cb);
          },
          py::arg("weights"), py::kw_only(), py::arg("device"), py::arg("stream"), py::arg("fds") = std::vector<int>(),
          py::arg("slot_bytes") = CudaMergeOptions().slot_bytes, py::arg("nslots") = CudaMergeOptions().nslots,
          py::arg("fill_threads") = 0, py::arg("progress") = py::none(), py::arg("accumulate") = false,
          py::arg("fd_names") = std::vector<std::string>(), py::arg("divisor") = 1.0, py::arg("divisor_lo") = 0.0,
          "Runs the plan through the GPU `device`, on `stream` (a cudaStream_t as an integer), through a ring "
          "of nslots pinned slots of slot_bytes (kept between runs: release_cuda_buffers() frees it). "
          "Memory outputs (out_file -1) are device addresses; inputs may be device memory (in_loc 2). "
          "Weights and the rest as in run(). Synchronizes `stream` before it returns.");
  m.def(
      "dots_cuda",
      [](const std::vector<std::vector<uintptr_t>>& inputs, const std::vector<std::vector<int>>& dtypes,
         const std::vector<std::vector<int>>& locations, const std::vector<uintptr_t>& g,
         const std::vector<int>& g_dtypes, const std::vector<int64_t>& ns, int device, uintptr_t stream,
         int64_t slot_bytes, int nslots, int fill_threads) {
        const size_t T = inputs.size();
        if (dtypes.size() != T || locations.size() != T || g.size() != T || g_dtypes.size() != T || ns.size() != T)
          throw std::invalid_argument("dots_cuda: inputs, dtypes, locations, g, g_dtypes and ns differ in length");
        std::vector<cuda::DotTensor> ts(T);
        for (size_t t = 0; t < T; ++t) {
          cuda::DotTensor& d = ts[t];
          if (dtypes[t].size() != inputs[t].size() || locations[t].size() != inputs[t].size())
            throw std::invalid_argument("dots_cuda: tensor " + std::to_string(t) +
                                        ": inputs, dtypes and locations differ in length");
          for (size_t k = 0; k < inputs[t].size(); ++k) {
            d.inputs.push_back(reinterpret_cast<const void*>(inputs[t][k]));
            if (!valid_dtype_code(dtypes[t][k]))
              throw std::invalid_argument("dots_cuda: tensor " + std::to_string(t) + ": invalid dtype code");
            d.dtypes.push_back(static_cast<DType>(dtypes[t][k]));
            if (locations[t][k] < 0 || locations[t][k] > 2)
              throw std::invalid_argument("dots_cuda: tensor " + std::to_string(t) + ": location must be 0, 1 or 2");
            d.locations.push_back(static_cast<InputLocation>(locations[t][k]));
          }
          d.g = reinterpret_cast<const void*>(g[t]);
          if (!valid_dtype_code(g_dtypes[t]))
            throw std::invalid_argument("dots_cuda: tensor " + std::to_string(t) + ": invalid dtype code of g");
          d.g_dtype = static_cast<DType>(g_dtypes[t]);
          d.n = ns[t];
        }
        CudaMergeOptions o;
        o.device = device;
        o.stream = stream;
        o.slot_bytes = slot_bytes;
        o.nslots = nslots;
        o.fill_threads = fill_threads;
        return cuda::run_dots(ts, o);
      },
      py::arg("inputs"), py::arg("dtypes"), py::arg("locations"), py::arg("g"), py::arg("g_dtypes"), py::arg("ns"),
      py::kw_only(), py::arg("device"), py::arg("stream"), py::arg("slot_bytes") = CudaMergeOptions().slot_bytes,
      py::arg("nslots") = CudaMergeOptions().nslots, py::arg("fill_threads") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "The K dot products <g_t, inputs_t[k]> of every tensor t on the GPU `device` (a learned soup's gradient "
      "pass): g_t are device addresses; inputs are host (0), file-mapping (1) or device (2) addresses, host ones "
      "streamed through the merge ring's pinned slots. multi_dot's bits. Synchronizes `stream`.");
  m.def("release_cuda_buffers", &cuda::release_buffers, py::call_guard<py::gil_scoped_release>(),
        "Frees the pinned and device memory of the CUDA merge ring (kept between merges; the next one "
        "allocates it again). Returns the bytes freed.");
#else
  m.attr("cuda_compiled") = false;
  m.def("cuda_device_count", [] { return 0; }, "CUDA devices present (this build has no CUDA: always 0).");
  for (const char* name : {"weighted_sum_cuda", "multi_dot_cuda", "gram_cuda", "sparse_merge_cuda", "dots_cuda",
                           "cuda_device_name", "cuda_is_device_pointer"}) {
    m.def(name, [name](py::args, py::kwargs) { no_cuda(name); });
  }
  merge_plan.def("run_cuda", [](const MergePlan&, py::args, py::kwargs) { no_cuda("MergePlan.run_cuda"); });
  // Nothing to free without CUDA: callers may release unconditionally.
  m.def("release_cuda_buffers", [] { return int64_t(0); },
        "Frees the CUDA merge ring's memory (this build has no CUDA: nothing to free, returns 0).");
#endif
}
