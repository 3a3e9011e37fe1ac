// CUDA dispatch of the pair-loss ops (pair_loss_stats, pair_loss_backward): rows x [N, D]
// against references r [M, D] in tiles of kRowTile x kRefTile pairs, the Gram tile from cuBLAS
// (tf32 as torch's matmul settings allow) and the kernels of pair_loss_kernels.cuh on the
// current stream, the tiles in a fixed order. Memory: O((N + M) D) plus one tile's Gram and
// coefficients, never N x M.
//
// Forward: each row's statistics (pair_loss_math.h) start with pair_loss_init; a block per
// row merges each tile's pairs into them; then pair_loss_finish_first and (NT-Xent) a second
// walk over the tiles for the positives; then the rows' outputs. Backward: per tile the
// coefficients C = dL/dm (over m for euclidean), dL/dx += C r and dL/dr += C^T x by cuBLAS
// (euclidean: + rowsum(C) x, + colsum(C) r, with the opposite sign on the products), the
// close pairs from differences.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/pair_loss_args.h"
#include "pair_loss_launch.h"

namespace confusion_kernels {
namespace {

namespace pl = pair_losses;

constexpr int64_t kRowTile = 2048;
constexpr int64_t kRefTile = 4096;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The operands and a tile of them (its Gram tile computed here).
template <typename T>
struct Operands {
  at::Tensor x, ref, labels, ref_labels, xn, rn;
  int64_t n, m, d;
  c10::optional<int64_t> self_offset;
  bool cosine;

  Operands(const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& ref_in,
           const at::Tensor& ref_labels_in, c10::optional<int64_t> offset, bool cos)
      : x(x_in.contiguous()),
        ref(ref_in.contiguous()),
        labels(labels_in.contiguous()),
        ref_labels(ref_labels_in.contiguous()),
        xn(x.mul(x).sum(1)),
        rn(ref.mul(ref).sum(1)),
        n(x.size(0)),
        m(ref.size(0)),
        d(x.size(1)),
        self_offset(offset),
        cosine(cos) {}

  // f(r0, rt, c0, ct, tile) for every tile, rows outer, references inner; `gram` holds the
  // tile's Gram products while f runs.
  template <class F>
  void for_each_tile(const F& f) const {
    for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
      const int64_t rt = std::min(kRowTile, n - r0);
      const at::Tensor xr = x.narrow(0, r0, rt);
      for (int64_t c0 = 0; c0 < m; c0 += kRefTile) {
        const int64_t ct = std::min(kRefTile, m - c0);
        const at::Tensor gram = at::mm(xr, ref.narrow(0, c0, ct).t()).contiguous();
        pl::PairTile<T> tile{gram.data_ptr<T>(),
                             x.data_ptr<T>() + r0 * d,
                             xn.data_ptr<T>() + r0,
                             labels.data_ptr<int64_t>() + r0,
                             ref.data_ptr<T>() + c0 * d,
                             rn.data_ptr<T>() + c0,
                             ref_labels.data_ptr<int64_t>() + c0,
                             rt,
                             ct,
                             d,
                             self_offset.has_value() ? r0 + *self_offset - c0 : 0,
                             self_offset.has_value(),
                             cosine};
        f(r0, rt, c0, ct, tile);
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor> pair_loss_stats_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, c10::optional<int64_t> self_offset, c10::string_view loss,
    at::ArrayRef<double> params, c10::string_view metric) {
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  check_pair_loss_inputs(x, labels, ref, ref_labels, self_offset, c10::kCUDA);
  const int64_t kind = pair_loss_code(loss);
  const bool cosine = pair_metric_is_cosine(metric);
  at::Tensor rows = at::empty({x.size(0), pair_loss_outputs(kind)}, x.options());
  at::Tensor stats = at::empty({x.size(0), kPairLossStats}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_loss_stats_cuda", [&] {
    using T = scalar_t;
    const Operands<T> o(x, labels, ref, ref_labels, self_offset, cosine);
    const PairLossParams<T> p = pair_loss_params<T>(kind, cosine, params);
    T* st = stats.data_ptr<T>();
    pl::launch_row_step<T>(p, o.n, 0, st, nullptr, current_stream());
    for (const bool second : {false, true}) {
      if (second && kind != kNTXent) break;
      o.for_each_tile([&](int64_t r0, int64_t, int64_t, int64_t, const pl::PairTile<T>& tile) {
        pl::launch_stats<T>(tile, p, second, st + r0 * kPairLossStats, current_stream());
      });
      if (!second) pl::launch_row_step<T>(p, o.n, 1, st, nullptr, current_stream());
    }
    pl::launch_row_step<T>(p, o.n, 2, st, rows.data_ptr<T>(), current_stream());
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> pair_loss_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& stats, const at::Tensor& x,
    const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    c10::optional<int64_t> self_offset, c10::string_view loss, at::ArrayRef<double> params,
    c10::string_view metric) {
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  check_pair_loss_inputs(x, labels, ref, ref_labels, self_offset, c10::kCUDA);
  const int64_t kind = pair_loss_code(loss);
  const bool cosine = pair_metric_is_cosine(metric);
  check_pair_loss_backward_inputs(grad_rows, stats, x, kind);
  at::Tensor grad_x = at::zeros_like(x, at::MemoryFormat::Contiguous);
  at::Tensor grad_ref = at::zeros_like(ref, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_loss_backward_cuda", [&] {
    using T = scalar_t;
    const Operands<T> o(x, labels, ref, ref_labels, self_offset, cosine);
    const PairLossParams<T> p = pair_loss_params<T>(kind, cosine, params);
    const at::Tensor g = grad_rows.to(x.scalar_type()).contiguous();
    const at::Tensor st = stats.to(x.scalar_type()).contiguous();
    const double product_sign = cosine ? 1.0 : -1.0;  // euclidean: dm/dx_i = (x_i - r_j) / m
    o.for_each_tile(
        [&](int64_t r0, int64_t rt, int64_t c0, int64_t ct, const pl::PairTile<T>& tile) {
          at::Tensor coef = at::empty({rt, ct}, o.x.options());
          at::Tensor near = at::empty({rt, ct}, o.x.options());
          pl::launch_coefficients<T>(tile, p, st.data_ptr<T>() + r0 * kPairLossStats,
                                     g.data_ptr<T>() + r0 * pair_loss_outputs(kind),
                                     coef.data_ptr<T>(), near.data_ptr<T>(), current_stream());
          at::Tensor gx = grad_x.narrow(0, r0, rt);
          at::Tensor gr = grad_ref.narrow(0, c0, ct);
          const at::Tensor xr = o.x.narrow(0, r0, rt);
          const at::Tensor rc = o.ref.narrow(0, c0, ct);
          gx.addmm_(coef, rc, 1, product_sign);
          gr.addmm_(coef.t(), xr, 1, product_sign);
          if (!cosine) {
            gx.add_(xr * coef.sum(1, true));
            gr.add_(rc * coef.sum(0).unsqueeze(1));
            pl::launch_near_grads<T>(tile, near.data_ptr<T>(), gx.data_ptr<T>(), gr.data_ptr<T>(),
                                     current_stream());
          }
        });
  });
  return {grad_x, grad_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CUDA, m) {
  m.impl("pair_loss_stats", &pair_loss_stats_cuda);
  m.impl("pair_loss_backward", &pair_loss_backward_cuda);
}

}  // namespace confusion_kernels
