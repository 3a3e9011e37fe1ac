// Operator schemas of confusion_kernels._C. Backends register their kernels
// with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda); autograd and fake-tensor
// rules are registered from Python (confusion_kernels/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing confusion_kernels._C loads this library (and runs the static
// registrations below); the module itself is empty, so no pybind11 is needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(confusion_kernels, m) {
  // S_in[i] = sum_{j != i, y_j == y_i} D(x_i, x_j); S_out[i] = sum_{y_j != y_i} D(x_i, x_j).
  // `algorithm` (direct, pair_pass, gram_tiles: spec.h) is chosen by the Python router
  // (confusion_kernels/_routing.py); an algorithm without a kernel on the device is refused.
  m.def("intra_inter_sums(Tensor x, Tensor labels, str metric, str algorithm) -> (Tensor, Tensor)");
  // dL/dx from per-row upstream gradients of S_in and S_out.
  m.def(
      "intra_inter_sums_backward(Tensor grad_in, Tensor grad_out, Tensor x, Tensor labels, "
      "str metric, str algorithm) -> Tensor");
  // The rectangular form: rows of x against the rows of ref [M, D] with labels ref_labels;
  // self_offset = o says that x_i is ref_{o+i} (that pair is left out).
  m.def(
      "intra_inter_sums_rect(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, "
      "int? self_offset, str metric, str algorithm) -> (Tensor, Tensor)");
  // (dL/dx, dL/dref) from per-row upstream gradients of S_in and S_out.
  m.def(
      "intra_inter_sums_rect_backward(Tensor grad_in, Tensor grad_out, Tensor x, Tensor labels, "
      "Tensor ref, Tensor ref_labels, int? self_offset, str metric, str algorithm) -> "
      "(Tensor, Tensor)");
  // The one-pass ASLoss core: t_in = sum_i w_in[i] S_in[i], t_out = sum_i w_out[i] S_out[i]
  // (0-d) and their gradients dt_in/dx, dt_out/dx [N, D], each unordered pair computed once.
  m.def(
      "weighted_pair_sums_with_grad(Tensor x, Tensor labels, Tensor w_in, Tensor w_out, "
      "str metric) -> (Tensor, Tensor, Tensor, Tensor)");
  // Affinity loss rows (docs/math.md, "Affinity loss"): prototypes [C, m, D];
  // returns (L [N], d_true [N], active [N]) with L_i = sum_{j != y_i} relu(margin + d_ij - d_iy)
  // and active_i the number of classes whose hinge is active.
  m.def(
      "affinity_hinge(Tensor f, Tensor prototypes, Tensor labels, float sigma, float margin, "
      "str similarity) -> (Tensor, Tensor, Tensor)");
  // (dL/df, dL/dprototypes) from the per-row upstream gradient of L and the forward's counts.
  m.def(
      "affinity_hinge_backward(Tensor grad_rows, Tensor f, Tensor prototypes, Tensor labels, "
      "Tensor d_true, Tensor active, float sigma, float margin, str similarity) -> "
      "(Tensor, Tensor)");
  // sum_i L_i together with its gradients for f and the prototypes (one pass, no
  // recomputation): the training path of affinity_loss, whose upstream gradient is a scalar.
  m.def(
      "affinity_hinge_sum_with_grad(Tensor f, Tensor prototypes, Tensor labels, float sigma, "
      "float margin, str similarity) -> (Tensor, Tensor, Tensor)");
  // N-Centroids loss rows on the unit sphere, x = z / max(|z|, 1e-12), metric euclidean, cosine
  // or great_circle: L_i = d(x_i, c_{y_i}) - [d(x_i, c_{h_i}) + mean_{k != y_i} d(x_i, c_k)]
  // (only the first term without negatives); returns (L [N], h [N] the hardest negative, -1
  // without negatives).
  m.def(
      "n_centroids_rows(Tensor z, Tensor centroids, Tensor labels, str metric, "
      "bool use_negatives) -> (Tensor, Tensor)");
  // dL/dz from the per-row upstream gradient and the forward's hardest negatives.
  m.def(
      "n_centroids_rows_backward(Tensor grad_rows, Tensor z, Tensor centroids, Tensor labels, "
      "Tensor hardest, str metric, bool use_negatives) -> Tensor");
  // sum_i L_i and dL/dz in one pass (the training path: a scalar upstream gradient).
  m.def(
      "n_centroids_sum_with_grad(Tensor z, Tensor centroids, Tensor labels, str metric, "
      "bool use_negatives) -> (Tensor, Tensor)");
  // Pair losses in pytorch-metric-learning's form (docs/math.md, "Pair losses"): rows x [N, D]
  // against ref [M, D] (self_offset o: x_i is ref_{o+i}, that pair left out); loss contrastive,
  // supcon, ntxent or multi_similarity with its parameters; metric euclidean (distance) or
  // cosine (similarity of the rows as given). Returns (rows [N, R], stats [N, 4]): the per-row
  // outputs with a gradient (R = 2 for contrastive) and the statistics (pair_loss_math.h).
  m.def(
      "pair_loss_stats(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, int? self_offset, "
      "str loss, float[] params, str metric) -> (Tensor, Tensor)");
  // (dL/dx, dL/dref) from the upstream gradient of the rows and the forward's statistics.
  m.def(
      "pair_loss_backward(Tensor grad_rows, Tensor stats, Tensor x, Tensor labels, Tensor ref, "
      "Tensor ref_labels, int? self_offset, str loss, float[] params, str metric) -> "
      "(Tensor, Tensor)");
  // Per-class float64 sums of (x - shift_y) and (x - shift_y)^2, and counts (ClassStatistics).
  m.def(
      "class_shifted_sums(Tensor features, Tensor labels, Tensor shift, int num_classes) -> "
      "(Tensor, Tensor, Tensor)");
  // The k nearest references of each query (docs/math.md, "Retrieval"): (distances [N, K],
  // indices [N, K]), K = min(k, M - [self_offset given]), ordered by (distance, index);
  // metric euclidean, sqeuclidean or cosine (unit rows: the caller normalises); self_offset
  // o: query i is reference o + i and not its own neighbour.
  m.def(
      "nearest_neighbors(Tensor query, Tensor reference, int k, str metric, int? self_offset) "
      "-> (Tensor, Tensor)");
}
