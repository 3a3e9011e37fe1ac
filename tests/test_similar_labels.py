"""Similar labels and confusion analysis (docs/math.md, "Similar labels"): streaming class
statistics against numpy, Welch's t-test against scipy, planted similar pairs
recovered, GAP features of a small CNN, and the plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as st
from torch import nn

import confusion_kernels as ck
from confusion_kernels import analysis
from conftest import require_backend


def random_data(n=500, k=7, c=4, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * (1 + labels[:, None]) + labels[:, None] + offset
    return x, labels


def numpy_stats(x, labels, c):
    x, labels = x.numpy(), labels.numpy()
    counts = np.array([(labels == i).sum() for i in range(c)])
    mean = np.stack([x[labels == i].mean(0) for i in range(c)])
    var = np.stack([x[labels == i].var(0, ddof=1) for i in range(c)])
    return counts, mean, var


# ---------------------------------------------------------------------------
# ClassStatistics
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_statistics_match_numpy_over_arbitrary_splits(backend, offset):
    device = torch.device("cpu")
    if backend in ("triton", "cpu"):  # triton: CUDA tensors, or CPU ones when interpreted
        device = require_backend(backend, "class_shifted_sums" if backend == "cpu"
                                 else "intra_inter_sums")
    x, labels = random_data(offset=offset)
    want = numpy_stats(x, labels, 4)
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.choice(np.arange(1, 500), size=9, replace=False))
    stats = ck.ClassStatistics(4, 7)
    for part in np.split(np.arange(500), cuts):
        stats.update(x[part].to(device), labels[part].to(device), backend=backend)
    np.testing.assert_array_equal(stats.counts.numpy(), want[0])
    np.testing.assert_allclose(stats.mean.numpy(), want[1], rtol=1e-12, atol=1e-12 * (1 + offset))
    np.testing.assert_allclose(stats.var.numpy(), want[2], rtol=1e-9 if offset else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_class_sums_do_not_depend_on_row_order(dtype):
    """The Triton class sums are integers (fixed point per class and feature), so any
    order of the atomic adds gives the same bits; float atomics (the interpreter adds in
    row order, a GPU in arrival order) would not. Also: the sums against float64 numpy,
    a NaN feature marks only its own (class, feature), a class absent from the batch
    sums to 0."""
    device = require_backend("triton", "intra_inter_sums")
    from confusion_kernels.triton import class_stats

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(333, 70, generator=g, dtype=torch.float64) * 10 + 3).to(dtype)
    labels = torch.randint(0, 4, (333,), generator=g)  # class 4 of 5 absent
    shift = torch.randn(5, 70, generator=g, dtype=torch.float64)
    count, s1, s2 = class_stats.shifted_sums(x.to(device), labels.to(device), shift.to(device), 5)
    perm = torch.randperm(333, generator=g)
    _, p1, p2 = class_stats.shifted_sums(x[perm].to(device), labels[perm].to(device),
                                         shift.to(device), 5)
    assert torch.equal(s1, p1) and torch.equal(s2, p2)
    d = x.double().numpy() - shift.numpy()[labels.numpy()]
    want1 = np.stack([d[labels.numpy() == c].sum(0) for c in range(5)])
    want2 = np.stack([(d[labels.numpy() == c] ** 2).sum(0) for c in range(5)])
    np.testing.assert_array_equal(count.cpu().numpy(), np.bincount(labels.numpy(), minlength=5))
    scale = np.abs(d).max() * 333
    np.testing.assert_allclose(s1.cpu().numpy(), want1, rtol=1e-12, atol=1e-13 * scale)
    np.testing.assert_allclose(s2.cpu().numpy(), want2, rtol=1e-12)
    assert not s1[4].any() and not s2[4].any()
    x_nan = x.clone()
    x_nan[5, 7] = float("nan")
    _, n1, n2 = class_stats.shifted_sums(x_nan.to(device), labels.to(device), shift.to(device), 5)
    bad = torch.zeros(5, 70, dtype=torch.bool)
    bad[labels[5], 7] = True
    assert torch.isnan(n1.cpu()[bad]).all() and torch.isnan(n2.cpu()[bad]).all()
    assert torch.equal(n1.cpu()[~bad], s1.cpu()[~bad])


def test_merge_order_does_not_matter():
    x, labels = random_data(n=900, seed=2)
    parts = [slice(0, 100), slice(100, 450), slice(450, 460), slice(460, 900)]
    shards = []
    for p in parts:
        s = ck.ClassStatistics(4, 7)
        s.update(x[p], labels[p])
        shards.append(s)
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        total = ck.ClassStatistics(4, 7)
        for i in order:
            total.merge(shards[i])
        results.append(total)
    for r in results[1:]:
        np.testing.assert_allclose(r.mean.numpy(), results[0].mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(r.var.numpy(), results[0].var.numpy(), rtol=1e-12)
    want = numpy_stats(x, labels, 4)
    np.testing.assert_allclose(results[0].var.numpy(), want[2], rtol=1e-12)


def test_cpu_class_sums_are_row_order_sums_on_any_thread_count():
    """The CPU kernel groups rows by class and splits the classes into jobs of about 2048
    rows: each class's sums must still be the float64 sums of its rows in row order, bit for
    bit, and the same on 1 and 2 threads (5000 rows: several jobs; a class with one row, one
    with none). The squares may be fused into the adds (one rounding), so they are compared to
    1e-14 against the loop and bit for bit across thread counts."""
    require_backend("cpu", "class_shifted_sums")
    g = torch.Generator().manual_seed(12)
    labels = torch.randint(0, 6, (5000,), generator=g)
    labels[1234] = 6  # one row; class 7 has none
    x = torch.randn(5000, 5, generator=g) * 3
    shift = torch.randn(8, 5, generator=g, dtype=torch.float64)
    want1 = torch.zeros(8, 5, dtype=torch.float64)
    want2 = torch.zeros(8, 5, dtype=torch.float64)
    d = x.double() - shift[labels]
    for i in range(5000):  # sequential, row order
        want1[labels[i]] += d[i]
        want2[labels[i]] += d[i] * d[i]
    threads, seen = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            count, s1, s2 = torch.ops.confusion_kernels.class_shifted_sums(x, labels, shift, 8)
            assert torch.equal(s1, want1), n
            torch.testing.assert_close(s2, want2, rtol=1e-14, atol=0)
            assert count.tolist() == torch.bincount(labels, minlength=8).double().tolist()
            seen.append(s2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_kernel_low_precision_features(dtype):
    require_backend("cpu", "class_shifted_sums")
    x, labels = random_data(n=300, seed=6)
    x = x.to(dtype)
    a = ck.ClassStatistics(4, 7).update(x, labels, backend="cpu")
    b = ck.ClassStatistics(4, 7).update(x.double(), labels, backend="torch")
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.var, b.var, rtol=1e-12, atol=1e-12)


def test_statistics_input_rules_and_small_classes():
    stats = ck.ClassStatistics(3, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        stats.update(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="K = 3"):
        stats.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))
    stats.update(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([0, 0, 1]))
    assert stats.counts.tolist() == [2, 1, 0]
    assert torch.isnan(stats.var[1]).all() and torch.isnan(stats.var[2]).all()
    assert stats.var[0].tolist() == [2.0, 2.0]


# ---------------------------------------------------------------------------
# Welch's t-test
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_welch_one_vs_rest_matches_scipy(alternative):
    x, labels = random_data(n=400, seed=3)
    stats = ck.ClassStatistics(4, 7).update(x, labels)
    t, df, p = ck.welch_t_test(stats, alternative=alternative)
    for c in range(4):
        a, b = x[labels == c].numpy(), x[labels != c].numpy()
        res = st.ttest_ind(a, b, equal_var=False, alternative=alternative)
        np.testing.assert_allclose(t[c].numpy(), res.statistic, rtol=1e-8)
        np.testing.assert_allclose(p[c].numpy(), res.pvalue, rtol=1e-8, atol=1e-300)
        np.testing.assert_allclose(df[c].numpy(), res.df, rtol=1e-8)


def test_welch_pairwise_matches_scipy():
    x, labels = random_data(n=300, seed=4)
    stats = ck.ClassStatistics(4, 7).update(x, labels)
    t, df, p = ck.welch_t_test(stats, pairwise=True, alternative="two-sided")
    assert t.shape == (4, 4, 7)
    for c, d in [(0, 1), (2, 3), (3, 0)]:
        res = st.ttest_ind(x[labels == c].numpy(), x[labels == d].numpy(), equal_var=False)
        np.testing.assert_allclose(t[c, d].numpy(), res.statistic, rtol=1e-8)
        np.testing.assert_allclose(p[c, d].numpy(), res.pvalue, rtol=1e-8)


def test_welch_zero_variance_convention():
    x = torch.tensor([[1.0], [1.0], [1.0], [1.0]], dtype=torch.float64)
    stats = ck.ClassStatistics(2, 1).update(x, torch.tensor([0, 0, 1, 1]))
    t, df, p = ck.welch_t_test(stats)
    assert t.tolist() == [[0.0], [0.0]] and p.tolist() == [[0.5], [0.5]]


# ---------------------------------------------------------------------------
# Similar labels
# ---------------------------------------------------------------------------
def planted_features(n_per_class=200, c=6, k=40, seed=5):
    """Classes (0, 1), (2, 3), (4, 5) share their 'own' channels: each pair
    activates the same 6 channels, other channels are noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(c).repeat_interleave(n_per_class)
    x = torch.rand(c * n_per_class, k, generator=g, dtype=torch.float64)
    for pair in range(c // 2):
        channels = slice(6 * pair, 6 * pair + 6)
        for cls in (2 * pair, 2 * pair + 1):
            x[labels == cls, channels] += 2.0
        # a channel that tells the two apart, so they are similar, not identical
        x[labels == 2 * pair, 30 + pair] += 1.0
    return x, labels


@pytest.mark.parametrize("method,statistic", [("welch", "t"), ("welch", "neglogp"),
                                              ("welch", "p"), ("prototype", "t")])
def test_similar_labels_recover_planted_pairs(method, statistic):
    x, labels = planted_features()
    stats = ck.ClassStatistics(6, 40).update(x, labels)
    idx, scores = ck.similar_labels(stats, k=2, method=method, statistic=statistic)
    assert idx.shape == (6, 2) and scores.shape == (6, 2)
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    assert torch.equal(idx[:, 0], partner)
    assert (scores[:, 0] >= scores[:, 1]).all()
    assert not (idx == torch.arange(6)[:, None]).any()


def test_similar_labels_rejects_bad_arguments():
    stats = ck.ClassStatistics(3, 2).update(torch.randn(9, 2), torch.arange(3).repeat(3))
    with pytest.raises(ValueError, match="k must lie"):
        ck.similar_labels(stats, k=3)
    with pytest.raises(ValueError, match="method"):
        ck.similar_labels(stats, k=1, method="cosine")


# ---------------------------------------------------------------------------
# GAPRecorder
# ---------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2))
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = self.block(self.conv1(x))
        return self.head(torch.relu(h).mean((2, 3)))


def test_gap_recorder_features_and_names():
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(8, 3, 9, 9)
    with analysis.GAPRecorder(model) as rec:
        model(x)
        feats = rec.features
        names = rec.feature_names
        assert rec.layer_names == [("conv1", 4), ("block.1", 6)]
    assert feats.shape == (8, 10) and len(names) == 10 and names[5] == ("block.1", 1)
    manual1 = torch.relu(model.conv1(x)).mean((2, 3))
    manual2 = torch.relu(model.block(model.conv1(x))).mean((2, 3))
    torch.testing.assert_close(feats, torch.cat([manual1, manual2], 1))
    assert not model.conv1._forward_hooks and not model._forward_pre_hooks  # removed on exit


def test_collect_statistics_over_a_loader():
    torch.manual_seed(1)
    model = SmallCNN()
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, 8, 8), torch.randint(0, 5, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=7)
    stats, names = analysis.collect_statistics(model, loader, 5)
    assert stats.num_features == 10 and int(stats.counts.sum()) == 40 and len(names) == 10
    with analysis.GAPRecorder(model) as rec:
        model(data.tensors[0])
        whole = ck.ClassStatistics(5, 10).update(rec.features, data.tensors[1])
    torch.testing.assert_close(stats.mean, whole.mean)


def test_collect_statistics_runs_in_eval_mode_and_restores_each_modules_mode():
    """A model in training mode was run as it was: dropout masked the features at random
    (two runs disagreed) and batch norm normalised by the batch and moved its running stats."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Dropout(0.5), nn.ReLU(),
                          nn.Conv2d(6, 4, 1))
    model.train()
    model[1].eval()  # a mixed state: each module's own flag must come back
    data = torch.utils.data.TensorDataset(torch.randn(30, 3, 7, 7), torch.randint(0, 3, (30,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    running = model[1].running_mean.clone()
    first, _ = analysis.collect_statistics(model, loader, 3)
    second, _ = analysis.collect_statistics(model, loader, 3)
    torch.testing.assert_close(first.mean, second.mean, rtol=0, atol=0)  # no dropout
    assert torch.equal(model[1].running_mean, running)  # batch norm's statistics untouched
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]

    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    broken = nn.Sequential(nn.Conv2d(3, 2, 1), Fails()).train()
    with pytest.raises(RuntimeError, match="boom"):
        analysis.collect_statistics(broken, loader, 3)
    assert all(m.training for m in broken.modules())


def test_class_statistics_state_dict_round_trip_and_to(tmp_path):
    g = torch.Generator().manual_seed(4)
    x, labels = torch.randn(50, 6, generator=g), torch.randint(0, 4, (50,), generator=g)
    stats = ck.ClassStatistics(4, 6).update(x[:30], labels[:30])
    path = tmp_path / "stats.pt"
    torch.save(stats.state_dict(), path)
    loaded = ck.ClassStatistics(4, 6).load_state_dict(torch.load(path))
    for a, b in ((loaded.counts, stats.counts), (loaded.mean, stats.mean), (loaded.m2, stats.m2)):
        assert torch.equal(a, b)
    # the loaded copy goes on exactly as the original (pending part included)
    stats.update(x[30:], labels[30:])
    loaded.update(x[30:], labels[30:])
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.var.nan_to_num(),
                                                                stats.var.nan_to_num())
    # stats never synced: its pending part is its totals, one Chan update serving both; the
    # loaded copy updates its pending part on its own, and gets the same bits
    assert all(torch.equal(a, b) for a, b in zip(loaded._pending, stats._pending))
    whole = ck.ClassStatistics(4, 6).update(x, labels)
    torch.testing.assert_close(loaded.mean, whole.mean)
    assert loaded.state_dict()["pending_counts"].sum() == 50
    elsewhere = ck.ClassStatistics(4, 6).update(x, labels)
    moved = elsewhere.to("meta")  # (a device without data: what moves is what is checked)
    assert moved is elsewhere and moved.device.type == "meta"
    assert all(t.device.type == "meta" for t in (moved.counts, moved.mean, moved.m2,
                                                  *moved._pending, *moved._synced))
    assert loaded.to("cpu") is loaded and torch.equal(loaded.mean, stats.mean)
    loaded.load_state_dict(whole.state_dict())
    assert torch.equal(loaded.mean, whole.mean)
    with pytest.raises(ValueError, match="state holds 4 classes x 6 features, this "
                                         "ClassStatistics 5 x 6"):
        ck.ClassStatistics(5, 6).load_state_dict(stats.state_dict())
    with pytest.raises(ValueError, match="state lacks"):
        ck.ClassStatistics(4, 6).load_state_dict({"num_classes": 4, "num_features": 6})
    bad = stats.state_dict()
    bad["mean"] = bad["mean"][:2]
    with pytest.raises(ValueError, match=r"state\['mean'\] must be a tensor of shape \(4, 6\)"):
        ck.ClassStatistics(4, 6).load_state_dict(bad)


# ---------------------------------------------------------------------------
# Confusion analysis and plots
# ---------------------------------------------------------------------------
def test_confusion_tools_use_sklearn_and_rank_pairs():
    from sklearn.metrics import confusion_matrix as sk

    y_true = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    y_pred = torch.tensor([0, 1, 1, 1, 0, 2, 3, 3, 3, 2])
    conf = analysis.confusion_matrix(y_true, y_pred, 4)
    np.testing.assert_array_equal(conf, sk(y_true.numpy(), y_pred.numpy(), labels=range(4)))
    assert analysis.most_confused_pairs(conf, 2) == [(2, 3, 3), (0, 1, 2)]
    assert analysis.most_confused_pairs(conf, 2, symmetric=True) == [(2, 3, 4), (0, 1, 3)]
    report = analysis.per_class_report(y_true, y_pred, 4)
    assert report["support"].tolist() == [3, 2, 4, 1]
    similar = torch.tensor([[1], [0], [3], [1]])
    cmp = analysis.similar_vs_confused(similar, conf, k=2)
    assert cmp["overlap"] == 2 and cmp["fraction"] == 1.0


def test_plots_write_png(tmp_path):
    x, labels = planted_features(n_per_class=30)
    stats = ck.ClassStatistics(6, 40).update(x, labels)
    idx, scores = ck.similar_labels(stats, k=2)
    paths = [tmp_path / n for n in ("rep.png", "rep2d.png", "conf.png", "sim.png")]
    analysis.plot_representation((x, labels), (x[:50], labels[:50]), prototypes=stats.mean,
                                 path=paths[0])
    analysis.plot_representation((x[:, :2], labels), prototypes=stats.mean[:, None, :2], path=paths[1])
    conf = analysis.confusion_matrix(labels, (labels + 1) % 6, 6)
    fig = analysis.plot_confusion_matrix(conf, path=paths[2])
    assert fig is not None
    analysis.plot_similar_labels(idx, scores, path=paths[3])
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000


def test_plots_keep_the_users_backend_and_leave_no_figure_open(tmp_path):
    """The plots chose matplotlib's Agg backend at import (a user's interactive backend was
    replaced) and left every figure open in pyplot (a loop of plots leaked them all)."""
    import subprocess
    import sys

    code = f"""
import matplotlib
matplotlib.use("svg")  # the user's choice, which the plots must keep
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from confusion_kernels import analysis
conf = np.array([[3, 1], [0, 4]])
figs = [analysis.plot_confusion_matrix(conf) for _ in range(5)]
figs.append(analysis.plot_similarity_heatmap(np.array([[1.0, 0.2], [0.2, 1.0]]),
                                             path={str(tmp_path / "sim.png")!r}))
figs.append(analysis.plot_representation((np.random.rand(20, 3), np.arange(20) % 2)))
figs.append(analysis.plot_similar_labels(np.array([[1], [0]]), np.array([[0.5], [0.5]])))
assert all(isinstance(f, Figure) for f in figs), [type(f) for f in figs]
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["svg", "0"]
    assert (tmp_path / "sim.png").stat().st_size > 1000


def test_most_confused_pairs_of_a_normalised_matrix():
    """A row-normalised (float) confusion matrix was cast to int64: every rate became 0 and
    nothing was returned; NaN passed with a numpy warning."""
    counts = np.array([[5, 2, 0, 0], [1, 6, 0, 0], [0, 0, 4, 3], [0, 0, 1, 4]])
    rates = counts / counts.sum(1, keepdims=True)
    got = analysis.most_confused_pairs(rates, 2)
    assert [(i, j) for i, j, _ in got] == [(2, 3), (0, 1)]
    assert got[0][2] == pytest.approx(3 / 7)
    assert analysis.most_confused_pairs(counts, 1) == [(2, 3, 3)]  # counts stay int
    assert isinstance(analysis.most_confused_pairs(counts, 1)[0][2], int)
    sim = np.array([[1], [0], [3], [2]])
    assert analysis.similar_vs_confused(sim, rates, k=2)["overlap"] == 2
    bad = rates.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        analysis.most_confused_pairs(bad)
    with pytest.raises(ValueError, match="non-negative"):
        analysis.most_confused_pairs(-rates)


def test_a_one_sample_class_is_never_ranked_similar():
    """Its t-vector is undefined; it became 0, whose cosine (0) outranked every real
    negative similarity, so it was every class's most similar class, silently."""
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(5, 12, generator=g, dtype=torch.float64) * 3
    labels = torch.cat([torch.arange(4).repeat_interleave(30), torch.tensor([4])])
    feats = centres[labels] + torch.randn(labels.shape[0], 12, generator=g, dtype=torch.float64)
    stats = analysis.ClassStatistics(5, 12).update(feats, labels)
    with pytest.warns(RuntimeWarning, match=r"classes \[4\]"):
        indices, scores = analysis.similar_labels(stats, k=3)
    assert (indices[:4] != 4).all()  # defined classes first
    assert scores[4].isnan().all()
    with pytest.warns(RuntimeWarning):
        sim = analysis.similarity_matrix(stats)
    assert sim[4, :4].isnan().all() and sim.diagonal().eq(1).all()
    one = analysis.ClassStatistics(1, 3).update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.warns(RuntimeWarning):  # C = 1: no rest, but the diagonal is still 1
        assert analysis.similarity_matrix(one).tolist() == [[1.0]]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_class_statistics_names_an_overflowing_sum_of_squares(backend):
    """Finite features whose squared deviations overflow float64 were reported as "features
    contain NaN or Inf"; the message now says what overflowed, and the statistics stay."""
    from confusion_kernels import _extension

    if backend == "cpu" and not _extension.has_kernel("class_shifted_sums", "CPU"):
        pytest.skip("backend 'cpu' needs the C++ extension: not built")
    feats = torch.zeros(6, 3, dtype=torch.float64)
    feats[:, 1] = torch.tensor([1e200, -1e200, 3e200, -2e200, 1e200, 0.0], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    stats = analysis.ClassStatistics(2, 3)
    with pytest.raises(ValueError, match=r"class 0, feature 1 overflows float64"):
        stats.update(feats, labels, backend=backend)
    assert (stats.counts == 0).all()
    feats[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        stats.update(feats, labels, backend=backend)


def test_statistics_take_only_statistics():
    stats = analysis.ClassStatistics(2, 3)
    with pytest.raises(TypeError, match="merge takes a ClassStatistics"):
        stats.merge("x")
    with pytest.raises(TypeError, match="welch_t_test takes a ClassStatistics"):
        analysis.welch_t_test(torch.randn(2, 3))


def test_update_follows_the_backend_rules_of_every_op(monkeypatch):
    """ClassStatistics.update takes the backends of every op ("reference" too) and
    CONFUSION_KERNELS_BACKEND, and an impossible choice raises naming it."""
    g = torch.Generator().manual_seed(31)
    x, labels = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    want = ck.ClassStatistics(4, 6).update(x, labels, backend="torch")
    got = ck.ClassStatistics(4, 6).update(x, labels, backend="reference")
    assert torch.equal(got.counts, want.counts) and torch.equal(got.m2, want.m2)
    monkeypatch.setenv("CONFUSION_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"ClassStatistics.update: .*CONFUSION_KERNELS_BACKEND="
                                           r"'cuda' cannot run class_shifted_sums"):
        ck.ClassStatistics(4, 6).update(x, labels)
    monkeypatch.setenv("CONFUSION_KERNELS_BACKEND", "reference")
    env = ck.ClassStatistics(4, 6).update(x, labels)
    assert torch.equal(env.m2, want.m2)
    with pytest.raises(ValueError, match="backend must be"):
        ck.ClassStatistics(4, 6).update(x, labels, backend="gpu")
