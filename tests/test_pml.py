"""confusion_kernels.pml: our losses as pytorch-metric-learning (PML) losses.

Every value and gradient is checked in float64 against a dense reference written here from
PML's definitions: the N x M distance matrix (reference.pairwise_distances) weighted by how
often each (embedding, reference) pair occurs among the pairs used.
"""

from __future__ import annotations

import pytest
import torch

pml_lib = pytest.importorskip("pytorch_metric_learning",
                              reason="the PML adapters need pytorch-metric-learning")

from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners, reducers  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402

import confusion_kernels as ck  # noqa: E402
from confusion_kernels import pml  # noqa: E402
from confusion_kernels.reference.pairwise import pairwise_distances  # noqa: E402

from conftest import assert_rel  # noqa: E402

LAMBDAS = dict(lambda_inner=0.3, lambda_outer=0.2, lambda_boundary=0.1)
METRICS = ("euclidean", "sqeuclidean", "manhattan", "cosine", "smooth_l1")


def _batch(n=23, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    x[n // 2] = x[0]  # a duplicate (zero distance)
    y[-1] = classes + 1  # a class of one embedding
    return x.requires_grad_(True), y


def _counts(a, b, n, m):
    w = torch.zeros(n, m, dtype=torch.float64)
    return w.index_put_((a, b), torch.ones(a.shape[0], dtype=torch.float64), accumulate=True)


def _dense(e, r, metric, w_pos, w_neg, constraint=10.0, mean=True):
    """lambda_in * <D, w_pos> - lambda_out * <D, w_neg> + lambda_b * boundary (means when
    ``mean``: divided by the pair counts and N; else sums)."""
    dist = pairwise_distances(e, r, metric)
    inner, outer = (dist * w_pos).sum(), (dist * w_neg).sum()
    radial = (torch.linalg.vector_norm(e, dim=1) - constraint).square()
    if mean:
        inner = inner / w_pos.sum() if w_pos.sum() > 0 else inner * 0
        outer = outer / w_neg.sum() if w_neg.sum() > 0 else outer * 0
        radial = radial.mean()
    else:
        radial = radial.sum()
    return (LAMBDAS["lambda_inner"] * inner - LAMBDAS["lambda_outer"] * outer
            + LAMBDAS["lambda_boundary"] * radial)


def _check(loss_fn, want_fn, x):
    got = loss_fn(x)
    (grad,) = torch.autograd.grad(got, x)
    want = want_fn(x)
    (want_grad,) = torch.autograd.grad(want, x)
    assert_rel(got, want, 1e-10, "loss")
    assert_rel(grad, want_grad, 1e-9, "grad")


@pytest.mark.parametrize("metric", METRICS)
def test_all_pairs_is_our_asloss(metric):
    x, y = _batch(seed=1)
    loss = pml.ASLoss(metric, **LAMBDAS)
    assert isinstance(loss, pml_losses.BaseMetricLossFunction)
    _check(lambda t: loss(t, y), lambda t: ck.as_loss(t, y, metric=metric, **LAMBDAS,
                                                      backend="reference"), x)
    a1, p, a2, n = lmu.get_all_pairs_indices(y)
    _check(lambda t: loss(t, y), lambda t: _dense(t, t, metric, _counts(a1, p, 23, 23),
                                                  _counts(a2, n, 23, 23)), x)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
def test_ref_emb_takes_every_embedding_reference_pair(metric):
    x, y = _batch(seed=2)
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(31, 6, generator=g, dtype=torch.float64)
    ref[4] = x[3].detach()  # a reference row equal to an embedding
    ref_y = torch.randint(0, 4, (31,), generator=g)
    same = (y[:, None] == ref_y[None, :]).double()
    loss = pml.ASLoss(metric, **LAMBDAS)
    _check(lambda t: loss(t, y, ref_emb=ref, ref_labels=ref_y),
           lambda t: _dense(t, ref, metric, same, 1 - same), x)
    with pytest.raises(ValueError, match="ref_labels are needed"):
        loss(x, y, ref_emb=ref)
    with pytest.raises(ValueError, match=r"ref_labels must be 1-D of length 31"):
        loss(x, y, ref_emb=ref, ref_labels=ref_y[:5])
    with pytest.raises(ValueError, match=r"ref_emb must be \[M, 6\]"):
        loss(x, y, ref_emb=ref[:, :3], ref_labels=ref_y)


MINERS = {
    "multi-similarity (pairs)": lambda: miners.MultiSimilarityMiner(epsilon=0.5),
    "pair margin (pairs)": lambda: miners.PairMarginMiner(pos_margin=1.0, neg_margin=4.0),
    "triplet margin (triplets)": lambda: miners.TripletMarginMiner(margin=0.5,
                                                                   type_of_triplets="all"),
}


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "smooth_l1"])
@pytest.mark.parametrize("miner", sorted(MINERS))
def test_mined_pairs_equal_the_dense_loss_masked_to_them(metric, miner):
    x, y = _batch(seed=4)
    mined = MINERS[miner]()(x.detach(), y)
    a1, p, a2, n = lmu.convert_to_pairs(mined, y)
    assert a1.numel() > 0 and a2.numel() > 0, "the miner found nothing: pick other data"
    loss = pml.ASLoss(metric, **LAMBDAS)
    _check(lambda t: loss(t, y, mined), lambda t: _dense(t, t, metric, _counts(a1, p, 23, 23),
                                                         _counts(a2, n, 23, 23)), x)
    summed = pml.ASLoss(metric, **LAMBDAS, reducer=reducers.SumReducer())
    _check(lambda t: summed(t, y, mined),
           lambda t: _dense(t, t, metric, _counts(a1, p, 23, 23), _counts(a2, n, 23, 23),
                            mean=False), x)


def test_no_positive_pair_gives_a_zero_inner_term():
    x, y = _batch(seed=5)
    a1, p, a2, n = lmu.get_all_pairs_indices(y)
    empty = a1[:0]
    loss = pml.ASLoss(**LAMBDAS)
    _check(lambda t: loss(t, y, (empty, empty, a2, n)),
           lambda t: _dense(t, t, "euclidean", torch.zeros(23, 23, dtype=torch.float64),
                            _counts(a2, n, 23, 23)), x)


def test_do_nothing_reducer_returns_the_per_pair_losses():
    x, y = _batch(seed=6)
    mined = miners.MultiSimilarityMiner(epsilon=0.5)(x.detach(), y)
    out = pml.ASLoss(**LAMBDAS, reducer=reducers.DoNothingReducer())(x, y, mined)
    a1, p, _, _ = mined
    d = pairwise_distances(x, x)[a1, p]
    assert_rel(out["inner_loss"]["losses"], LAMBDAS["lambda_inner"] * d, 1e-12, "inner")
    assert out["inner_loss"]["reduction_type"] == "pos_pair"
    assert out["boundary_loss"]["losses"].shape == (23,)


def test_what_cannot_be_fused_is_refused_by_name():
    x, y = _batch(seed=7)
    from pytorch_metric_learning import distances

    with pytest.raises(ValueError, match=r"distance=CosineSimilarity\(\) cannot be fused"):
        pml.ASLoss(distance=distances.CosineSimilarity())
    with pytest.raises(ValueError, match=r"reducer=AvgNonZeroReducer\(\) drops losses"):
        pml.ASLoss(reducer=reducers.AvgNonZeroReducer())
    with pytest.raises(ValueError, match=r"reducer=ThresholdReducer\(\) drops losses"):
        pml.ASLoss(reducer=reducers.ThresholdReducer(low=0))
    with pytest.raises(ValueError, match=r"reducer=SumReducer\(\) needs the loss of every pair"):
        pml.ASLoss(reducer=reducers.SumReducer())(x, y)
    with pytest.raises(ValueError, match="unknown metric 'chebyshev'"):
        pml.ASLoss("chebyshev")
    with pytest.raises(ValueError, match="reduction='none': in PML the reducer decides"):
        pml.ASLoss(reduction="none")
    a1, p, a2, n = lmu.get_all_pairs_indices(y)
    with pytest.raises(ValueError, match=r"indices_tuple\[1\] indexes outside the 23 reference"):
        pml.ASLoss()(x, y, (a1, p + 100, a2, n))
    with pytest.raises(ValueError, match=r"indices_tuple\[0\] must be a 1-D integer tensor"):
        pml.ASLoss()(x, y, (a1.double(), p, a2, n))
    with pytest.raises(ValueError, match="indices_tuple must be"):
        pml.ASLoss()(x, y, (a1, p))
    with pytest.raises(ValueError, match="reduction='class_mean' weighs pairs per class"):
        pml.ASLoss(reduction="class_mean")(x, y, (a1, p, a2, n))
    with pytest.raises(ValueError, match="labels are needed"):
        pml.ASLoss()(x)


def test_pml_cross_batch_memory_gives_our_memory_value():
    """PML's CrossBatchMemory (pml.CrossBatchMemory: PML's own refuses any loss not on its list
    of names) around pml.ASLoss and our ASLoss(memory=...) give the same loss value. The gradients differ by design (docs/pml.md): PML's memory holds detached copies of
    the batch, so a pair within the batch moves only its anchor; ours differentiates both
    ends. PML's gradient is checked against the dense reference with detached columns."""
    g = torch.Generator().manual_seed(8)
    batches = [(torch.randn(12, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (12,), generator=g)) for _ in range(3)]
    with pytest.raises(Exception, match="CrossBatchMemory not supported for ASLoss"):
        pml_losses.CrossBatchMemory(pml.ASLoss(), embedding_size=5)  # PML's list of names
    wrapped = pml.CrossBatchMemory(pml.ASLoss(**LAMBDAS), embedding_size=5, memory_size=40)
    assert isinstance(wrapped, pml_losses.CrossBatchMemory)
    ours = ck.ASLoss(**LAMBDAS, memory=ck.CrossBatchMemory(40, 5, dtype=torch.float64),
                     backend="reference")
    seen = []
    for x, y in batches:
        xp = x.clone().requires_grad_(True)
        got = wrapped(xp, y)
        (grad,) = torch.autograd.grad(got, xp)
        want = ours(x.clone().requires_grad_(True), y)
        assert_rel(got, want, 1e-12, "value")
        seen.append((x, y))
        ref = torch.cat([b[0] for b in seen])
        ref_y = torch.cat([b[1] for b in seen])
        offset = ref.shape[0] - x.shape[0]
        same = (y[:, None] == ref_y[None, :]).double()
        same[torch.arange(12), offset + torch.arange(12)] = 0  # no self comparisons
        xd = x.clone().requires_grad_(True)
        dense = _dense(xd, ref, "euclidean", same, 1 - (y[:, None] == ref_y[None, :]).double())
        (want_grad,) = torch.autograd.grad(dense, xd)
        assert_rel(grad, want_grad, 1e-9, "PML's gradient")


def test_trains_with_a_miner():
    torch.manual_seed(9)
    model = torch.nn.Linear(8, 4).double()
    loss_fn, miner = pml.ASLoss(lambda_inner=1.0, lambda_outer=0.1), miners.MultiSimilarityMiner()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 4, (64,))
    x = x + 2 * torch.nn.functional.one_hot(y, 8).double()
    first = None
    for _ in range(20):
        e = model(x)
        loss = loss_fn(e, y, miner(e, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first


def test_affinity_and_n_centroids_match_ours_and_refuse_pairs():
    x, y = _batch(seed=10)
    y = y.clamp_max(3)
    f = x.detach().float().requires_grad_(True)
    aff = pml.AffinityLoss(4, 6, 2, sigma=3.0, margin=0.5, lambda_diversity=0.1)
    ours = ck.AffinityLoss(4, 6, 2, sigma=3.0, margin=0.5, lambda_diversity=0.1)
    with torch.no_grad():
        ours.prototypes.copy_(aff.prototypes)
    assert_rel(aff(f, y), ours(f, y), 1e-6, "affinity")
    assert list(aff.parameters())[0] is aff.prototypes
    assert torch.equal(aff.predict(f), ours.predict(f))
    ncl = pml.NCentroidsLoss(4, 6, metric="cosine")
    ncl_ours = ck.NCentroidsLoss(4, 6, metric="cosine")
    ncl_ours.centroids = ncl.centroids.clone()
    assert_rel(ncl(f, y), ncl_ours(f, y), 1e-6, "n-centroids")
    assert torch.allclose(ncl.centroids, ncl_ours.centroids)  # both took their EMA step
    for loss in (aff, ncl):
        a1, p, a2, n = lmu.get_all_pairs_indices(y)
        with pytest.raises(ValueError, match="indices_tuple does not apply"):
            loss(f, y, (a1, p, a2, n))
        with pytest.raises(ValueError, match="ref_emb does not apply"):
            loss(f, y, ref_emb=f.detach(), ref_labels=y)
    summed = pml.AffinityLoss(4, 6, 2, sigma=3.0, margin=0.5, lambda_diversity=0.1,
                              reducer=reducers.SumReducer())
    with torch.no_grad():
        summed.core.prototypes.copy_(aff.prototypes)
    want = (ck.affinity_loss(f, y, aff.prototypes, sigma=3.0, margin=0.5, lambda_diversity=0.0,
                             reduction="none").sum()
            + 0.1 * ck.diversity_regularizer(aff.prototypes))
    assert_rel(summed(f, y), want, 1e-6, "affinity, sum reducer")
    from pytorch_metric_learning import distances

    with pytest.raises(ValueError, match="cannot be fused"):
        pml.NCentroidsLoss(4, 6, distance=distances.LpDistance())


def test_n_centroids_gives_per_embedding_losses_to_other_reducers():
    x, y = _batch(seed=11)
    y = y.clamp_max(3)
    z = x.detach().clone().requires_grad_(True)
    summed = pml.NCentroidsLoss(4, 6, reducer=reducers.SumReducer()).double()
    ours = ck.NCentroidsLoss(4, 6).double()
    got = summed(z, y)
    want = ck.n_centroids_loss(z, y, ours.centroids, reduction="sum")
    assert_rel(got, want, 1e-12, "sum")
    ours(z.detach(), y)  # the EMA step of the same batch
    assert torch.allclose(summed.centroids, ours.centroids)
    out = pml.NCentroidsLoss(4, 6, reducer=reducers.DoNothingReducer()).double().eval()(z, y)
    assert out["loss"]["losses"].shape == (23,) and out["loss"]["reduction_type"] == "element"


# --- PML's pair losses, fused (pml.ContrastiveLoss, SupConLoss, NTXentLoss, MultiSimilarityLoss)
from pytorch_metric_learning import distances as pml_distances  # noqa: E402

PAIR_LOSSES = {
    "ContrastiveLoss": {"pos_margin": 0.1, "neg_margin": 0.7},
    "SupConLoss": {"temperature": 0.3},
    "NTXentLoss": {"temperature": 0.2},
    "MultiSimilarityLoss": {"alpha": 3.0, "beta": 40.0, "base": 0.4},
}


def _swap(name, x, labels, ref=None, ref_labels=None, indices=None, **kwargs):
    """(ours, PML's): loss and input gradient of the same call, ours by the one-line swap."""
    out = []
    for module in (pml, pml_losses):
        loss_fn = getattr(module, name)(**kwargs)
        a = x.clone().requires_grad_(True)
        loss = loss_fn(a, labels, indices, ref, ref_labels)
        (grad,) = torch.autograd.grad(loss, a)
        out.append((loss, grad))
    return out


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("defaults", [True, False])
@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_pair_loss_swap_changes_nothing(name, defaults, with_ref, recwarn):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(150, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 30, (150,), generator=g)
    ref = torch.randn(70, 12, generator=g, dtype=torch.float64) if with_ref else None
    ref_labels = torch.randint(0, 30, (70,), generator=g) if with_ref else None
    kwargs = {} if defaults else PAIR_LOSSES[name]
    (ours, g_ours), (theirs, g_theirs) = _swap(name, x, labels, ref, ref_labels, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-9)
    assert not [w for w in recwarn if "confusion_kernels.pml" in str(w.message)]  # fused


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_pair_loss_fused_with_unnormalised_euclidean_and_on_cpu(name):
    g = torch.Generator().manual_seed(22)
    x = torch.randn(90, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 12, (90,), generator=g)
    distance = pml_distances.LpDistance(normalize_embeddings=False)
    ours = getattr(pml, name)(distance=distance, backend="cpu")(x, labels)
    theirs = getattr(pml_losses, name)(distance=distance)(x, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("why,kwargs,mined", [
    ("distance=DotProductSimilarity", {"distance": pml_distances.DotProductSimilarity()}, False),
    (r"LpDistance\(p=1", {"distance": pml_distances.LpDistance(p=1)}, False),
    ("reducer=MeanReducer", {"reducer": reducers.MeanReducer()}, True),
])
def test_what_is_not_fused_runs_pmls_own_code_with_a_warning_once(why, kwargs, mined):
    pml._WARNED.clear()
    g = torch.Generator().manual_seed(23)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (40,), generator=g)
    indices = miners.MultiSimilarityMiner()(x, labels) if mined else None
    with pytest.warns(UserWarning, match=why) as record:
        (ours, g_ours), (theirs, g_theirs) = _swap("SupConLoss", x, labels, indices=indices,
                                                   **kwargs)
        _swap("SupConLoss", x, labels, indices=indices, **kwargs)
    assert len([w for w in record if "confusion_kernels.pml" in str(w.message)]) == 1
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("miner", ["pairs", "triplets"])
@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_pair_loss_on_mined_pairs_is_fused_and_equal(name, miner, recwarn):
    g = torch.Generator().manual_seed(25)
    x = torch.randn(70, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (70,), generator=g)
    mine = (miners.MultiSimilarityMiner() if miner == "pairs"
            else miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"))
    indices = mine(x, labels)
    (ours, g_ours), (theirs, g_theirs) = _swap(name, x, labels, indices=indices,
                                               **PAIR_LOSSES[name])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-9)
    assert not [w for w in recwarn if "confusion_kernels.pml" in str(w.message)]


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_mined_pairs_outside_the_batch_are_refused(name):
    x, labels = torch.randn(10, 4, dtype=torch.float64), torch.arange(10) % 3
    bad = (torch.tensor([0, 1]), torch.tensor([2, 10]), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"indices_tuple\[1\] indexes outside the 10"):
        getattr(pml, name)()(x, labels, bad)


def test_pml_cross_batch_memory_wraps_a_pair_loss(recwarn):
    """PML's CrossBatchMemory passes the loss an indices_tuple (it leaves out each row's own
    copy in the memory): the mined-pair path, fused, with PML's values."""
    pml._WARNED.clear()
    g = torch.Generator().manual_seed(24)
    batches = [(torch.randn(32, 8, generator=g, dtype=torch.float64),
                torch.randint(0, 8, (32,), generator=g)) for _ in range(3)]
    values = []
    for module in (pml, pml_losses):
        memory = pml_losses.CrossBatchMemory(module.NTXentLoss(), embedding_size=8,
                                             memory_size=64)
        values.append([memory(x, y) for x, y in batches])
    for ours, theirs in zip(*values):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    assert not [w for w in recwarn if "confusion_kernels.pml" in str(w.message)]
