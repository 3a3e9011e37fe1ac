"""CrossBatchMemory: the FIFO itself, and ASLoss against a batch plus the memory (the
rectangular op) compared with the reference terms of the same pairs in float64."""

import pytest
import torch

import confusion_kernels as ck
from confusion_kernels import _extension, reference
from conftest import assert_rel, make_batch, require_backend

TOL = 1e-10


def filled_memory(size, dim, batches, seed, num_classes=4):
    memory = ck.CrossBatchMemory(size, dim, dtype=torch.float64)
    for b in range(batches):
        x, labels = make_batch(7, dim, num_classes, seed=seed + b)
        memory.enqueue(x, labels)
    return memory


def test_fifo_keeps_the_last_rows():
    memory = ck.CrossBatchMemory(10, 2, dtype=torch.float64)
    rows = torch.arange(34, dtype=torch.float64).repeat(2, 1).T  # row k = (k, k)
    labels = torch.arange(34)
    memory.enqueue(rows[:4], labels[:4])
    assert memory.filled == 4
    stored, stored_labels = memory.contents()
    assert torch.equal(stored, rows[:4]) and torch.equal(stored_labels, labels[:4])
    for lo, hi in [(4, 11), (11, 13), (13, 34)]:  # wraps around; the last batch exceeds size
        memory.enqueue(rows[lo:hi], labels[lo:hi])
    stored, stored_labels = memory.contents()
    assert memory.filled == 10
    assert sorted(stored_labels.tolist()) == list(range(24, 34))
    assert torch.equal(stored[:, 0].long(), stored_labels)
    # state_dict round trip keeps contents and fill state
    other = ck.CrossBatchMemory(10, 2, dtype=torch.float64)
    other.load_state_dict(memory.state_dict())
    assert other.filled == 10 and other.next_row == memory.next_row
    assert torch.equal(other.contents()[0], stored)
    memory.reset()
    assert memory.contents()[0].shape == (0, 2)


def test_enqueue_refuses_bad_shapes():
    memory = ck.CrossBatchMemory(5, 3)
    with pytest.raises(ValueError, match=r"x must be \[N, 3\]"):
        memory.enqueue(torch.randn(4, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be"):
        memory.enqueue(torch.randn(4, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="size and embedding_dim"):
        ck.CrossBatchMemory(0, 3)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("metric, reduction, include_self", [
    ("euclidean", "pair_mean", False), ("cosine", "class_mean", False),
    ("manhattan", "class_mean", True), ("sqeuclidean", "pair_mean", True)])
def test_terms_with_memory_match_reference(backend, metric, reduction, include_self):
    device = require_backend(backend, "intra_inter_sums_rect") if backend != "reference" else "cpu"
    memory = filled_memory(12, 5, 3, seed=40)  # 21 rows enqueued: wrapped once
    x, labels = make_batch(9, 5, 4, seed=3)
    labels[0] = 7  # a class only in the batch, with one sample
    x = x.requires_grad_(True)
    xd = x.to(device)  # the kernel runs on its backend's device; x.grad stays on the CPU
    terms = ck.as_loss_terms(xd, labels.to(device), metric=metric, reduction=reduction,
                             include_self=include_self, backend=backend, memory=memory.to(device))
    terms = type(terms)(*(t.cpu() for t in terms))
    ref, ref_labels = memory.reference_set(x.detach(), labels)
    xr = x.detach().clone().requires_grad_(True)
    expected = reference.as_loss_terms(xr, labels, metric=metric, reduction=reduction,
                                       include_self=include_self,
                                       ref=torch.cat([xr, ref[9:]]), ref_labels=ref_labels)
    for name, a, b in zip(("inner", "outer", "boundary"), terms, expected):
        assert_rel(a, b, TOL, name)
    g = torch.autograd.grad(sum(terms), x)[0]
    gr = torch.autograd.grad(sum(expected), xr)[0]
    assert_rel(g, gr, TOL, "gradient")
    # the memory changes the loss: the test can fail
    alone = ck.as_loss_terms(xd, labels.to(device), metric=metric, reduction=reduction,
                             include_self=include_self, backend=backend)
    assert not torch.allclose(alone.outer.cpu(), terms.outer)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_memory_is_the_batch_alone(backend):
    if backend != "reference":  # (it failed instead of skipping without the C++ extension)
        require_backend(backend, "intra_inter_sums_rect")
    x, labels = make_batch(11, 4, 3, seed=5)
    memory = ck.CrossBatchMemory(8, 4, dtype=torch.float64)
    for reduction in ("pair_mean", "class_mean"):
        a = ck.as_loss_terms(x, labels, reduction=reduction, memory=memory, backend=backend)
        b = ck.as_loss_terms(x, labels, reduction=reduction, backend="reference")
        for name, u, v in zip(("inner", "outer", "boundary"), a, b):
            assert_rel(u, v, TOL, name)


def test_module_enqueues_in_training_only():
    """Training mode: the loss of a batch meets the rows enqueued before it (the reference with
    those rows as extra columns), then the batch is stored as it was; eval mode stores
    nothing."""
    memory = ck.CrossBatchMemory(50, 4, dtype=torch.float64)
    backend = "cpu" if _extension.has_kernel("intra_inter_sums_rect", "CPU") else "reference"
    criterion = ck.ASLoss(memory=memory, backend=backend)
    x, labels = make_batch(6, 4, 2, seed=1)
    alone = criterion(x, labels)  # empty memory: the batch alone
    torch.testing.assert_close(alone, ck.as_loss(x, labels, backend="reference"))
    assert memory.filled == 6
    stored, stored_labels = memory.contents()
    assert torch.equal(stored, x) and torch.equal(stored_labels, labels)
    x2, labels2 = make_batch(5, 4, 2, seed=2)
    with_memory = criterion(x2, labels2)
    ref, ref_labels = torch.cat([x2, x]), torch.cat([labels2, labels])
    t = reference.as_loss_terms(x2, labels2, ref=ref, ref_labels=ref_labels)
    want = 1e-3 * t.inner - 1e-3 * t.outer + 1e-2 * t.boundary
    assert_rel(with_memory, want, TOL, "loss with the memory")
    assert not torch.allclose(with_memory, ck.as_loss(x2, labels2, backend="reference"))
    assert memory.filled == 11
    criterion.eval()
    criterion(x, labels)
    assert memory.filled == 11
    with pytest.raises(ValueError, match="one representation"):
        criterion([x, x], labels)
    with pytest.raises(ValueError, match="ddp_gradient=True needs global_batch=True"):
        ck.ASLoss(memory=memory, ddp_gradient=True)
    with pytest.raises(ValueError, match="ddp_gradient=True scales the gradient of a global"):
        ck.as_loss(x, labels, ddp_gradient=True)
    with pytest.raises(ValueError, match="4-D rows"):
        ck.as_loss_terms(torch.randn(3, 5, dtype=torch.float64), labels[:3], memory=memory)


def test_bad_arguments_are_refused_not_coerced():
    """Issue 26: CrossBatchMemory(2.5, 4) gave a raw torch error; float labels were truncated
    (0.7 -> 0), bool labels and integer embeddings accepted; set_extra_state took filled = -2."""
    with pytest.raises(TypeError, match="size must be an int"):
        ck.CrossBatchMemory(2.5, 4)
    with pytest.raises(TypeError, match="floating dtype"):
        ck.CrossBatchMemory(4, 3, dtype=torch.int64)
    memory = ck.CrossBatchMemory(4, 3)
    with pytest.raises(TypeError, match="integer tensor"):
        memory.enqueue(torch.randn(2, 3), torch.tensor([0.7, 1.0]))
    with pytest.raises(TypeError, match="integer tensor"):
        memory.enqueue(torch.randn(2, 3), torch.tensor([True, False]))
    with pytest.raises(TypeError, match="floating tensor"):
        memory.enqueue(torch.ones(2, 3, dtype=torch.int64), torch.tensor([0, 1]))
    for state in ({"filled": -2, "next_row": 0}, {"filled": 5, "next_row": 0},
                  {"filled": 1, "next_row": 4}):
        with pytest.raises(ValueError, match="does not fit"):
            memory.set_extra_state(state)
    assert memory.filled == 0
