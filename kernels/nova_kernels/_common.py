"""Helpers shared by the op modules (nova_kernels.ops.*): output allocation, poisoned under
test so that an element a kernel forgot to write shows; the accumulation dtype of the torch
paths; the row bounds of a padded or packed (cu_seqlens) layout inside a Triton kernel."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

_POISON = False  # set by `poisoned()` (tests): fresh outputs / workspaces start as garbage


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Inside: `empty` fills what it returns with NaN (floats), the most negative value
    (signed ints), the largest (unsigned) or True (bool). Tests wrap every kernel call in it."""
    global _POISON
    before, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = before


def _poison_value(dtype: torch.dtype) -> float | int | bool:
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        return True
    info = torch.iinfo(dtype)
    return info.min if info.min < 0 else info.max


def empty(*size, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """torch.empty(*size, dtype=, device=) for kernel outputs and workspaces: every op module
    allocates what a kernel writes through this one function (see `poisoned`)."""
    out = torch.empty(*size, dtype=dtype, device=device)
    if _POISON:
        out.fill_(_poison_value(dtype))
    return out


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation / statistics dtype of the torch paths: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@triton.jit
def _row_bounds(cu_ptr, rid, T, PACKED: tl.constexpr):
    """[start, end) (int64) of row `rid`: cu_seqlens[rid], cu_seqlens[rid + 1] when PACKED,
    else rid * T, rid * T + T (padded rows of length T)."""
    if PACKED:
        start = tl.load(cu_ptr + rid).to(tl.int64)
        end = tl.load(cu_ptr + rid + 1).to(tl.int64)
    else:
        start = rid.to(tl.int64) * T
        end = start + T
    return start, end
