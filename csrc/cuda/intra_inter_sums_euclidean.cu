// intra_inter_sums CUDA kernels for the euclidean metric (see intra_inter_sums_kernels.cuh).
#include "intra_inter_sums_kernels.cuh"

namespace confusion_kernels {
CK_INSTANTIATE_INTRA_INTER_SUMS(kEuclidean)
}  // namespace confusion_kernels
