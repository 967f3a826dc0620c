// Files: read-only mappings the kernels read from, their fault guard, and the writes of results
// (pwrite, renameat2). The merge plan and its executors are in plan.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastsoup/dtype.h"

namespace fastsoup {

// An operating-system error: errno plus the file it concerns (becomes Python's OSError).
struct OsError : std::runtime_error {
  OsError(int err, std::string what, std::string path)
      : std::runtime_error(std::move(what)), err(err), path(std::move(path)) {}
  int err;
  std::string path;
};

enum class Advice : int { kNormal = 0, kSequential = 1, kWillNeed = 2, kDontNeed = 3 };

// madvise over [addr, addr+len) widened to whole pages. Only for ranges of file mappings: on
// anonymous memory kDontNeed would discard data. Failures are ignored (advice is a hint).
void advise_range(const void* addr, size_t len, Advice advice);

// ---------------------------------------------------------------------------------------------
// Inputs that change under a merge. A file truncated while it is mapped raises SIGBUS at the next
// read of a page past its new end (an I/O error while paging in does too). fastsoup installs one
// SIGBUS handler, chained to whatever was installed before: for a BUS_ADRERR fault inside a
// guarded range (every MappedFile, and the ranges of a FaultGuard), it maps a zero page over the
// faulting page, counts the fault and returns, so the read goes on and sees zeros instead of
// killing the process. Readers then refuse what they read: the merge executors compare
// fault_count() between steps (one atomic load) and throw InputFault; the Python layer checks each
// file's faults() and identity before it trusts (installs, caches, returns) a result. Faults
// anywhere else go to the previous handler (or the default action) as if fastsoup were not there.

// A range of a file mapping whose faults are caught. Registering (re)installs the handler when
// another one (e.g. Python's faulthandler) replaced it. Not copyable; unregisters on destruction,
// which must happen before the range is unmapped.
class FaultGuard {
 public:
  FaultGuard(const void* begin, size_t length, std::string path, bool writable = false);
  ~FaultGuard();
  FaultGuard(const FaultGuard&) = delete;
  FaultGuard& operator=(const FaultGuard&) = delete;
  uint32_t faults() const;  // faults caught in this range so far
  const std::string& path() const { return path_; }
  bool active() const { return slot_ >= 0; }  // false: the guard table was full (no guard)

 private:
  std::string path_;
  int slot_ = -1;
};

// Faults caught in any guarded range since the process started.
uint64_t fault_count();
// The file of the range that faulted last ("" when none did).
std::string last_fault_path();
// The file of the guarded range holding addr ("" when none does).
std::string guarded_path(const void* addr);

// The guarded ranges that hold a set of addresses (a merge's mapped inputs), and whether any of
// them faulted since the watch began. faulted() costs one atomic load while no range anywhere
// faulted; faults of other ranges (another file read elsewhere in the process) do not count.
class FaultWatch {
 public:
  explicit FaultWatch(const std::vector<const void*>& addresses);
  bool faulted();
  const std::string& path() const { return path_; }  // the file that faulted

 private:
  uint64_t seen_ = 0;
  std::vector<int> slots_;
  std::vector<uint32_t> base_;
  std::string path_;
};

// An input file changed under a read: truncated while mapped, or unreadable (EIO). errno EIO.
struct InputFault : OsError {
  explicit InputFault(std::string path)
      : OsError(5 /* EIO */, "changed during the merge: a read past its end (it was truncated while being read) or an "
                             "I/O error; nothing was written", std::move(path)) {}
};

// A whole file mapped: read-only and shared (page-cache pages, no copy), or private
// (copy-on-write: writable pages that never reach the file). Empty files map nothing. Only regular
// files are opened, without blocking (a FIFO or a device is refused, never waited on); the
// descriptor stays open so the file's identity can be checked against the one it had at open
// (fileno()). The mapping is guarded (FaultGuard).
class MappedFile {
 public:
  explicit MappedFile(std::string path, bool writable = false);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(base_); }
  size_t size() const { return size_; }
  bool writable() const { return writable_; }
  int fileno() const { return fd_; }
  uint32_t faults() const { return guard_ ? guard_->faults() : 0; }
  // Advice over a byte range of the file (checked against its size).
  void advise(size_t offset, size_t length, Advice advice) const;

 private:
  std::string path_;
  void* base_ = nullptr;
  size_t size_ = 0;
  int fd_ = -1;
  bool writable_ = false;
  FaultGuard* guard_ = nullptr;
};

// rename(2) with renameat2 flags: kNoReplace fails with EEXIST when `to` exists (an exclusive
// install); kExchange swaps the two paths atomically (both must exist). Throws OsError (EINVAL or
// ENOSYS where the filesystem or kernel lacks the flag: the caller falls back).
enum class RenameFlag : unsigned { kNoReplace = 1, kExchange = 2 };
void rename2(const std::string& from, const std::string& to, RenameFlag flag);

// Writes all n bytes at offset (retrying short writes and EINTR); throws OsError.
void pwrite_all(int fd, const void* buf, size_t n, int64_t offset, const std::string& what);

}  // namespace fastsoup
