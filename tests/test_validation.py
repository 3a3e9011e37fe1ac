"""Every input rule of docs/math.md, "Input rules" raises a clear Python exception."""

import re

import pytest
import torch

import confusion_kernels as ck

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
    with pytest.raises(ValueError, match=r"no features \(D = 0\)"):  # was an IndexError (cosine)
        fn(X[:, :0], Y, **({"metric": "cosine"} if "metric" in fn.__code__.co_names else {}))
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
        op(X, Y[:4], "euclidean", "direct")
    with pytest.raises(RuntimeError, match="labels must be int64"):
        op(X, Y.int(), "euclidean", "direct")
    with pytest.raises(RuntimeError, match="unknown metric 'chebyshev'"):
        op(X, Y, "chebyshev", "direct")
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        op(X[0], Y, "euclidean", "direct")
    with pytest.raises(RuntimeError, match="unknown algorithm 'gram'; expected direct, "
                                           "pair_pass or gram_tiles"):
        op(X, Y, "euclidean", "gram")
    with pytest.raises(RuntimeError, match="algorithm 'pair_pass' is a Gram form .*; manhattan "
                                           "runs 'direct'"):
        op(X, Y, "manhattan", "pair_pass")
    with pytest.raises(RuntimeError, match="algorithm 'gram_tiles' has no kernel on cpu; it runs "
                                           "'direct' or 'pair_pass'"):
        op(X, Y, "euclidean", "gram_tiles")


# --- the arguments that gave torch-internal or raw Python errors (issue: hardening, usability) ---
def test_arguments_on_another_device_are_named():
    meta = torch.device("meta")
    unit = torch.nn.functional.normalize(torch.randn(6, 3))
    with pytest.raises(ValueError, match="the memory is on meta but x is on cpu"):
        ck.as_loss(X, Y, memory=ck.CrossBatchMemory(5, 3, device=meta))
    with pytest.raises(ValueError, match="kappa is on meta but x is on cpu"):
        ck.vmf_nll(unit, unit, torch.ones(6, device=meta))
    with pytest.raises(ValueError, match="log_sigma is on meta but x is on cpu"):
        ck.gaussian_nll(unit, unit, torch.zeros(6, 1, device=meta))


def test_messages_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"ref has no rows \(M = 0\)"):
        ck.intra_inter_sums(X, Y, ref=X[:0], ref_labels=Y[:0])
    from confusion_kernels.ops import _op_checks

    with pytest.raises(ValueError, match=r"intra_inter_sums_rect_triton: ref_labels must be "
                                         r"1-D of length M = 4"):
        _op_checks.check_rect_row_sums(X, Y, X[:4], Y[:3], None, "euclidean")
    with pytest.raises(ValueError, match=r"weighted_pair_sums_with_grad_triton: w_in must be "
                                         r"1-D of length N = 6"):
        _op_checks.check_row_sums(X, Y, "euclidean", (torch.ones(5), torch.ones(6)),
                                  op="weighted_pair_sums_with_grad_triton",
                                  grad_names=("w_in", "w_out"))


@pytest.mark.parametrize("memory", [torch.randn(5, 3), [1, 2], "memory"])
def test_memory_must_be_a_cross_batch_memory(memory):
    with pytest.raises(TypeError, match="memory must be a confusion_kernels.CrossBatchMemory"):
        ck.as_loss(X, Y, memory=memory)
    with pytest.raises(TypeError, match="memory must be a confusion_kernels.CrossBatchMemory"):
        ck.ASLoss(memory=memory)


@pytest.mark.parametrize("name", ["alpha0", "decay"])
def test_ema_rates_must_be_numbers(name):
    with pytest.raises(TypeError, match=f"{name} must be a real number, got '0.3'"):
        ck.NCentroidsLoss(3, 4, **{name: "0.3"})


def test_statistics_check_labels_of_an_empty_batch():
    from confusion_kernels.analysis.statistics import ClassStatistics

    stats = ClassStatistics(3, 4)
    with pytest.raises(TypeError, match="integer"):
        stats.update(torch.randn(0, 4), torch.zeros(0))
    with pytest.raises(ValueError, match="labels has 2 entries but the embeddings have 0 rows"):
        stats.update(torch.randn(0, 4), torch.zeros(2, dtype=torch.int64))
    assert stats.update(torch.randn(0, 4), torch.zeros(0, dtype=torch.int64)) is stats


def test_vmf_needs_unit_rows():
    unit = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64))
    kappa = torch.full((6,), 3.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must have unit rows.*row 2 has norm 3"):
        ck.vmf_nll(unit * torch.tensor([1, 1, 3, 1, 1, 1.0])[:, None], unit, kappa)
    with pytest.raises(ValueError, match="mu must have unit rows"):
        ck.vmf_nll(unit, 2 * unit, kappa)
    with_zero = unit.clone()
    with_zero[1] = 0.0  # what normalising z = 0 gives: accepted
    assert torch.isfinite(ck.vmf_nll(with_zero, unit, kappa)).all()


def test_zero_dimensional_kappa_is_one_concentration_for_all():
    z = torch.randn(7, 4)
    crit = ck.NCentroidsLoss(3, 4)
    a = crit.confidence(z, kappa=torch.tensor(2.0))  # reported shape (1,) before
    b = crit.confidence(z, kappa=torch.full((7,), 2.0))
    assert torch.equal(a.log_likelihood, b.log_likelihood) and torch.equal(a.head, b.head)


def test_reference_cosine_keeps_near_parallel_digits():
    """1 - a.b / (|a||b|) in fp32 lost every digit on near-parallel rows (relative error 6.9
    against float64 on the same values); from the unit rows' difference it keeps fp32's."""
    from confusion_kernels.reference.pairwise import cdist_twice_differentiable

    if not cdist_twice_differentiable():
        pytest.skip(f"torch {torch.__version__} cannot differentiate torch.cdist twice: the "
                    "reference cosine keeps 1 - a.b / (|a||b|) there, for its second derivatives")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 16, generator=g, dtype=torch.float64)
         + 1e-4 * torch.randn(12, 16, generator=g, dtype=torch.float64)).float()
    y = torch.randint(0, 3, (12,), generator=g)
    got = ck.intra_inter_sums(x, y, "cosine", backend="reference")
    want = ck.intra_inter_sums(x.double(), y, "cosine", backend="reference")
    for g_, w_ in zip(got, want):
        assert float((g_.double() - w_).norm() / w_.norm()) < 1e-3


def test_compiled_check_failure_carries_our_message():
    """Under torch.compile(fullgraph=True) a failed check surfaces as Dynamo's
    "Observed exception" (torch does not let an exception out of a full graph as it is); its
    text carries our message. Without fullgraph our ValueError comes out as it is."""
    ref, ref_labels = torch.randn(12, 3), torch.randint(0, 3, (12,))

    def call(a):
        return ck.intra_inter_sums(a, Y, "euclidean", backend="reference", ref=ref,
                                   ref_labels=ref_labels, self_offset=10)
    message = r"self_offset must satisfy 0 <= self_offset and self_offset \+ N <= M"
    with pytest.raises(Exception) as info:
        torch.compile(call, fullgraph=True)(X)
    if "Observed exception" in str(info.value):  # torch 2.15; torch 2.6's Dynamo stops earlier
        assert re.search(message, str(info.value))
    with pytest.raises(ValueError, match=message):
        torch.compile(call)(X)


def test_interpreter_arithmetic_warnings_are_not_shown():
    """numpy warned (overflow, invalid value) in the Triton interpreter on inf input, where a
    GPU just computes IEEE results: 21,700 warnings in one test run."""
    import subprocess
    import sys

    code = ("import os, warnings\nos.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch, confusion_kernels as ck\n"
            "x = torch.randn(11, 40); x[4, 7] = float('inf'); y = torch.arange(11) % 3\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    ck.intra_inter_sums(x, y, backend='triton', check_finite=False)\n"
            "print('warnings', len(w))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if "warnings" not in out.stdout:
        pytest.skip(f"the triton backend cannot run here: {out.stderr.strip()[-200:]}")
    assert out.stdout.strip().endswith("warnings 0"), out.stdout


# --- every message names the function the user called ---------------------------------------
_U = torch.nn.functional.normalize(torch.randn(6, 3), dim=1)
ENTRIES = {  # name -> a call with a list instead of the embeddings
    "intra_inter_sums": lambda bad: ck.intra_inter_sums(bad, Y),
    "as_loss_terms": lambda bad: ck.as_loss_terms(bad, Y),
    "as_loss": lambda bad: ck.as_loss(bad, Y),
    "ASLoss": lambda bad: ck.ASLoss()(bad, Y),
    "affinity_loss": lambda bad: ck.affinity_loss(bad, Y, torch.randn(3, 2, 3)),
    "class_affinity": lambda bad: ck.class_affinity(bad, torch.randn(3, 2, 3)),
    "AffinityLoss": lambda bad: ck.AffinityLoss(3, 3)(bad, Y),
    "n_centroids_loss": lambda bad: ck.n_centroids_loss(bad, Y, _U[:3]),
    "NCentroidsLoss": lambda bad: ck.NCentroidsLoss(3, 3)(bad, Y),
    "NCentroidsLoss.predict": lambda bad: ck.NCentroidsLoss(3, 3).predict(bad),
    "vmf_nll": lambda bad: ck.vmf_nll(bad, _U, torch.ones(6)),
    "gaussian_nll": lambda bad: ck.gaussian_nll(bad, _U, torch.zeros(6, 1)),
    "ClassStatistics.update": lambda bad: ck.ClassStatistics(3, 3).update(bad, Y),
}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_each_message_names_the_function_the_user_called(entry):
    """A check deep inside (check_embeddings, or n_centroids_loss inside NCentroidsLoss)
    raised a message naming no function or another one; now it names the entry."""
    with pytest.raises((TypeError, ValueError)) as info:
        ENTRIES[entry](X.tolist())
    assert str(info.value).startswith(f"{entry}: "), str(info.value)
    assert str(info.value).count(": ") >= 1 and f"{entry}: {entry}" not in str(info.value)


def test_a_backend_that_cannot_run_is_named_by_the_entry():
    with pytest.raises(RuntimeError, match=r"^as_loss: backend='bogus' cannot run") as info:
        ck.as_loss(X, Y, backend="bogus")
    assert "confusion_kernels: " not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (257, 33)])
def test_all_finite_agrees_with_isfinite(dtype, shape):
    """The one-pass min/max scan behind check_all_finite finds every NaN and +-Inf, wherever
    it sits (first, last, middle element), in every floating dtype."""
    from confusion_kernels._validation import all_finite

    g = torch.Generator().manual_seed(len(shape) * 100 + shape[0])
    base = (torch.randn(shape, generator=g) * 100).to(dtype)
    assert bool(all_finite(base))
    for value in (float("nan"), float("inf"), -float("inf")):
        for pos in (0, base.numel() // 2, base.numel() - 1):
            t = base.clone().view(-1)
            t[pos] = value
            t = t.view(shape)
            assert bool(all_finite(t)) == bool(torch.isfinite(t).all()) is False
    assert bool(all_finite(base[:0]))
    assert bool(all_finite(torch.arange(5)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_rows_agrees_with_isfinite(dtype):
    """finite_rows (one |x| max pass per row) marks exactly the rows that hold a NaN or
    +-Inf, wherever it sits in the row; no features: every row is finite."""
    from confusion_kernels._validation import finite_rows

    g = torch.Generator().manual_seed(5)
    t = (torch.randn(40, 33, generator=g) * 100).to(dtype)
    for row, col, value in ((0, 0, float("nan")), (7, 32, float("inf")),
                            (8, 16, -float("inf")), (39, 1, float("nan"))):
        t[row, col] = value
    want = torch.isfinite(t).all(1)
    assert want.sum() == 36
    assert torch.equal(finite_rows(t), want)
    assert torch.equal(finite_rows(t[:, :0]), torch.ones(40, dtype=torch.bool))
    assert finite_rows(t[:0]).shape == (0,)
