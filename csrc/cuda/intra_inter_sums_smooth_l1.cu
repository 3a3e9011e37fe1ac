// intra_inter_sums CUDA kernels for the smooth_l1 metric (see intra_inter_sums_kernels.cuh).
#include "intra_inter_sums_kernels.cuh"

namespace confusion_kernels {
CK_INSTANTIATE_INTRA_INTER_SUMS(kSmoothL1)
}  // namespace confusion_kernels
