// Every unordered pair of row tiles, each once, in a schedule that lets threads work on
// disjoint tiles with a fixed order of contributions per tile (the CPU pair pass and the
// pair losses' self pass). CPU only.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "parallel_jobs.h"

namespace confusion_kernels {

// The tile pairs (r <= c) of `tiles` row tiles in rounds in which no two pairs
// share a tile: round t pairs tile t + s with tile t - s (s = 1, 2, ...) modulo
// an odd number of slots (one empty slot more when `tiles` is even) and gives
// tile t its diagonal pair, so every unordered pair comes exactly once (the
// circle method of round-robin tournaments). Listed round after round, with
// each pair's place in its two tiles' sequences (see run_tile_pairs).
struct TilePair {
  int64_t r, c;
  int64_t r_before, c_before;  // pairs of tile r / c listed before this one
};

inline std::vector<TilePair> tile_pair_schedule(int64_t tiles) {
  const int64_t slots = tiles | 1;
  std::vector<TilePair> pairs;
  std::vector<int64_t> seen(tiles, 0);
  const auto add = [&](int64_t r, int64_t c) {
    pairs.push_back({r, c, seen[r], seen[c]});
    ++seen[r];
    if (c != r) ++seen[c];
  };
  for (int64_t t = 0; t < slots; ++t) {
    for (int64_t s = 1; s <= slots / 2; ++s) {
      const int64_t p = (t + s) % slots, q = (t - s + slots) % slots;
      if (p < tiles && q < tiles) add(std::min(p, q), std::max(p, q));
    }
    if (t < tiles) add(t, t);  // the diagonal (half a pair's work) last in its round
  }
  return pairs;
}

// Runs job(pair, worker) for every scheduled tile pair in one parallel region
// (parallel_jobs.h) with no barrier between rounds. A pair may start once its
// two tiles have finished every pair listed before it (per-tile counters), so
// each row receives its contributions in schedule order whatever the number of
// threads or the timing (deterministic, no atomics on the outputs, no
// per-thread copies). A thread takes the first unclaimed pair that may start
// among the next kLookahead rounds, not only the next pair in the list: when
// another thread is descheduled (busy processes beside the step), the pairs
// that do not touch its tiles go on. A thread that finds none yields its core.
template <class Job>
void run_tile_pairs(const std::vector<TilePair>& pairs, int64_t tiles, const Job& job) {
  const int64_t count = static_cast<int64_t>(pairs.size());
  const int64_t workers = job_workers(count);
  if (workers == 1 || at::in_parallel_region()) {
    for (const TilePair& tp : pairs) job(tp, int64_t(0));
    return;
  }
  constexpr int64_t kLookahead = 4;
  const int64_t window = kLookahead * ((tiles | 1) / 2 + 1);  // pairs in kLookahead rounds
  std::vector<std::atomic<int64_t>> done(tiles);
  for (auto& d : done) d.store(0, std::memory_order_relaxed);
  std::vector<std::atomic<uint8_t>> claimed(count);
  for (auto& c : claimed) c.store(0, std::memory_order_relaxed);
  std::atomic<int64_t> first{0};  // every pair before it is claimed
  // a pair that throws (out of memory) never finishes: the threads stop taking
  // pairs instead of waiting for it, and parallel_for rethrows the error
  std::atomic<bool> failed{false};
  const auto may_start = [&](const TilePair& tp) {
    return done[tp.r].load(std::memory_order_acquire) == tp.r_before &&
           done[tp.c].load(std::memory_order_acquire) == tp.c_before;
  };
  parallel_rows(0, workers, 1, [&](int64_t worker, int64_t) {
    for (;;) {
      if (failed.load(std::memory_order_relaxed)) return;
      int64_t lo = first.load(std::memory_order_acquire);
      while (lo < count && claimed[lo].load(std::memory_order_acquire)) ++lo;
      if (lo == count) return;
      for (int64_t seen = first.load(); seen < lo && !first.compare_exchange_weak(seen, lo);) {
      }
      int64_t k = -1;
      for (int64_t q = lo, end = std::min(count, lo + window); q < end && k < 0; ++q) {
        uint8_t free = 0;
        if (!claimed[q].load(std::memory_order_relaxed) && may_start(pairs[q]) &&
            claimed[q].compare_exchange_strong(free, 1, std::memory_order_acq_rel))
          k = q;
      }
      if (k < 0) {
        std::this_thread::yield();
        continue;
      }
      const TilePair& tp = pairs[k];
      try {
        job(tp, worker);
      } catch (...) {
        failed.store(true);
        throw;
      }
      done[tp.r].fetch_add(1, std::memory_order_release);
      if (tp.c != tp.r) done[tp.c].fetch_add(1, std::memory_order_release);
    }
  });
}

}  // namespace confusion_kernels
