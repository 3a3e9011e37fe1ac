// Host-side preparation of the Gram-form operands (ATen, host only): the shifts
// of the CPU and CUDA pair passes and the CUDA intra_inter_sums dispatch.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {

// Whether each row of z (its last dimension holds the features, kept as size 1)
// has no NaN/Inf: the largest |z_k| is finite (amax propagates NaN). One
// vectorised pass; on CPU at::isfinite(z).all(-1) takes ten times as long, an
// element at a time.
inline at::Tensor finite_rows(const at::Tensor& z) {
  if (z.size(-1) == 0) {  // no features: nothing to be non-finite (amax needs one)
    std::vector<int64_t> shape = z.sizes().vec();
    shape.back() = 1;
    return at::ones(shape, z.options().dtype(at::kBool));
  }
  return at::isfinite(z.abs().amax(/*dim=*/-1, /*keepdim=*/true));
}

// The mean over `dim` of the rows of z (its last dimension holds the features)
// that contain no NaN/Inf, keeping `dim`; zeros where there is none. A row
// holding NaN/Inf stays non-finite itself (and so do the sums it enters) but
// must not spread to every other row through a shift.
inline at::Tensor finite_row_mean(const at::Tensor& z, int64_t dim) {
  const at::Tensor finite = finite_rows(z);
  const at::Tensor count = finite.sum(dim, /*keepdim=*/true).clamp_min(1).to(z.scalar_type());
  return at::where(finite, z, at::zeros_like(z)).sum(dim, /*keepdim=*/true) / count;
}

// euclidean / sqeuclidean distances do not change under a common shift, but
// the Gram form |a|^2 + |b|^2 - 2 a.b loses digits in proportion to |a|^2:
// rows far from the origin would all fail the Gram test and take the slow
// exact path. Centring on the mean row keeps the norms at the data's spread;
// the gradient is the same (dL/dx = dL/d(x - m), m held constant, since L
// does not depend on m). Cosine is not shift invariant and is left alone.
inline at::Tensor center_for_gram(const at::Tensor& xa, int64_t metric) {
  if (metric != kEuclidean && metric != kSqEuclidean) return xa;
  return (xa - finite_row_mean(xa, 0)).contiguous();
}

// The unit rows x / |x| for the cosine metric, given norms = |x_i| (a
// division, so exactly +-1 in one dimension; zero rows stay zero).
inline at::Tensor unit_rows(const at::Tensor& xa, const at::Tensor& norms) {
  const at::Tensor col = norms.unsqueeze(1);
  return at::where(col > 0, xa / col, at::zeros_like(xa)).contiguous();
}

// Operands of the Gram form (see pair_math.h): the rows, or the unit rows for
// cosine (zero rows take the exact path). sq_norms = |x_i|^2.
inline at::Tensor gram_operands(const at::Tensor& xa, const at::Tensor& sq_norms, int64_t metric) {
  return metric == kCosine ? unit_rows(xa, sq_norms.sqrt()) : xa;
}

}  // namespace confusion_kernels
