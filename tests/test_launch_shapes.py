"""The Triton launchers' arithmetic as a GPU would see it, checked on the CPU: grids within
CUDA's limits at N = 2^24, enough programs to give every SM of an H100 / H200 work at the
benchmark shapes, and one TF32 rule for every op. The launchers' GPU configurations are
used (not the interpreter's), by making them believe they are not interpreted."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from confusion_kernels import _metrics  # noqa: E402
from confusion_kernels.triton import _support, affinity, class_stats, intra_inter_sums, n_centroids, pair_losses, pair_pass  # noqa: E402

MODULES = (affinity, intra_inter_sums, n_centroids, pair_pass, pair_losses)
MAX_X, MAX_YZ = 2**31 - 1, 65535
SMS = 132  # H100 / H200
BIG_N = 2**24


@pytest.fixture
def gpu_configs(monkeypatch):
    for module in MODULES:
        monkeypatch.setattr(module, "triton_interpreting", lambda: False)


def within_limits(grid: tuple[int, ...]) -> bool:
    x, *rest = grid
    return 1 <= x <= MAX_X and all(1 <= v <= MAX_YZ for v in rest)


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 128, 4096])
def test_grids_within_cuda_limits_at_n_2_pow_24(gpu_configs, dtype, d):
    x = torch.empty(0, dtype=dtype)
    for metric in (_metrics.EUCLIDEAN, _metrics.COSINE):
        for grad in (False, True):
            grids = pair_pass.launch_grids(BIG_N, pair_pass._config(dtype, grad, metric))
            assert all(within_limits(g) for g in (grids[0], grids[-1]))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for m in (1, BIG_N):
            grids = intra_inter_sums.launch_grids(BIG_N, d, intra_inter_sums._config(acc, metric),
                                                  m, 4 * SMS)
            for name in ("forward", "backward"):
                assert within_limits(grids[name]), (name, grids[name])
    for m in (1, 5, 64):
        cfg = affinity._config(x, m)
        grids = affinity.launch_grids(BIG_N, 100_000, d, cfg, 4 * SMS)
        for name in ("forward", "backward_f", "backward_w"):
            assert within_limits(grids[name]), (name, grids[name])
    for g in n_centroids.launch_grids(BIG_N, d, n_centroids._config(x)).values():
        assert within_limits(g), g
    assert within_limits(class_stats.grid(BIG_N, d))
    if dtype in (torch.float32, torch.float64):  # the pair losses' inputs
        for m in (1, BIG_N):
            grids = pair_losses.launch_grids(BIG_N, m, pair_losses._config(dtype), 4 * SMS)
            for name in ("stats", "grad_x", "grad_ref"):
                assert within_limits(grids[name]), (name, grids[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_losses_give_every_sm_work(gpu_configs, dtype):
    """At the benchmark's N = M = 4,096 the 128 row blocks alone would leave SMs idle: each
    launch is split to at least 2 programs per SM, and the splits' partials stay within
    a few copies of the rows."""
    grids = pair_losses.launch_grids(4096, 4096, pair_losses._config(dtype), 4 * SMS)
    for name in ("stats", "grad_x", "grad_ref"):
        programs = grids[name][0] * grids[name][1]
        assert 2 * SMS <= programs <= 8 * SMS, (name, grids[name])
        assert grids[name + "_splits"][0] <= 8


def test_pair_pass_launches_one_kernel_per_round(gpu_configs):
    """The schedule's cost in launches: T' - 1 rounds plus the diagonal (T = N / BLOCK).
    A known limit, not a goal: at N = 2^20 that is 32,768 launches of 32x32 tiles."""
    cfg = pair_pass._config(torch.float32, True)
    grids = pair_pass.launch_grids(2**20, cfg)
    t = 2**20 // cfg["BLOCK"]
    assert len(grids) == t and grids[0] == (t // 2,) and grids[-1] == (t,)


@pytest.mark.parametrize("n, classes, m, d", [(65536, 100, 1, 128), (65536, 100_000, 1, 512),
                                              (65536, 20_000, 5, 512), (4096, 10, 5, 64)])
def test_affinity_weight_gradient_gives_every_sm_work(gpu_configs, n, classes, m, d):
    """dL/dW's (class block, dim block) grid alone is 2 x 4 programs at C = 100, D = 128;
    the row splits bring every benchmark shape to at least 2 programs per SM (shares are
    whole row blocks, so up to half the target of 4), with partial sums bounded by about
    target x BLOCK_C MP x BLOCK_DO elements."""
    for dtype in DTYPES:
        cfg = affinity._config(torch.empty(0, dtype=dtype), m)
        grids = affinity.launch_grids(n, classes, d, cfg, 4 * SMS)
        programs = grids["backward_w"][0] * grids["backward_w"][1] * grids["backward_w"][2]
        splits, rows = grids["row_splits"]
        most = grids["backward_w"][0] * grids["backward_w"][1] * -(-n // cfg["BLOCK_M"])
        assert programs >= min(2 * SMS, most)
        assert splits * rows >= n > (splits - 1) * rows  # every row in exactly one share
        if splits > 1:
            partial = splits * classes * m * d
            assert partial <= 2 * 4 * SMS * cfg["BLOCK_C"] * cfg["MP"] * cfg["BLOCK_DO"]


def test_row_splits_cover_every_row_once():
    for n in (1, 31, 32, 33, 1000, 65537):
        for programs in (1, 3, 600):
            splits, rows = _support.shares(n, programs, 32, 528)
            assert rows % 32 == 0 and splits >= 1
            assert splits * rows >= n > (splits - 1) * rows


@pytest.mark.parametrize("n, d", [(16384, 128), (65536, 128), (262144, 128)])
def test_row_kernels_give_every_sm_work_at_benchmark_shapes(gpu_configs, n, d):
    """N-Centroids (row blocks), the direct passes (row blocks x column splits, row x dim
    blocks), a pair-pass round (N / 2 BLOCK block pairs), the affinity forward and class
    statistics at the sizes of ``benchmarks/run.py --suite gpu``: at least one program per
    SM. (Below N = 8,192 a pair-pass round has fewer block pairs than an H200 has SMs: not
    claimed; those batches take milliseconds.)"""
    for dtype in DTYPES:
        x = torch.empty(0, dtype=dtype)
        assert n_centroids.launch_grids(n, d, n_centroids._config(x))["forward"][0] >= SMS
        assert affinity.launch_grids(n, 1000, 512, affinity._config(x, 5), 4 * SMS)[
            "forward"][0] >= SMS
        for grad in (False, True):
            assert pair_pass.launch_grids(n, pair_pass._config(dtype, grad))[0][0] >= SMS
    grid = intra_inter_sums.launch_grids(n, d, intra_inter_sums._config(torch.float32))["backward"]
    assert grid[0] * grid[1] >= SMS
    assert class_stats.grid(1 << 20, 512)[0] >= SMS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", [_metrics.EUCLIDEAN, _metrics.COSINE])
def test_rectangular_forward_splits_its_columns(gpu_configs, dtype, metric):
    """The rectangular benchmark (4,096 rows against 65,536 reference rows, D = 64): its
    4,096 / BLOCK_M row blocks alone are 128 programs on 132 SMs (fp32), each over all
    65,536 columns; the columns are split into whole BLOCK_N shares until there are about
    4 programs per SM, each share's sums added in a fixed order afterwards."""
    cfg = intra_inter_sums._config(dtype, metric)
    grids = intra_inter_sums.launch_grids(4096, 64, cfg, 65536, 4 * SMS)
    rows, splits = grids["forward"]
    assert rows * splits >= 2 * SMS
    count, per_split = grids["column_splits"]
    assert count == splits and per_split % cfg["BLOCK_N"] == 0
    assert splits * per_split >= 65536 > (splits - 1) * per_split  # every column once
    # a square pass of many rows is not split (its row blocks are enough)
    assert intra_inter_sums.launch_grids(65536, 64, cfg, 65536, 4 * SMS)["forward"][1] == 1
    x_grad = intra_inter_sums.launch_grids(4096, 64, cfg)["backward"]
    assert x_grad[0] * x_grad[1] >= SMS


@pytest.mark.parametrize("allow", [False, True])
def test_one_tf32_rule_for_every_op(gpu_configs, allow):
    """10-bit-mantissa (tf32) products only when torch.backends.cuda.matmul.allow_tf32 says
    so, in every op and dtype; fp64 always exact."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        check_tf32_rule(allow)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def check_tf32_rule(allow: bool) -> None:
    for dtype in DTYPES:
        x = torch.empty(0, dtype=dtype)
        precisions = set(pair_pass._precisions_of(dtype))
        precisions |= {affinity._config(x, 1)["PREC"], n_centroids._config(x)["PREC"]}
        if dtype == torch.float64:
            assert precisions == {"ieee"}
        elif not allow:
            assert "tf32" not in precisions, (dtype, precisions)
        elif dtype == torch.float32:
            assert precisions == {"tf32"}
