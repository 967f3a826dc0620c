// C++ tests of the native I/O (ctest): the SIGBUS guard of file mappings, the fault watch of the
// merge executor, regular files only, renameat2, and the writer's error naming its file.
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "fastsoup/io.h"
#include "fastsoup/plan.h"
#include "expect.h"

using namespace fastsoup;


static std::string g_dir;

static std::string write_file(const std::string& name, size_t size, unsigned char byte) {
  const std::string path = g_dir + "/" + name;
  std::vector<unsigned char> data(size, byte);
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(data.data(), 1, data.size(), f);
  std::fclose(f);
  return path;
}

static void test_truncated_mapping_reads_zeros() {
  const std::string path = write_file("a.bin", 1 << 20, 7);
  MappedFile m(path);
  const volatile unsigned char* p = reinterpret_cast<const unsigned char*>(m.address());
  EXPECT(p[700000] == 7 && m.faults() == 0, "before: %d, %u faults", p[700000], m.faults());
  const uint64_t before = fault_count();
  EXPECT(::truncate(path.c_str(), 4096) == 0, "truncate failed");
  EXPECT(p[700000] == 0, "a read past the new end reads %d, expected 0", p[700000]);
  EXPECT(p[4095] == 7, "the page still in the file reads %d", p[4095]);
  EXPECT(m.faults() >= 1 && fault_count() > before, "faults not counted: %u", m.faults());
  EXPECT(last_fault_path() == path, "last fault in '%s'", last_fault_path().c_str());
  EXPECT(guarded_path(reinterpret_cast<const void*>(m.address() + 10)) == path, "guarded_path");
}

static void test_watch_counts_only_its_ranges() {
  const std::string pa = write_file("w1.bin", 1 << 20, 1), pb = write_file("w2.bin", 1 << 20, 2);
  MappedFile a(pa), b(pb);
  FaultWatch watch({reinterpret_cast<const void*>(a.address())});
  EXPECT(!watch.faulted(), "faulted before any fault");
  ::truncate(pb.c_str(), 0);
  volatile unsigned char x = reinterpret_cast<const unsigned char*>(b.address())[100000];
  (void)x;
  EXPECT(!watch.faulted(), "a fault of another file counted");
  ::truncate(pa.c_str(), 0);
  x = reinterpret_cast<const unsigned char*>(a.address())[200000];
  EXPECT(watch.faulted() && watch.path() == pa, "its own fault: faulted %d, path '%s'", watch.faulted(),
         watch.path().c_str());
}

// out (or output file 0 at offset 0, when out is null) = 1.0 * in, n float32 elements.
static MergePlan one_input_plan(uintptr_t in, int64_t n, void* out, InputLocation loc) {
  MergeSegment g;
  g.n = n;
  g.out_file = out ? -1 : 0;
  g.out_offset = reinterpret_cast<int64_t>(out);
  g.out_dtype = DType::kFloat32;
  return MergePlan(1, {g}, {in}, {static_cast<int32_t>(DType::kFloat32)}, {static_cast<int32_t>(loc)});
}

static MergeRun weight_one() {
  MergeRun r;
  r.weights = {1.0};
  return r;
}

static CpuMergeOptions small_steps() {
  CpuMergeOptions o;
  o.window_bytes = 1 << 16;  // many steps: the fault is seen at the step that read it
  return o;
}

static void test_merge_of_a_truncated_input_throws_input_fault() {
  const int64_t n = 1 << 18;
  const std::string path = write_file("m.bin", static_cast<size_t>(n) * 4, 0);
  MappedFile m(path);
  std::vector<float> out(static_cast<size_t>(n));
  ::truncate(path.c_str(), 8192);
  bool thrown = false;
  try {
    run_merge(one_input_plan(m.address(), n, out.data(), InputLocation::kMapped), weight_one(), small_steps(), nullptr);
  } catch (const InputFault& e) {
    thrown = e.path == path && e.err == EIO;
  }
  EXPECT(thrown, "no InputFault naming %s", path.c_str());
}

static void test_fifo_is_refused_without_blocking() {
  const std::string path = g_dir + "/pipe";
  ::mkfifo(path.c_str(), 0600);
  bool refused = false;
  try {
    MappedFile m(path);
  } catch (const OsError& e) {
    refused = e.err == EINVAL && std::string(e.what()).find("FIFO") != std::string::npos;
  }
  EXPECT(refused, "a FIFO was not refused as one");
}

static void test_rename_noreplace() {
  const std::string a = write_file("r1", 10, 1), b = write_file("r2", 10, 2);
  int err = 0;
  try {
    rename2(a, b, RenameFlag::kNoReplace);
  } catch (const OsError& e) {
    err = e.err;
  }
  // EEXIST; a filesystem without the flag says EINVAL (the Python layer falls back then).
  EXPECT(err == EEXIST || err == EINVAL || err == ENOSYS, "rename over an existing file: errno %d", err);
  struct stat st;
  EXPECT(::stat(a.c_str(), &st) == 0, "the source is gone");
}

static void test_writer_names_its_file() {
  const int64_t n = 1 << 16;
  std::vector<float> in(static_cast<size_t>(n), 1.0f);
  const MergePlan p = one_input_plan(reinterpret_cast<uintptr_t>(in.data()), n, nullptr, InputLocation::kHost);
  const int fd = ::open("/dev/full", O_WRONLY);
  MergeRun r = weight_one();
  r.fds = {fd};
  r.fd_names = {"/out/model-00001-of-00001.safetensors"};
  std::string named;
  try {
    run_merge(p, r, small_steps(), nullptr);
  } catch (const OsError& e) {
    named = e.path;
  }
  ::close(fd);
  EXPECT(named == "/out/model-00001-of-00001.safetensors", "the error names '%s'", named.c_str());
}

int main() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/fastsoup-io-test-XXXXXX";
  const char* d = ::mkdtemp(&tmpl[0]);
  if (!d) return 2;
  g_dir = d;
  test_truncated_mapping_reads_zeros();
  test_watch_counts_only_its_ranges();
  test_merge_of_a_truncated_input_throws_input_fault();
  test_fifo_is_refused_without_blocking();
  test_rename_noreplace();
  test_writer_names_its_file();
  const std::string rm = "rm -rf '" + g_dir + "'";
  if (std::system(rm.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", g_dir.c_str());
  if (g_failures) {
    std::fprintf(stderr, "%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("io tests passed\n");
  return 0;
}
