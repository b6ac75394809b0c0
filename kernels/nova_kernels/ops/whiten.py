"""Masked whitening: normalize values by the mean and variance of the masked elements.

Semantics of verl's `masked_whiten` (used by GAE and REINFORCE++ advantages):

    n    = sum(mask)
    mean = sum(x * mask) / (n + 1e-8)
    var  = sum((x - mean)^2 * mask) / (n + 1e-8) * n / (n - 1)     (unbiased)
    out  = (x - mean) * rsqrt(var + eps)     [+ mean when shift_mean=False]

for EVERY element (masked-out ones included; callers multiply by the mask when they need
zeros there). With fewer than two masked elements the statistics mean nothing: verl raises;
here nothing is checked (that would cost a host sync) and the Bessel factor is taken as 1.

DP composition: `reduce(t, op)` (the caller's in-place all-reduce over its ranks; None =
this process alone) is called twice, op "sum", on fp32 tensors: first [2] = (masked sum,
count), then [1] = the centered sum of squares around the global mean (two passes: fp32 stays
accurate). The result is then the whitening over the concatenation of every rank's elements,
`nova_engine.rl.rollouts.whiten_dp`'s semantics. Deterministic (per-block partials summed by
torch.sum, no atomics) and without host sync.

Triton: two reduction passes over blocks (sum/count, then the centered sum of squares),
per-block partials summed by torch, then one elementwise pass. Any shape; statistics are
global over all elements (and ranks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .._backend import interpreting, resolve_backend
from .._common import empty

Reduce = Callable[[torch.Tensor, str], None]

_GPU_BLOCK = 4096  # elements per program on GPU (nova_kernels._aot compiles this config)
_INTERP_BLOCK = 1024  # under the interpreter


@triton.jit
def _partial_sums_kernel(
    x_ptr,  # [N] values
    m_ptr,  # [N] mask (nonzero = counted)
    stats_ptr,  # [2] fp32 (mean, rstd) — read only in the second pass (CENTERED)
    part_ptr,  # [n_blocks, 2] fp32 out: (sum, count) or (centered sum of squares, 0)
    N,
    CENTERED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = (tl.load(m_ptr + offs, mask=ok, other=0) != 0).to(tl.float32)
    if CENTERED:
        mean = tl.load(stats_ptr)
        d = (x - mean) * m
        tl.store(part_ptr + pid * 2, tl.sum(d * d, 0))
        tl.store(part_ptr + pid * 2 + 1, 0.0)
    else:
        tl.store(part_ptr + pid * 2, tl.sum(x * m, 0))
        tl.store(part_ptr + pid * 2 + 1, tl.sum(m, 0))


@triton.jit
def _apply_kernel(
    x_ptr,  # [N] values
    stats_ptr,  # [2] fp32 (mean, rstd)
    out_ptr,  # [N] fp32 out
    N,
    SHIFT_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr)
    rstd = tl.load(stats_ptr + 1)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y = y + mean
    tl.store(out_ptr + offs, y, mask=ok)


def _whiten_triton(x, m, shift_mean, eps, reduce):
    N = x.numel()
    xf = x.contiguous().view(-1)
    mf = m.contiguous().view(-1)
    if mf.dtype == torch.bool:
        mf = mf.view(torch.uint8)
    out = empty(x.shape, dtype=torch.float32, device=x.device)
    block = _INTERP_BLOCK if interpreting() else _GPU_BLOCK
    nb = triton.cdiv(N, block)
    part = empty((nb, 2), dtype=torch.float32, device=x.device)
    stats = torch.zeros(2, dtype=torch.float32, device=x.device)
    if nb:
        _partial_sums_kernel[(nb,)](xf, mf, stats, part, N, CENTERED=False, BLOCK=block)
    sums = part.sum(0)  # (masked sum, count); zeros when N == 0 (a rank may hold nothing)
    if reduce is not None:
        reduce(sums, "sum")
    n = sums[1]
    stats[0] = sums[0] / (n + 1e-8)
    if nb:
        _partial_sums_kernel[(nb,)](xf, mf, stats, part, N, CENTERED=True, BLOCK=block)
    ss = part[:, 0].sum().reshape(1)
    if reduce is not None:
        reduce(ss, "sum")
    stats[1] = torch.rsqrt(ss[0] / (n + 1e-8) * _bessel(n) + eps)
    if nb:
        _apply_kernel[(nb,)](xf, stats, out.view(-1), N, SHIFT_MEAN=shift_mean, BLOCK=block)
    return out


def _bessel(n: torch.Tensor) -> torch.Tensor:
    return torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))


def _whiten_torch(x, m, shift_mean, eps, reduce):
    xf = x.float()
    mf = (m != 0).float()
    sums = torch.stack([(xf * mf).sum(), mf.sum()])
    if reduce is not None:
        reduce(sums, "sum")
    n = sums[1]
    mean = sums[0] / (n + 1e-8)
    ss = ((xf - mean) ** 2 * mf).sum().reshape(1)
    if reduce is not None:
        reduce(ss, "sum")
    out = (xf - mean) * torch.rsqrt(ss[0] / (n + 1e-8) * _bessel(n) + eps)
    return out + mean if not shift_mean else out


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    backend: str | None = None,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Masked whitening. values: any shape float; mask: same shape (bool/int/float, nonzero =
    included in the statistics); reduce: None or the caller's in-place all-reduce
    `reduce(t, op)` over its DP ranks (two "sum" calls, module docstring). Returns fp32 of
    values' shape. No gradient, no host sync."""
    if mask.shape != values.shape:
        raise ValueError(f"whiten: mask {tuple(mask.shape)} != values {tuple(values.shape)}")
    with torch.no_grad():
        if resolve_backend(backend) == "torch":
            return _whiten_torch(values, mask, shift_mean, eps, reduce)
        return _whiten_triton(values, mask, shift_mean, eps, reduce)
