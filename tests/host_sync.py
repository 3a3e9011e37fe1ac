"""``forbid_host_sync()``: raise on any operation that would make the host wait for a GPU.

On a CPU nothing waits, so the GPU path's Python is run on CPU tensors under two modes
that see every torch call: a dispatch mode (ATen ops, including those issued inside our
Python custom ops, whose implementations it runs under itself) and a function mode
(``Tensor.item`` / ``tolist`` / ``bool`` / ``numpy`` / ``cpu``, which reach no ATen op on
a CPU tensor). Triton's interpreter copies tensors to the host by design, so what runs
inside a Triton launch is exempt: on a GPU that is the kernel itself.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch._library.custom_ops import OPDEFS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that copy a device value to the host, or whose output size depends on the data
# (so the host reads a count from the device before it can allocate).
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_numpy", "aten::argwhere",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive", "aten::masked_select", "aten::bincount", "aten::histc",
    "aten::equal", "aten::is_nonzero", "aten::allclose", "aten::_assert_async",
    "aten::repeat_interleave.Tensor", "aten::item",
})
SYNC_METHODS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                          "numpy", "cpu", "nonzero", "unique", "bincount"})
BOOL_INDEX_OPS = frozenset({"aten::index", "aten::index_put_", "aten::index_put",
                            "aten::_index_put_impl_"})


class HostSyncError(AssertionError):
    pass


_state = threading.local()


def _in_launch() -> bool:
    return getattr(_state, "launch_depth", 0) > 0


def _fail(what: str) -> None:
    raise HostSyncError(f"host synchronisation on the GPU path: {what}")


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in (indices or ()) if i is not None)


class _DispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _in_launch():
            return func(*args, **kwargs)
        name = func.name()
        if name in SYNC_OPS or name.split(".")[0] in SYNC_OPS:
            _fail(name)
        if name.split(".")[0] in BOOL_INDEX_OPS and _bool_index(args):
            _fail(f"{name} with a boolean mask (a nonzero inside)")
        opdef = OPDEFS.get(name.split(".")[0])
        if opdef is not None:  # our Python custom ops: run their bodies under the guard
            with self, _FunctionGuard():
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


class _FunctionGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not _in_launch() and name in SYNC_METHODS:
            _fail(f"Tensor.{name}()" if name.islower() else name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _exempt_triton_launches():
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:
        yield
        return
    original = GridExecutor.__call__

    def launch(self, *args, **kwargs):
        _state.launch_depth = getattr(_state, "launch_depth", 0) + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _state.launch_depth -= 1

    GridExecutor.__call__ = launch
    try:
        yield
    finally:
        GridExecutor.__call__ = original


@contextlib.contextmanager
def forbid_host_sync():
    """Every torch call in the block that would wait for a GPU raises HostSyncError."""
    with _exempt_triton_launches(), _DispatchGuard(), _FunctionGuard():
        yield
