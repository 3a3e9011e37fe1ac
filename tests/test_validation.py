"""Every input rule of docs/math.md, "Input rules" raises a clear Python exception."""

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels import _backend

X = torch.randn(6, 3)
Y = torch.tensor([0, 1, 0, 1, 2, 2])


@pytest.mark.parametrize("fn", [
    lambda x, y, **k: ck.intra_inter_sums(x, y, **k),
    lambda x, y, **k: ck.as_loss_terms(x, y, **k),
    lambda x, y, **k: ck.as_loss(x, y, **k),
    lambda x, y, **k: ck.ASLoss(**k)(x, y),
])
def test_embedding_and_label_rules(fn):
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(X.numpy(), Y)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fn(X.to(torch.int64), Y)
    with pytest.raises(ValueError, match="2-D"):
        fn(X[:, 0], Y)
    with pytest.raises(ValueError, match="2-D"):
        fn(X[None], Y)
    with pytest.raises(ValueError, match="N = 0"):
        fn(X[:0], Y[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = X.clone()
        x[2, 1] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(x, Y)
    with pytest.raises(TypeError, match="integer"):
        fn(X, Y.float())
    with pytest.raises(TypeError, match="integer"):
        fn(X, Y.bool())
    with pytest.raises(ValueError, match="1-D"):
        fn(X, Y[:, None])
    with pytest.raises(ValueError, match="5 entries but the embeddings have 6 rows"):
        fn(X, Y[:5])
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(X, [0, 1, 0, 1, 2, 2])


def test_check_finite_switch_skips_the_scan():
    x = X.clone()
    x[0, 0] = float("nan")
    s_in, s_out = ck.intra_inter_sums(x, Y, check_finite=False, backend="reference")
    assert torch.isnan(s_in).any()


def test_unknown_options():
    with pytest.raises(ValueError, match="unknown metric 'chebyshev'"):
        ck.intra_inter_sums(X, Y, "chebyshev")
    with pytest.raises(ValueError, match="unknown reduction"):
        ck.as_loss_terms(X, Y, reduction="sum")
    with pytest.raises(ValueError, match="unknown reduction"):
        ck.ASLoss(reduction="sum")
    with pytest.raises(RuntimeError, match="unknown backend 'gpu'"):
        ck.intra_inter_sums(X, Y, backend="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: labels on another device")
def test_labels_on_another_device():
    with pytest.raises(ValueError, match="are on cuda"):
        ck.intra_inter_sums(X, Y.cuda())


def test_explicit_backend_that_cannot_run_raises():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
            ck.intra_inter_sums(X, Y, backend="cuda")
    else:
        with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
            ck.intra_inter_sums(X, Y, backend="cuda")
        with pytest.raises(RuntimeError, match="runs on CPU tensors"):
            ck.intra_inter_sums(X.cuda(), Y.cuda(), backend="cpu")


def test_cpp_op_checks_inputs_itself():
    """Direct torch.ops calls bypass the Python checks: the C++ kernel still refuses."""
    if "cpu" not in ck.available_backends():
        pytest.skip("the C++ extension is not built")
    op = torch.ops.confusion_kernels.intra_inter_sums
    with pytest.raises(RuntimeError, match="labels must be 1-D of length N = 6"):
        op(X, Y[:4], "euclidean")
    with pytest.raises(RuntimeError, match="labels must be int64"):
        op(X, Y.int(), "euclidean")
    with pytest.raises(RuntimeError, match="unknown metric 'chebyshev'"):
        op(X, Y, "chebyshev")
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        op(X[0], Y, "euclidean")
