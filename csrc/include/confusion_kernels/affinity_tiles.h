// The tile loops of the affinity loss (docs/math.md, "Affinity loss"), shared by the CPU and
// CUDA kernels (host code, ATen). A (row tile x class tile) block gets its
// squared distances from one matrix product in the Gram form (gram_tiles.h;
// BLAS / cuBLAS: tensor cores where torch allows them); a tile holds whole
// classes, so the min over the m prototypes stays inside it. The per-pair
// epilogues are the device's own kernels (`Tiles`), written with affinity_math.h:
//   Tiles::kDevice, Tiles::Guard (constructed from a c10::Device)
//   Tiles::kTileScratch: whether the epilogue uses the d / arg tiles of TileBuffers
//   Tiles::true_class(in, f_norms, w_norms, sigma, kind, d_true, true_arg)
//       d_true_i and the arg-min prototype of the own class (direct dots)
//   Tiles::own_class(f, w, own_proto, own_coef, grad_f, grad_w, row_coef, col_coef)
//       the own-class gradient terms after the last tile (own_class_terms_aten)
//   Tiles::epilogue(g, fn_r, wn_t, m, c0, lab_r, d_true_r, sigma, margin, kind,
//                   rows_r, active_r, g_r, own_active_r, a, a_row_sums, buf)
//       per row and class d = sim(min_t s) at the first arg-min; the hinge
//       sums into rows_r / active_r (when defined) and the coefficient tile
//       a = dL/ds at each class's arg-min slot (when defined), with the own
//       class weighted -own_active_r (when defined, else 0)
// Gradients: dL/df = 2 rowsum(A) f - 2 A W, dL/dW = 2 colsum(A) W - 2 A^T f,
// accumulated tile by tile in a fixed order (deterministic). Memory
// O((N + P) D + tile); nothing of size N x P.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "confusion_kernels/affinity_math.h"
#include "confusion_kernels/checks.h"
#include "confusion_kernels/gram_tiles.h"

namespace confusion_kernels {
namespace affinity {

constexpr int64_t kRowTile = 1024;
constexpr int64_t kProtoTile = 1024;  // prototypes per tile, rounded down to whole classes

inline int64_t classes_per_tile(int64_t m) { return std::max<int64_t>(1, kProtoTile / m); }

// Rows per tile: kRowTile, or more while a tile stays within kRowTile x kProtoTile
// entries (few prototypes: fewer, larger tiles, less fixed cost per tile).
inline int64_t rows_per_tile(const AffinityInputs& in) {
  const int64_t pt = std::min(classes_per_tile(in.num_centers), in.num_classes) * in.num_centers;
  return std::min(in.f.size(0), std::max(kRowTile, kRowTile * kProtoTile / pt));
}

// grad_f -= 2 A W_t and grad_w -= 2 A^T f_r for a coefficient tile A [rt, ct m]
// (ds/df = 2 (f - w), ds/dw = -2 (f - w)); the column sums of A for the
// 2 colsum(A) W term added at the end.
inline void add_tile_gradient(const at::Tensor& a, const at::Tensor& fr, const at::Tensor& wt,
                              int64_t r0, int64_t p0, at::Tensor& grad_f, at::Tensor& grad_w,
                              at::Tensor& col_coef) {
  const int64_t rt = a.size(0), pt = a.size(1);
  grad_f.narrow(0, r0, rt).addmm_(a, wt, 1, -2);
  grad_w.narrow(0, p0, pt).addmm_(a.t(), fr, 1, -2);
  col_coef.narrow(0, p0, pt).add_(a.sum(0));
}

// Scratch tiles reused across the loop: the affinities and arg-mins of a tile
// (for epilogues that keep them, `scratch`) and the coefficient tile.
struct TileBuffers {
  at::Tensor d, arg, a;
  TileBuffers(const AffinityInputs& in, bool scratch, bool with_a) {
    const int64_t rt = rows_per_tile(in);
    const int64_t ct = std::min(classes_per_tile(in.num_centers), in.num_classes);
    if (scratch) {
      d = at::empty({rt * ct}, in.f.options());
      arg = at::empty({rt * ct}, in.labels.options());
    }
    if (with_a) a = at::empty({rt * ct * in.num_centers}, in.f.options());
  }
};

// One pass over all (row tile x class tile) blocks. Outputs that are
// undefined are not computed:
//   rows / active: hinge sums (forward);
//   grad_f / grad_w with row_coef / col_coef: the gradient contributions of
//   every tile for upstream gradients g_rows (undefined: 1 for every row),
//   with the own class weighted -own_active (undefined: 0, the caller adds it).
template <class Tiles>
void tile_pass(const AffinityInputs& in, const at::Tensor& f_norms, const at::Tensor& w_norms,
               double sigma, double margin, int64_t kind, const at::Tensor& d_true,
               const at::Tensor& rows, const at::Tensor& active, const at::Tensor& g_rows,
               const at::Tensor& own_active, at::Tensor grad_f, at::Tensor grad_w,
               const at::Tensor& row_coef, at::Tensor col_coef) {
  const at::Tensor& f = in.f;
  const at::Tensor& w = in.prototypes;
  const int64_t m = in.num_centers;
  const bool with_grad = grad_f.defined();
  TileBuffers buf(in, Tiles::kTileScratch, with_grad);
  const int64_t ct_max = classes_per_tile(m);
  for_each_gram_tile(
      f, w, rows_per_tile(in), ct_max * m,
      [&](int64_t r0, int64_t rt, int64_t p0, int64_t pt, const at::Tensor& g) {
        at::Tensor a;
        if (with_grad) {
          a = buf.a.narrow(0, 0, rt * pt).view({rt, pt});
          if (m > 1) a.zero_();
        }
        Tiles::epilogue(g, f_norms.narrow(0, r0, rt), w_norms.narrow(0, p0, pt), m, p0 / m,
                        in.labels.narrow(0, r0, rt), d_true.narrow(0, r0, rt), sigma, margin, kind,
                        rows_of(rows, r0, rt), rows_of(active, r0, rt), rows_of(g_rows, r0, rt),
                        rows_of(own_active, r0, rt), a, rows_of(row_coef, r0, rt), buf);
        if (with_grad)
          add_tile_gradient(a, f.narrow(0, r0, rt), w.narrow(0, p0, pt), r0, p0, grad_f, grad_w,
                            col_coef);
      });
}

// The own-class terms of the gradient with ATen ops (any device): coefficient
// c_i at prototype p_i = own_proto_i of row i, so grad_f_i -= 2 c_i w_{p_i},
// row_coef_i += c_i, and per prototype p, over its rows in increasing order,
// grad_w_p -= 2 sum c_i f_i and col_coef_p += sum c_i.
inline void own_class_terms_aten(const at::Tensor& f, const at::Tensor& w,
                                 const at::Tensor& own_proto, const at::Tensor& own_coef,
                                 at::Tensor& grad_f, at::Tensor& grad_w, at::Tensor& row_coef,
                                 at::Tensor& col_coef) {
  grad_f.addcmul_(own_coef.unsqueeze(1), w.index_select(0, own_proto), -2);
  row_coef.add_(own_coef);
  // Per prototype, the sum over its rows in a fixed order (index_add_ on CUDA
  // would use atomics): stable sort by prototype, then segment sums over one
  // segment per prototype (empty ones sum to 0). The segment lengths are integer
  // counts (exact in any order); every size is known on the host (P = C m), so
  // nothing waits for the device.
  const at::Tensor order = std::get<1>(own_proto.sort(/*stable=*/true, 0, false));
  const at::Tensor lengths = at::zeros({w.size(0)}, own_proto.options())
                                 .index_add_(0, own_proto, at::ones_like(own_proto));
  const at::Tensor sum_f = at::segment_reduce((f * own_coef.unsqueeze(1)).index_select(0, order),
                                              "sum", lengths, {}, {}, 0, true);
  const at::Tensor sum_c =
      at::segment_reduce(own_coef.index_select(0, order), "sum", lengths, {}, {}, 0, true);
  grad_w.add_(sum_f, -2);
  col_coef.add_(sum_c);
}

// Forward rows, d_true and active counts; with grad_f / grad_w given, also the
// gradient of sum_i L_i (upstream gradient 1 for every row) in the same pass.
// The own-class coefficient -active_i d'(s_iy) is known only after the last
// tile, so that term is added after the loop from the direct arg-min.
template <class Tiles>
void forward_tiles(const AffinityInputs& in, double sigma, double margin, int64_t kind,
                   at::Tensor& rows, at::Tensor& d_true, at::Tensor& active,
                   at::Tensor* grad_f = nullptr, at::Tensor* grad_w = nullptr) {
  const at::Tensor& f = in.f;
  const at::Tensor& w = in.prototypes;
  const int64_t n = f.size(0), m = in.num_centers;
  const at::Tensor f_norms = (f * f).sum(1), w_norms = (w * w).sum(1);
  at::Tensor true_arg = at::empty({n}, in.labels.options());
  Tiles::true_class(in, f_norms, w_norms, sigma, kind, d_true, true_arg);
  rows.zero_();
  active.zero_();
  const bool with_grad = grad_f != nullptr;
  at::Tensor row_coef, col_coef;
  if (with_grad) {
    row_coef = at::zeros({n}, f.options());
    col_coef = at::zeros({w.size(0)}, f.options());
  }
  tile_pass<Tiles>(in, f_norms, w_norms, sigma, margin, kind, d_true, rows, active, at::Tensor(),
                   at::Tensor(), with_grad ? *grad_f : at::Tensor(),
                   with_grad ? *grad_w : at::Tensor(), row_coef, col_coef);
  if (!with_grad) return;
  // the own class: coefficient -active_i d'(s_iy) at the direct arg-min prototype
  const at::Tensor dds = kind == kInverse ? d_true.square().div(-sigma) : d_true.div(-sigma);
  const at::Tensor own_coef = active.neg().mul(dds);
  Tiles::own_class(f, w, in.labels * m + true_arg, own_coef, *grad_f, *grad_w, row_coef, col_coef);
  grad_f->addcmul_(row_coef.unsqueeze(1), f, 2);
  grad_w->addcmul_(col_coef.unsqueeze(1), w, 2);
}

// Gradients from per-row upstream gradients g_rows, recomputing every tile.
template <class Tiles>
void backward_tiles(const AffinityInputs& in, const at::Tensor& g_rows, const at::Tensor& d_true,
                    const at::Tensor& active, double sigma, double margin, int64_t kind,
                    at::Tensor& grad_f, at::Tensor& grad_w) {
  const at::Tensor& f = in.f;
  const at::Tensor& w = in.prototypes;
  const at::Tensor f_norms = (f * f).sum(1), w_norms = (w * w).sum(1);
  at::Tensor row_coef = at::zeros({f.size(0)}, f.options());
  at::Tensor col_coef = at::zeros({w.size(0)}, f.options());
  tile_pass<Tiles>(in, f_norms, w_norms, sigma, margin, kind, d_true, at::Tensor(), at::Tensor(),
                   g_rows, active, grad_f, grad_w, row_coef, col_coef);
  grad_f.addcmul_(row_coef.unsqueeze(1), f, 2);
  grad_w.addcmul_(col_coef.unsqueeze(1), w, 2);
}

// The three ops for one device, on top of the loops above; Tiles::kDevice is
// the device type the inputs must be on, Tiles::Guard makes f's device current.
template <class Tiles>
std::tuple<at::Tensor, at::Tensor, at::Tensor> hinge_op(const at::Tensor& f,
                                                        const at::Tensor& prototypes,
                                                        const at::Tensor& labels, double sigma,
                                                        double margin,
                                                        c10::string_view similarity) {
  const typename Tiles::Guard guard(f.device());
  const AffinityInputs in =
      prepare_affinity_inputs(f, prototypes, labels, sigma, similarity, Tiles::kDevice);
  at::Tensor rows = at::empty({f.size(0)}, in.f.options());
  at::Tensor d_true = at::empty_like(rows), active = at::empty_like(rows);
  forward_tiles<Tiles>(in, sigma, margin, in.similarity, rows, d_true, active);
  return {poison_rows(rows, in.bad), d_true, active};
}

template <class Tiles>
std::tuple<at::Tensor, at::Tensor> hinge_backward_op(
    const at::Tensor& grad_rows, const at::Tensor& f, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& d_true, const at::Tensor& active, double sigma,
    double margin, c10::string_view similarity) {
  const typename Tiles::Guard guard(f.device());
  const AffinityInputs in =
      prepare_affinity_inputs(f, prototypes, labels, sigma, similarity, Tiles::kDevice);
  const int64_t n = f.size(0);
  for (const at::Tensor* t : {&grad_rows, &d_true, &active})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->device() == f.device(),
                "affinity_hinge_backward: per-row tensors must be [N] on f's device");
  const at::Tensor g = grad_rows.to(in.f.scalar_type()).contiguous();
  const at::Tensor dt = d_true.to(in.f.scalar_type()).contiguous();
  const at::Tensor ac = active.to(in.f.scalar_type()).contiguous();
  at::Tensor grad_f = at::zeros_like(in.f), grad_w = at::zeros_like(in.prototypes);
  backward_tiles<Tiles>(in, g, dt, ac, sigma, margin, in.similarity, grad_f, grad_w);
  return {poison_rows(grad_f, in.bad).to(f.scalar_type()),
          poison_all(grad_w, in.bad).view(prototypes.sizes()).to(prototypes.scalar_type())};
}

// sum_i L_i and its gradients (for f and the prototypes) in one pass.
template <class Tiles>
std::tuple<at::Tensor, at::Tensor, at::Tensor> hinge_sum_with_grad_op(const at::Tensor& f,
                                                                      const at::Tensor& prototypes,
                                                                      const at::Tensor& labels,
                                                                      double sigma, double margin,
                                                                      c10::string_view similarity) {
  const typename Tiles::Guard guard(f.device());
  const AffinityInputs in =
      prepare_affinity_inputs(f, prototypes, labels, sigma, similarity, Tiles::kDevice);
  at::Tensor rows = at::empty({f.size(0)}, in.f.options());
  at::Tensor d_true = at::empty_like(rows), active = at::empty_like(rows);
  at::Tensor grad_f = at::zeros_like(in.f), grad_w = at::zeros_like(in.prototypes);
  forward_tiles<Tiles>(in, sigma, margin, in.similarity, rows, d_true, active, &grad_f, &grad_w);
  return {poison_all(rows.sum(), in.bad), poison_rows(grad_f, in.bad).to(f.scalar_type()),
          poison_all(grad_w, in.bad).view(prototypes.sizes()).to(prototypes.scalar_type())};
}

}  // namespace affinity
}  // namespace confusion_kernels
