// C++ CPU kernel of nearest_neighbors: the K nearest references r [M, D] of every query
// q [N, D] in the order of (distance, index), nothing of size N x M held (per pair
// neighbor_math.h; readable definition: confusion_kernels/reference/retrieval.py).
//
// One job per query tile, in one parallel region (parallel_jobs.h). A job walks the reference
// tiles in order; one single-threaded Gram product per tile gives the tile's keys, and each
// query row keeps a candidate list: a reference enters it when its key is below the row's
// threshold (the K-th key kept so far; the test on simd lanes), and a full list is cut back
// to its K best (nth_element), which lowers the threshold. As the references come in index
// order, a later reference with a key equal to the threshold comes after it: the strict test
// keeps the lower index. The K kept get their distances from the rows' differences
// (neighbor_distance) and are sorted by (distance, index). Every row is written by one job: the
// same result on any number of threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/neighbor_args.h"
#include "confusion_kernels/neighbor_math.h"
#include "parallel_jobs.h"
#include "simd.h"

namespace confusion_kernels {
namespace {

// Query tiles of up to 512 rows (at least 64, and about four per thread when there are few)
// against reference tiles of 512: a 1 MB float32 Gram tile per job. On the 2-core test
// machine 512 x 512 tiles ran N = 65536 self-retrieval 20 % faster than 64 x 1024.
constexpr int64_t kMaxQueryTile = 512, kMinQueryTile = 64;
constexpr int64_t kRefTile = 512;

int64_t query_tile(int64_t n) {
  const int64_t share = (n + 4 * region_threads() - 1) / (4 * region_threads());
  return std::max(kMinQueryTile, std::min(kMaxQueryTile, share));
}

template <typename T>
struct Candidate {
  T key;
  int64_t index;
};

template <typename T>
bool candidate_before(const Candidate<T>& a, const Candidate<T>& b) {
  return neighbor_before(a.key, a.index, b.key, b.index);
}

// The candidate list of one query row: the K best so far and the later entrants.
template <typename T>
struct RowCandidates {
  std::vector<Candidate<T>> items;
  T threshold = std::numeric_limits<T>::infinity();
  size_t keep = 0, capacity = 0;

  void reset(size_t k) {
    keep = k;
    capacity = std::max<size_t>(2 * k, k + 64);
    items.clear();
    items.reserve(capacity);
    threshold = std::numeric_limits<T>::infinity();
  }
  // Cuts the list to its `keep` best; the threshold becomes the worst key kept.
  void cut() {
    if (items.size() <= keep) return;
    std::nth_element(items.begin(), items.begin() + (keep - 1), items.end(), candidate_before<T>);
    threshold = items[keep - 1].key;
    items.resize(keep);
  }
  void push(T key, int64_t index) {
    items.push_back({key, index});
    if (items.size() == capacity) cut();
  }
  // The references c0 + j, j < ct, of one Gram tile row g (r_sq: their squared norms,
  // unused for cosine); self_j, the query's own column, is skipped. The first `keep` enter
  // whatever their key (an overflowed key counts as +inf), so K always exist; then a key
  // enters when it is below the threshold, tested on simd lanes.
  void offer(const T* g, const T* r_sq, int64_t ct, int64_t c0, int64_t self_j, int64_t metric) {
    const bool cosine = metric == kNeighborCosine;
    const auto key_of = [&](int64_t j) {
      const T key = neighbor_key(g[j], cosine ? T(0) : r_sq[j], metric);
      return key == key ? key : std::numeric_limits<T>::infinity();
    };
    int64_t j = 0;
    for (; j < ct && items.size() < keep; ++j)
      if (j != self_j) push(key_of(j), c0 + j);
    using L = simd::Widest<T>;
    using V = typename L::V;
    for (; j + L::kWidth <= ct; j += L::kWidth) {
      // the lanes of neighbor_key (2 g is exact: the same key with or without an fma)
      const V gv = L::load(g + j);
      const V key = cosine ? L::zero() - gv : L::load(r_sq + j) - (gv + gv);
      uint32_t bits = L::bits(L::gt(L::set1(threshold), key));
      while (bits != 0) {
        const int64_t jj = j + __builtin_ctz(bits);
        bits &= bits - 1;
        if (jj != self_j) push(key_of(jj), c0 + jj);
      }
    }
    for (; j < ct; ++j) {
      const T key = key_of(j);
      if (key < threshold && j != self_j) push(key, c0 + j);
    }
  }
};

// sum_k (a_k - b_k)^2 on simd lanes.
template <typename T>
T squared_difference(const T* a, const T* b, int64_t d) {
  using L = simd::Widest<T>;
  typename L::V acc = L::zero();
  int64_t k = 0;
  for (; k + L::kWidth <= d; k += L::kWidth) {
    const typename L::V diff = L::load(a + k) - L::load(b + k);
    acc = acc + diff * diff;
  }
  T sum = L::hsum(acc);
  for (; k < d; ++k) sum += (a[k] - b[k]) * (a[k] - b[k]);
  return sum;
}

template <typename T>
T squared_norm(const T* a, int64_t d) {
  T sum = 0;
  for (int64_t k = 0; k < d; ++k) sum += a[k] * a[k];
  return sum;
}

template <typename T>
void nearest_neighbors_kernel(const at::Tensor& q, const at::Tensor& r, int64_t k, int64_t metric,
                              c10::optional<int64_t> self_offset, T* out_dist, int64_t* out_idx) {
  const int64_t n = q.size(0), m = r.size(0), d = q.size(1);
  const T* qp = q.data_ptr<T>();
  const T* rp = r.data_ptr<T>();
  // squared norms (cosine: 1 or 0, a zero row's distance is 1)
  std::vector<T> r_sq(m);
  parallel_rows(0, m, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) r_sq[j] = squared_norm(rp + j * d, d);
  });
  const int64_t row_tile = query_tile(n);
  const int64_t tiles = (n + row_tile - 1) / row_tile;
  run_jobs(tiles, [&](int64_t tile, int64_t) {
    const int64_t r0 = tile * row_tile, rt = std::min(row_tile, n - r0);
    const at::Tensor qt = q.narrow(0, r0, rt);
    at::Tensor gram = at::empty({rt, std::min(kRefTile, m)}, q.options());
    std::vector<RowCandidates<T>> rows(rt);
    for (auto& row : rows) row.reset(static_cast<size_t>(k));
    for (int64_t c0 = 0; c0 < m; c0 += kRefTile) {
      const int64_t ct = std::min(kRefTile, m - c0);
      at::Tensor g = gram.narrow(1, 0, ct);
      at::mm_out(g, qt, r.narrow(0, c0, ct).t());
      const T* gp = g.data_ptr<T>();
      const int64_t ld = g.stride(0);
      const T* sq = r_sq.data() + c0;
      for (int64_t i = 0; i < rt; ++i) {
        const int64_t self = self_offset.has_value() ? *self_offset + r0 + i - c0 : -1;
        rows[i].offer(gp + i * ld, sq, ct, c0, self, metric);
      }
    }
    for (int64_t i = 0; i < rt; ++i) {
      RowCandidates<T>& row = rows[i];
      row.cut();
      const T* qi = qp + (r0 + i) * d;
      const T q_sq = squared_norm(qi, d);
      for (auto& c : row.items) {
        const T dist = neighbor_distance(squared_difference(qi, rp + c.index * d, d), metric, q_sq,
                                         r_sq[c.index]);
        c.key = dist == dist ? dist : std::numeric_limits<T>::infinity();
      }
      std::sort(row.items.begin(), row.items.end(), candidate_before<T>);
      for (int64_t t = 0; t < k; ++t) {
        out_dist[(r0 + i) * k + t] = row.items[t].key;
        out_idx[(r0 + i) * k + t] = row.items[t].index;
      }
    }
  });
}

// Whether t holds no NaN/Inf: its largest |t_k| is finite (amax propagates NaN),
// one vectorised pass where at::isfinite(t).all() took several on CPU.
bool all_finite(const at::Tensor& t) {
  return t.numel() == 0 || at::isfinite(t.abs().amax()).item<bool>();
}

// (distances [N, K], indices [N, K]) of the K = min(k, M - [self]) nearest references of each
// query; cosine takes unit (or zero) rows, the caller normalises.
std::tuple<at::Tensor, at::Tensor> nearest_neighbors_cpu(const at::Tensor& query,
                                                         const at::Tensor& reference, int64_t k,
                                                         c10::string_view metric,
                                                         c10::optional<int64_t> self_offset) {
  const NoAutocast no_autocast;
  const SerialAten serial;
  check_neighbor_inputs(query, reference, k, self_offset, c10::kCPU);
  TORCH_CHECK(all_finite(query) && (reference.is_same(query) || all_finite(reference)),
              "nearest_neighbors: query and reference must be finite (a NaN or inf row has no "
              "order of neighbours)");
  const int64_t code = neighbor_metric_code(metric);
  const int64_t n = query.size(0), m = reference.size(0);
  const int64_t kk = neighbor_count(k, m, self_offset);
  at::Tensor dist = at::empty({n, kk}, query.options());
  at::Tensor idx = at::empty({n, kk}, query.options().dtype(at::kLong));
  if (n == 0 || kk <= 0) return {dist, idx};
  const at::Tensor q = query.contiguous(), r = reference.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nearest_neighbors_cpu", [&] {
    nearest_neighbors_kernel<scalar_t>(q, r, kk, code, self_offset, dist.data_ptr<scalar_t>(),
                                       idx.data_ptr<int64_t>());
  });
  return {dist, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("nearest_neighbors", &nearest_neighbors_cpu);
}

}  // namespace confusion_kernels
