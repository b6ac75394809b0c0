"""Host-sync guard: prove on a CPU that a code path would never stall a CUDA stream.

On a GPU, reading a device tensor's values on the host (`.item()`, `.tolist()`, `.numpy()`,
`bool(t)`, `int(t)`) or running an op whose output size depends on the values (`nonzero`,
boolean-mask indexing, `masked_select`, `unique`, `repeat_interleave` without
`output_size`) waits for every kernel queued before it. Inside megatron's 1F1B schedule one
such read per micro-batch serializes the pipeline. On a CPU nothing waits, so the guard makes
those reads raise instead:

    with forbid_host_sync():          # tests: a stage's forward/backward step
        loss = step(batch)            # raises HostSyncError at the first read

Code that only ever runs on the CPU (the CPU attention kernel, which takes host arrays by
design and has a GPU counterpart that reads nothing) marks itself:

    with host_sync_ok("CPU attention kernel reads cu_seqlens"):
        cu_list = cu.tolist()

What the guard cannot see on a CPU: host-to-device copies from pageable memory
(`torch.tensor(list, device="cuda")`, `.to("cuda")` of a fresh CPU tensor), which CUDA also
performs synchronously. Whatever a loss needs from the host is therefore built when the
batch is packed and moved with it (`PackedBatch`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostSyncError(RuntimeError):
    """A tensor's values were read on the host inside `forbid_host_sync()`."""


_state = threading.local()


def _forbidden() -> bool:
    return getattr(_state, "forbid", 0) > 0 and getattr(_state, "allow", 0) == 0


# ops whose result (or output shape) needs the values on the host
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}


def _data_dependent(func, args, kwargs) -> bool:
    if func in _SYNC_OPS:
        return True
    if func is aten.repeat_interleave.Tensor:  # output size = sum(repeats) unless given
        return kwargs.get("output_size") is None and (len(args) < 2 or args[1] is None)
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx or ())
    return False


class _SyncMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _forbidden() and _data_dependent(func, args, kwargs):
            raise HostSyncError(
                f"{func} reads a tensor's values on the host (a CUDA stream sync per call); "
                "compute it when the batch is packed, or mark a CPU-only path host_sync_ok()"
            )
        return func(*args, **kwargs)


def _guarded(name: str):
    original = getattr(torch.Tensor, name)

    def method(self, *args, **kwargs):
        if _forbidden():
            raise HostSyncError(
                f"Tensor.{name}() reads a tensor's values on the host (a CUDA stream sync); "
                "compute it when the batch is packed, or mark a CPU-only path host_sync_ok()"
            )
        return original(self, *args, **kwargs)

    return original, method


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Inside: every host read of tensor values raises HostSyncError (module docstring)."""
    patched = {n: _guarded(n) for n in ("tolist", "numpy", "item")}
    for name, (_, method) in patched.items():
        setattr(torch.Tensor, name, method)
    _state.forbid = getattr(_state, "forbid", 0) + 1
    try:
        with _SyncMode():
            yield
    finally:
        _state.forbid -= 1
        for name, (original, _) in patched.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def host_sync_ok(reason: str) -> Iterator[None]:
    """Marks a CPU-only code path whose host reads have no GPU counterpart (`reason` says
    why); inside it `forbid_host_sync` lets reads through."""
    del reason  # documentation at the call site
    _state.allow = getattr(_state, "allow", 0) + 1
    try:
        yield
    finally:
        _state.allow -= 1
