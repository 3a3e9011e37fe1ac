"""GPU-only checks of the cuda and triton backends (skipped without CUDA).

The CPU-side suites (test_intra_inter_sums.py, test_as_loss.py, ...) already
run every backend, cuda and triton on the GPU included, when a GPU is present.
"""

import os
import subprocess
import sys

import pytest
import torch

import confusion_kernels as ck
from conftest import ALL_METRICS, make_batch, rel_error, require_backend

GPU_BACKENDS = ("cuda", "triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no CUDA device")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_bitwise_deterministic(backend, metric):
    device = require_backend(backend)
    x, labels = make_batch(3000, 40, 7, seed=1, device=device, dtype=torch.float32)
    results = []
    for _ in range(2):
        xr = x.clone().requires_grad_(True)
        s_in, s_out = ck.intra_inter_sums(xr, labels, metric, backend=backend)
        (s_in * 0.3 - s_out).sum().backward()
        results.append((s_in, s_out, xr.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def low_precision_reference(x: torch.Tensor, labels: torch.Tensor, metric: str):
    """The reference computed in x's own dtype (fp16/bf16): torch.cdist has no
    such CUDA kernel, so the distances are written out from differences."""
    if metric == "cosine":
        dist = ck.reference.pairwise_distances(x, metric=metric)
    else:
        diff = x[:, None, :] - x[None, :, :]
        if metric == "manhattan":
            dist = diff.abs().sum(-1)
        else:
            dist = diff.square().sum(-1)
            dist = dist.sqrt() if metric == "euclidean" else dist
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.where(same & ~eye, dist, 0).sum(1), torch.where(same, 0, dist).sum(1)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "manhattan", "cosine"])
def test_low_precision_within_twice_reference_error(backend, dtype, metric):
    """Error vs float64 at most 2x that of the reference computed in the same dtype
    (sizes kept small enough that the fp16 reference's sums do not overflow)."""
    device = require_backend(backend)
    x64, labels = make_batch(512, 16, 8, seed=2, device=device)
    x = x64.to(dtype)
    exact = ck.reference.intra_inter_sums(x64, labels, metric)
    ref_low = low_precision_reference(x, labels, metric)
    ours = ck.intra_inter_sums(x, labels, metric, backend=backend)
    for o, r, e in zip(ours, ref_low, exact):
        assert torch.isfinite(r).all()
        assert rel_error(o, e) <= 2 * rel_error(r, e)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n,d", [(65536, 128), (1048576, 2), (1048576, 128)])
def test_memory_linear_in_n(backend, n, d):
    """Peak memory of forward + backward stays within a bound linear in N*D."""
    device = require_backend(backend)
    x = torch.randn(n, d, device=device)
    labels = torch.randint(0, 1000, (n,), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    xr = x.clone().requires_grad_(True)
    s_in, s_out = ck.intra_inter_sums(xr, labels, "euclidean", backend=backend, check_finite=False)
    (s_in - s_out).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = 16 * (n * d * 4) + 64 * n + 2**20  # a handful of [N, D] and [N] buffers
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    assert torch.isfinite(xr.grad).all()


def test_cuda_gradcheck_on_device():
    require_backend("cuda")
    x, labels = make_batch(11, 5, 3, seed=3, device="cuda", duplicates=False)
    x.requires_grad_(True)
    for metric in ALL_METRICS:
        assert torch.autograd.gradcheck(
            lambda inp: ck.intra_inter_sums(inp, labels, metric, backend="cuda"), (x,),
            eps=1e-6, atol=1e-7, rtol=1e-6)


# Euclidean, sqeuclidean and cosine with D >= 9 take a Gram-form kernel: the
# full-tile kernels (csrc/cuda/gram_tile_kernels.cuh: fp32 / fp16 / bf16 on tensor
# cores or in fp32; fp64 goes to the pair pass), or under
# CONFUSION_KERNELS_CUDA_PAIR_PASS=1 the pair pass
# (csrc/cuda/pair_pass_kernels.cuh, every dtype, exact FMA arithmetic).
# Tolerances are those of the tensor cores.
GRAM_CASES = {  # name: (input dtype, allow_tf32, relative tolerance vs float64)
    "fp64": (torch.float64, False, 1e-10),
    "fp32": (torch.float32, False, 2e-5),
    "tf32": (torch.float32, True, 2e-2),
    "fp16": (torch.float16, False, 5e-3),
    "bf16": (torch.bfloat16, False, 3e-2),
}


@pytest.mark.parametrize("path", ["pair_pass", "full_tiles"])
@pytest.mark.parametrize("case", list(GRAM_CASES))
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("n,d", [(1, 9), (65, 24), (130, 33), (70, 129), (40, 300), (3000, 64)])
def test_gram_kernels_match_reference(path, case, metric, n, d, monkeypatch):
    require_backend("cuda")
    monkeypatch.setenv("CONFUSION_KERNELS_CUDA_PAIR_PASS", "1" if path == "pair_pass" else "0")
    dtype, tf32, tol = GRAM_CASES[case]
    x64, labels = make_batch(n, d, 5, seed=n + d, device="cuda")
    x = x64.to(dtype)
    xs = x.double().requires_grad_(True)  # the reference sees the stored input
    g_in = torch.randn(n, device="cuda", dtype=torch.float64)
    g_out = torch.randn(n, device="cuda", dtype=torch.float64)
    want = ck.reference.intra_inter_sums(xs, labels, metric)
    (want_grad,) = torch.autograd.grad((want[0] * g_in + want[1] * g_out).sum(), xs)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        xr = x.clone().requires_grad_(True)
        s_in, s_out = ck.intra_inter_sums(xr, labels, metric, backend="cuda")
        (grad,) = torch.autograd.grad((s_in * g_in.to(s_in.dtype) + s_out * g_out.to(s_out.dtype)).sum(), xr)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    for got, ref, what in ((s_in, want[0], "S_in"), (s_out, want[1], "S_out"), (grad, want_grad, "grad")):
        assert torch.isfinite(got).all(), what
        assert rel_error(got, ref) <= tol, f"{what} {case} {metric}: {rel_error(got, ref):.2e} > {tol}"


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kernel_switches_agree(metric):
    """The default Gram path (the full-tile kernels),
    CONFUSION_KERNELS_CUDA_EXACT=1 (every case to the difference-form kernel) and
    CONFUSION_KERNELS_CUDA_PAIR_PASS=1 (the pair pass) agree to fp32
    accuracy, forward and backward."""
    require_backend("cuda")
    code = (
        "import torch, confusion_kernels as ck;"
        "g = torch.Generator().manual_seed(0);"
        "x = torch.randn(700, 40, generator=g).cuda().requires_grad_(True);"
        "y = torch.randint(0, 4, (700,), generator=g).cuda();"
        "w = torch.rand(700, generator=g).cuda();"
        f"s_in, s_out = ck.intra_inter_sums(x, y, {metric!r}, backend='cuda');"
        "(grad,) = torch.autograd.grad((s_in * w + s_out).sum(), x);"
        "print(repr(s_in.sum().item()), repr(s_out.sum().item()), repr(grad.pow(2).sum().item()))"
    )
    values = []
    for env_flags in ({}, {"CONFUSION_KERNELS_CUDA_EXACT": "1"}, {"CONFUSION_KERNELS_CUDA_PAIR_PASS": "1"}):
        env = dict(os.environ, CONFUSION_KERNELS_CUDA_EXACT="0", CONFUSION_KERNELS_CUDA_PAIR_PASS="0")
        env.update(env_flags)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        values.append([float(v) for v in out.stdout.strip().splitlines()[-1].split()])
    for other in values[1:]:
        for got, want in zip(values[0], other):
            assert got != 0.0 and abs(got - want) <= 1e-4 * abs(want), (values, metric)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["contrastive_loss", "supcon_loss", "ntxent_loss",
                                  "multi_similarity_loss"])
def test_pair_losses_on_the_gpu(backend, name):
    """Several tiles of each backend (N = 5000 rows, a reference set of 9000), float64 against
    the reference, float32 bit for bit on a second run, and the peak memory far below the
    N x M matrix the reference holds."""
    device = require_backend(backend, "pair_loss_stats")
    fn = getattr(ck, name)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 64, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, 500, (5000,), generator=g).to(device)
    ref = torch.randn(9000, 64, generator=g, dtype=torch.float64).to(device)
    ref_labels = torch.randint(0, 500, (9000,), generator=g).to(device)
    for metric in ("euclidean", "cosine"):
        out = []
        for b in ("reference", backend):
            a = x.clone().requires_grad_(True)
            loss = fn(a, labels, ref, ref_labels, metric=metric, backend=b)
            out.append((loss, torch.autograd.grad(loss, a)[0]))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-8, atol=1e-12)
    runs = []
    for _ in range(2):
        a = x.float().requires_grad_(True)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss = fn(a, labels, backend=backend)
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device) - base
        runs.append((loss.detach(), a.grad))
    assert all(torch.equal(u, v) for u, v in zip(*runs))
    assert peak < 5000 * 5000 * 4, peak  # the N x N fp32 matrix
