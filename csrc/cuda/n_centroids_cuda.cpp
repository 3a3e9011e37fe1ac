// CUDA dispatch of the N-Centroids ops: the tile loop of n_centroids_tiles.h
// with cuBLAS Gram tiles (tf32 / tensor cores as torch's matmul settings allow)
// and the epilogue kernels of n_centroids_kernels.cuh on the current stream.
// The first minimum and the sums over a tile's rows are ATen reductions (no
// atomics: deterministic).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "confusion_kernels/n_centroids_tiles.h"
#include "n_centroids_launch.h"

namespace confusion_kernels {
namespace {

namespace nc = n_centroids;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaTiles {
  static constexpr c10::DeviceType kDevice = c10::kCUDA;
  static constexpr int64_t kRowTile = 4096;
  static constexpr int64_t kCentroidTile = 1024;
  struct Guard {
    c10::cuda::CUDAGuard device;
    NoAutocast no_autocast;
    explicit Guard(c10::Device d) : device(d) {}
  };
  static void normalise(nc::Inputs& in) { nc::normalise_with_aten(in); }
  static at::Tensor through_normalisation(const nc::Inputs& in, const at::Tensor& grad_x) {
    return nc::through_normalisation_with_aten(in, grad_x);
  }
  // job(r0, rt) for every row tile, one after another (stream order)
  template <class Job>
  static void row_tiles(int64_t n, const Job& job) {
    for (int64_t r0 = 0; r0 < n; r0 += kRowTile) job(r0, std::min(kRowTile, n - r0));
  }

  static void direct(const nc::Inputs& in, const at::Tensor& index, const at::Tensor& weight,
                     at::Tensor& dist, const at::Tensor& grad_x) {
    const at::Tensor w = weight.defined() ? weight.contiguous() : weight;
    const at::Tensor idx = index.contiguous();
    AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "n_centroids_direct_cuda", [&] {
      nc::launch_direct<scalar_t>(in.x.data_ptr<scalar_t>(), in.centroids.data_ptr<scalar_t>(),
                                  idx.data_ptr<int64_t>(), ptr_or_null<scalar_t>(w), in.x.size(0),
                                  in.x.size(1), in.metric, dist.data_ptr<scalar_t>(),
                                  ptr_or_null<scalar_t>(grad_x), current_stream());
    });
  }

  static void negatives(const at::Tensor& g_in, const nc::Inputs& in, int64_t r0, int64_t c0,
                        const at::Tensor& weight_r, const at::Tensor& best_r,
                        const at::Tensor& best_k_r, const at::Tensor& sum_r, const at::Tensor& coef,
                        const at::Tensor& x_coef_r, const at::Tensor& grad_x_r) {
    const at::Tensor g = g_in.contiguous();
    const int64_t rt = g.size(0), ct = g.size(1), d = in.x.size(1);
    const at::Tensor lab_r = in.labels.narrow(0, r0, rt);
    const at::Tensor w = weight_r.defined() ? weight_r.contiguous() : weight_r;
    at::Tensor dist = at::empty_like(g);
    at::Tensor exact = at::empty({rt, ct}, g.options().dtype(at::kByte));
    at::Tensor alpha_tile = coef.defined() ? at::empty_like(g) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "n_centroids_pairs_cuda", [&] {
      nc::launch_pairs<scalar_t>(
          g.data_ptr<scalar_t>(), in.x.data_ptr<scalar_t>() + r0 * d,
          in.x_norm2.data_ptr<scalar_t>() + r0, in.centroids.data_ptr<scalar_t>() + c0 * d,
          in.c_norm2.data_ptr<scalar_t>() + c0, lab_r.data_ptr<int64_t>(), ptr_or_null<scalar_t>(w),
          rt, ct, c0, d, in.metric, dist.data_ptr<scalar_t>(), exact.data_ptr<uint8_t>(),
          ptr_or_null<scalar_t>(coef), ptr_or_null<scalar_t>(alpha_tile), current_stream());
      if (coef.defined())
        nc::launch_exact_grad<scalar_t>(
            in.x.data_ptr<scalar_t>() + r0 * d, in.centroids.data_ptr<scalar_t>() + c0 * d,
            lab_r.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), exact.data_ptr<uint8_t>(), rt, ct,
            c0, d, in.metric, grad_x_r.data_ptr<scalar_t>(), current_stream());
    });
    if (coef.defined()) at::Tensor(x_coef_r).add_(alpha_tile.sum(1));
    if (!best_r.defined()) return;
    const at::Tensor own =
        lab_r.unsqueeze(1).sub(c0).eq(at::arange(ct, lab_r.options()).unsqueeze(0));
    at::Tensor(sum_r).add_(dist.masked_fill(own, 0).sum(1));
    const auto tile_min = dist.masked_fill(own, std::numeric_limits<double>::infinity()).min(1);
    const at::Tensor& tile_best = std::get<0>(tile_min);
    const at::Tensor tile_k = std::get<1>(tile_min).add(c0);
    // a tile whose only column is the row's own centroid offers no negative
    const at::Tensor offers = own.logical_not().any(1);
    const at::Tensor take = offers.logical_and(tile_best.lt(best_r).logical_or(best_k_r.lt(0)));
    at::Tensor(best_r).copy_(at::where(take, tile_best, best_r));
    at::Tensor(best_k_r).copy_(at::where(take, tile_k, best_k_r));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CUDA, m) {
  m.impl("n_centroids_rows", &n_centroids::rows_op<CudaTiles>);
  m.impl("n_centroids_rows_backward", &n_centroids::rows_backward_op<CudaTiles>);
  m.impl("n_centroids_sum_with_grad", &n_centroids::sum_with_grad_op<CudaTiles>);
}

}  // namespace confusion_kernels
