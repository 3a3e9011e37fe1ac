// Work sharing of the CPU kernels: one parallel region per call (not one per
// tile), jobs taken from a shared counter.
//
// A region's threads meet at its end; on a machine where other processes
// compete for the cores (data-loader workers beside a training step) every
// meeting waits for a descheduled thread, so a kernel that opens a region per
// tile slows down far more than one product of the same size does. Taking the
// next job from a counter also lets the threads that run keep working while
// one is descheduled (a static split would wait for its share).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace confusion_kernels {

// Threads a region of `jobs` jobs uses: at most one per job.
inline int64_t job_workers(int64_t jobs) {
  return std::max<int64_t>(1, std::min<int64_t>(jobs, at::get_num_threads()));
}

// job(k, worker) for k in [0, jobs), in one parallel region; `worker` < job_workers(jobs)
// is the running thread's own slot (for its scratch). One job, one thread or a call from
// inside a region runs on the calling thread in order (then the ATen calls inside a job
// use every thread themselves).
template <class Job>
void run_jobs(int64_t jobs, const Job& job) {
  const int64_t workers = job_workers(jobs);
  if (workers == 1 || at::in_parallel_region()) {
    for (int64_t k = 0; k < jobs; ++k) job(k, int64_t(0));
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t worker, int64_t) {
    for (int64_t k = next++; k < jobs; k = next++) job(k, worker);
  });
}

}  // namespace confusion_kernels
