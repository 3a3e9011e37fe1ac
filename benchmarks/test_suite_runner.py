"""benchmarks/run.py: quantiles, the Markdown tables and a tiny end-to-end case (CSV columns,
statuses), without timing anything large."""

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
import suite_cases  # noqa: E402


def test_quantiles():
    values = [float(v) for v in range(11)]
    assert run.quantile(values, 0.5) == 5.0
    assert run.quantile(values, 0.2) == 2.0 and run.quantile(values, 0.8) == 8.0
    assert run.quantile([3.0], 0.8) == 3.0


def test_markdown_names_the_fastest_provider():
    base = dict(op="op", mode="fwd", data="random", N=8, D=2, K=3, peak_mib=1.0,
                fraction_of_floor=0.5, status="ok")
    rows = [dict(base, provider="ours-cpu", median_ms=1.0), dict(base, provider="eager", median_ms=4.0),
            dict(base, provider="keops", status="error: X")]
    lines = run.markdown(rows)
    row = next(line for line in lines if line.startswith("| fwd"))
    assert "| 1.00 | 4.00 | error: X | ours-cpu |" in row


def test_summary_compares_with_the_faster_formulation():
    """ "vs compile" used the readable definition's compiled time even where the plain
    formulation (cdist / Gram) compiled faster, which flattered us (issue 29)."""
    base = dict(op="op", mode="fwd+bwd", data="random", N=8, D=2, K=3, peak_mib=1.0,
                fraction_of_floor=0.5, status="ok")
    rows = [dict(base, provider="ours-cpu", median_ms=10.0),
            dict(base, provider="eager", median_ms=80.0),
            dict(base, provider="eager-plain", median_ms=40.0),
            dict(base, provider="compile", median_ms=60.0),
            dict(base, provider="compile-plain", median_ms=20.0)]
    line = run.summary(rows)[-1]
    assert "| 40.00 ms (plain) | 20.00 ms (plain) | 4.0× | 2.0× |" in line, line
    rows[2]["median_ms"] = 90.0
    assert "| 80.00 ms | 20.00 ms (plain) | 8.0× | 2.0× |" in run.summary(rows)[-1]


def test_tiny_suite_writes_every_column(tmp_path, monkeypatch):
    device = torch.device("cpu")

    def tiny(suite, dev, keops):
        return [lambda: suite_cases.intra_inter_sums_case(dev, 40, 3, "clustered", "euclidean",
                                                          "fwd+bwd", keops=False),
                lambda: suite_cases.class_stats_case(dev, 50, 4, "random", 3)]

    monkeypatch.setattr(suite_cases, "suite_cases", tiny)
    ceilings = {"fp32_tflops": 0.1, "bandwidth_gbs": 1.0}
    rows = run.run_suite("cpu", device, reps=2, budget_s=1.0, ceilings=ceilings, keops=False)
    providers = {r["provider"] for r in rows}
    assert {"eager", "compile", "eager-plain", "compile-plain"} <= providers
    assert {r["floor_bound"] for r in rows} <= {"flops", "bytes"}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    path = tmp_path / "suite.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=run.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    read = list(csv.DictReader(open(path)))
    assert set(read[0]) == set(run.COLUMNS)
    assert all(float(r["median_ms"]) > 0 and float(r["fraction_of_floor"]) > 0 for r in read)


def test_plain_formulations_compute_the_same_values():
    """A baseline that computes something else would make every ratio meaningless."""
    import plain_formulations as plain

    from confusion_kernels import reference

    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(37, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (37,), generator=g)
    ref, ref_labels = torch.randn(29, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (29,), generator=g)
    for metric in plain.PLAIN_METRICS:
        got = plain.row_sums(x, labels, metric) + plain.row_sums(x, labels, metric, ref, ref_labels)
        want = (reference.intra_inter_sums(x, labels, metric)
                + reference.intra_inter_sums(x, labels, metric, ref=ref, ref_labels=ref_labels))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(plain.as_loss(x, labels, metric),
                                   reference.as_loss(x, labels, metric=metric), rtol=1e-9, atol=1e-12)
    assert not plain.has_plain_form("smooth_l1")


def test_pml_contrastive_peer_has_the_as_loss_gradient():
    import pytest

    import plain_formulations as plain

    import confusion_kernels as ck

    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (40,), generator=g)
    peer = plain.pml_contrastive_as_loss(x, labels)
    if peer is None:
        pytest.skip("needs pytorch-metric-learning (the peer)")
    want = ck.as_loss(x, labels, backend="reference")
    torch.testing.assert_close(peer - 1e-3 * plain.NEG_MARGIN, want, rtol=1e-9, atol=1e-9)
    (g_peer,) = torch.autograd.grad(peer, x)
    (g_want,) = torch.autograd.grad(ck.as_loss(x, labels, backend="reference"), x)
    torch.testing.assert_close(g_peer, g_want, rtol=1e-9, atol=1e-12)


def test_contention_case_runs_and_stops_its_load():
    """The contention case on tiny steps, one busy process for a bounded time (nothing timed
    is asserted; the load must be gone afterwards)."""
    import contention

    calls = []
    steps = {"tiny": lambda: calls.append(torch.ones(4).sum())}
    load = contention.BackgroundLoad(1, 5.0)
    with load:
        assert all(p.is_alive() for p in load.procs)
    assert not any(p.is_alive() for p in load.procs)
    rows = contention.measure(steps, busy=1, reps=2, seconds=5.0)
    assert rows[0]["step"] == "tiny" and rows[0]["slowdown"] > 0 and len(calls) == 6
    assert "| tiny |" in "\n".join(contention.markdown(rows))
    tiny = contention.default_steps(n=16, d=3, product=8)
    assert set(tiny) == {
        "as_loss ours-cpu (N=16, D=3)", "as_loss eager (N=16, D=3)",
        "intra_inter_sums rect ours-cpu (N=8, M=32, D=3)",
        "affinity_loss ours-cpu (N=16, C=4, m=1, D=6)",
        "n_centroids_loss ours-cpu (N=64, K=4, D=6)", "matrix product 8^3"}
    for step in tiny.values():  # every step runs (a fused op raising would show here)
        step()


def test_contention_case_in_a_process_with_another_wait_policy():
    """The second measurement runs in a fresh process that sees the environment it was given
    (OMP_WAIT_POLICY is read when the OpenMP runtime loads) and its rows land in the table."""
    import contention

    rows = contention.measure_with_env({"OMP_WAIT_POLICY": "passive"}, busy=1, reps=2,
                                       seconds=5.0, n=16)
    assert {r["omp_wait_policy"] for r in rows} == {"passive"}
    assert all(r["spin_after_region_ms"] >= 0 for r in rows)
    assert len(rows) == 6 and all(r["slowdown"] > 0 for r in rows)
    table = "\n".join(contention.markdown(rows, rows[:1]))
    assert "slowdown (passive)" in table and "| – | – | – |" in table


def test_curves_run_on_tiny_sizes(tmp_path):
    """benchmarks/curves.py end to end on N = 32 (nothing timed is asserted)."""
    import curves

    out = curves.main(["--sizes", "32", "--step-limit", "5", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(out / "curves.csv")))
    assert {r["op"] for r in rows} == {"as_loss[euclidean]", "as_loss[cosine]",
                                       "intra_inter_sums_rect[euclidean]",
                                       "n_centroids_loss[great_circle]", "affinity_loss[m=1]",
                                       "affinity_loss[m=5]", "contrastive_loss[euclidean]",
                                       "supcon_loss[cosine]", "ntxent_loss[cosine]",
                                       "multi_similarity_loss[cosine]"} == set(curves.cases(32))
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert (out / "curves.png").stat().st_size > 1000
    some = curves.measure([32], 5.0, reps=1, ops=["affinity_loss[m=1]"])
    assert {r["op"] for r in some} == {"affinity_loss[m=1]"}
    assert {r["provider"] for r in some} == {"ours-cpu", "eager", "compile"}
    pair = curves.measure([32], 5.0, reps=1, ops=["supcon_loss[cosine]", "ntxent_loss[cosine]"])
    assert {(r["op"], r["provider"]) for r in pair} >= {("supcon_loss[cosine]", "pml"),
                                                        ("ntxent_loss[cosine]", "ours-cpu")}
    assert ("ntxent_loss[cosine]", "pml") not in {(r["op"], r["provider"]) for r in pair}


def test_pair_losses_vs_pml_runs_on_tiny_sizes(tmp_path):
    """benchmarks/pair_losses_vs_pml.py on N = 32, two rounds (nothing timed is asserted):
    every loss, PML beside all but NT-Xent, the tables written."""
    import pair_losses_vs_pml as vs

    pytest.importorskip("pytorch_metric_learning", reason="the peer is PML")
    rows = vs.measure(32, 2)
    assert [r["loss"] for r in rows] == ["contrastive_loss[euclidean]", "supcon_loss[cosine]",
                                         "ntxent_loss[cosine]", "multi_similarity_loss[cosine]"]
    assert all(r["ours_ms"] > 0 for r in rows)
    assert [r["pml_ms"] == r["pml_ms"] for r in rows] == [True, True, False, True]
    vs.write(rows, tmp_path, "header")
    assert "| ntxent_loss[cosine] | 32 |" in (tmp_path / "pair_losses_vs_pml.md").read_text()
    assert len(list(csv.DictReader(open(tmp_path / "pair_losses_vs_pml.csv")))) == 4


def test_crossover_runs_and_derives_thresholds(tmp_path):
    """benchmarks/crossover.py on two tiny sizes: a row per case and size, and thresholds for
    every routing key (no timing is asserted)."""
    import crossover

    rows = crossover.measure(sizes=(8, 12), reps=1)
    assert {r["case"] for r in rows} == set(crossover.CASES)
    assert all(r["fused_ms"] > 0 and r["eager_ms"] > 0 for r in rows)
    keys = crossover.thresholds(rows)
    assert set(keys) == {op for op, _ in crossover.CASES.values()}
    assert all(v in (0, 12, 13) for v in keys.values())
    fake = [dict(case="c", op="k", N=n, fused_ms=f, eager_ms=1.0, eager_over_fused=1.0 / f)
            for n, f in ((16, 3.0), (32, 0.5), (64, 1.04), (128, 0.5))]
    assert crossover.thresholds(fake) == {"k": 32}  # 1.04 is a tie (TIE = 1.05): fused
    fake[2]["fused_ms"] = 1.2
    assert crossover.thresholds(fake) == {"k": 128}
    assert "| k | 128 |" in "\n".join(crossover.markdown(fake))


def test_summary_has_a_line_per_shape():
    """An op measured at several shapes (the small batches, the demo's affinity shape) gets
    one summary line per shape, not only its last one."""
    base = dict(op="op", mode="fwd+bwd", data="random", D=2, K=3, peak_mib=1.0,
                fraction_of_floor=0.5, status="ok")
    rows = [dict(base, N=n, provider=p, median_ms=ms)
            for n in (8, 64) for p, ms in (("ours-cpu", 1.0 * n), ("eager", 3.0 * n))]
    lines = run.summary(rows)[2:]
    assert len(lines) == 2 and lines[0].startswith("| op (fwd+bwd) | 8 |")
    assert lines[1].startswith("| op (fwd+bwd) | 64 |") and "3.0×" in lines[1]


def test_retrieval_peers_find_the_same_neighbours():
    """The retrieval case's plain Gram + topk and faiss find our neighbours (no ties on random
    data), so the suite times the same work."""
    import pytest

    import confusion_kernels as ck
    import plain_formulations as plain

    g = torch.Generator().manual_seed(1)
    x = torch.randn(700, 16, generator=g)
    _, ours = ck.nearest_neighbors(x, k=12, metric="cosine")
    assert torch.equal(plain.retrieval_topk(x, 12, chunk=256), ours)
    faiss = pytest.importorskip("faiss", reason="needs faiss-cpu")
    u = torch.nn.functional.normalize(x, dim=1).numpy()
    index = faiss.IndexFlatIP(16)
    index.add(u)
    found = torch.from_numpy(index.search(u, 13)[1])
    assert torch.equal(found[:, 0], torch.arange(700)) and torch.equal(found[:, 1:], ours)
    case = suite_cases.retrieval_case(torch.device("cpu"), 300, 8, "clustered", 7)
    assert {"ours-cpu", "eager", "eager-plain", "compile-plain"} <= set(case.steps)
    for name in ("ours-cpu", "eager", "eager-plain"):
        case.steps[name]()
