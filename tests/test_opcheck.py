"""Registered ops pass torch.library.opcheck and run under torch.compile."""

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels._metrics import METRIC_CODES
from conftest import make_batch, require_backend


def op_for(backend):
    if backend == "triton":
        return torch.ops.confusion_kernels.intra_inter_sums_triton
    return torch.ops.confusion_kernels.intra_inter_sums


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("metric", sorted(METRIC_CODES))
def test_opcheck(backend, metric):
    device = require_backend(backend)
    x, labels = make_batch(13, 5, 3, seed=1, device=device)
    x.requires_grad_(True)
    torch.library.opcheck(op_for(backend), (x, labels, metric, ck.route(
        "intra_inter_sums", x, backend, metric=metric).algorithm))


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_opcheck_backward_op(backend):
    device = require_backend(backend)
    x, labels = make_batch(13, 5, 3, seed=2, device=device)
    g = torch.randn(13, dtype=x.dtype, device=device)
    torch.library.opcheck(torch.ops.confusion_kernels.intra_inter_sums_backward,
                          (g, -g, x, labels, "euclidean", "direct"))


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_torch_compile_fullgraph_parity(backend):
    device = require_backend(backend)
    x, labels = make_batch(50, 6, 4, seed=3, device=device, dtype=torch.float32)

    def loss(inp):
        return ck.as_loss(inp, labels, metric="euclidean", backend=backend, check_finite=False)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    eager_val = loss(xa)
    compiled_val = compiled(xb)
    eager_val.backward()
    compiled_val.backward()
    torch.testing.assert_close(compiled_val, eager_val)
    torch.testing.assert_close(xb.grad, xa.grad)
