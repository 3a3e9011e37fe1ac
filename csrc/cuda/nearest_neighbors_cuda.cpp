// CUDA dispatch of nearest_neighbors: the K nearest references r [M, D] of every query q [N, D]
// in the order of (distance, index), K <= 1024, without an N x M buffer. Queries in tiles of
// kQueryTile against references in tiles of kRefTile, in order; each tile's Gram products from
// cuBLAS (tf32 as torch's matmul settings allow), then offer_kernel merges the tile into the
// queries' lists (nearest_neighbors_kernels.cuh); finish_kernel measures the distances of the K
// kept from the rows and sorts them. Memory: O((N + M) D + N K) plus one Gram tile (64 MB in
// float32). All on the current stream, without reading a value on the host: NaN / inf rows
// are not refused here (their keys and distances order as +inf); ck.nearest_neighbors refuses
// them before the op runs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/neighbor_args.h"
#include "nearest_neighbors_launch.h"

namespace confusion_kernels {
namespace {

namespace nb = neighbors;

constexpr int64_t kQueryTile = 2048;
constexpr int64_t kRefTile = 8192;

std::tuple<at::Tensor, at::Tensor> nearest_neighbors_cuda(const at::Tensor& query,
                                                          const at::Tensor& reference, int64_t k,
                                                          c10::string_view metric,
                                                          c10::optional<int64_t> self_offset) {
  const c10::cuda::CUDAGuard guard(query.device());
  const NoAutocast no_autocast;
  check_neighbor_inputs(query, reference, k, self_offset, c10::kCUDA);
  const int64_t code = neighbor_metric_code(metric);
  const int64_t n = query.size(0), m = reference.size(0), d = query.size(1);
  const int64_t kk = neighbor_count(k, m, self_offset);
  TORCH_CHECK(kk <= nb::kMaxNeighbors, "nearest_neighbors: the CUDA kernel keeps at most ",
              nb::kMaxNeighbors, " neighbours per query, asked for ", kk);
  at::Tensor dist = at::empty({n, kk}, query.options());
  at::Tensor idx = at::empty({n, kk}, query.options().dtype(at::kLong));
  if (n == 0 || kk == 0) return {dist, idx};
  const at::Tensor q = query.contiguous(), r = reference.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nearest_neighbors_cuda", [&] {
    using T = scalar_t;
    const at::Tensor q_sq = q.mul(q).sum(1);
    const at::Tensor r_sq = reference.is_same(query) ? q_sq : r.mul(r).sum(1);
    at::Tensor keys = at::empty({n, kk}, q.options());
    at::Tensor index = at::empty({n, kk}, idx.options());
    at::Tensor count = at::zeros({n}, idx.options());
    for (int64_t r0 = 0; r0 < n; r0 += kQueryTile) {
      const int64_t rt = std::min(kQueryTile, n - r0);
      const at::Tensor qt = q.narrow(0, r0, rt);
      for (int64_t c0 = 0; c0 < m; c0 += kRefTile) {
        const int64_t ct = std::min(kRefTile, m - c0);
        const at::Tensor gram = at::mm(qt, r.narrow(0, c0, ct).t()).contiguous();
        const nb::NeighborTile<T> tile{gram.data_ptr<T>(),
                                       r_sq.data_ptr<T>() + c0,
                                       rt,
                                       ct,
                                       c0,
                                       self_offset.has_value() ? r0 + *self_offset - c0 : 0,
                                       self_offset.has_value(),
                                       code};
        nb::launch_offer<T>(tile, kk, keys.data_ptr<T>() + r0 * kk,
                            index.data_ptr<int64_t>() + r0 * kk, count.data_ptr<int64_t>() + r0,
                            stream);
      }
    }
    nb::launch_finish<T>(q.data_ptr<T>(), q_sq.data_ptr<T>(), r.data_ptr<T>(), r_sq.data_ptr<T>(),
                         n, d, kk, code, index.data_ptr<int64_t>(), dist.data_ptr<T>(),
                         idx.data_ptr<int64_t>(), stream);
  });
  return {dist, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CUDA, m) {
  m.impl("nearest_neighbors", &nearest_neighbors_cuda);
}

}  // namespace confusion_kernels
