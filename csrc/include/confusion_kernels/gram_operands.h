// Host-side preparation of the Gram-form operands, shared by the CPU kernel
// and the CUDA dispatch (ATen, host only).
#pragma once

#include <ATen/ATen.h>

#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {

// euclidean / sqeuclidean distances do not change under a common shift, but
// the Gram form |a|^2 + |b|^2 - 2 a.b loses digits in proportion to |a|^2:
// rows far from the origin would all fail the Gram test and take the slow
// exact path. Centring on the mean row keeps the norms at the data's spread;
// the gradient is the same (dL/dx = dL/d(x - m), m held constant, since L
// does not depend on m). Cosine is not shift invariant and is left alone.
inline at::Tensor center_for_gram(const at::Tensor& xa, int64_t metric) {
  if (metric != kEuclidean && metric != kSqEuclidean) return xa;
  return (xa - xa.mean(0, /*keepdim=*/true)).contiguous();
}

// Operands of the Gram form (see pair_math.h): the rows, or the unit rows
// x / |x| for cosine (a division, so exactly +-1 in one dimension; zero rows
// stay zero and their pairs take the exact path). sq_norms = |x_i|^2.
inline at::Tensor gram_operands(const at::Tensor& xa, const at::Tensor& sq_norms,
                                int64_t metric) {
  if (metric != kCosine) return xa;
  const at::Tensor norms = sq_norms.sqrt().unsqueeze(1);
  return at::where(norms > 0, xa / norms, at::zeros_like(xa)).contiguous();
}

}  // namespace confusion_kernels
