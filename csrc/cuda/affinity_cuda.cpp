// CUDA dispatch of the affinity loss ops: the tile loops of affinity_tiles.h
// with cuBLAS Gram tiles (tf32 / tensor cores as torch's matmul settings
// allow) and the epilogue kernels of affinity_kernels.cuh on the current
// stream. Row sums of a tile are ATen reductions (no atomics: deterministic).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "affinity_launch.h"
#include "confusion_kernels/affinity_tiles.h"
#include "confusion_kernels/checks.h"

namespace confusion_kernels {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaTiles {
  static constexpr c10::DeviceType kDevice = c10::kCUDA;
  struct Guard {
    c10::cuda::CUDAGuard device;
    NoAutocast no_autocast;
    explicit Guard(c10::Device d) : device(d) {}
  };
  static void true_class(const AffinityInputs& in, const at::Tensor& f_norms,
                         const at::Tensor& w_norms, double sigma, int64_t kind, at::Tensor& d_true,
                         at::Tensor& true_arg) {
    AT_DISPATCH_FLOATING_TYPES(in.f.scalar_type(), "affinity_true_class_cuda", [&] {
      affinity::launch_true_class<scalar_t>(
          in.f.data_ptr<scalar_t>(), in.prototypes.data_ptr<scalar_t>(),
          f_norms.data_ptr<scalar_t>(), w_norms.data_ptr<scalar_t>(), in.labels.data_ptr<int64_t>(),
          in.f.size(0), in.f.size(1), in.num_centers, scalar_t(sigma), kind,
          d_true.data_ptr<scalar_t>(), true_arg.data_ptr<int64_t>(), current_stream());
    });
  }
  static void own_class(const at::Tensor& f, const at::Tensor& w, const at::Tensor& own_proto,
                        const at::Tensor& own_coef, at::Tensor& grad_f, at::Tensor& grad_w,
                        at::Tensor& row_coef, at::Tensor& col_coef) {
    affinity::own_class_terms_aten(f, w, own_proto, own_coef, grad_f, grad_w, row_coef, col_coef);
  }
  static constexpr bool kTileScratch = true;
  // Two kernels per tile: the affinities and arg-mins into buf's d / arg
  // tiles, then the hinges and coefficients from them.
  static void epilogue(const at::Tensor& g, const at::Tensor& fn_r, const at::Tensor& wn_t,
                       int64_t m, int64_t c0, const at::Tensor& lab_r, const at::Tensor& d_true_r,
                       double sigma, double margin, int64_t kind, const at::Tensor& rows_r,
                       const at::Tensor& active_r, const at::Tensor& g_r,
                       const at::Tensor& own_active_r, const at::Tensor& a,
                       const at::Tensor& a_row_sums, affinity::TileBuffers& buf) {
    const int64_t rt = g.size(0), ct = g.size(1) / m;
    at::Tensor d_tile = buf.d.narrow(0, 0, rt * ct).view({rt, ct});
    at::Tensor arg_tile = buf.arg.narrow(0, 0, rt * ct).view({rt, ct});
    similarity(g, fn_r, wn_t, m, sigma, kind, d_tile, arg_tile);
    hinge(d_tile, arg_tile, m, c0, lab_r, d_true_r, sigma, margin, kind, rows_r, active_r, g_r,
          own_active_r, a, a_row_sums);
  }

 private:
  static void similarity(const at::Tensor& g_in, const at::Tensor& fn_r, const at::Tensor& wn_t,
                         int64_t m, double sigma, int64_t kind, at::Tensor& d_tile,
                         at::Tensor& arg_tile) {
    const at::Tensor g = g_in.contiguous();
    const at::Tensor fn = fn_r.contiguous(), wn = wn_t.contiguous();
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "affinity_similarity_cuda", [&] {
      affinity::launch_similarity<scalar_t>(g.data_ptr<scalar_t>(), fn.data_ptr<scalar_t>(),
                                            wn.data_ptr<scalar_t>(), d_tile.size(0), d_tile.size(1),
                                            m, scalar_t(sigma), kind, d_tile.data_ptr<scalar_t>(),
                                            arg_tile.data_ptr<int64_t>(), current_stream());
    });
  }
  static void hinge(const at::Tensor& d_tile, const at::Tensor& arg_tile, int64_t m, int64_t c0,
                    const at::Tensor& lab_r, const at::Tensor& d_true_r, double sigma,
                    double margin, int64_t kind, const at::Tensor& rows_r,
                    const at::Tensor& active_r, const at::Tensor& g_r,
                    const at::Tensor& own_active_r, const at::Tensor& a,
                    const at::Tensor& a_row_sums) {
    const bool sums = rows_r.defined();
    at::Tensor h_tile, on_tile;
    if (sums) {
      h_tile = at::empty_like(d_tile);
      on_tile = at::empty_like(d_tile);
    }
    AT_DISPATCH_FLOATING_TYPES(d_tile.scalar_type(), "affinity_hinge_tile_cuda", [&] {
      affinity::launch_hinge<scalar_t>(
          d_tile.data_ptr<scalar_t>(), arg_tile.data_ptr<int64_t>(), d_tile.size(0), d_tile.size(1),
          m, c0, lab_r.data_ptr<int64_t>(), d_true_r.data_ptr<scalar_t>(), scalar_t(sigma),
          scalar_t(margin), kind, ptr_or_null<scalar_t>(g_r), ptr_or_null<scalar_t>(own_active_r),
          ptr_or_null<scalar_t>(h_tile), ptr_or_null<scalar_t>(on_tile), ptr_or_null<scalar_t>(a),
          current_stream());
    });
    if (sums) {
      at::Tensor(rows_r).add_(h_tile.sum(1));
      at::Tensor(active_r).add_(on_tile.sum(1));
    }
    if (a_row_sums.defined()) at::Tensor(a_row_sums).add_(a.sum(1));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CUDA, m) {
  m.impl("affinity_hinge", &affinity::hinge_op<CudaTiles>);
  m.impl("affinity_hinge_backward", &affinity::hinge_backward_op<CudaTiles>);
  m.impl("affinity_hinge_sum_with_grad", &affinity::hinge_sum_with_grad_op<CudaTiles>);
}

}  // namespace confusion_kernels
