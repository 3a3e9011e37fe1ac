// C++ CPU kernels of intra_inter_sums (SPEC section 2): for every row i
//   S_in[i]  = sum_{j != i, y_j == y_i} D(x_i, x_j)
//   S_out[i] = sum_{j : y_j != y_i}     D(x_i, x_j)
// and its backward, in O(N*D + tile) memory.
//
// euclidean / sqeuclidean (D > 8) / cosine: forward and backward are the
// triangular Gram-form pass of pair_sums_with_grad_cpu.cpp (each unordered
// pair once, class-aligned tiles shifted by their mean, exact recomputation
// of the pairs the Gram form cannot resolve). manhattan / smooth_l1, and
// euclidean / sqeuclidean at small D: direct loops over a transposed copy so
// the inner loop runs over contiguous columns and vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/pair_math.h"
#include "pair_sums_with_grad.h"

namespace confusion_kernels {
namespace {

constexpr int64_t kDirectColBlock = 256;
// euclidean / sqeuclidean with at most this many dimensions use the direct
// (difference) loops: a K <= kDirectMaxDim matrix product does too little work
// per output to pay for writing and re-reading the tile.
constexpr int64_t kDirectMaxDim = 8;  // measured: direct wins up to D = 8 at N = 4096

bool uses_gram_pass(int64_t metric, int64_t dim) {
  return metric == kCosine ||
         ((metric == kEuclidean || metric == kSqEuclidean) && dim > kDirectMaxDim);
}

// ---------------------------------------------------------------------------
// Direct loops (manhattan, smooth_l1; euclidean, sqeuclidean at small D) over
// x^T so that the innermost loop walks contiguous columns.
// ---------------------------------------------------------------------------
// sums[jj] = sum_k term(x_ik - x_(c0+jj),k) for the ct columns from c0 (xt = x^T, n columns).
template <int64_t M, typename acc_t>
inline void direct_block_sums(const acc_t* xi, const acc_t* xt, int64_t n, int64_t d, int64_t c0,
                              int64_t ct, acc_t* sums) {
  std::fill(sums, sums + ct, acc_t(0));
  for (int64_t k = 0; k < d; ++k) {
    const acc_t xik = xi[k];
    const acc_t* col = xt + k * n + c0;
#pragma omp simd
    for (int64_t jj = 0; jj < ct; ++jj) sums[jj] += direct_term<acc_t>(M, xik - col[jj]);
  }
}

template <int64_t M, typename acc_t>
void direct_forward(const at::Tensor& xa, const int64_t* lab, acc_t* s_in, acc_t* s_out) {
  const int64_t n = xa.size(0), d = xa.size(1);
  const acc_t* xp = xa.data_ptr<acc_t>();
  const at::Tensor xt = xa.t().contiguous();
  const acc_t* xtp = xt.data_ptr<acc_t>();
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kDirectColBlock);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t li = lab[i];
      acc_t in = 0, out = 0;
      for (int64_t c0 = 0; c0 < n; c0 += kDirectColBlock) {
        const int64_t ct = std::min(kDirectColBlock, n - c0);
        direct_block_sums<M, acc_t>(xp + i * d, xtp, n, d, c0, ct, buf.data());
        for (int64_t jj = 0; jj < ct; ++jj) {
          const int64_t j = c0 + jj;
          const acc_t dist = j == i ? acc_t(0) : direct_finalize<acc_t>(M, buf[jj]);
          (lab[j] == li ? in : out) += dist;
        }
      }
      s_in[i] = in;
      s_out[i] = out;
    }
  });
}

template <int64_t M, typename acc_t>
void direct_backward(const at::Tensor& xa, const int64_t* lab, const acc_t* g_in,
                     const acc_t* g_out, at::Tensor& grad) {
  const int64_t n = xa.size(0), d = xa.size(1);
  const acc_t* xp = xa.data_ptr<acc_t>();
  const at::Tensor xt = xa.t().contiguous();
  const acc_t* xtp = xt.data_ptr<acc_t>();
  acc_t* gradp = grad.data_ptr<acc_t>();
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> coef(kDirectColBlock), dist2(kDirectColBlock);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t li = lab[i];
      for (int64_t c0 = 0; c0 < n; c0 += kDirectColBlock) {
        const int64_t ct = std::min(kDirectColBlock, n - c0);
        for (int64_t jj = 0; jj < ct; ++jj) {
          const int64_t j = c0 + jj;
          coef[jj] = j == i ? acc_t(0)
                            : (lab[j] == li ? g_in[i] + g_in[j] : g_out[i] + g_out[j]);
        }
        if (M == kEuclidean) {  // fold 1/|x_i - x_j| into the coefficients (0 at distance 0)
          direct_block_sums<M, acc_t>(xp + i * d, xtp, n, d, c0, ct, dist2.data());
          for (int64_t jj = 0; jj < ct; ++jj) {
            const acc_t dist = direct_finalize<acc_t>(M, dist2[jj]);
            coef[jj] = dist > acc_t(0) ? coef[jj] / dist : acc_t(0);
          }
        }
        // euclidean: the folded coefficient times (x_ik - x_jk), i.e. the term at dist 1
        const acc_t dist_arg = M == kEuclidean ? acc_t(1) : acc_t(0);
        for (int64_t k = 0; k < d; ++k) {
          const acc_t xik = xp[i * d + k];
          const acc_t* col = xtp + k * n + c0;
          const acc_t* c = coef.data();
          acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t jj = 0; jj < ct; ++jj)
            acc += c[jj] * direct_grad_term<acc_t>(M, xik - col[jj], dist_arg);
          gradp[i * d + k] += acc;
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Dispatch on metric (compile-time constant in the loops) and dtype.
// ---------------------------------------------------------------------------
// The difference-form metrics (and euclidean / sqeuclidean at small D); the
// Gram metrics go through pair_row_sums.
template <typename acc_t>
void forward_impl(int64_t metric, const at::Tensor& xa, const int64_t* lab, acc_t* s_in,
                  acc_t* s_out) {
  switch (metric) {
    case kEuclidean: return direct_forward<kEuclidean, acc_t>(xa, lab, s_in, s_out);
    case kSqEuclidean: return direct_forward<kSqEuclidean, acc_t>(xa, lab, s_in, s_out);
    case kManhattan: return direct_forward<kManhattan, acc_t>(xa, lab, s_in, s_out);
    case kSmoothL1: return direct_forward<kSmoothL1, acc_t>(xa, lab, s_in, s_out);
    default: TORCH_CHECK(false, "intra_inter_sums: unknown metric code ", metric);
  }
}

// The difference-form metrics (and euclidean / sqeuclidean at small D); the
// Gram metrics go through pair_sums_with_grad.
template <typename acc_t>
void backward_impl(int64_t metric, const at::Tensor& xa, const int64_t* lab, const acc_t* g_in,
                   const acc_t* g_out, at::Tensor& grad) {
  switch (metric) {
    case kEuclidean: return direct_backward<kEuclidean, acc_t>(xa, lab, g_in, g_out, grad);
    case kSqEuclidean: return direct_backward<kSqEuclidean, acc_t>(xa, lab, g_in, g_out, grad);
    case kManhattan: return direct_backward<kManhattan, acc_t>(xa, lab, g_in, g_out, grad);
    case kSmoothL1: return direct_backward<kSmoothL1, acc_t>(xa, lab, g_in, g_out, grad);
    default: TORCH_CHECK(false, "intra_inter_sums_backward: unknown metric code ", metric);
  }
}

std::tuple<at::Tensor, at::Tensor> intra_inter_sums_cpu(const at::Tensor& x,
                                                        const at::Tensor& labels,
                                                        c10::string_view metric_name) {
  const NoAutocast no_autocast;
  const RowSumsInputs in = prepare_row_sums_inputs(x, labels, metric_name, c10::kCPU);
  const int64_t metric = in.metric;
  if (uses_gram_pass(metric, in.x.size(1))) return pair_row_sums(in.x, in.labels, metric);
  at::Tensor s_in = at::zeros({x.size(0)}, in.x.options());
  at::Tensor s_out = at::zeros({x.size(0)}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "intra_inter_sums_cpu", [&] {
    forward_impl<scalar_t>(metric, in.x, in.labels.data_ptr<int64_t>(),
                           s_in.data_ptr<scalar_t>(), s_out.data_ptr<scalar_t>());
  });
  return {s_in, s_out};
}

at::Tensor intra_inter_sums_backward_cpu(const at::Tensor& grad_in, const at::Tensor& grad_out,
                                         const at::Tensor& x, const at::Tensor& labels,
                                         c10::string_view metric_name) {
  const NoAutocast no_autocast;
  const RowSumsInputs in =
      prepare_row_sums_backward_inputs(grad_in, grad_out, x, labels, metric_name, c10::kCPU);
  const int64_t metric = in.metric;
  if (uses_gram_pass(metric, in.x.size(1))) {
    // dL/dx is the gradient of sum_i g_in[i] S_in[i] + g_out[i] S_out[i]: the one-pass
    // kernel with the upstream gradients as weights, each unordered pair once.
    const PairSums r = pair_sums_with_grad(in.x, in.labels, in.grad_in, in.grad_out, metric);
    return (r.grad_in + r.grad_out).to(x.scalar_type());
  }
  at::Tensor grad = at::zeros_like(in.x);
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "intra_inter_sums_backward_cpu", [&] {
    backward_impl<scalar_t>(metric, in.x, in.labels.data_ptr<int64_t>(),
                            in.grad_in.data_ptr<scalar_t>(), in.grad_out.data_ptr<scalar_t>(),
                            grad);
  });
  return grad.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("intra_inter_sums", &intra_inter_sums_cpu);
  m.impl("intra_inter_sums_backward", &intra_inter_sums_backward_cpu);
}

}  // namespace confusion_kernels
