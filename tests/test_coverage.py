"""A new public loss or op cannot land without its tests (docs/adding_an_op.md).

The losses and ops are read off the package (tests/conftest.py: LOSS_MODULES, LOSS_FUNCTIONS,
OPS); the guarantee tests are parametrised over those lists, and these tests check that each
one also has its own test file, a host-synchronisation training step and a benchmark row.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import confusion_kernels as ck

from conftest import LOSS_FUNCTIONS, LOSS_MODULES, OPS

ROOT = Path(__file__).resolve().parents[1]


def _module_stem(name: str) -> str:
    return getattr(ck, name).__module__.rsplit(".", 1)[1]


def test_the_lists_are_read_off_the_package():
    assert {"ASLoss", "AffinityLoss", "NCentroidsLoss"} <= set(LOSS_MODULES)
    assert {"as_loss", "affinity_loss", "n_centroids_loss"} <= set(LOSS_FUNCTIONS)
    assert all(callable(getattr(ck, n)) for n in LOSS_MODULES + LOSS_FUNCTIONS + OPS)


@pytest.mark.parametrize("name", LOSS_FUNCTIONS + OPS)
def test_each_loss_and_op_has_its_test_file(name):
    path = ROOT / "tests" / f"test_{_module_stem(name)}.py"
    assert path.exists(), f"{name} ({getattr(ck, name).__module__}) has no {path.name}"
    assert name in path.read_text(), f"{path.name} never calls {name}"


@pytest.mark.parametrize("name", LOSS_FUNCTIONS)
def test_each_loss_runs_its_training_step_without_host_synchronisation(name):
    text = (ROOT / "tests" / "test_host_sync.py").read_text()
    wanted = {f"def test_{name}_training_step", f"def test_{name.removesuffix('_loss')}_training_step"}
    assert any(w in text for w in wanted), f"tests/test_host_sync.py has no training step of {name}"


@pytest.mark.parametrize("name", LOSS_FUNCTIONS + OPS)
def test_each_loss_and_op_has_a_benchmark_row(name):
    cases = (ROOT / "benchmarks" / "suite_cases.py").read_text()
    stem = _module_stem(name)
    assert name in cases or stem in cases, f"benchmarks/suite_cases.py has no case of {name}"


def test_each_loss_module_wraps_a_loss_function():
    for name in LOSS_MODULES:
        module = importlib.import_module(getattr(ck, name).__module__)
        assert any(getattr(module, f, None) is getattr(ck, f) for f in LOSS_FUNCTIONS), name
