#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "fastsoup/io.h"

namespace fastsoup {

namespace {
size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

int to_madvise(Advice a) {
  switch (a) {
    case Advice::kNormal:
      return MADV_NORMAL;
    case Advice::kSequential:
      return MADV_SEQUENTIAL;
    case Advice::kWillNeed:
      return MADV_WILLNEED;
    case Advice::kDontNeed:
      return MADV_DONTNEED;
  }
  return MADV_NORMAL;
}
}  // namespace

void advise_range(const void* addr, size_t len, Advice advice) {
  if (len == 0 || addr == nullptr) return;
  const uintptr_t ps = page_size();
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  const uintptr_t begin = a & ~(ps - 1);
  const uintptr_t end = (a + len + ps - 1) & ~(ps - 1);
  (void)madvise(reinterpret_cast<void*>(begin), end - begin, to_madvise(advice));
}

namespace {
const char* kind_of(mode_t m) {
  if (S_ISDIR(m)) return "a folder";
  if (S_ISFIFO(m)) return "a FIFO (named pipe)";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}
}  // namespace

MappedFile::MappedFile(std::string path, bool writable) : path_(std::move(path)), writable_(writable) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below); no retry on
  // EINTR here, so a signal (Ctrl-C) reaches the caller, which decides whether to try again.
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    const int e = errno;
    throw OsError(e, std::string("cannot open for reading: ") + std::strerror(e), path_);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw OsError(e, std::string("cannot stat: ") + std::strerror(e), path_);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw OsError(EINVAL, std::string("not a regular file: it is ") + kind_of(st.st_mode) + "; give a checkpoint file",
                  path_);
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = writable ? ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0)
                       : ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      throw OsError(e, std::string("cannot map: ") + std::strerror(e), path_);
    }
    base_ = p;
    guard_ = new FaultGuard(base_, size_, path_, writable);
  }
  fd_ = fd;  // kept open: the identity of the file as opened (fstat) can be checked later
}

MappedFile::~MappedFile() {
  delete guard_;  // before the range is unmapped
  if (base_) ::munmap(base_, size_);
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::advise(size_t offset, size_t length, Advice advice) const {
  if (offset > size_ || length > size_ - offset)
    throw std::out_of_range("advise: range [" + std::to_string(offset) + ", " + std::to_string(offset + length) +
                            ") is outside " + path_ + " (" + std::to_string(size_) + " bytes)");
  advise_range(static_cast<const char*>(base_) + offset, length, advice);
}

void rename2(const std::string& from, const std::string& to, RenameFlag flag) {
#ifdef SYS_renameat2
  const long r = ::syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), static_cast<unsigned>(flag));
  if (r == 0) return;
  const int e = errno;
#else
  const int e = ENOSYS;
#endif
  throw OsError(e, std::string(flag == RenameFlag::kExchange ? "cannot exchange with " : "cannot rename to ") + to + ": " +
                       std::strerror(e), from);
}

void pwrite_all(int fd, const void* buf, size_t n, int64_t offset, const std::string& what) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      throw OsError(e, std::string("write failed: ") + std::strerror(e), what);
    }
    if (w == 0) throw OsError(EIO, "write failed: wrote 0 bytes", what);
    p += w;
    n -= static_cast<size_t>(w);
    offset += w;
  }
}

}  // namespace fastsoup
