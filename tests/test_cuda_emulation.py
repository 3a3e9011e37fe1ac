"""The CUDA kernels (csrc/cuda/gram_tile_kernels.cuh, affinity_kernels.cuh,
pair_pass_kernels.cuh, n_centroids_kernels.cuh, pair_loss_kernels.cuh,
nearest_neighbors_kernels.cuh) run on the CPU.

tests/cuda_emulation/cuda_host_shim.h compiles the kernel bodies unchanged as
C++ with one thread per CUDA thread, so the tiling, ragged edges, shared-memory
staging, barriers, WMMA operand layouts and the exact-pair fallback are checked
against the float64 reference here, on machines without a GPU. It cannot check
speed, registers or hardware limits: tests/test_cuda.py does on a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from confusion_kernels import _metrics
from confusion_kernels.reference import intra_inter_sums as reference_sums

from conftest import assert_rel, make_batch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests/cuda_emulation/gram_kernels_on_host.cpp",
           ROOT / "tests/cuda_emulation/cuda_host_shim.h",
           ROOT / "csrc/cuda/gram_tile_kernels.cuh",
           ROOT / "csrc/include/confusion_kernels/pair_math.h",
           ROOT / "csrc/include/confusion_kernels/spec.h"]

POLICIES = {"fp32": 0, "tf32": 1, "fp16": 2, "bf16": 3}
METRICS = {m: _metrics.METRIC_CODES[m] for m in ("euclidean", "sqeuclidean", "cosine")}
# Relative error bounds against the float64 reference evaluated on the
# operands as stored (fp16 / bf16 inputs are rounded first).
TOLERANCE = {"fp32": 2e-5, "tf32": 2e-2, "fp16": 5e-3, "bf16": 3e-2}
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block on sm_90 (sm_80: 163 KiB)


def _compiler() -> str:
    for cxx in ("g++", "c++", "clang++"):
        if shutil.which(cxx):
            return cxx
    pytest.skip("needs a C++20 compiler (g++ / clang++) to build the emulated CUDA kernels")


def _build(tmp_path_factory, source: Path, headers: list[Path]) -> ctypes.CDLL:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [source] + headers)).hexdigest()[:16]
    lib = tmp_path_factory.mktemp("cuda_emulation") / f"{source.stem}_{digest}.so"
    cmd = [_compiler(), "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC",
           f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cuda'}",
           f"-I{ROOT / 'tests/cuda_emulation'}", str(source), "-o", str(lib)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"emulated kernels do not compile:\n{result.stderr[-4000:]}"
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> ctypes.CDLL:
    dll = _build(tmp_path_factory, SOURCES[0], SOURCES[1:])
    dll.ck_gram_smem_bytes.restype = ctypes.c_int64
    return dll


@pytest.fixture(scope="session")
def affinity_kernels(tmp_path_factory) -> ctypes.CDLL:
    return _build(tmp_path_factory, ROOT / "tests/cuda_emulation/affinity_kernels_on_host.cpp",
                  [ROOT / "csrc/cuda/affinity_kernels.cuh", SOURCES[1],
                   ROOT / "csrc/include/confusion_kernels/affinity_math.h"])


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _operands(x: torch.Tensor, metric: str, policy: str):
    """What the host side (intra_inter_sums_cuda.cpp, gram_inputs) hands the kernels."""
    xa = x.float()
    if policy == "fp16":  # the input itself is fp16 / bf16; exact rows are its fp32 copy
        xa = x.half().float()
    elif policy == "bf16":
        xa = x.bfloat16().float()
    xa = xa.contiguous()
    half = policy in ("fp16", "bf16")

    def to_operand(t):
        return (t.half() if policy == "fp16" else t.bfloat16() if policy == "bf16" else t).contiguous()

    if metric == "cosine":
        sq = (xa * xa).sum(1).contiguous()
        norms = sq.sqrt().unsqueeze(1)
        op = to_operand(torch.where(norms > 0, xa / norms, torch.zeros_like(xa)))
    else:  # 16-bit inputs as stored (no second rounding); fp32 centred (center_for_gram)
        op = to_operand(xa if half else xa - xa.mean(0, keepdim=True))
        sq = (op.float() * op.float()).sum(1).contiguous()
    return op, xa, sq


def emulated_forward(kernels, x, labels, metric, policy):
    rows, xa, sq = _operands(x, metric, policy)
    n, d = x.shape
    s_in, s_out = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    labels = labels.contiguous()
    rc = kernels.ck_gram_forward(POLICIES[policy], METRICS[metric], _ptr(rows), _ptr(xa),
                                 _ptr(labels), _ptr(sq), ctypes.c_int64(n), ctypes.c_int64(d),
                                 _ptr(s_in), _ptr(s_out))
    assert rc == 0
    return s_in, s_out


def emulated_backward(kernels, x, labels, g_in, g_out, metric, policy):
    rows, xa, sq = _operands(x, metric, policy)
    n, d = x.shape
    grad = torch.full((n, d), float("nan"))
    g_in, g_out = g_in.float().contiguous(), g_out.float().contiguous()
    labels = labels.contiguous()
    rc = kernels.ck_gram_backward(POLICIES[policy], METRICS[metric], _ptr(rows), _ptr(xa),
                                  _ptr(labels), _ptr(sq), _ptr(g_in), _ptr(g_out),
                                  ctypes.c_int64(n), ctypes.c_int64(d), _ptr(grad))
    assert rc == 0
    return grad


def reference(x, labels, g_in, g_out, metric, policy):
    """float64 reference on the input as the kernel stores it."""
    xs = x.double()
    if policy == "fp16":
        xs = x.half().double()
    elif policy == "bf16":
        xs = x.bfloat16().double()
    xs = xs.clone().requires_grad_(True)
    s_in, s_out = reference_sums(xs, labels, metric)
    (grad,) = torch.autograd.grad((s_in * g_in.double() + s_out * g_out.double()).sum(), xs)
    return s_in.detach(), s_out.detach(), grad


def _check(kernels, x, labels, metric, policy, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    n = x.shape[0]
    g_in, g_out = torch.randn(n, generator=g), torch.randn(n, generator=g)
    want_in, want_out, want_grad = reference(x, labels, g_in, g_out, metric, policy)
    s_in, s_out = emulated_forward(kernels, x, labels, metric, policy)
    grad = emulated_backward(kernels, x, labels, g_in, g_out, metric, policy)
    tol = TOLERANCE[policy]
    what = f"{metric} {policy} N={n} D={x.shape[1]}"
    assert_rel(s_in, want_in, tol, f"S_in {what}")
    assert_rel(s_out, want_out, tol, f"S_out {what}")
    assert_rel(grad, want_grad, tol, f"grad {what}")


# (N, D): ragged row and column tiles (64), ragged 32-dim chunks, two and
# three 128-dim gradient blocks (grid.y), a single row.
SHAPES = [(1, 9), (5, 16), (64, 32), (65, 9), (130, 33), (70, 129), (40, 300)]


@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("n,d", SHAPES)
def test_fp32_exact_kernel_matches_reference(kernels, metric, n, d):
    x, labels = make_batch(n, d, 3, seed=n * 1000 + d)
    _check(kernels, x, labels, metric, "fp32", seed=n + d)


@pytest.mark.parametrize("policy", ["tf32", "fp16", "bf16"])
@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("n,d", [(65, 24), (70, 129)])
def test_tensor_core_kernels_match_reference(kernels, policy, metric, n, d):
    x, labels = make_batch(n, d, 4, seed=7 * n + d)
    _check(kernels, x, labels, metric, policy, seed=n)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("metric", list(METRICS))
def test_duplicate_rows_give_exact_zero(kernels, policy, metric):
    """Identical rows: distance 0 (not a Gram-form residue) and no gradient."""
    row = torch.randn(1, 20, generator=torch.Generator().manual_seed(3)) * 5
    x = row.repeat(70, 1)  # 70 > 64: two row tiles, all pairs identical
    labels = torch.zeros(70, dtype=torch.long)
    labels[::2] = 1
    s_in, s_out = emulated_forward(kernels, x, labels, metric, policy)
    assert torch.equal(s_in, torch.zeros(70)) and torch.equal(s_out, torch.zeros(70))
    grad = emulated_backward(kernels, x, labels, torch.ones(70), torch.ones(70), metric, policy)
    assert torch.equal(grad, torch.zeros(70, 20))


@pytest.mark.parametrize("metric", list(METRICS))
def test_tight_clusters_use_the_exact_pairs(kernels, metric):
    """Clusters of radius 1e-3 at distance 10 from the origin: every intra-class
    pair fails the Gram-form test and goes through the exact path."""
    g = torch.Generator().manual_seed(11)
    centers = torch.randn(3, 17, generator=g) * 10
    labels = torch.randint(0, 3, (90,), generator=g)
    x = centers[labels] + 1e-3 * torch.randn(90, 17, generator=g)
    _check(kernels, x.double(), labels, metric, "fp32", seed=5)


@pytest.mark.parametrize("policy", ["fp16", "bf16"])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_16bit_inputs_are_rounded_once(kernels, policy, metric):
    """A 16-bit input is used as stored: trained-like classes (radius 10, spread
    0.3) keep fp32 accuracy against the reference on the stored values. Centring
    and casting back to 16 bits (a second rounding) gave relative errors of
    5e-5 (fp16) to 6e-4 (bf16) here."""
    g = torch.Generator().manual_seed(12)
    centres = torch.randn(4, 64, generator=g)
    centres = 10 * centres / centres.norm(dim=1, keepdim=True)
    labels = torch.randint(0, 4, (70,), generator=g)
    x = centres[labels] + 0.3 * torch.randn(70, 64, generator=g)
    want_in, want_out, _ = reference(x, labels, torch.ones(70), torch.ones(70), metric, policy)
    s_in, s_out = emulated_forward(kernels, x, labels, metric, policy)
    assert_rel(s_in, want_in, 1e-5, f"S_in {metric} {policy}")
    assert_rel(s_out, want_out, 1e-5, f"S_out {metric} {policy}")


def test_single_class_and_singletons(kernels):
    x, _ = make_batch(67, 12, 1, seed=2)
    _check(kernels, x, torch.zeros(67, dtype=torch.long), "euclidean", "fp32")
    _check(kernels, x, torch.arange(67), "cosine", "fp32")


def test_cosine_zero_and_tiny_rows(kernels):
    """|a||b| <= eps takes the constant-denominator branch (docs/math.md, "Distances")."""
    x, labels = make_batch(20, 10, 2, seed=4)
    x[3] = 0.0
    x[7] = 1e-9
    _check(kernels, x, labels, "cosine", "fp32")


def test_shared_memory_fits_the_gpu(kernels):
    for policy, code in POLICIES.items():
        for backward in (0, 1):
            size = kernels.ck_gram_smem_bytes(code, backward)
            assert 0 < size <= SHARED_MEMORY_LIMIT, (policy, backward, size)


@pytest.mark.parametrize("metric", list(METRICS))
def test_exact_pair_coefficients_equal_the_exact_gradient(kernels, metric):
    """pair_grad_exact_coefficients (used by the tiled backward) equals
    pair_grad_exact_accumulate (used by the CPU kernel), in float64."""
    rng = np.random.default_rng(0)
    fn = kernels.ck_pair_grad_both
    dbl = ctypes.POINTER(ctypes.c_double)
    for case in range(6):
        d = int(rng.integers(1, 12))
        a = rng.standard_normal(d)
        b = a + 1e-6 * rng.standard_normal(d) if case == 1 else rng.standard_normal(d)
        if case == 2:
            b = a.copy()
        if case == 3:
            b = np.zeros(d)
        out1, out2 = np.zeros(d), np.zeros(d)
        fn(METRICS[metric], a.ctypes.data_as(dbl), b.ctypes.data_as(dbl), ctypes.c_int64(d),
           ctypes.c_double(0.7), out1.ctypes.data_as(dbl), out2.ctypes.data_as(dbl))
        np.testing.assert_allclose(out2, out1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("metric", list(METRICS))
def test_rows_far_from_the_origin(kernels, policy, metric):
    """Rows at distance 50 from the origin with spread 1 (centring keeps
    euclidean / sqeuclidean on the Gram path; cosine pairs are near-parallel
    and go exact)."""
    g = torch.Generator().manual_seed(9)
    x = 50.0 + torch.randn(96, 40, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (96,), generator=g)
    _check(kernels, x, labels, metric, policy, seed=3)


# ---------------------------------------------------------------------------
# Affinity epilogue kernels, driven the way affinity_tiles.h drives them
# (one tile: the problems below fit in a single row and class tile).
# ---------------------------------------------------------------------------
def _i64(t):
    return ctypes.c_int64(t)


def _dbl(v):
    return ctypes.c_double(v)


def emulated_affinity(lib, f, labels, w, g_rows, sigma, margin, kind):
    """(rows, grad_f, grad_w) of the hinge part through the emulated CUDA
    epilogues, with the host steps of affinity_tiles.h in torch."""
    n, d = f.shape
    c, m, _ = w.shape
    wf = w.reshape(c * m, d).contiguous()
    fn, wn = (f * f).sum(1).contiguous(), (wf * wf).sum(1).contiguous()
    labels = labels.contiguous()
    d_true, true_arg = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.int64)
    lib.ck_affinity_true_class(_ptr(f), _ptr(wf), _ptr(fn), _ptr(wn), _ptr(labels), _i64(n),
                               _i64(d), _i64(m), _dbl(sigma), _i64(kind), _ptr(d_true), _ptr(true_arg))
    g = (f @ wf.T).contiguous()
    d_tile, arg = torch.empty(n, c, dtype=torch.float64), torch.empty(n, c, dtype=torch.int64)
    lib.ck_affinity_similarity(_ptr(g), _ptr(fn), _ptr(wn), _i64(n), _i64(c), _i64(m), _dbl(sigma),
                               _i64(kind), _ptr(d_tile), _ptr(arg))
    h, on = torch.empty(n, c, dtype=torch.float64), torch.empty(n, c, dtype=torch.float64)
    null = ctypes.c_void_p(None)
    lib.ck_affinity_hinge(_ptr(d_tile), _ptr(arg), _i64(n), _i64(c), _i64(m), _i64(0),
                          _ptr(labels), _ptr(d_true), _dbl(sigma), _dbl(margin), _i64(kind), null,
                          null, _ptr(h), _ptr(on), null)
    rows, active = h.sum(1), on.sum(1)
    # backward_tiles: coefficients with the upstream gradient and own-class weight
    a = torch.zeros(n, c * m, dtype=torch.float64)
    g_rows = g_rows.contiguous()
    lib.ck_affinity_hinge(_ptr(d_tile), _ptr(arg), _i64(n), _i64(c), _i64(m), _i64(0),
                          _ptr(labels), _ptr(d_true), _dbl(sigma), _dbl(margin), _i64(kind),
                          _ptr(g_rows), _ptr(active), null, null, _ptr(a))
    grad_f = 2 * a.sum(1, keepdim=True) * f - 2 * a @ wf
    grad_w = 2 * a.sum(0)[:, None] * wf - 2 * a.T @ f
    return rows, grad_f, grad_w.reshape(c, m, d), d_true, true_arg


@pytest.mark.parametrize("n,c,m,d", [(1, 3, 1, 4), (70, 9, 3, 5), (300, 5, 5, 17), (40, 1, 2, 3)])
@pytest.mark.parametrize("kind", [0, 1])
def test_affinity_epilogue_kernels_match_reference(affinity_kernels, n, c, m, d, kind):
    from confusion_kernels.reference import affinity as ref

    g = torch.Generator().manual_seed(n + c + m + d)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, m, d, generator=g, dtype=torch.float64) * 0.7
    if m > 1:
        w[:, m - 1] = w[:, 0]  # ties: the first prototype takes the gradient
    labels = torch.randint(0, c, (n,), generator=g)
    f[0] = w[labels[0], 0]
    g_rows = torch.randn(n, generator=g, dtype=torch.float64)
    sim = "inverse" if kind else "gaussian"
    rows, gf, gw, d_true, _ = emulated_affinity(affinity_kernels, f, labels, w, g_rows, 3.0, 0.5, kind)
    fr, wr = f.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = ref.affinity_hinge_rows(fr, labels, wr, sigma=3.0, margin=0.5, similarity_kind=sim)
    (want * g_rows).sum().backward()
    assert_rel(rows, want.detach(), 1e-12, "rows")
    assert_rel(gf, fr.grad, 1e-10, "grad f")
    assert_rel(gw, wr.grad, 1e-10, "grad W")
    d_ref = ref.class_affinity(f, w, sigma=3.0, similarity_kind=sim).gather(1, labels[:, None])[:, 0]
    assert_rel(d_true, d_ref, 1e-12, "d_true")


# ---------------------------------------------------------------------------
# The pair pass (csrc/cuda/pair_pass_kernels.cuh): the one-pass
# ASLoss core on CUDA, every round and the diagonal launch as the host runs them.
# ---------------------------------------------------------------------------
PAIR_PASS_BLOCK = 32  # pair_pass::kBlock


@pytest.fixture(scope="session")
def pair_pass(tmp_path_factory) -> ctypes.CDLL:
    dll = _build(tmp_path_factory, ROOT / "tests/cuda_emulation/pair_pass_on_host.cpp",
                 [ROOT / "csrc/cuda/pair_pass_kernels.cuh", SOURCES[1], SOURCES[3]])
    dll.ck_pair_pass_smem_bytes.restype = ctypes.c_int64
    return dll


def _pair_pass_inputs(x, labels, metric):
    """What csrc/cuda/pair_pass_cuda.cu (sorted_rows.h, block_shifts) hands the kernel."""
    n, d = x.shape
    perm = torch.argsort(labels, stable=True)
    xs = x[perm].contiguous()
    cls = torch.unique_consecutive(labels[perm], return_inverse=True)[1].to(torch.int32).contiguous()
    if metric == "cosine":
        sq64 = (xs.double() ** 2).sum(1)
        norms = sq64.sqrt()[:, None]
        z = torch.where(norms > 0, xs.double() / norms, torch.zeros_like(xs.double())).to(x.dtype)
        sq = sq64.to(x.dtype)
    else:
        z, sq = xs, torch.zeros(n, dtype=x.dtype)
    blocks = -(-n // PAIR_PASS_BLOCK)
    padded = torch.zeros(blocks * PAIR_PASS_BLOCK, d, dtype=x.dtype)
    padded[:n] = z
    count = torch.zeros(blocks * PAIR_PASS_BLOCK, 1, dtype=x.dtype)
    count[:n] = 1
    shift = (padded.view(blocks, PAIR_PASS_BLOCK, d).sum(1)
             / count.view(blocks, PAIR_PASS_BLOCK, 1).sum(1).clamp_min(1)).contiguous()
    return perm, xs, z.contiguous(), sq.contiguous(), cls, shift


def emulated_pair_pass(dll, x, labels, metric, w_in=None, w_out=None):
    """grad: (t_in, t_out, dt_in/dx, dt_out/dx); without weights: (S_in, S_out)."""
    perm, xs, z, sq, cls, shift = _pair_pass_inputs(x, labels, metric)
    n, d = x.shape
    grad = w_in is not None
    wi = (w_in if grad else torch.zeros(n)).to(x.dtype)[perm].contiguous()
    wo = (w_out if grad else torch.zeros(n)).to(x.dtype)[perm].contiguous()
    t_in, t_out = torch.zeros(n, dtype=x.dtype), torch.zeros(n, dtype=x.dtype)
    g_in, g_out = torch.zeros_like(xs), torch.zeros_like(xs)
    gx_in, gx_out = torch.zeros_like(xs), torch.zeros_like(xs)
    rc = dll.ck_pair_pass(int(x.dtype == torch.float64), METRICS[metric], int(grad), _ptr(z),
                          _ptr(xs), _ptr(shift), _ptr(cls), _ptr(sq), _ptr(wi), _ptr(wo),
                          _ptr(t_in), _ptr(t_out), _ptr(g_in), _ptr(g_out), _ptr(gx_in),
                          _ptr(gx_out), ctypes.c_int64(n), ctypes.c_int64(d))
    assert rc == 0

    def unsort(v):
        out = torch.empty_like(v)
        out[perm] = v
        return out

    if not grad:
        return unsort(t_in), unsort(t_out)
    if metric == "cosine":  # unit-row gradients to x (unit_to_row_gradient), plus the eps terms
        inv = torch.where(sq > 0, 1 / sq.sqrt(), torch.zeros_like(sq))[:, None]
        g_in = (g_in - z * (g_in * z).sum(1, keepdim=True)) * inv + gx_in
        g_out = (g_out - z * (g_out * z).sum(1, keepdim=True)) * inv + gx_out
    return t_in.sum(), t_out.sum(), unsort(g_in), unsort(g_out)


def _weighted_reference(x, labels, metric, w_in, w_out):
    xs = x.double().clone().requires_grad_(True)
    s_in, s_out = reference_sums(xs, labels, metric)
    t_in, t_out = (w_in.double() * s_in).sum(), (w_out.double() * s_out).sum()
    g_in, = torch.autograd.grad(t_in, xs, retain_graph=True)
    g_out, = torch.autograd.grad(t_out, xs)
    return t_in.detach(), t_out.detach(), g_in, g_out, s_in.detach(), s_out.detach()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("n,d,classes,kind", [
    (5, 16, 2, "random"),       # one block
    (70, 33, 3, "random"),      # three blocks (an odd count: a padding block in every round)
    (100, 40, 1, "random"),     # one class: t_out = 0
    (97, 12, 40, "random"),     # many small classes, ragged last block
    (90, 17, 3, "clustered"),   # tight clusters far from the origin: exact pairs
])
def test_pair_pass_kernel_matches_reference(pair_pass, dtype, metric, n, d, classes, kind):
    g = torch.Generator().manual_seed(n * 31 + d)
    labels = torch.randint(0, classes, (n,), generator=g)
    if kind == "random":
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
    else:
        centres = 10 * torch.randn(classes, d, generator=g, dtype=torch.float64)
        x = centres[labels] + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x[n // 2] = x[0]  # a duplicate: distance 0, gradient 0
    if metric == "cosine" and n > 3:
        x[3] = 0.0  # a zero row: the eps branch
    x = x.to(dtype)
    w_in, w_out = torch.rand(n, generator=g), torch.rand(n, generator=g)
    want = _weighted_reference(x, labels, metric, w_in, w_out)
    got = emulated_pair_pass(pair_pass, x, labels, metric, w_in, w_out)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    what = f"{metric} {dtype} N={n} D={d} {kind}"
    for a, b, name in zip(got, want[:4], ("t_in", "t_out", "grad_in", "grad_out")):
        assert_rel(a, b, tol, f"{name} {what}")
    s_in, s_out = emulated_pair_pass(pair_pass, x, labels, metric)
    assert_rel(s_in, want[4], tol, f"S_in {what}")
    assert_rel(s_out, want[5], tol, f"S_out {what}")


def test_pair_pass_is_deterministic_and_fits_shared_memory(pair_pass):
    x, labels = make_batch(75, 20, 4, seed=8, dtype=torch.float32)
    w = torch.rand(75)
    first = emulated_pair_pass(pair_pass, x, labels, "euclidean", w, w.flip(0))
    second = emulated_pair_pass(pair_pass, x, labels, "euclidean", w, w.flip(0))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert pair_pass.ck_pair_pass_smem_bytes(1) <= 48 * 1024  # no opt-in needed, even in fp64


# ---------------------------------------------------------------------------
# The N-Centroids epilogues (csrc/cuda/n_centroids_kernels.cuh), with the host
# steps of n_centroids_tiles.h / n_centroids_cuda.cpp in torch.
# ---------------------------------------------------------------------------
SPHERE_METRICS = {"euclidean": 0, "cosine": 1, "great_circle": 2}


@pytest.fixture(scope="session")
def ncl_kernels(tmp_path_factory) -> ctypes.CDLL:
    return _build(tmp_path_factory, ROOT / "tests/cuda_emulation/n_centroids_kernels_on_host.cpp",
                  [ROOT / "csrc/cuda/n_centroids_kernels.cuh", SOURCES[1], SOURCES[3],
                   ROOT / "csrc/include/confusion_kernels/sphere_math.h"])


def emulated_n_centroids(lib, z, labels, c, g_rows, metric, c0, ct):
    """(rows, grad_z) of the N-Centroids rows with the centroid tiles c0.., ct wide, each
    through the emulated pairs / exact-gradient / direct kernels; the minimum, sums and
    products of the host side in torch."""
    from confusion_kernels.ops.n_centroids_rows import through_normalisation
    from confusion_kernels.reference import n_centroids as ncl

    n, d = z.shape
    k = c.shape[0]
    code = _i64(SPHERE_METRICS[metric])
    x = ncl.normalize(z).contiguous()
    xn, cn = (x * x).sum(1).contiguous(), (c * c).sum(1).contiguous()
    labels = labels.contiguous()
    weight = (g_rows / -(k - 1)).contiguous()
    best = torch.full((n,), float("inf"), dtype=torch.float64)
    best_k = torch.full((n,), -1, dtype=torch.int64)
    sums = torch.zeros(n, dtype=torch.float64)
    grad_x = torch.zeros(n, d, dtype=torch.float64)
    x_coef = torch.zeros(n, dtype=torch.float64)
    for k0 in range(0, k, ct):
        kt = min(ct, k - k0)
        ctile = c[k0:k0 + kt].contiguous()
        g = (x @ ctile.T).contiguous()
        dist, exact = torch.empty(n, kt, dtype=torch.float64), torch.empty(n, kt, dtype=torch.uint8)
        coef, alpha = torch.empty(n, kt, dtype=torch.float64), torch.empty(n, kt, dtype=torch.float64)
        lib.ck_ncl_pairs(_ptr(g), _ptr(x), _ptr(xn), _ptr(ctile), _ptr(cn[k0:k0 + kt].contiguous()),
                         _ptr(labels), _ptr(weight), _i64(n), _i64(kt), _i64(k0), _i64(d), code,
                         _ptr(dist), _ptr(exact), _ptr(coef), _ptr(alpha))
        lib.ck_ncl_exact_grad(_ptr(x), _ptr(ctile), _ptr(labels), _ptr(weight), _ptr(exact),
                              _i64(n), _i64(kt), _i64(k0), _i64(d), code, _ptr(grad_x))
        grad_x += coef @ ctile
        x_coef += alpha.sum(1)
        own = (labels[:, None] - k0) == torch.arange(kt)[None, :]
        sums += dist.masked_fill(own, 0.0).sum(1)
        tile_best, tile_k = dist.masked_fill(own, float("inf")).min(1)
        take = (~own).any(1) & ((tile_best < best) | (best_k < 0))
        best, best_k = torch.where(take, tile_best, best), torch.where(take, tile_k + k0, best_k)
    grad_x += x_coef[:, None] * x
    own_d, hard_d = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    g_rows = g_rows.contiguous()
    minus_g = (-g_rows).contiguous()
    lib.ck_ncl_direct(_ptr(x), _ptr(c), _ptr(labels), _ptr(g_rows), _i64(n), _i64(d), code,
                      _ptr(own_d), _ptr(grad_x))
    lib.ck_ncl_direct(_ptr(x), _ptr(c), _ptr(best_k), _ptr(minus_g), _i64(n), _i64(d), code,
                      _ptr(hard_d), _ptr(grad_x))
    rows = own_d - hard_d - sums / (k - 1)
    return rows, through_normalisation(z, x, grad_x)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "great_circle"])
@pytest.mark.parametrize("n,k,d,ct", [(1, 2, 3, 2), (40, 9, 5, 4), (23, 30, 7, 16)])
def test_n_centroids_epilogue_kernels_match_reference(ncl_kernels, metric, n, k, d, ct):
    from confusion_kernels.reference import n_centroids as ncl

    g = torch.Generator().manual_seed(n + k + d)
    c = ncl.normalize(torch.randn(k, d, generator=g, dtype=torch.float64)).contiguous()
    labels = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    if n > 4:
        other = (labels + 1) % k
        z[0] = c[labels[0]] * 2.0   # on the own centroid
        z[1] = c[other[1]] * 0.5    # on another centroid (an exact pair)
        z[2] = -c[other[2]]         # antipode of another centroid (exact for the angle)
        z[3] = c[other[3]] + 1e-4 * torch.randn(d, generator=g, dtype=torch.float64)
    g_rows = torch.randn(n, generator=g, dtype=torch.float64)
    rows, grad = emulated_n_centroids(ncl_kernels, z, labels, c, g_rows, metric, 0, ct)
    zr = z.clone().requires_grad_(True)
    x = ncl.normalize(zr)
    dist = ncl.sphere_distances(x, c, metric)
    is_own = torch.zeros_like(dist, dtype=torch.bool).scatter_(1, labels[:, None], True)
    want = (dist.gather(1, labels[:, None])[:, 0] - dist.masked_fill(is_own, float("inf")).min(1)[0]
            - dist.masked_fill(is_own, 0.0).sum(1) / (k - 1))
    (want * g_rows).sum().backward()
    assert_rel(rows, want.detach(), 1e-12, "rows")
    assert_rel(grad, zr.grad, 1e-10, "grad z")


# ---------------------------------------------------------------------------
# The pair losses (csrc/cuda/pair_loss_kernels.cuh), with the host steps of
# pair_losses_cuda.cpp in torch, against the C++ CPU op (itself tested against the
# reference in tests/test_pair_losses.py).
# ---------------------------------------------------------------------------
PAIR_LOSS_PARAMS = {"contrastive": (0, [0.15, 0.8]), "supcon": (1, [0.2]), "ntxent": (2, [0.1]),
                    "multi_similarity": (3, [2.0, 50.0, 0.5])}


@pytest.fixture(scope="session")
def pair_loss_kernels(tmp_path_factory) -> ctypes.CDLL:
    return _build(tmp_path_factory, ROOT / "tests/cuda_emulation/pair_loss_kernels_on_host.cpp",
                  [ROOT / "csrc/cuda/pair_loss_kernels.cuh", ROOT / "csrc/cuda/pair_loss_tile.h",
                   ROOT / "csrc/cuda/kernel_prelude.cuh",
                   SOURCES[1], SOURCES[3], SOURCES[4],
                   ROOT / "csrc/include/confusion_kernels/pair_loss_math.h"])


def emulated_pair_loss(lib, x, labels, ref, ref_labels, self_offset, loss, metric, grad_rows,
                       row_tile, ref_tile, threads):
    """((rows, stats), (grad_x, grad_ref)) of pair_losses_cuda.cpp's tile loops with tiles of
    row_tile x ref_tile pairs and blocks of ``threads``, the kernels emulated, cuBLAS's
    products in torch."""
    kind, params = PAIR_LOSS_PARAMS[loss]
    a, b, c = (params + [0.0, 0.0])[:3]
    consts = (_i64(kind), ctypes.c_double(a), ctypes.c_double(b), ctypes.c_double(c))
    cosine = ctypes.c_int(metric == "cosine")
    n, d = x.shape
    m = ref.shape[0]
    xn, rn = (x * x).sum(1).contiguous(), (ref * ref).sum(1).contiguous()
    block = ctypes.c_uint(threads)

    def tiles():
        for r0 in range(0, n, row_tile):
            rt = min(row_tile, n - r0)
            for c0 in range(0, m, ref_tile):
                ct = min(ref_tile, m - c0)
                g = (x[r0:r0 + rt] @ ref[c0:c0 + ct].T).contiguous()
                has_self = self_offset is not None
                delta = r0 + self_offset - c0 if has_self else 0
                args = (_ptr(g), _ptr(x[r0:]), _ptr(xn[r0:]), _ptr(labels[r0:]), _ptr(ref[c0:]),
                        _ptr(rn[c0:]), _ptr(ref_labels[c0:]), _i64(rt), _i64(ct), _i64(d),
                        _i64(delta), ctypes.c_int(has_self), cosine)
                yield r0, rt, c0, ct, args

    stats = torch.empty(n, 4, dtype=torch.float64)
    rows = torch.empty(n, 2 if loss == "contrastive" else 1, dtype=torch.float64)
    lib.ck_pl_row_step(consts[0], cosine, *consts[1:], _i64(n), 0, _ptr(stats), None, block)
    for second in (False, True):
        if second and loss != "ntxent":
            break
        for r0, _, _, _, args in tiles():
            lib.ck_pl_stats(*args, *consts, ctypes.c_int(second), _ptr(stats[r0:]), block)
        if not second:
            lib.ck_pl_row_step(consts[0], cosine, *consts[1:], _i64(n), 1, _ptr(stats), None,
                               block)
    lib.ck_pl_row_step(consts[0], cosine, *consts[1:], _i64(n), 2, _ptr(stats), _ptr(rows), block)

    grad_x, grad_ref = torch.zeros_like(x), torch.zeros_like(ref)
    sign = 1.0 if metric == "cosine" else -1.0
    for r0, rt, c0, ct, args in tiles():
        coef = torch.empty(rt, ct, dtype=torch.float64)
        near = torch.empty(rt, ct, dtype=torch.float64)
        lib.ck_pl_coefficients(*args, *consts, _ptr(stats[r0:]), _ptr(grad_rows[r0:]), _ptr(coef),
                               _ptr(near), block)
        xr, rc = x[r0:r0 + rt], ref[c0:c0 + ct]
        gx = grad_x[r0:r0 + rt]
        gr = grad_ref[c0:c0 + ct]
        gx += sign * (coef @ rc)
        gr += sign * (coef.T @ xr)
        if metric != "cosine":
            gx += xr * coef.sum(1, keepdim=True)
            gr += rc * coef.sum(0)[:, None]
            lib.ck_pl_near_grads(_ptr(xr), _ptr(rc), _i64(rt), _i64(ct), _i64(d), _ptr(near),
                                 _ptr(gx), _ptr(gr), block)
    return (rows, stats), (grad_x, grad_ref)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("loss", list(PAIR_LOSS_PARAMS))
def test_pair_loss_kernels_match_the_cpu_op(pair_loss_kernels, loss, metric):
    """Several row and reference tiles (ragged), blocks of 8 threads (a tree of 3 merges, a
    tile's columns not a multiple of 8), a left-out pair, duplicates (exact distance 0) and
    rows 1e-9 apart (the difference form), a one-sample class; float64 against the C++ CPU
    op's rows, statistics and gradients."""
    from confusion_kernels import _extension

    if not _extension.has_kernel("pair_loss_stats", "CPU"):
        pytest.skip("needs the C++ CPU kernel (the extension is not built)")
    g = torch.Generator().manual_seed(len(loss) + len(metric))
    n, d = 37, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (n,), generator=g)
    x[1], labels[1] = x[0], labels[0]
    x[3], labels[3] = x[2] + 1e-9, labels[2]
    x[5], labels[5] = x[4], (labels[4] + 1) % 4
    labels[6] = 9  # one sample
    extra = torch.randn(11, d, generator=g, dtype=torch.float64)
    ref = torch.cat([extra, x]).contiguous()
    ref_labels = torch.cat([torch.randint(0, 4, (11,), generator=g), labels]).contiguous()
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        ref = torch.nn.functional.normalize(ref, dim=1)
    grad_rows = torch.rand(n, 2 if loss == "contrastive" else 1, generator=g, dtype=torch.float64)
    kind, params = PAIR_LOSS_PARAMS[loss]
    ops = torch.ops.confusion_kernels
    # x as its own references through a copy: the CPU op's self path (the same tensor) returns
    # the whole gradient in dL/dx, this comparison wants the two parts
    for r, rl, offset in ((x.clone(), labels.clone(), 0), (ref, ref_labels, 11),
                          (extra, ref_labels[:11], None)):
        r = r.contiguous()
        (rows, stats), (gx, gr) = emulated_pair_loss(
            pair_loss_kernels, x, labels, r, rl.contiguous(), offset, loss, metric, grad_rows,
            row_tile=16, ref_tile=13, threads=8)
        want_rows, want_stats = ops.pair_loss_stats(x, labels, r, rl, offset, loss, params,
                                                    metric)
        want_gx, want_gr = ops.pair_loss_backward(grad_rows, want_stats, x, labels, r, rl, offset,
                                                  loss, params, metric)
        torch.testing.assert_close(rows, want_rows, rtol=1e-12, atol=1e-12)
        finite = torch.isfinite(want_stats)
        assert torch.equal(finite, torch.isfinite(stats))
        torch.testing.assert_close(stats[finite], want_stats[finite], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, want_gx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gr, want_gr, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# nearest_neighbors (csrc/cuda/nearest_neighbors_kernels.cuh), with the host loop of
# nearest_neighbors_cuda.cpp in torch, against the reference and the C++ CPU op.
# ---------------------------------------------------------------------------
NEIGHBOR_METRICS = {"euclidean": 0, "sqeuclidean": 1, "cosine": 2}


@pytest.fixture(scope="session")
def neighbor_kernels(tmp_path_factory) -> ctypes.CDLL:
    lib = _build(tmp_path_factory,
                 ROOT / "tests/cuda_emulation/nearest_neighbors_kernels_on_host.cpp",
                 [ROOT / "csrc/cuda/nearest_neighbors_kernels.cuh",
                  ROOT / "csrc/cuda/nearest_neighbors_tile.h",
                  ROOT / "csrc/cuda/kernel_prelude.cuh", SOURCES[1], SOURCES[3],
                  ROOT / "csrc/include/confusion_kernels/neighbor_math.h"])
    lib.ck_nn_list_bytes.restype = ctypes.c_int64
    return lib


def emulated_neighbors(lib, q, r, k, metric, self_offset, query_tile, ref_tile, threads):
    """(distances, indices) of nearest_neighbors_cuda.cpp's tile loop with tiles of
    query_tile x ref_tile and blocks of ``threads``, the kernels emulated, cuBLAS's Gram
    products in torch (float64)."""
    from confusion_kernels.reference.retrieval import neighbor_count

    n, d = q.shape
    m = r.shape[0]
    kk = neighbor_count(k, m, self_offset)
    code = _i64(NEIGHBOR_METRICS[metric])
    q_sq, r_sq = (q * q).sum(1).contiguous(), (r * r).sum(1).contiguous()
    keys = torch.full((n, kk), float("nan"), dtype=torch.float64)  # garbage until written
    index = torch.full((n, kk), -7, dtype=torch.long)
    count = torch.zeros(n, dtype=torch.long)
    block = ctypes.c_uint(threads)
    for r0 in range(0, n, query_tile):
        rt = min(query_tile, n - r0)
        for c0 in range(0, m, ref_tile):
            ct = min(ref_tile, m - c0)
            g = (q[r0:r0 + rt] @ r[c0:c0 + ct].T).contiguous()
            has_self = self_offset is not None
            delta = r0 + self_offset - c0 if has_self else 0
            lib.ck_nn_offer(_ptr(g), _ptr(r_sq[c0:]), _i64(rt), _i64(ct), _i64(c0), _i64(delta),
                            ctypes.c_int(has_self), code, _i64(kk), _ptr(keys[r0:]),
                            _ptr(index[r0:]), _ptr(count[r0:]), block)
    assert torch.all(count == kk), "every query holds K candidates after the last tile"
    dist = torch.empty(n, kk, dtype=torch.float64)
    out = torch.empty(n, kk, dtype=torch.long)
    lib.ck_nn_finish(_ptr(q), _ptr(q_sq), _ptr(r), _ptr(r_sq), _i64(n), _i64(d), _i64(kk), code,
                     _ptr(index), _ptr(dist), _ptr(out), block)
    return dist, out


def _neighbor_rows(seed, metric):
    """Random queries [37, 5] with a pair 1e-9 apart and, for cosine, a zero row; 11 extra
    references before them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 5, generator=g, dtype=torch.float64)
    x[3] = x[2] + 1e-9
    extra = torch.randn(11, 5, generator=g, dtype=torch.float64)
    if metric == "cosine":
        x[9] = 0.0
        x = torch.nn.functional.normalize(x, dim=1)
        extra = torch.nn.functional.normalize(extra, dim=1)
    return x.contiguous(), extra.contiguous()


def _check_neighbors(lib, x, r, k, metric, offset, **tiles):
    """The emulated kernels against the reference (indices equal) and scipy's cdist."""
    from scipy.spatial.distance import cdist

    from confusion_kernels.reference import retrieval as reference

    dist, idx = emulated_neighbors(lib, x, r, k, metric, offset, **tiles)
    want_dist, want_idx = reference.nearest_neighbors(x, r, k, metric, offset)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(dist, want_dist, rtol=1e-12, atol=1e-15)
    full = torch.from_numpy(np.nan_to_num(cdist(x.numpy(), r.numpy(), metric),
                                          nan=1.0))  # scipy: 0 / 0 for a zero row
    torch.testing.assert_close(dist, full.gather(1, idx), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("metric", list(NEIGHBOR_METRICS))
@pytest.mark.parametrize("k", [1, 3, 20, 100])
def test_neighbor_kernels_match_the_reference(neighbor_kernels, metric, k):
    """Several query and reference tiles (ragged), blocks of 8 threads (rounds of 8 columns,
    a tile of 13 not a multiple of them, lists cut inside a tile for k = 1 and 3 and carried
    over many tiles for k = 20), k beyond the references (100: every reference); the query's
    own row left out (self retrieval, and inside a larger reference set); float64 against the
    reference and scipy's cdist."""
    x, extra = _neighbor_rows(k + len(metric), metric)
    for r, offset in ((x, 0), (torch.cat([extra, x]).contiguous(), 11), (extra, None)):
        _check_neighbors(neighbor_kernels, x, r, k, metric, offset, query_tile=16, ref_tile=13,
                         threads=8)


@pytest.mark.parametrize("metric", list(NEIGHBOR_METRICS))
@pytest.mark.parametrize("k", [1, 2, 5])
def test_neighbor_kernels_break_exact_ties_by_index(neighbor_kernels, metric, k):
    """Rows whose Gram products are exact in any order (small integers; for cosine, signed
    multiples of unit vectors; no zero row: the reference's distance of orthogonal rows,
    cdist squared, is 1 + 2e-16, where the zero row's is 1), so duplicates and equal distances tie exactly
    in the kernels' keys too: equal keys in one round of entrants, across rounds and across
    reference tiles, at the K-th place, go to the lower index, as in the reference."""
    g = torch.Generator().manual_seed(k)
    if metric == "cosine":
        axes = torch.randint(0, 4, (60,), generator=g)
        x = torch.nn.functional.one_hot(axes, 4).double()
        x *= torch.randint(1, 4, (60, 1), generator=g) * (2 * torch.randint(0, 2, (60, 1),
                                                                             generator=g) - 1)
        x = torch.nn.functional.normalize(x, dim=1)
    else:
        x = torch.randint(-2, 3, (60, 4), generator=g).double()
    x[40] = x[3]
    for r, offset in ((x, 0), (x.flip(0).contiguous(), None)):
        _check_neighbors(neighbor_kernels, x, r, k, metric, offset, query_tile=23, ref_tile=17,
                         threads=8)


def test_neighbor_kernels_match_the_cpu_op(neighbor_kernels):
    """Many entrants per tile (clustered queries against 300 references in tiles of 64, lists
    of 5 cut every few rounds of 8) and the GPU's own tile sizes' shapes: the emulated kernels
    give the C++ CPU op's neighbours."""
    from confusion_kernels import _extension

    if not _extension.has_kernel("nearest_neighbors", "CPU"):
        pytest.skip("needs the C++ CPU kernel (the extension is not built)")
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(6, 16, generator=g, dtype=torch.float64) * 3
    r = (centers[torch.arange(300) % 6] + torch.randn(300, 16, generator=g,
                                                      dtype=torch.float64)).contiguous()
    q = (centers[torch.arange(21) % 6] + torch.randn(21, 16, generator=g,
                                                     dtype=torch.float64)).contiguous()
    for metric in NEIGHBOR_METRICS:
        qm, rm = q, r
        if metric == "cosine":
            qm = torch.nn.functional.normalize(q, dim=1)
            rm = torch.nn.functional.normalize(r, dim=1)
        dist, idx = emulated_neighbors(neighbor_kernels, qm, rm, 5, metric, None, query_tile=21,
                                       ref_tile=64, threads=8)
        want_dist, want_idx = torch.ops.confusion_kernels.nearest_neighbors(qm, rm, 5, metric,
                                                                            None)
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(dist, want_dist, rtol=1e-12, atol=1e-15)


def test_neighbor_lists_fit_the_default_shared_memory(neighbor_kernels):
    """The largest list (1024 neighbours, blocks of 256: 2048 entries) fits the 48 KiB a
    kernel gets without opting in, in float64 too."""
    assert neighbor_kernels.ck_nn_list_bytes(_i64(1024), ctypes.c_uint(256)) <= 48 * 1024
