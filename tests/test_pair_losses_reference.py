"""The reference pair losses (confusion_kernels/reference/pair_losses.py) against
pytorch-metric-learning's own classes in float64: values and gradients, on several label
layouts, with and without a reference set and with mined pairs."""

from __future__ import annotations

import pytest
import torch

from confusion_kernels.reference import pair_losses as ref_losses

pml = pytest.importorskip("pytorch_metric_learning", reason="needs pytorch-metric-learning")
from pytorch_metric_learning import distances, losses, miners  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402


def _labels(layout: str, n: int, g: torch.Generator) -> torch.Tensor:
    if layout == "two_views":  # many classes, two samples each (contrastive pre-training)
        return torch.arange(n // 2).repeat_interleave(2)[torch.randperm(n // 2 * 2, generator=g)]
    if layout == "one_class_plus_few":
        labels = torch.zeros(n, dtype=torch.long)
        labels[torch.randperm(n, generator=g)[:3]] = torch.tensor([1, 2, 2])
        return labels
    return torch.randint(0, 7, (n,), generator=g)  # "random": ragged class sizes


# (PML distance, our metric, normalize)
DISTANCES = {
    "lp": (lambda: distances.LpDistance(), "euclidean", True),
    "lp_raw": (lambda: distances.LpDistance(normalize_embeddings=False), "euclidean", False),
    "cosine": (lambda: distances.CosineSimilarity(), "cosine", True),
}

LOSSES = {
    "contrastive": (lambda d: losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9, distance=d),
                    lambda s: ref_losses.contrastive_loss(s, pos_margin=0.1, neg_margin=0.9)),
    "supcon": (lambda d: losses.SupConLoss(temperature=0.2, distance=d),
               lambda s: ref_losses.supcon_loss(s, temperature=0.2)),
    "ntxent": (lambda d: losses.NTXentLoss(temperature=0.1, distance=d),
               lambda s: ref_losses.ntxent_loss(s, temperature=0.1)),
    "multi_similarity": (lambda d: losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5,
                                                              distance=d),
                         lambda s: ref_losses.multi_similarity_loss(s, alpha=2.0, beta=50.0,
                                                                    base=0.5)),
}


def _compare(loss_name, dist_name, x, labels, ref=None, ref_labels=None, indices_tuple=None):
    make_pml, ours = LOSSES[loss_name]
    make_dist, metric, normalize = DISTANCES[dist_name]
    xa = x.clone().requires_grad_(True)
    ra = None if ref is None else ref.clone().requires_grad_(True)
    want = make_pml(make_dist())(xa, labels, indices_tuple, ra, ref_labels)
    xb = x.clone().requires_grad_(True)
    rb = None if ref is None else ref.clone().requires_grad_(True)
    pairs = None if indices_tuple is None else lmu.convert_to_pairs(
        indices_tuple, labels, labels if ref_labels is None else ref_labels)
    setup = ref_losses.pair_setup(xb, labels, rb, ref_labels, metric=metric, normalize=normalize,
                                  indices_tuple=pairs)
    got = ours(setup)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    leaves = [xa] + ([] if ra is None else [ra])
    mine = [xb] + ([] if rb is None else [rb])
    if want.requires_grad:
        grads_want = torch.autograd.grad(want, leaves, allow_unused=True)
        grads_got = torch.autograd.grad(got, mine, allow_unused=True)
        for gw, gg in zip(grads_want, grads_got):
            gw = torch.zeros_like(mine[0]) if gw is None else gw
            gg = torch.zeros_like(gw) if gg is None else gg
            torch.testing.assert_close(gg, gw, rtol=1e-6, atol=1e-9)
    return got


@pytest.mark.parametrize("dist_name", list(DISTANCES))
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("layout,n", [("two_views", 24), ("one_class_plus_few", 19),
                                      ("random", 37)])
def test_reference_equals_pml(loss_name, dist_name, layout, n):
    g = torch.Generator().manual_seed(hash((loss_name, dist_name, layout)) % 2**31)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    labels = _labels(layout, n, g)
    got = _compare(loss_name, dist_name, x, labels)
    assert got.item() != 0.0  # every layout has positive and negative pairs


@pytest.mark.parametrize("dist_name", list(DISTANCES))
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_reference_equals_pml_with_a_reference_set(loss_name, dist_name):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (13,), generator=g)
    ref = torch.randn(29, 6, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 4, (29,), generator=g)
    ref[3] = x[2]  # a reference equal to an embedding: the pair (2, 3) is kept, at distance 0
    ref_labels[3] = labels[2]
    _compare(loss_name, dist_name, x, labels, ref, ref_labels)


@pytest.mark.parametrize("miner", ["pairs", "triplets"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_reference_equals_pml_on_mined_pairs(loss_name, miner):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (30,), generator=g)
    if miner == "pairs":
        indices = miners.MultiSimilarityMiner(epsilon=0.3)(x, labels)
    else:
        indices = miners.TripletMarginMiner(margin=0.5, type_of_triplets="all")(x, labels)
    assert all(len(t) > 1 for t in indices)
    _compare(loss_name, "cosine" if loss_name != "contrastive" else "lp", x, labels,
             indices_tuple=indices)


def test_duplicate_rows_give_finite_gradients():
    """Two equal embeddings of one class (distance 0): the euclidean losses stay finite."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3])
    x[1] = x[0]
    for name in LOSSES:
        _compare(name, "lp", x, labels)


def test_a_single_class_batch_has_no_negative_pairs():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    labels = torch.zeros(9, dtype=torch.long)
    for name in LOSSES:
        got = _compare(name, "cosine" if name != "contrastive" else "lp", x, labels)
        if name in ("supcon", "ntxent"):
            assert got.item() == 0.0  # PML's zero loss: no negative pair at all


def test_unknown_metric_is_refused():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="metric must be one of"):
        ref_losses.pair_setup(x, torch.zeros(4, dtype=torch.long), metric="manhattan")


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_reference_equals_pml_when_some_anchors_have_no_mined_negative(loss_name):
    """Mined pairs by hand, repeats included: anchor 1 has positives and no negative, anchor 4
    negatives only."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 1, 2])
    a1, p = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([1, 1, 5, 3, 6])
    a2, n = torch.tensor([0, 0, 2, 4, 4]), torch.tensor([2, 4, 0, 0, 1])
    _compare(loss_name, "cosine" if loss_name != "contrastive" else "lp", x, labels,
             indices_tuple=(a1, p, a2, n))
