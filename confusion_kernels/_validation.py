"""Input rules of docs/math.md, "Input rules", shared by every op: clear Python errors
before any kernel runs."""

from __future__ import annotations

import functools

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


def check_all_finite(t: torch.Tensor, name: str) -> None:
    """NaN/Inf scan of ``t`` (ValueError; see ``require``)."""
    require(torch.isfinite(t).all(),
            f"{name} contains NaN or Inf (pass check_finite=False to skip this scan)")


def check_label_range(labels: torch.Tensor, num_classes: int, what: str = "",
                      name: str = "labels") -> None:
    """Every label (or other index, called ``name``) in [0, num_classes) (ValueError; see
    ``require``)."""
    if torch.compiler.is_compiling():
        require((labels.min() >= 0) & (labels.max() < num_classes),
                f"{name} must lie in [0, {num_classes}){what}")
        return
    lo, hi = torch.stack([labels.min(), labels.max()]).tolist()  # one sync
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}){what}, got values in [{lo}, {hi}]")


def check_embeddings(x: torch.Tensor, name: str = "x", *, check_finite: bool = True) -> None:
    """x: floating 2-D [N, D] with N > 0, finite unless ``check_finite=False``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no rows (N = 0)")
    if check_finite:
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
