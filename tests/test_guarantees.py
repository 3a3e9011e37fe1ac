"""The package's promises, each tested on every backend CI can run (docs/design.md, "Guarantees"):
double backward, validation inside every registered op, the NaN policy, cosine at any
scale, torch.compile with default arguments, bitwise determinism, one dtype policy."""

import multiprocessing
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import confusion_kernels as ck
from confusion_kernels import _validation, analysis
from confusion_kernels.ops.affinity_hinge import affinity_hinge_rows
from confusion_kernels.reference import n_centroids as ncl
from conftest import LOSS_FUNCTIONS, LOSS_MODULES, OPS, require_backend

KERNELS = ["cpu", "triton", "cuda"]
ALL = ["reference", "cpu", "triton", "cuda"]
METRICS = ["euclidean", "sqeuclidean", "manhattan", "cosine", "smooth_l1"]


def _batch(n=11, d=5, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 3, 2][:n], device=device)
    return x, labels


def _prototypes(c=4, m=2, d=5, seed=1, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, m, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


# --- double backward --------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("what", ["intra_inter_sums", "as_loss", "affinity_rows", "affinity_loss"])
def test_double_backward_raises_on_kernel_backends(backend, what):
    op = "affinity_hinge" if what.startswith("affinity") else "intra_inter_sums"
    device = require_backend(backend, op)
    x, labels = _batch(device=device)
    x.requires_grad_(True)
    w = _prototypes(device=device).requires_grad_(True)
    if what == "intra_inter_sums":
        out = ck.intra_inter_sums(x, labels, "sqeuclidean", backend=backend)[0].sum()
    elif what == "as_loss":
        out = ck.as_loss(x, labels, metric="sqeuclidean", backend=backend)
    elif what == "affinity_rows":
        out = affinity_hinge_rows(x, labels, w, sigma=2.0, margin=0.5, similarity="gaussian",
                                  backend=backend).sum()
    else:
        out = ck.affinity_loss(x, labels, w, sigma=2.0, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, (x, w) if what.startswith("affinity") else x, create_graph=True,
                            allow_unused=True)
    # first-order gradients still work
    out = ck.as_loss(x, labels, metric="sqeuclidean", backend=backend) if op == "intra_inter_sums" \
        else ck.affinity_loss(x, labels, w, sigma=2.0, backend=backend)
    torch.autograd.grad(out, x)


def _cdist_is_twice_differentiable() -> bool:
    from confusion_kernels.reference.pairwise import cdist_twice_differentiable

    return cdist_twice_differentiable()


@pytest.mark.parametrize("metric", METRICS)
def test_reference_backend_gives_true_second_derivatives(metric):
    if metric in ("euclidean", "sqeuclidean", "manhattan") and not _cdist_is_twice_differentiable():
        pytest.skip(f"torch {torch.__version__}: torch.cdist has no double backward, which the "
                    f"reference's {metric} distance uses")
    x, labels = _batch(n=7, d=3, seed=3)
    x.requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda t: ck.as_loss(t, labels, metric=metric, backend="reference"), (x,))


def test_regularizer_and_affinity_reference_are_twice_differentiable():
    x, labels = _batch(n=6, d=3, seed=4)
    w = _prototypes(c=4, m=2, d=3).requires_grad_(True)
    x.requires_grad_(True)
    for method in ("pairwise", "moments"):
        assert torch.autograd.gradgradcheck(lambda t: ck.diversity_regularizer(t, method=method), (w,))
    assert torch.autograd.gradgradcheck(
        lambda a, b: ck.affinity_loss(a, labels, b, sigma=2.0, backend="reference"), (x, w))


# --- every registered op validates its own inputs ---------------------------------------
def _raw_affinity(backend):
    if backend == "triton":
        return torch.ops.confusion_kernels.affinity_hinge_triton
    return torch.ops.confusion_kernels.affinity_hinge


def _raw_sums(backend):
    if backend == "triton":
        return (torch.ops.confusion_kernels.intra_inter_sums_triton,
                torch.ops.confusion_kernels.intra_inter_sums_triton_backward)
    return (torch.ops.confusion_kernels.intra_inter_sums,
            torch.ops.confusion_kernels.intra_inter_sums_backward)


BAD_AFFINITY = {
    "label 2**40": dict(labels=[0, 1, 2, 0, 1, 2 ** 40]),
    "label -1": dict(labels=[0, 1, 2, 0, 1, -1]),
    "label 1000": dict(labels=[0, 1, 2, 0, 1, 1000]),
    "prototypes of another D": dict(w_shape=(3, 2, 5)),
    "labels shorter than N": dict(labels=[0, 1, 2, 0, 1]),
    "similarity 'laplace'": dict(similarity="laplace"),
    "sigma 0": dict(sigma=0.0),
}


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", sorted(BAD_AFFINITY))
def test_raw_affinity_op_rejects_bad_input(backend, case):
    device = require_backend(backend, "affinity_hinge")
    spec = dict(labels=[0, 1, 2, 0, 1, 2], w_shape=(3, 2, 4), similarity="gaussian", sigma=10.0)
    spec.update(BAD_AFFINITY[case])
    f = torch.randn(6, 4, device=device)
    w = torch.randn(*spec["w_shape"], device=device)
    labels = torch.tensor(spec["labels"], device=device)
    if case.startswith("label ") and not _validation.host_checks(f):
        # GPU tensors without strict checks: no host read of the labels; the op clamps them for
        # indexing (nothing is read out of bounds) and the bad row comes out NaN
        # (docs/design.md, "Host synchronisation")
        rows = _raw_affinity(backend)(f, w, labels, spec["sigma"], 0.5, spec["similarity"])[0]
        bad = torch.zeros(6, dtype=torch.bool)
        bad[5] = True
        assert rows.isnan().cpu().equal(bad), rows
        return
    with pytest.raises((ValueError, RuntimeError)):
        _raw_affinity(backend)(f, w, labels, spec["sigma"], 0.5, spec["similarity"])


@pytest.mark.parametrize("backend", KERNELS)
def test_raw_affinity_backward_rejects_short_per_row_tensors(backend):
    device = require_backend(backend, "affinity_hinge")
    f, w = torch.randn(6, 4, device=device), torch.randn(3, 2, 4, device=device)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    backward = (torch.ops.confusion_kernels.affinity_hinge_triton_backward if backend == "triton"
                else torch.ops.confusion_kernels.affinity_hinge_backward)
    short = torch.ones(5, device=device)
    with pytest.raises((ValueError, RuntimeError)):
        backward(short, f, w, labels, torch.ones(6, device=device), torch.ones(6, device=device),
                 10.0, 0.5, "gaussian")


@pytest.mark.parametrize("backend", KERNELS)
def test_raw_row_sums_ops_reject_bad_input(backend):
    device = require_backend(backend)
    fwd, bwd = _raw_sums(backend)
    x = torch.randn(6, 4, device=device)
    labels = torch.tensor([0, 1, 2, 0, 1, 1], device=device)
    e, a = "euclidean", "direct"
    for call in (lambda: fwd(x, labels, "chebyshev", a), lambda: fwd(x, labels, "", a),
                 lambda: fwd(x, labels[:5], e, a), lambda: fwd(x, labels.float(), e, a),
                 lambda: fwd(x[:0], labels[:0], e, a), lambda: fwd(x.int(), labels, e, a),
                 lambda: fwd(x, labels, e, "gram"), lambda: fwd(x, labels, "manhattan", "pair_pass"),
                 lambda: bwd(torch.randn(5, device=device), torch.randn(6, device=device), x,
                             labels, e, a),
                 lambda: bwd(torch.randn(6, device=device), torch.randn(7, device=device), x,
                             labels, e, a),
                 lambda: bwd(torch.randn(6, device=device), torch.randn(6, device=device), x,
                             labels, "L2", a),
                 lambda: bwd(torch.randn(6, device=device), torch.randn(6, device=device), x,
                             labels, e, "")):
        with pytest.raises((ValueError, RuntimeError)):
            call()


def test_triton_affinity_says_how_many_centres_it_takes():
    device = require_backend("triton", "affinity_hinge")
    f, labels = torch.randn(4, 3, device=device), torch.tensor([0, 1, 0, 1], device=device)
    with pytest.raises(ValueError, match="at most 64 prototypes per class, got m = 65; use "
                                         "backend='cpu' or 'cuda'"):
        ck.affinity_loss(f, labels, torch.randn(2, 65, 3, device=device), backend="triton")
    # the largest m it takes runs
    ck.affinity_loss(f, labels, torch.randn(2, 64, 3, device=device), backend="triton")


# --- NaN policy: with the scan off, non-finite in means non-finite out ------------------
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_give_the_references_non_finite_pattern(backend, metric, bad):
    device = require_backend(backend)
    x, labels = _batch(n=11, d=40, seed=5, device=device, dtype=torch.float32)
    x[4, 7] = bad
    s_in, s_out = ck.intra_inter_sums(x, labels, metric, backend=backend, check_finite=False)
    r_in, r_out = ck.intra_inter_sums(x.cpu().double(), labels.cpu(), metric, backend="reference",
                                      check_finite=False)
    # Inf can give Inf or NaN depending on the order of operations: compare finiteness
    assert torch.equal(torch.isfinite(s_in).cpu(), torch.isfinite(r_in))
    assert torch.equal(torch.isfinite(s_out).cpu(), torch.isfinite(r_out))
    assert not torch.isfinite(s_in).all()
    loss = ck.as_loss(x, labels, metric=metric, backend=backend, check_finite=False)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("where", ["f nan", "f inf", "prototype nan", "prototype inf"])
def test_affinity_loss_with_non_finite_input_is_not_finite(backend, where):
    device = require_backend(backend, "affinity_hinge") if backend != "reference" else "cpu"
    f, labels = _batch(n=9, d=5, seed=6, device=device, dtype=torch.float32)
    w = _prototypes(c=4, m=2, d=5, device=device, dtype=torch.float32)
    value = float("nan") if where.endswith("nan") else float("inf")
    if where.startswith("f"):
        f[3, 0] = value
    else:
        w[1, 0, 0] = value
    f.requires_grad_(True)
    w.requires_grad_(True)
    loss = ck.affinity_loss(f, labels, w, sigma=2.0, lambda_diversity=0.0, backend=backend,
                            check_finite=False)
    assert not torch.isfinite(loss)
    with pytest.raises(ValueError, match="NaN or Inf"):  # asked for: scanned on every device
        ck.affinity_loss(f, labels, w, sigma=2.0, backend=backend, check_finite=True)
    if _validation.host_checks(f):  # the default scans where that is free (CPU tensors)
        with pytest.raises(ValueError, match="NaN or Inf"):
            ck.affinity_loss(f, labels, w, sigma=2.0, backend=backend)
    else:  # GPU tensors: no scan by default, and the loss is not finite
        assert not torch.isfinite(ck.affinity_loss(f, labels, w, sigma=2.0, backend=backend))


# --- cosine is scale invariant at any scale ---------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("scale", [1e-3, 1e19, 3e19, 1e30, 1e38])
def test_cosine_at_any_row_norm(backend, scale):
    device = require_backend(backend) if backend != "reference" else "cpu"
    x, labels = _batch(n=11, d=16, seed=7, dtype=torch.float32)
    unit = x / x.norm(dim=1, keepdim=True)
    big = (unit * torch.linspace(0.5, 1.0, 11)[:, None] * scale).to(device).requires_grad_(True)
    s_in, s_out = ck.intra_inter_sums(big, labels.to(device), "cosine", backend=backend)
    (s_in + 2 * s_out).sum().backward()
    want = unit.double().requires_grad_(True)
    r_in, r_out = ck.reference.intra_inter_sums(want, labels, "cosine")
    (r_in + 2 * r_out).sum().backward()
    torch.testing.assert_close(s_in.double().cpu(), r_in.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_out.double().cpu(), r_out.detach(), rtol=1e-5, atol=1e-5)
    # dD/dx scales as 1/|x|: compare in units of the row norm
    norms = (torch.linspace(0.5, 1.0, 11)[:, None] * scale).double()
    got = big.grad.double().cpu() * norms
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want.grad, rtol=1e-4, atol=1e-4)


# --- torch.compile(fullgraph=True) with default arguments -------------------------------
@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_compile_fullgraph_with_default_arguments(backend):
    device = require_backend(backend, "affinity_hinge")
    x, labels = _batch(n=11, d=5, seed=8, device=device, dtype=torch.float32)
    w = _prototypes(c=4, m=2, d=5, device=device, dtype=torch.float32)

    def step(a, b):
        return ck.as_loss(a, labels, backend=backend) + ck.affinity_loss(a, labels, b,
                                                                         backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    eager, got = step(xa, wa), compiled(xb, wb)
    eager.backward()
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(wb.grad, wa.grad)
    if device.type == "cpu":
        bad = x.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(RuntimeError, match="NaN or Inf"):
            compiled(bad, w)


@pytest.mark.parametrize("loss_name", LOSS_MODULES)
def test_training_step_compiles_fullgraph_with_inductor(loss_name):
    """Two training steps of each loss module under torch.compile(fullgraph=True) with the
    default (Inductor) backend and default arguments (check_finite=True) equal eager: loss,
    input gradient, parameter gradients and buffers (the N-Centroids EMA centroids, step)."""
    import copy

    require_backend("cpu", "n_centroids_rows")
    from confusion_kernels.losses import n_centroids

    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if loss_name == "NCentroidsLoss" and version < n_centroids._COMPILED_EMA_MIN_TORCH:
        pytest.skip(f"torch {torch.__version__}: the EMA step stays eager before torch 2.15 "
                    "(2.6's Inductor reordered its buffer write), so fullgraph=True raises")
    torch.manual_seed(0)
    makers = {"ASLoss": lambda: ck.ASLoss(),
              "AffinityLoss": lambda: ck.AffinityLoss(4, 6, num_centers=2, sigma=2.0),
              "NCentroidsLoss": lambda: ck.NCentroidsLoss(4, 6)}
    assert loss_name in makers, f"a new loss module: add {loss_name} to this guarantee test"
    make = makers[loss_name]
    eager_mod = make()
    compiled_mod = copy.deepcopy(eager_mod)
    # other tests compile the same forward with other arguments (tests/test_n_centroids.py);
    # their graphs count toward Dynamo's recompile limit for the code object
    torch._dynamo.reset()
    compiled = torch.compile(compiled_mod, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        z = torch.randn(20, 6, generator=g)
        labels = torch.randint(0, 4, (20,), generator=g)
        za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        want, got = eager_mod(za, labels), compiled(zb, labels)
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(zb.grad, za.grad)
        for (name, a), b in zip(eager_mod.named_parameters(), compiled_mod.parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=name)
        for (name, a), b in zip(eager_mod.named_buffers(), compiled_mod.buffers()):
            torch.testing.assert_close(b, a, msg=name)


def test_compiled_nan_check_on_cuda_is_a_device_assert():
    """On CUDA the compiled NaN scan (check_finite=True: GPU tensors are not scanned by
    default) is a device-side assert: it ends the process's CUDA
    context (as every torch device assert does), so it runs in a child process, which
    must fail with the scan's message (on an H100 it took every later test of the
    process down with it when run in-process)."""
    require_backend("cuda", "affinity_hinge")
    code = (
        "import torch, confusion_kernels as ck\n"
        "x = torch.randn(11, 5, device='cuda'); x[0, 0] = float('nan')\n"
        "y = torch.randint(0, 3, (11,), device='cuda')\n"
        "f = torch.compile(lambda a: ck.as_loss(a, y, backend='cuda', check_finite=True),"
        " fullgraph=True,"
        " backend='aot_eager')\n"
        "f(x); torch.cuda.synchronize()\n"
        "print('no error')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "no error" not in out.stdout, out.stdout[-2000:]
    assert "NaN or Inf" in out.stderr, out.stderr[-3000:]


# --- bitwise determinism ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["pairwise", "moments"])
def test_diversity_regularizer_gradient_is_bitwise_reproducible(method):
    w = torch.randn(300, 3, 64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    g1, = torch.autograd.grad(ck.diversity_regularizer(w, method=method), w)
    g2, = torch.autograd.grad(ck.diversity_regularizer(w, method=method), w)
    assert torch.equal(g1, g2)
    want = ck.reference.affinity.diversity_regularizer(w.detach().double())
    torch.testing.assert_close(ck.diversity_regularizer(w.double(), method=method), want,
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", KERNELS)
def test_fused_losses_are_bitwise_reproducible(backend):
    device = require_backend(backend, "affinity_hinge")
    x, labels = _batch(n=11, d=40, seed=10, device=device, dtype=torch.float32)
    w = _prototypes(c=4, m=3, d=40, device=device, dtype=torch.float32)
    results = []
    for _ in range(2):
        a, b = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = ck.as_loss(a, labels, backend=backend) + ck.affinity_loss(a, labels, b,
                                                                         backend=backend)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_cpu_pair_kernels_do_not_depend_on_the_thread_count(metric):
    """The CPU pair pass (many tile pairs, run out of order by the threads) and the rectangular
    op's row-tile jobs give the same bits on 1 and 2 threads, and twice in a row."""
    require_backend("cpu", "intra_inter_sums")
    g = torch.Generator().manual_seed(12)
    n, m, d = 1500, 700, 24  # several tiles of both ops, ragged ends
    x = torch.randn(n, d, generator=g)
    x[7] = x[3]  # a duplicate: an exact pair
    labels = torch.randint(0, 5, (n,), generator=g)
    ref = torch.randn(m, d, generator=g)
    ref_labels = torch.randint(0, 5, (m,), generator=g)

    def run():
        a, r = x.clone().requires_grad_(True), ref.clone().requires_grad_(True)
        loss = ck.as_loss(a, labels, metric=metric, backend="cpu")
        s_in, s_out = ck.intra_inter_sums(a, labels, metric, ref=r, ref_labels=ref_labels,
                                          backend="cpu")
        (loss + s_in.sum() * 1e-3 - s_out.mean()).backward()
        return loss.detach(), s_in.detach(), s_out.detach(), a.grad, r.grad

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two, again = run(), run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again):
        assert torch.equal(b, c)
        assert torch.equal(a, b)


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def test_cpu_pair_pass_is_deterministic_beside_busy_processes():
    """Beside busy processes the pair pass's threads take tile pairs out of list order (a
    descheduled thread's tiles are passed over): the result is still the same bits as on one
    thread."""
    require_backend("cpu", "intra_inter_sums")
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2300, 16, generator=g)  # 6 row tiles (a class each): rounds to look ahead into
    labels = torch.randint(0, 6, (2300,), generator=g)

    def run():
        a = x.clone().requires_grad_(True)
        loss = ck.as_loss(a, labels, backend="cpu")
        loss.backward()
        return loss.detach(), a.grad

    threads = torch.get_num_threads()
    busy = [multiprocessing.get_context("fork").Process(target=_spin, args=(20.0,), daemon=True)
            for _ in range(2)]
    try:
        torch.set_num_threads(1)
        want = run()
        torch.set_num_threads(2)
        for p in busy:
            p.start()
        for _ in range(5):
            for got, expected in zip(run(), want):
                assert torch.equal(got, expected)
    finally:
        for p in busy:
            p.terminate()
            p.join(timeout=5)
        torch.set_num_threads(threads)



def test_cpu_kernels_leave_the_thread_count_as_they_found_it():
    """The CPU kernels run their set-up ATen calls on one thread (parallel_jobs.h, SerialAten)
    and must give torch's thread count back afterwards, also when they raise inside."""
    require_backend("cpu", "intra_inter_sums")
    g = torch.Generator().manual_seed(13)
    x = torch.randn(300, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (300,), generator=g)
    ref = torch.randn(200, 16, generator=g, requires_grad=True)
    ref_labels = torch.randint(0, 4, (200,), generator=g)
    z = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    z.requires_grad_(True)
    cents = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    ops = torch.ops.confusion_kernels
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ck.as_loss(x, labels, backend="cpu").backward()
        assert torch.get_num_threads() == 2
        for metric in ("euclidean", "cosine", "manhattan"):
            s_in, s_out = ck.intra_inter_sums(x, labels, metric, ref=ref, ref_labels=ref_labels,
                                              backend="cpu")
            (s_in.sum() + s_out.sum()).backward()
            assert torch.get_num_threads() == 2, metric
        ck.n_centroids_loss(z, labels, cents, backend="cpu").backward()
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="metric"):
            ops.intra_inter_sums_rect(x.detach(), labels, ref.detach(), ref_labels, None,
                                      "no-such-metric", "gram_tiles")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)

# --- one dtype policy -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_mixed_embedding_and_prototype_dtypes(backend):
    device = require_backend(backend, "affinity_hinge") if backend != "reference" else "cpu"
    f, labels = _batch(n=9, d=5, seed=11, device=device, dtype=torch.float32)
    w = _prototypes(c=4, m=2, d=5, device=device, dtype=torch.float64).requires_grad_(True)
    loss = ck.affinity_loss(f, labels, w, sigma=2.0, backend=backend)
    loss.backward()
    assert w.grad.dtype == torch.float64
    want = ck.reference.affinity.affinity_loss(f.double().cpu(), labels.cpu(), w.detach().float().double().cpu(),
                                      sigma=2.0)
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-5, atol=1e-6)


# --- small input rules ------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [np.float32(2.0), np.float64(2.0), torch.tensor(2.0), 2])
def test_sigma_accepts_numbers_numpy_scalars_and_0d_tensors(sigma):
    f, labels = _batch(n=9, d=5, seed=12)
    w = _prototypes(c=4, m=2, d=5)
    want = ck.affinity_loss(f, labels, w, sigma=2.0, backend="reference")
    torch.testing.assert_close(ck.affinity_loss(f, labels, w, sigma=sigma, backend="reference"), want)


def test_small_input_rules_raise_clear_errors():
    f, labels = _batch(n=9, d=5, seed=13)
    w = _prototypes(c=4, m=2, d=5)
    with pytest.raises(TypeError, match="sigma must be a real number"):
        ck.affinity_loss(f, labels, w, sigma="2")
    with pytest.raises(ValueError, match="D >= 1"):
        ck.diversity_regularizer(torch.zeros(3, 2, 0))
    with pytest.raises(ValueError, match=r"f has no features \(D = 0\)"):
        ck.affinity_loss(torch.zeros(9, 0, dtype=torch.float64), labels, torch.zeros(4, 2, 0))
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
        ck.class_affinity(f, w, chunk_rows=0)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        analysis.collect_statistics(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), [], 3)
    with pytest.raises(ValueError, match=r"y_true must lie in \[0, 3\)"):
        analysis.confusion_matrix([0, 1, 3], [0, 1, 2], 3)
    with pytest.raises(ValueError, match=r"y_pred must lie in \[0, 3\)"):
        analysis.confusion_matrix([0, 1, 2], [0, -1, 2], 3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        analysis.most_confused_pairs(np.eye(3), -1)
    conf = np.array([[5, 1, 0], [2, 5, 3], [0, 0, 4]])
    with pytest.raises(ValueError, match="similar_indices must be"):
        analysis.similar_vs_confused(np.array([[1], [0]]), conf)
    with pytest.raises(ValueError, match=r"similar_indices must lie in \[0, 3\)"):
        analysis.similar_vs_confused(np.array([[1], [7], [0]]), conf)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        analysis.similar_vs_confused(np.array([[1], [2], [0]]), conf, k=0)
    with pytest.raises(ValueError, match="hold no samples"):
        ck.similar_labels(ck.ClassStatistics(4, 3), k=2)
    stats = ck.ClassStatistics(4, 3).update(torch.randn(20, 3), torch.randint(0, 3, (20,)))
    with pytest.warns(RuntimeWarning, match=r"classes \[3\] have no samples"):
        ck.similar_labels(stats, k=2)


def test_extension_lists_every_op_of_the_library():
    from confusion_kernels import _extension

    if not _extension.HAS_C:
        pytest.skip("the C++ extension is not built")
    assert set(_extension.OPS) == {"intra_inter_sums", "intra_inter_sums_backward",
                                   "intra_inter_sums_rect", "intra_inter_sums_rect_backward",
                                   "affinity_hinge", "affinity_hinge_backward",
                                   "affinity_hinge_sum_with_grad", "class_shifted_sums",
                                   "weighted_pair_sums_with_grad", "n_centroids_rows",
                                   "n_centroids_rows_backward", "n_centroids_sum_with_grad",
                                   "pair_loss_stats", "pair_loss_backward",
                                   "nearest_neighbors"}


# --- torch.autocast: one policy on every backend ------------------------------------------
PAIR_LOSSES = ("contrastive_loss", "supcon_loss", "ntxent_loss", "multi_similarity_loss")
AUTOCAST = {"cpu": torch.bfloat16, "cuda": torch.float16}


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("loss_name", LOSS_FUNCTIONS + OPS)
def test_autocast_policy_is_the_same_on_every_backend(backend, loss_name):
    """Under torch.autocast (bf16 on CPU, fp16 on CUDA) a loss takes the 16-bit embeddings an
    autocast region produces, keeps its fp32 parameters (prototypes, centroids) in fp32,
    computes in fp32 and returns fp32: the value and gradient are bit for bit those of the
    same call without autocast, and equal the float64 reference on the same 16-bit values."""
    device = (torch.device("cpu") if backend == "reference"
              else require_backend(backend, "n_centroids_rows"))
    half = AUTOCAST[device.type]
    g = torch.Generator().manual_seed(21)
    z = (torch.randn(40, 8, generator=g) + 0.5).to(device=device, dtype=half)
    labels = torch.randint(0, 4, (40,), generator=g).to(device)
    w = (0.5 * torch.randn(4, 2, 8, generator=g)).to(device)
    c = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1).to(device)
    fns = {
        "as_loss": lambda a, be: ck.as_loss(a, labels, backend=be),
        "affinity_loss": lambda a, be: ck.affinity_loss(a, labels, w.to(a.dtype) if
                                                        a.dtype == torch.float64 else w,
                                                        sigma=3.0, backend=be),
        "n_centroids_loss": lambda a, be: ck.n_centroids_loss(
            a, labels, c.to(a.dtype) if a.dtype == torch.float64 else c, backend=be),
        "intra_inter_sums": lambda a, be: ck.intra_inter_sums(a, labels, "euclidean",
                                                              backend=be)[0].sum(),
        **{name: (lambda a, be, name=name: getattr(ck, name)(a, labels, backend=be))
           for name in PAIR_LOSSES},
    }
    assert loss_name in fns, f"a new loss: add {loss_name} to this guarantee test"
    fn = fns[loss_name]
    z64 = z.double().requires_grad_(True)
    want = fn(z64, "reference")
    want.backward()
    zh = z.clone().requires_grad_(True)
    with torch.autocast(device.type, dtype=half):
        got = fn(zh, backend)
    got.backward()
    assert got.dtype == torch.float32
    assert zh.grad.dtype == half
    zo = z.clone().requires_grad_(True)
    outside = fn(zo, backend)  # the same call without autocast: bit for bit the same
    outside.backward()
    torch.testing.assert_close(got, outside, rtol=0, atol=0)
    torch.testing.assert_close(zh.grad, zo.grad, rtol=0, atol=0)
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(zh.grad.double(), z64.grad, rtol=2e-2, atol=2e-3)


def test_cpp_ops_ignore_an_enclosing_autocast():
    """A direct torch.ops call inside an autocast region computes as outside it (the op's
    own matrix products are not re-cast to bf16)."""
    require_backend("cpu", "affinity_hinge")
    f, labels = _batch(n=11, d=5, seed=4, dtype=torch.float32)
    w = _prototypes(c=4, m=2, d=5, dtype=torch.float32)
    want = torch.ops.confusion_kernels.affinity_hinge(f, w, labels, 3.0, 0.5, "gaussian")[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.ops.confusion_kernels.affinity_hinge(f, w, labels, 3.0, 0.5, "gaussian")[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["n_centroids", "affinity"])
def test_compiled_reference_reports_labels_out_of_range(loss):
    """Under torch.compile the label-range check is a device-side assert that the graph may
    run after the indexing; the reference backend indexes with clamped labels there and
    poisons the bad rows, so the user sees the assert's message, or NaN where an older
    Inductor drops the assert (Inductor's bounds check failed first before: "index out of
    bounds", or an abort)."""
    z = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    y[2] = 3
    if loss == "n_centroids":
        c = ncl.normalize(torch.randn(3, 4))
        fn = torch.compile(lambda z, y: ck.n_centroids_loss(z, y, c, backend="reference"))
    else:
        w = torch.randn(3, 2, 4)
        fn = torch.compile(lambda z, y: ck.affinity_loss(z, y, w, backend="reference"))
    try:
        out = fn(z, y)
    except RuntimeError as err:
        assert "labels must lie in [0, 3)" in str(err)
    else:  # torch < 2.15's Inductor drops the device-side assert: then NaN, never a number
        assert torch.__version__ < "2.15" and out.isnan()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float64, 1e155)])
def test_euclidean_at_any_scale(backend, dtype, scale):
    """Entries of 1e20 in fp32 (1e155 in fp64): the true euclidean sums (~1e22) are finite, but
    the squares overflowed (cpu NaN from inf - inf; reference and triton inf). sqeuclidean
    sums are inf there, and must be inf (not NaN). Square op, rectangular op, one-pass loss."""
    device = "cpu" if backend == "reference" else require_backend(backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    xs, yd = (x * scale).to(dtype).to(device), y.to(device)
    want = ck.intra_inter_sums(x, y, "euclidean", backend="reference")
    got = ck.intra_inter_sums(xs, yd, "euclidean", backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu() / scale, b, rtol=1e-5, atol=1e-6)
    rect = ck.intra_inter_sums(xs[:7], yd[:7], "euclidean", backend=backend, ref=xs,
                               ref_labels=yd, self_offset=0)
    torch.testing.assert_close(rect[1].double().cpu() / scale,
                               ck.intra_inter_sums(x[:7], y[:7], "euclidean", backend="reference",
                                                   ref=x, ref_labels=y, self_offset=0)[1],
                               rtol=1e-5, atol=1e-6)
    sq = ck.intra_inter_sums(xs, yd, "sqeuclidean", backend=backend)
    assert not any(s.isnan().any() for s in sq)
    xr = xs.clone().requires_grad_(True)
    terms = ck.as_loss_terms(xr, yd, backend=backend)
    terms.outer.backward()
    assert torch.isfinite(terms.outer) and torch.isfinite(xr.grad).all()
