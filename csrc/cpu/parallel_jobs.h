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
#include <ATen/ThreadLocalState.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace confusion_kernels {

namespace detail {
// The thread count a SerialAten scope on this thread replaced (0: none open).
inline int& serial_outer_threads() {
  thread_local int outer = 0;
  return outer;
}
inline void set_region_threads(int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}
}  // namespace detail

// In its scope, the ATen calls of this thread open no parallel region (the
// thread's OpenMP team size is 1): the O(N*D) steps before and after a
// kernel's one region run on the calling thread. Under contention every
// region costs a wake-up and a barrier, and GNU OpenMP's workers spin for a
// while after each region on cores that the serial steps between regions
// need. run_jobs and parallel_rows still use every thread.
class SerialAten {
 public:
  SerialAten() : saved_(detail::serial_outer_threads()) {
    if (saved_ == 0) {
      detail::serial_outer_threads() = at::get_num_threads();
      detail::set_region_threads(1);
    }
  }
  ~SerialAten() {
    if (saved_ == 0) {
      detail::set_region_threads(detail::serial_outer_threads());
      detail::serial_outer_threads() = 0;
    }
  }
  SerialAten(const SerialAten&) = delete;
  SerialAten& operator=(const SerialAten&) = delete;

 private:
  int saved_;
};

// Threads a region opened here gets: all of torch's, also inside a SerialAten scope.
inline int64_t region_threads() {
  const int outer = detail::serial_outer_threads();
  return outer ? outer : at::get_num_threads();
}

// at::parallel_for(begin, end, grain, f) on region_threads() threads: a kernel's own
// parallel loop, which a SerialAten scope around it must not make serial. Each thread runs f
// under the caller's thread-local state (at::parallel_for does not carry it over): the op's
// dispatch guards (checks.h, NoAutocast: no autocast, below autograd) and grad mode hold for
// the ATen calls inside the jobs too. Without it a job's matrix product on an input that
// requires grad recorded an autograd node per tile.
template <class F>
void parallel_rows(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  const auto in_state = [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard guard(state);
    f(b, e);
  };
  const int outer = detail::serial_outer_threads();
  if (outer == 0) {
    at::parallel_for(begin, end, grain, in_state);
    return;
  }
  detail::set_region_threads(outer);
  try {
    at::parallel_for(begin, end, grain, in_state);
  } catch (...) {
    detail::set_region_threads(1);
    throw;
  }
  detail::set_region_threads(1);
}

// Threads a region of `jobs` jobs uses: at most one per job.
inline int64_t job_workers(int64_t jobs) {
  return std::max<int64_t>(1, std::min<int64_t>(jobs, region_threads()));
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
  parallel_rows(0, workers, 1, [&](int64_t worker, int64_t) {
    for (int64_t k = next++; k < jobs; k = next++) job(k, worker);
  });
}

}  // namespace confusion_kernels
