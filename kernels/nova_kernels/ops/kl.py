"""Per-token KL estimators k1 | k2 | k3 of log-probs against a reference's, as a
differentiable loss term (`kl_divergence`) or a reward penalty without gradient
(`kl_penalty`, verl's apply_kl_penalty). The estimator and its clamps are the ones the
policy loss uses (`_kl_value_grad` in nova_kernels.ops.policy_loss):

    logr = clamp(ref - logprobs, -20, 20)
    k1 = -logr,  k2 = logr^2 / 2,  k3 = exp(logr) - 1 - logr,  clamped to [-10, 10]

Shapes: logprobs and ref_logprobs of any (equal) shape; the KL is fp32, elementwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import interpreting, resolve_backend
from .._common import empty
from ..reference import kl_reference
from .policy_loss import KL_TYPES, _flat, _kl_value_grad

_GPU_BLOCK = 4096  # elements per program on GPU (nova_kernels._aot compiles this config)
_INTERP_BLOCK = 1024  # under the interpreter

# ----------------------------------------------------------------------------- Triton


@triton.jit
def _kl_fwd_kernel(
    lp_ptr,  # [N] log-probs
    ref_ptr,  # [N] reference log-probs
    kl_ptr,  # [N] fp32 out
    N,
    lr_clamp,
    val_clamp,
    KL_TYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lp = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    kl, _ = _kl_value_grad(lp, ref, lr_clamp, val_clamp, KL_TYPE)
    tl.store(kl_ptr + offs, kl, mask=ok)


@triton.jit
def _kl_bwd_kernel(
    lp_ptr,  # [N] log-probs
    ref_ptr,  # [N] reference log-probs
    gkl_ptr,  # [N] grad of the kl output
    dlp_ptr,  # [N] out: grad of logprobs (logprobs' dtype)
    N,
    lr_clamp,
    val_clamp,
    KL_TYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lp = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gkl = tl.load(gkl_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    _, dkl = _kl_value_grad(lp, ref, lr_clamp, val_clamp, KL_TYPE)
    tl.store(dlp_ptr + offs, (gkl * dkl).to(dlp_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launch


class _KLFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, ref, kl_type, lr_clamp, val_clamp):
        N = logprobs.numel()
        out = empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)
        block = _INTERP_BLOCK if interpreting() else _GPU_BLOCK
        args = (N, lr_clamp, val_clamp)
        meta = dict(KL_TYPE=KL_TYPES.index(kl_type), BLOCK=block)
        if N:
            grid = (triton.cdiv(N, block),)
            _kl_fwd_kernel[grid](_flat(logprobs), _flat(ref), out.view(-1), *args, **meta)
        ctx.save_for_backward(logprobs, ref)
        ctx.args, ctx.meta = args, meta
        return out

    @staticmethod
    def backward(ctx, gkl):
        logprobs, ref = ctx.saved_tensors
        dlp = empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
        N = logprobs.numel()
        if N:
            grid = (triton.cdiv(N, ctx.meta["BLOCK"]),)
            _kl_bwd_kernel[grid](
                _flat(logprobs), _flat(ref), _flat(gkl), dlp.view(-1), *ctx.args, **ctx.meta
            )
        return dlp, None, None, None, None


# ----------------------------------------------------------------------------- public


def kl_divergence(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kl_type: str = "k3",
    *,
    log_ratio_clamp: float | None = 20.0,
    value_clamp: float | None = 10.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token KL estimate k1 | k2 | k3 (Schulman) of logprobs vs ref_logprobs, any shape,
    fp32 out, differentiable w.r.t. logprobs (usable as a loss term)."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_divergence: kl_type={kl_type!r}, expected one of {KL_TYPES}")
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError("kl_divergence: ref_logprobs must be shaped like logprobs")
    if resolve_backend(backend) == "torch":
        return kl_reference(logprobs, ref_logprobs, kl_type, log_ratio_clamp, value_clamp).float()
    lrc = math.inf if log_ratio_clamp is None else float(log_ratio_clamp)
    vc = math.inf if value_clamp is None else float(value_clamp)
    return _KLFn.apply(logprobs, ref_logprobs.detach(), kl_type, lrc, vc)


def kl_penalty(
    rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_type: str = "k1",
    *,
    backend: str | None = None,
    **clamps,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL as a reward penalty (verl's apply_kl_penalty): token rewards - kl_coef * kl * mask.
    No gradient. Returns (penalized rewards fp32, per-token kl * mask fp32)."""
    with torch.no_grad():
        kl = kl_divergence(logprobs, ref_logprobs, kl_type, backend=backend, **clamps)
        kl = kl * (mask != 0)
        return rewards.float() - kl_coef * kl, kl
