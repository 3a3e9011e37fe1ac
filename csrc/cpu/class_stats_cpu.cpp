// C++ CPU kernel of ClassStatistics.update (docs/math.md, "Similar labels"): per class c and
// feature k, the float64 sums of (x - shift_c) and (x - shift_c)^2 over the
// rows of class c, and the class counts, reading the features once. Threads
// own blocks of features and walk the rows in order: no atomics, the same
// sums on every run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "confusion_kernels/checks.h"

namespace confusion_kernels {
namespace {

constexpr int64_t kFeatureBlock = 64;

template <typename scalar_t>
void shifted_sums(const scalar_t* x, const int64_t* lab, const double* shift, int64_t b, int64_t k,
                  double* s1, double* s2) {
  at::parallel_for(0, (k + kFeatureBlock - 1) / kFeatureBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t k0 = blk * kFeatureBlock, kn = std::min(kFeatureBlock, k - k0);
      for (int64_t i = 0; i < b; ++i) {
        const scalar_t* xi = x + i * k + k0;
        const int64_t c = lab[i];
        const double* sh = shift + c * k + k0;
        double* a1 = s1 + c * k + k0;
        double* a2 = s2 + c * k + k0;
#pragma omp simd
        for (int64_t j = 0; j < kn; ++j) {
          const double d = double(xi[j]) - sh[j];
          a1[j] += d;
          a2[j] += d * d;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_shifted_sums_cpu(const at::Tensor& features,
                                                                      const at::Tensor& labels,
                                                                      const at::Tensor& shift,
                                                                      int64_t num_classes) {
  const NoAutocast no_autocast;
  TORCH_CHECK(features.dim() == 2 && at::isFloatingType(features.scalar_type()),
              "class_shifted_sums: features must be a floating [B, K] tensor");
  TORCH_CHECK(
      labels.dim() == 1 && labels.size(0) == features.size(0) && labels.scalar_type() == at::kLong,
      "class_shifted_sums: labels must be int64 [B]");
  TORCH_CHECK(shift.dim() == 2 && shift.size(0) == num_classes &&
                  shift.size(1) == features.size(1) && shift.scalar_type() == at::kDouble,
              "class_shifted_sums: shift must be float64 [C, K]");
  TORCH_CHECK(features.device().is_cpu() && labels.device().is_cpu() && shift.device().is_cpu(),
              "class_shifted_sums: CPU tensors expected");
  const int64_t b = features.size(0), k = features.size(1);
  check_label_range(labels, num_classes, "class_shifted_sums");
  const at::Tensor x = features.contiguous(), lab = labels.contiguous(), sh = shift.contiguous();
  at::Tensor s1 = at::zeros({num_classes, k}, sh.options());
  at::Tensor s2 = at::zeros({num_classes, k}, sh.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "class_shifted_sums", [&] {
        shifted_sums<scalar_t>(x.data_ptr<scalar_t>(), lab.data_ptr<int64_t>(),
                               sh.data_ptr<double>(), b, k, s1.data_ptr<double>(),
                               s2.data_ptr<double>());
      });
  at::Tensor count = at::bincount(lab, {}, num_classes).to(at::kDouble);
  return {count, s1, s2};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("class_shifted_sums", &class_shifted_sums_cpu);
}

}  // namespace confusion_kernels
