"""One source of truth for the facts Python, Triton and C++ / CUDA share (confusion_kernels/_spec.py).

The C++ header spec.h is generated from _spec.py; these tests fail when the committed header
is stale, and when a code or constant of _spec.py is defined again anywhere else.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from confusion_kernels import _metrics, _spec
from confusion_kernels.reference import n_centroids as ncl_reference

ROOT = Path(__file__).resolve().parents[1]
CPP_SOURCES = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")]
PY_SOURCES = [p for p in (ROOT / "confusion_kernels").rglob("*.py")]


def test_the_committed_header_is_generated_from_spec():
    assert _spec.HEADER.read_text() == _spec.header_text(), (
        "csrc/include/confusion_kernels/spec.h is stale: run `python -m confusion_kernels._spec`")


@pytest.mark.parametrize("pattern", [
    r"constexpr[^;=]*\bkCosineEps\s*=", r"constexpr[^;=]*\bkGramExactFraction\s*=",
    r"constexpr[^;=]*\bkNormEps\s*=", r"constexpr[^;=]*\bkDirectMaxDim\s*=",
    r"\bkGramMinDim\b", r"enum\s+Metric\b", r"enum\s+SphereMetric\b",
    r"\bkEuclidean\s*=\s*\d", r'\{\s*"euclidean"\s*,\s*kEuclidean',
])
def test_cpp_defines_no_shared_fact_twice(pattern):
    where = [str(p.relative_to(ROOT)) for p in CPP_SOURCES
             if p != _spec.HEADER and re.search(pattern, p.read_text())]
    assert not where, f"{pattern!r} is defined outside spec.h (generate it from _spec.py): {where}"


@pytest.mark.parametrize("pattern", [
    r"^\s*(COSINE_EPS|GRAM_EXACT_FRACTION|NORM_EPS|DIRECT_MAX_DIM|_DIRECT_MAX_DIM)\s*=\s*[0-9]",
    r'\{\s*"euclidean"\s*:\s*0\b', r'"great_circle"\s*:\s*\d',  # code tables
])
def test_python_defines_no_shared_fact_twice(pattern):
    here = Path(_spec.__file__).resolve()
    where = [str(p.relative_to(ROOT)) for p in PY_SOURCES
             if p.resolve() != here and re.search(pattern, p.read_text(), re.MULTILINE)]
    assert not where, f"{pattern!r} is written outside _spec.py: {where}"


def test_python_tables_come_from_spec():
    assert list(_metrics.METRIC_CODES) == list(_spec.PAIR_METRICS)
    assert [_metrics.METRIC_CODES[m] for m in _spec.PAIR_METRICS] == list(range(5))
    assert ncl_reference.METRICS == _spec.SPHERE_METRICS
    assert ncl_reference.NORM_EPS == _spec.NORM_EPS
    assert _metrics.COSINE_EPS == _spec.COSINE_EPS


def test_losses_package_exports_every_public_loss():
    """confusion_kernels.losses lists every public name of its modules (it exported 4 of 16)."""
    import importlib

    import confusion_kernels.losses as losses

    for module in ("affinity", "as_loss", "confidence", "memory", "n_centroids"):
        mod = importlib.import_module(f"confusion_kernels.losses.{module}")
        public = getattr(mod, "__all__", None) or [
            n for n, v in vars(mod).items() if not n.startswith("_") and callable(v)
            and getattr(v, "__module__", "") == mod.__name__]
        missing = [n for n in public if n not in losses.__all__]
        assert not missing, f"confusion_kernels.losses does not export {missing} of {module}"


LAYERS = {  # package -> the packages it must not import (the layering of docs/design.md)
    "reference": ("ops", "losses", "triton", "analysis", "demo"),
    "triton": ("ops", "losses", "analysis", "demo"),
    "ops": ("losses", "analysis", "demo", "pml"),
    "losses": ("analysis", "demo", "pml"),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_downwards_only(layer):
    """reference -> triton -> ops -> losses: a lower layer never imports a higher one (the
    ops <-> triton import circle of N-Centroids cannot come back)."""
    import ast

    bad = []
    for path in (ROOT / "confusion_kernels" / layer).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = (node.module or "").split(".")
                top = (target[0] if node.level >= 2 else
                       target[0] if node.level == 0 and target[0] != "confusion_kernels"
                       else target[1] if node.level == 0 and len(target) > 1 else None)
                if node.level == 1:
                    top = layer
                if top in LAYERS[layer]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {top}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "confusion_kernels" and len(parts) > 1 and \
                            parts[1] in LAYERS[layer]:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {parts[1]}")
    assert not bad, bad
