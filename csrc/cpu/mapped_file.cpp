#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
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

MappedFile::MappedFile(std::string path) : path_(std::move(path)) {
  int fd;
  do {
    fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
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
    throw OsError(EINVAL, "not a regular file", path_);
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      throw OsError(e, std::string("cannot map: ") + std::strerror(e), path_);
    }
    base_ = p;
  }
  ::close(fd);  // the mapping keeps the file alive
}

MappedFile::~MappedFile() {
  if (base_) ::munmap(base_, size_);
}

void MappedFile::advise(size_t offset, size_t length, Advice advice) const {
  if (offset > size_ || length > size_ - offset)
    throw std::out_of_range("advise: range [" + std::to_string(offset) + ", " + std::to_string(offset + length) +
                            ") is outside " + path_ + " (" + std::to_string(size_) + " bytes)");
  advise_range(static_cast<const char*>(base_) + offset, length, advice);
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
