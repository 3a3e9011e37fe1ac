"""``weighted_pair_sums``: the one-pass core of the ASLoss.

    t_in  = sum_i w_in[i]  S_in[i]  = sum_{i<j, y_i = y_j}  (w_in[i]  + w_in[j])  D(x_i, x_j)
    t_out = sum_i w_out[i] S_out[i] = sum_{i<j, y_i != y_j} (w_out[i] + w_out[j]) D(x_i, x_j)

The ASLoss terms are such weighted sums, with weights that depend on the
labels only (1 / pair count, or per class for ``class_mean``). Because the
weights are known before the kernel runs, the kernel computes t_in, t_out and
their gradients together, each unordered pair once (a pair pass), and
the backward only scales the two stored gradients by the upstream scalars:
about half the work of a forward plus a recomputing backward.
"""

import torch

from .. import _extension
from .._validation import accumulation_dtype as _accumulation
from .._metrics import GRAM_METRICS, METRIC_CODES
from ._op_checks import check_row_sums
from ._registration import refuse_double_backward
from .._scaling import common_scale, rescale_large_rows

CPP_OP = "confusion_kernels::weighted_pair_sums_with_grad"
TRITON_OP = "confusion_kernels::weighted_pair_sums_with_grad_triton"


def _fake(x, labels, w_in, w_out, metric):
    acc = _accumulation(x.dtype)
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    return x.new_empty((), dtype=acc), x.new_empty((), dtype=acc), grad, torch.empty_like(grad)


def _setup_context(ctx, inputs, output):
    _, _, grad_in, grad_out = output
    ctx.save_for_backward(grad_in, grad_out)
    ctx.mark_non_differentiable(grad_in, grad_out)


def _backward(ctx, g_in, g_out, _grad_in, _grad_out):
    refuse_double_backward("as_loss")
    grad_in, grad_out = ctx.saved_tensors
    grad = None
    if g_in is not None:
        grad = g_in.to(grad_in.dtype) * grad_in
    if g_out is not None:
        term = g_out.to(grad_out.dtype) * grad_out
        grad = term if grad is None else grad + term
    return grad, None, None, None, None


if _extension.HAS_C and _extension.has_kernel("weighted_pair_sums_with_grad", "CPU"):
    torch.library.register_fake(CPP_OP)(_fake)
    torch.library.register_autograd(CPP_OP, _backward, setup_context=_setup_context)


@torch.library.custom_op(TRITON_OP, mutates_args=())
def _triton_one_pass(x: torch.Tensor, labels: torch.Tensor, w_in: torch.Tensor,
                     w_out: torch.Tensor, metric: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton import pair_pass

    check_row_sums(x, labels, metric, (w_in, w_out), op=TRITON_OP.split("::")[1],
                   grad_names=("w_in", "w_out"))
    if METRIC_CODES[metric] not in GRAM_METRICS:
        raise ValueError("weighted_pair_sums_with_grad_triton: metrics with a Gram form only "
                         "(euclidean, sqeuclidean, cosine)")
    t_in, t_out, g_in, g_out = pair_pass.weighted_with_grad(x, labels, w_in, w_out,
                                                            METRIC_CODES[metric])
    return t_in, t_out, g_in.to(x.dtype), g_out.to(x.dtype)


_triton_one_pass.register_fake(_fake)
_triton_one_pass.register_autograd(_backward, setup_context=_setup_context)


def weighted_pair_sums(x: torch.Tensor, labels: torch.Tensor, w_in: torch.Tensor,
                       w_out: torch.Tensor, metric: str, backend: str = "cpu"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_in, t_out), differentiable in x; inputs validated by the caller, ``metric``
    a canonical name, the weights non-differentiable [N] tensors, ``backend`` one
    for which ``_routing.route("as_loss_terms", ...)`` chose ``one_pass``."""
    if metric == "cosine":
        x = rescale_large_rows(x)
    scaled = common_scale(metric, x)
    if scaled is not None:  # euclidean / sqeuclidean: squares that cannot overflow
        x = x * scaled[0].to(x.dtype)
    op = _triton_one_pass if backend == "triton" else \
        torch.ops.confusion_kernels.weighted_pair_sums_with_grad
    t_in, t_out, _, _ = op(x, labels, w_in, w_out, metric)
    if scaled is not None:
        t_in, t_out = t_in * scaled[1].to(t_in.dtype), t_out * scaled[1].to(t_out.dtype)
    return t_in, t_out
