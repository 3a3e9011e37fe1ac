// C++ CPU kernel of ClassStatistics.update (docs/math.md, "Similar labels"): per class c and
// feature k, the float64 sums of (x - shift_c) and (x - shift_c)^2 over the
// rows of class c, and the class counts, reading the features once.
//
// The rows are grouped by class first (a counting sort, stable), then each job
// takes a run of classes and, per class, walks its rows in increasing order
// with the class's shift and two sums (3 K doubles) kept in cache; each row is
// read whole and once. A class's sums are the same in any thread count and on
// every run (one owner, row order). Scattering rows into per-class sums in row
// order instead touches a random class's 3 K doubles per row, which missed the
// caches about 10x more than reading the row costs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/group_by_key.h"
#include "parallel_jobs.h"

namespace confusion_kernels {
namespace {

// Rows per job, about: classes are grouped into jobs of at least this many rows.
constexpr int64_t kRowsPerJob = 2048;

template <typename scalar_t>
void shifted_sums(const scalar_t* x, const int64_t* lab, const double* shift, int64_t b, int64_t k,
                  int64_t num_classes, double* s1, double* s2) {
  // rows grouped by class, each class's rows in increasing order
  const KeyGroups groups = group_by_key(lab, b, num_classes);
  const std::vector<int64_t>&start = groups.start, &order = groups.order;
  // jobs: runs of whole classes with about kRowsPerJob rows (the split depends on the
  // labels only, not on the thread count)
  std::vector<int64_t> first_class{0};
  for (int64_t c = 0, rows = 0; c < num_classes; ++c) {
    rows += start[c + 1] - start[c];
    if (rows >= kRowsPerJob && c + 1 < num_classes) {
      first_class.push_back(c + 1);
      rows = 0;
    }
  }
  first_class.push_back(num_classes);
  run_jobs(int64_t(first_class.size()) - 1, [&](int64_t job, int64_t) {
    for (int64_t c = first_class[job]; c < first_class[job + 1]; ++c) {
      const double* sh = shift + c * k;
      double* a1 = s1 + c * k;
      double* a2 = s2 + c * k;
      for (int64_t r = start[c]; r < start[c + 1]; ++r) {
        const scalar_t* xi = x + order[r] * k;
        if (r + 2 < b) {  // rows come in class order, not memory order: fetch ahead
          const char* ahead = reinterpret_cast<const char*>(x + order[r + 2] * k);
          for (int64_t off = 0; off < k * int64_t(sizeof(scalar_t)); off += 64)
            __builtin_prefetch(ahead + off);
        }
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) {
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
                               sh.data_ptr<double>(), b, k, num_classes, s1.data_ptr<double>(),
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
