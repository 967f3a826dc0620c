// A small persistent pool of worker threads for the CPU kernels.
#pragma once

#include <cstdint>
#include <functional>

namespace fastsoup {
namespace cpu {

// Runs fn(0) .. fn(ntasks-1) on up to `threads` threads (the caller's included) and returns when all
// are done. Tasks are handed out in order from a shared counter. If the pool is busy (another
// caller, or a nested call), the tasks run on the calling thread. The first exception a task throws
// is rethrown here after every task has finished.
void parallel_for(int64_t ntasks, int threads, const std::function<void(int64_t)>& fn);

// Logical CPUs this process may run on (sched_getaffinity), or FASTSOUP_NUM_THREADS when set.
int available_threads();

}  // namespace cpu
}  // namespace fastsoup
