// Gram-form intra_inter_sums kernels for the cosine metric (see gram_tile_kernels.cuh).
#include "gram_tile_launch.cuh"

namespace confusion_kernels {
CK_INSTANTIATE_GRAM(kCosine)
}  // namespace confusion_kernels
