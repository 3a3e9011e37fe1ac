"""The fused pair losses (ck.contrastive_loss, supcon_loss, ntxent_loss, multi_similarity_loss)
on the cpu and triton backends (Triton: under TRITON_INTERPRET=1 without a GPU) against their
reference in float64, against pytorch-metric-learning's classes, gradcheck, and the input
rules."""

from __future__ import annotations

import pytest
import torch

import confusion_kernels as ck

from confusion_kernels import _backend
from conftest import require_backend

LOSSES = {
    "contrastive": (ck.contrastive_loss, {"pos_margin": 0.15, "neg_margin": 0.8}),
    "supcon": (ck.supcon_loss, {"temperature": 0.2}),
    "ntxent": (ck.ntxent_loss, {"temperature": 0.1}),
    "multi_similarity": (ck.multi_similarity_loss, {"alpha": 2.0, "beta": 50.0, "base": 0.5}),
}
# (metric, normalize)
DISTANCES = [("euclidean", True), ("euclidean", False), ("cosine", True)]
FUSED = ["cpu", "triton", "cuda"]  # cuda: skipped without a GPU
# Triton runs in its interpreter here (numpy, one program at a time): smaller batches that
# still span several blocks of 32 with a ragged last one. CI runs the suite three times.
SMALL = {"cpu": 1.0, "cuda": 1.0, "triton": 0.25}


def _n(fused: str, n: int) -> int:
    """n rows on cpu and cuda, about a quarter (at least 33, never a multiple of 32) on triton."""
    if SMALL[fused] == 1.0:
        return n
    m = max(33, int(n * SMALL[fused]))
    return m + 1 if m % 32 == 0 else m


def _batch(n, d, classes, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x, labels


def _both(name, x, labels, ref=None, ref_labels=None, metric="cosine", normalize=True,
          fused="cpu", **extra):
    """(loss, grads) of the reference and of the ``fused`` backend."""
    fn, params = LOSSES[name]
    device = require_backend(fused, "pair_loss_stats")
    labels = labels.to(device)
    ref_labels = None if ref_labels is None else ref_labels.to(device)
    out = []
    for backend in ("reference", fused):
        a = x.clone().to(device).requires_grad_(True)
        r = None if ref is None else ref.clone().to(device).requires_grad_(True)
        loss = fn(a, labels, r, ref_labels, metric=metric, normalize=normalize, backend=backend,
                  **params, **extra)
        leaves = [a] + ([] if r is None else [r])
        grads = torch.autograd.grad(loss, leaves) if loss.requires_grad else [None] * len(leaves)
        out.append((loss, grads))
    return out


def _assert_same(pair, rtol=1e-9, atol=1e-12):
    (want, want_grads), (got, got_grads) = pair
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, w, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("metric,normalize", DISTANCES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_fused_equals_reference_over_ragged_tiles(name, metric, normalize, fused):
    """N = 300 (cpu row tiles of 128: a ragged last tile; triton: 75, blocks of 32) against
    itself, and 130 rows against M = 700 references (two cpu reference tiles of 512, the
    second ragged; triton 33 against 175), float64."""
    x, labels = _batch(_n(fused, 300), 6, 9, seed=1)
    _assert_same(_both(name, x, labels, metric=metric, normalize=normalize, fused=fused))
    q, ql = _batch(_n(fused, 130), 6, 9, seed=2)
    r, rl = _batch(_n(fused, 700), 6, 9, seed=3)
    _assert_same(_both(name, q, ql, r, rl, metric=metric, normalize=normalize, fused=fused))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("name", list(LOSSES))
def test_fused_equals_reference_on_two_views_and_one_big_class(name, fused):
    g = torch.Generator().manual_seed(4)
    n = 2 * (_n(fused, 200) // 2)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    two_views = torch.arange(n // 2).repeat_interleave(2)
    _assert_same(_both(name, x, two_views, fused=fused))
    one_class = torch.zeros(n, dtype=torch.long)
    one_class[:3] = torch.tensor([1, 2, 2])
    _assert_same(_both(name, x, one_class, metric="euclidean", fused=fused))


# cpu: one row tile (the two-pass backward), three; triton: three blocks, the last ragged
@pytest.mark.parametrize("fused,n", [("cpu", 40), ("cpu", 300), ("triton", 70)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_duplicates_and_near_duplicates_take_the_exact_distance(name, n, fused):
    """Equal rows (distance 0: gradient 0) and rows 1e-9 apart, where the Gram form cancels;
    on one row tile (the two-pass backward) and on three (the one-pass backward's groups)."""
    x, labels = _batch(n, 4, 3, seed=5)
    x[1], labels[1] = x[0], labels[0]
    x[3], labels[3] = x[2] + 1e-9, labels[2]
    x[5], labels[5] = x[4], (labels[4] + 1) % 3  # a duplicate with another label
    x[n - 1], labels[n - 1] = x[1], labels[1]  # across row tiles
    _assert_same(_both(name, x, labels, metric="euclidean", normalize=False, fused=fused),
                 rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck(name, fused):
    device = require_backend(fused, "pair_loss_stats")
    fn, params = LOSSES[name]
    x, labels = _batch(9, 3, 3, seed=6)
    ref, ref_labels = _batch(7, 3, 3, seed=7)
    x, labels, ref, ref_labels = (t.to(device) for t in (x, labels, ref, ref_labels))
    for metric in ("euclidean", "cosine"):
        torch.autograd.gradcheck(
            lambda a, r: fn(a, labels, r, ref_labels, metric=metric, backend=fused, **params),
            (x.requires_grad_(True), ref.requires_grad_(True)))
        if fused != "triton":  # the interpreter is slow; its self case is the same kernels
            torch.autograd.gradcheck(
                lambda a: fn(a, labels, metric=metric, backend=fused, **params), (x,))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("name", list(LOSSES))
def test_equal_to_pytorch_metric_learning(name, fused):
    pml = pytest.importorskip("pytorch_metric_learning", reason="needs pytorch-metric-learning")
    from pytorch_metric_learning import distances, losses

    device = require_backend(fused, "pair_loss_stats")
    makers = {"contrastive": lambda: losses.ContrastiveLoss(pos_margin=0.15, neg_margin=0.8),
              "supcon": lambda: losses.SupConLoss(temperature=0.2),
              "ntxent": lambda: losses.NTXentLoss(temperature=0.1),
              "multi_similarity": lambda: losses.MultiSimilarityLoss(2.0, 50.0, 0.5)}
    assert pml is not None and distances is not None
    fn, params = LOSSES[name]
    x, labels = _batch(_n(fused, 150), 8, 12, seed=8)
    ref, ref_labels = _batch(_n(fused, 90), 8, 12, seed=9)
    x, labels, ref, ref_labels = (t.to(device) for t in (x, labels, ref, ref_labels))
    for r, rl in ((None, None), (ref, ref_labels)):
        a = x.clone().requires_grad_(True)
        want = makers[name]()(a, labels, None, r, rl)
        (gw,) = torch.autograd.grad(want, a)
        b = x.clone().requires_grad_(True)
        metric = "euclidean" if name == "contrastive" else "cosine"
        got = fn(b, labels, r, rl, metric=metric, backend=fused, **params)
        (gg,) = torch.autograd.grad(got, b)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(gg, gw, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("name", list(LOSSES))
def test_single_class_and_tiny_batches_give_what_pml_gives(name, fused):
    device = require_backend(fused, "pair_loss_stats")
    fn, params = LOSSES[name]
    x, _ = _batch(12, 4, 1, seed=10)
    for labels in (torch.zeros(12, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([3])):
        rows = x[:labels.shape[0]]
        _assert_same(_both(name, rows, labels, fused=fused))
    if name in ("supcon", "ntxent"):  # no negative pair: PML's zero loss
        zeros = torch.zeros(12, dtype=torch.long, device=device)
        assert fn(x.to(device), zeros, backend=fused, **params).item() == 0.0


@pytest.mark.parametrize("fused", FUSED)
def test_float32_close_to_float64_and_half_precision_returns_float32(fused):
    device = require_backend(fused, "pair_loss_stats")
    x, labels = _batch(_n(fused, 260), 16, 7, seed=11)
    x, labels = x.to(device), labels.to(device)
    for name, (fn, params) in LOSSES.items():
        want = fn(x, labels, backend=fused, **params)
        got = fn(x.float(), labels, backend=fused, **params)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-5)
        assert fn(x.half(), labels, backend=fused, **params).dtype == torch.float32


def test_bad_input_gets_a_clear_error():
    x, labels = _batch(10, 4, 3, seed=12)
    with pytest.raises(ValueError, match="ref_emb and ref_labels go together"):
        ck.supcon_loss(x, labels, x)
    with pytest.raises(ValueError, match="D = 5"):
        ck.supcon_loss(x, labels, torch.randn(6, 5, dtype=torch.float64),
                       torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_labels has 5 entries"):
        ck.ntxent_loss(x, labels, torch.randn(6, 4, dtype=torch.float64),
                       torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        ck.supcon_loss(x, labels, temperature=0.0)
    with pytest.raises(ValueError, match="metric must be one of"):
        ck.contrastive_loss(x, labels, metric="manhattan")
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ck.multi_similarity_loss(bad, labels)
    with pytest.raises(ValueError, match="labels has 9 entries"):
        ck.contrastive_loss(x, labels[:9])
    with pytest.raises(RuntimeError, match="cannot run pair_loss_stats"):
        ck.supcon_loss(x, labels, backend="cuda")


@pytest.mark.parametrize("name", list(LOSSES))
def test_same_bits_on_one_and_two_threads(name):
    require_backend("cpu", "pair_loss_stats")
    fn, params = LOSSES[name]
    x, labels = _batch(600, 16, 40, seed=13, dtype=torch.float32)  # 5 row tiles, 2 ref tiles
    ref, ref_labels = _batch(700, 16, 40, seed=14, dtype=torch.float32)

    def run():
        a, r = x.clone().requires_grad_(True), ref.clone().requires_grad_(True)
        loss = fn(a, labels, r, ref_labels, backend="cpu", **params)
        loss.backward()
        own = x.clone().requires_grad_(True)  # the self path: 3 tiles of 256, 6 tile pairs
        own_loss = fn(own, labels, backend="cpu", **params)
        own_loss.backward()
        return loss.detach(), a.grad, r.grad, own_loss.detach(), own.grad

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(LOSSES))
def test_mined_pairs_equal_the_reference_masked_to_them(name):
    """indices_tuple: the listed pairs only (losses/mined_pairs.py), equal to the dense
    reference restricted to them; pairs repeated; a reference set; at most one pair of each
    kind gives PML's 0."""
    from confusion_kernels.reference import pair_losses as reference

    fn, params = LOSSES[name]
    x, labels = _batch(25, 4, 4, seed=15)
    ref, ref_labels = _batch(18, 4, 4, seed=16)
    same = (labels[:, None] == ref_labels[None, :]).nonzero()
    other = (labels[:, None] != ref_labels[None, :]).nonzero()
    pairs = (same[::2, 0], same[::2, 1], other[::3, 0], other[::3, 1])
    pairs = tuple(torch.cat([t, t[:3]]) for t in pairs)  # three pairs listed twice
    for metric in ("euclidean", "cosine"):
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = fn(a, labels, ref, ref_labels, metric=metric, indices_tuple=pairs, **params)
        setup = reference.pair_setup(b, labels, ref, ref_labels, metric=metric,
                                     indices_tuple=pairs)
        ref_fn = {"contrastive": reference.contrastive_loss, "supcon": reference.supcon_loss,
                  "ntxent": reference.ntxent_loss,
                  "multi_similarity": reference.multi_similarity_loss}[name]
        want = ref_fn(setup, **params)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(got, a)[0],
                                   torch.autograd.grad(want, b)[0], rtol=1e-8, atol=1e-12)
    one = tuple(t[:1] for t in pairs)
    assert fn(x, labels, ref, ref_labels, indices_tuple=one, **params).item() == 0.0


def _largest_allocation(step) -> int:
    """The largest net allocation of any op (bytes) while ``step`` runs (torch's profiler)."""
    with torch.profiler.profile(profile_memory=True) as prof:
        step()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("fused,n", [("cpu", 3000), ("triton", 200)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_no_n_by_m_buffer(name, fused, n):
    """fwd+bwd of the fused kernel allocates nothing near N x M (on cpu the largest piece is
    the backward's partials, groups x M x D; the Triton launchers allocate O(N D)); the dense
    reference's N x M matrices show that the check sees such a buffer."""
    device = require_backend(fused, "pair_loss_stats")
    fn, params = LOSSES[name]
    x, labels = _batch(n, 16, n // 4, seed=17, dtype=torch.float32)
    x, labels = x.to(device).requires_grad_(True), labels.to(device)
    n_by_m = n * n * 4
    fused_peak = _largest_allocation(lambda: fn(x, labels, backend=fused, **params).backward())
    dense = _largest_allocation(lambda: fn(x, labels, backend="reference", **params).backward())
    assert fused_peak < n_by_m / 4, (fused_peak, n_by_m)
    assert dense >= n_by_m, (dense, n_by_m)


@pytest.mark.parametrize("name", list(LOSSES))
def test_triton_gives_the_same_bits_on_every_run_and_equals_cpu(name):
    """Each output row has one writer: two runs are bit for bit equal; float32 against the
    C++ kernel (another summation order) to rounding."""
    device = require_backend("triton", "pair_loss_stats")
    fn, params = LOSSES[name]
    x, labels = _batch(97, 16, 6, seed=18, dtype=torch.float32)
    ref, ref_labels = _batch(75, 16, 6, seed=19, dtype=torch.float32)

    def run(backend, dev):
        a = x.clone().to(dev).requires_grad_(True)
        r = ref.clone().to(dev).requires_grad_(True)
        loss = fn(a, labels.to(dev), r, ref_labels.to(dev), backend=backend, **params)
        loss.backward()
        return [t.cpu() for t in (loss.detach(), a.grad, r.grad)]

    first, second = run("triton", device), run("triton", device)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    if _backend.unavailable_reason("cpu", torch.device("cpu"), "pair_loss_stats") is None:
        for a, b in zip(first, run("cpu", torch.device("cpu"))):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_triton_op_refuses_bad_input():
    """Direct calls of the registered Triton op get the C++ op's rules."""
    require_backend("triton", "pair_loss_stats")
    ops = torch.ops.confusion_kernels
    x, labels = _batch(10, 4, 3, seed=20)
    ref, ref_labels = _batch(12, 4, 3, seed=21)
    with pytest.raises(ValueError, match="self_offset must satisfy"):
        ops.pair_loss_stats_triton(x, labels, ref, ref_labels, 3, "supcon", [0.1], "cosine")
    with pytest.raises(ValueError, match="must both be float32 or both float64"):
        ops.pair_loss_stats_triton(x, labels, ref.float(), ref_labels, None, "supcon", [0.1],
                                   "cosine")
    with pytest.raises(ValueError, match="multi_similarity takes 3 parameters"):
        ops.pair_loss_stats_triton(x, labels, ref, ref_labels, None, "multi_similarity", [0.1],
                                   "cosine")
    with pytest.raises(ValueError, match="ref_labels must be 1-D of length M = 12"):
        ops.pair_loss_stats_triton(x, labels, ref, ref_labels[:5], None, "ntxent", [0.1],
                                   "cosine")
    with pytest.raises(ValueError, match="unknown metric"):
        ops.pair_loss_stats_triton(x, labels, ref, ref_labels, None, "ntxent", [0.1], "l1")
    rows, stats = ops.pair_loss_stats_triton(x, labels, ref, ref_labels, None, "contrastive",
                                             [0.1, 0.9], "euclidean")
    with pytest.raises(ValueError, match="grad_rows must be floating"):
        ops.pair_loss_backward_triton(rows[:, :1], stats, x, labels, ref, ref_labels, None,
                                      "contrastive", [0.1, 0.9], "euclidean")
