"""Input rules of docs/math.md, "Input rules", shared by every op: clear Python errors
before any kernel runs.

Checks of metadata (type, dtype, shape, device) always run: they cost nothing. Checks of
the *data* (the NaN/Inf scan, the label range) need the host to read a value from the
tensor, which on a GPU means waiting for every queued kernel (a host synchronisation,
which also rules out CUDA-graph capture). So they run on the host for CPU tensors, and on
other devices only when asked (``check_finite=True``, or ``strict_checks()``); otherwise the
kernels guard themselves (labels out of range are clamped for indexing and their rows come
out NaN) and non-finite input gives non-finite output (docs/design.md, "Host
synchronisation").
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def autocast_off(fn):
    """Runs ``fn(x, ...)`` with torch.autocast off for x's device type.

    The autocast policy of every loss: inputs keep the dtype they arrive in (16-bit
    embeddings from an autocast region stay 16-bit) and the dtype policy decides the compute
    dtype (16-bit computed in fp32, fp32 in fp32, fp64 in fp64; parameters such as
    prototypes join that dtype). Without this, autocast would run the reference's matrix
    products in bf16 / fp16 while the kernels compute in fp32, and the backends would differ.
    """

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def names_errors(entry: str):
    """Decorator of a public function or module ``forward``: the ValueError and TypeError it
    raises (and our RuntimeErrors, which begin with "confusion_kernels:") name it, so that a
    message always names the function the user called. A message that another entry inside
    it had already named gets this entry's name instead (NCentroidsLoss calls
    n_centroids_loss: the user called NCentroidsLoss). The exception keeps its type and
    traceback (its message is rewritten in place)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ValueError, TypeError, RuntimeError) as exc:
                _name_exception(exc, entry)
                raise

        return wrapper

    return deco


def _name_exception(exc: BaseException, entry: str) -> None:
    """Rewrites the message of one of our exceptions to begin with ``entry``."""
    if not exc.args or not isinstance(exc.args[0], str):
        return
    message = exc.args[0]
    if isinstance(exc, RuntimeError):  # ours only: the backend choice (_backend.py)
        if not message.startswith("confusion_kernels: "):
            return
        message = message[len("confusion_kernels: "):]
    elif not isinstance(exc, (ValueError, TypeError)):
        return
    inner = getattr(exc, "_ck_entry", None)
    if inner is not None and message.startswith(f"{inner}: "):
        message = message[len(inner) + 2:]
    if not message.startswith((f"{entry}: ", f"{entry}(")):
        message = f"{entry}: {message}"
    exc.args = (message, *exc.args[1:])
    exc._ck_entry = entry


class _CheckPolicy:
    # strict: data checks on the host on every device (env CONFUSION_KERNELS_STRICT_CHECKS=1)
    strict = os.environ.get("CONFUSION_KERNELS_STRICT_CHECKS", "") not in ("", "0")
    # tests only: treat CPU tensors as a GPU's, to run the GPU path's Python on the CPU
    cpu_as_gpu = False


def set_strict_checks(enabled: bool) -> None:
    """Run the data checks (NaN/Inf scan, label range) on the host for tensors on every device:
    a clear ``ValueError`` for bad input on a GPU too, at the cost of one host synchronisation
    per check. Off by default (environment: ``CONFUSION_KERNELS_STRICT_CHECKS=1``)."""
    _CheckPolicy.strict = bool(enabled)


@contextlib.contextmanager
def strict_checks(enabled: bool = True) -> Iterator[None]:
    """``set_strict_checks(enabled)`` for the block, restored after it."""
    before = _CheckPolicy.strict
    _CheckPolicy.strict = bool(enabled)
    try:
        yield
    finally:
        _CheckPolicy.strict = before


def host_checks(t: torch.Tensor) -> bool:
    """True where data checks of ``t`` run on the host: CPU tensors, or strict checks on."""
    return _CheckPolicy.strict or (t.device.type == "cpu" and not _CheckPolicy.cpu_as_gpu)


def reads_for_free(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s value costs no device synchronisation and no graph break: a CPU
    tensor (not treated as a GPU one, as the host-sync tests do) outside torch.compile. Host
    shortcuts (nothing to rescale; a finiteness test in Python) are taken only there."""
    return (t.device.type == "cpu" and not _CheckPolicy.cpu_as_gpu
            and not torch.compiler.is_compiling())


def scan_finite(check_finite: bool | None, t: torch.Tensor) -> bool:
    """Whether to scan ``t`` for NaN/Inf: ``check_finite`` when given, else ``host_checks(t)``."""
    return host_checks(t) if check_finite is None else bool(check_finite)


def require(condition: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the 0-d bool tensor ``condition`` holds.

    Eager: one host sync and a ValueError. Under torch.compile the check is
    traced as a device-side assert (``torch._assert_async``), so the graph has
    no data-dependent branch (fullgraph=True works) and bad input still fails
    with the same message at run time: a RuntimeError on CPU; on CUDA a device
    assert, after which the process's CUDA context is unusable.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool: no NaN or Inf in ``t``. One min/max pass (NaN propagates into both, an
    infinity shows in one); ``torch.isfinite(t).all()`` takes four passes on CPU."""
    if t.numel() == 0 or not (t.dtype.is_floating_point or t.dtype.is_complex):
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.dtype.is_complex:
        return torch.isfinite(t).all()
    lo, hi = torch.aminmax(t)
    if reads_for_free(t):
        # two Python floats: torch.isfinite on a 0-d tensor costs ~10 us a call on CPU
        return torch.tensor(math.isfinite(lo.item()) and math.isfinite(hi.item()))
    return torch.isfinite(lo) & torch.isfinite(hi)


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """[N] bool for t [N, D]: row i holds no NaN or Inf. Its largest |t_ik| is finite (amax
    propagates NaN): one vectorised pass, where ``torch.isfinite(t).all(1)`` takes several
    times as long on CPU (2.2 ms against 0.35 ms at 16384 x 128, measured)."""
    if t.shape[-1] == 0:
        return torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device)
    return torch.isfinite(t.abs().amax(-1))


def check_all_finite(t: torch.Tensor, name: str) -> None:
    """NaN/Inf scan of ``t`` (ValueError; see ``require``)."""
    require(all_finite(t),
            f"{name} contains NaN or Inf (pass check_finite=False to skip this scan)")


def check_label_range(labels: torch.Tensor, num_classes: int, what: str = "",
                      name: str = "labels", *, host: bool | None = None) -> None:
    """Every label (or other index, called ``name``) in [0, num_classes) (ValueError; see
    ``require``). Runs when ``host`` (default: ``host_checks(labels)``); otherwise the op
    that indexes with the labels guards them (``guard_label_range``)."""
    if not (host_checks(labels) if host is None else host) or labels.numel() == 0:
        return  # (no labels, none out of range: one rank's empty part of a global batch)
    if torch.compiler.is_compiling():
        require((labels.min() >= 0) & (labels.max() < num_classes),
                f"{name} must lie in [0, {num_classes}){what}")
        return
    lo, hi = torch.stack([labels.min(), labels.max()]).tolist()  # one sync
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}){what}, got values in [{lo}, {hi}]")


def compiled_index(labels: torch.Tensor,
                   num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(labels to index a table with, bad rows or None) after ``check_label_range``: as they
    are in eager mode (checked on the host). Under torch.compile the check is a device-side
    assert that the graph may run after the indexing (Inductor's own bounds check then fails
    first, without our message) or, in older torch, drop: the labels are clamped into
    [0, num_classes) and the bad rows returned, for ``poison_rows`` / ``poison_all`` (a NaN
    result where no assert fires, never a plausible number)."""
    if torch.compiler.is_compiling():
        return _clamped(labels, num_classes)
    return labels, None


def guard_label_range(labels: torch.Tensor, num_classes: int, what: str = "",
                      name: str = "labels") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(indices safe to index with, bad rows or None), for ops that index a table with labels.

    Host checks (``host_checks``): the ValueError of ``check_label_range``; the labels as they
    are and None. Otherwise no host synchronisation: out-of-range values are clamped into
    [0, num_classes) so that no kernel reads out of bounds, and the mask of those rows is
    returned for ``poison_rows`` (bad input, NaN output)."""
    if host_checks(labels):
        check_label_range(labels, num_classes, what, name, host=True)
        return labels, None
    return _clamped(labels, num_classes)


def _clamped(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels clamped into [0, num_classes), the rows whose label was outside)."""
    return labels.clamp(0, num_classes - 1), (labels < 0) | (labels >= num_classes)


def poison_rows(t: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """``t`` [N, ...] with NaN in the rows where ``bad`` [N] holds (unchanged for None)."""
    if bad is None:
        return t
    return t.masked_fill(bad.view(-1, *([1] * (t.dim() - 1))), float("nan"))


def poison_all(t: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """``t`` all NaN when any row is bad: for what every row contributes to (a sum, the
    gradient of a table) (unchanged for None)."""
    if bad is None:
        return t
    return t.masked_fill(bad.any(), float("nan"))


def check_embeddings(x: torch.Tensor, name: str = "x", *,
                     check_finite: bool | None = None, allow_empty: bool = False,
                     count: str = "N") -> None:
    """x: floating 2-D [N, D] with N > 0 (N = 0 too with ``allow_empty``: one rank's part of
    a global batch), finite when scanned (``scan_finite``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{count}, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} has no rows ({count} = 0)")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (D = 0): every distance would be 0 or "
                         "undefined")
    if scan_finite(check_finite, x):
        check_all_finite(x, name)


def check_labels(labels: torch.Tensor, n: int, device: torch.device,
                 name: str = "labels") -> torch.Tensor:
    """labels: 1-D integer of length n on ``device``; returned as contiguous int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the embeddings have {n} rows")
    if labels.device != device:
        raise ValueError(f"{name} are on {labels.device} but the embeddings are on {device}")
    return labels.to(torch.int64).contiguous()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What kernels accumulate in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp16/bf16 inputs, else the input dtype (docs/math.md, "Input rules")."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
