"""Per-sequence sum / mean of a per-token value over packed sequences (cu_seqlens), with backward.

    out_B = seq_reduce(values_T, cu_seqlens_B1, mask_T, reduction="sum" | "mean")

Legend: T tokens of a packed batch, B sequences, cu_seqlens [B+1] the sequence boundaries
(sequence b = tokens cu[b] ... cu[b+1]-1; tokens outside [cu[0], cu[B]) belong to none).
mask [T] (optional; nonzero = counted, e.g. the loss mask) selects the tokens that count:

    sum_b  = sum_{t in b} values_t * mask_t
    mean_b = sum_b / count_b,  count_b = sum_{t in b} mask_t   (0 when count_b == 0)

Used by DPO (sequence log-prob sums, length-normalized means), reward models and GRPO.
Output fp32 [B] (fp64 for fp64 values on the torch path, for gradchecks); grad_values_t = g_b * mask_t (/ count_b for the mean), 0 outside sequences,
in values' dtype. Triton: one program per sequence loops over its tokens (forward); the
backward is token-parallel over segment ids from torch.searchsorted (every token written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting, resolve_backend
from .._common import _acc_dtype, empty

_REDUCTIONS = ("sum", "mean")
# tokens per program on GPU (nova_kernels._aot compiles these configs) / under the interpreter
_GPU_BLOCK_FWD, _INTERP_BLOCK_FWD = 1024, 64
_GPU_BLOCK_BWD, _INTERP_BLOCK_BWD = 1024, 256


@triton.jit
def _seq_reduce_fwd_kernel(
    v_ptr,  # [T] values (any float dtype)
    m_ptr,  # [T] mask (nonzero = counted); read only HAS_MASK
    cu_ptr,  # [B+1] int32/int64 sequence boundaries
    out_ptr,  # [B] fp32 out: sum or mean
    cnt_ptr,  # [B] fp32 out: counted tokens
    MEAN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK], tl.float32)
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        ok = offs < end
        v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_MASK:
            w = (tl.load(m_ptr + offs, mask=ok, other=0) != 0).to(tl.float32)
        else:
            w = ok.to(tl.float32)
        acc += v * w
        cnt += w
    total = tl.sum(acc, 0)
    n = tl.sum(cnt, 0)
    if MEAN:
        total = tl.where(n > 0, total / tl.maximum(n, 1.0), 0.0)
    tl.store(out_ptr + b, total)
    tl.store(cnt_ptr + b, n)


@triton.jit
def _seq_reduce_bwd_kernel(
    seg_ptr,  # [T] int64 segment id of each token (B or -1 outside every sequence)
    m_ptr,  # [T] mask; read only HAS_MASK
    g_ptr,  # [B] fp32 upstream grad
    cnt_ptr,  # [B] fp32 counts (read only MEAN)
    dv_ptr,  # [T] out: grad of values (values' dtype)
    T,
    B,
    MEAN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < T
    seg = tl.load(seg_ptr + offs, mask=ok, other=-1)
    inside = ok & (seg >= 0) & (seg < B)
    g = tl.load(g_ptr + seg, mask=inside, other=0.0)
    if MEAN:
        n = tl.load(cnt_ptr + seg, mask=inside, other=1.0)
        g = g / tl.maximum(n, 1.0)
    if HAS_MASK:
        g = tl.where(tl.load(m_ptr + offs, mask=ok, other=0) != 0, g, 0.0)
    tl.store(dv_ptr + offs, g.to(dv_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers


def _segments(cu_B1: torch.Tensor, T: int) -> torch.Tensor:
    """[T] int64 sequence id of every token; -1 before cu[0], B at or after cu[B]."""
    tokens = torch.arange(T, device=cu_B1.device, dtype=cu_B1.dtype)
    return torch.searchsorted(cu_B1, tokens, right=True).long() - 1


def _fwd_triton(v_T, cu_B1, m_T, mean: bool):
    B = cu_B1.numel() - 1
    out = empty(B, device=v_T.device, dtype=torch.float32)
    cnt = empty(B, device=v_T.device, dtype=torch.float32)
    if B > 0:
        _seq_reduce_fwd_kernel[(B,)](
            v_T,
            m_T if m_T is not None else v_T,
            cu_B1,
            out,
            cnt,
            MEAN=mean,
            HAS_MASK=m_T is not None,
            BLOCK=_INTERP_BLOCK_FWD if interpreting() else _GPU_BLOCK_FWD,
        )
    return out, cnt


def _bwd_triton(g_B, cnt_B, cu_B1, m_T, T, dtype, mean: bool):
    B = g_B.numel()
    seg = _segments(cu_B1, T)
    dv = empty(T, device=g_B.device, dtype=dtype)
    block = _INTERP_BLOCK_BWD if interpreting() else _GPU_BLOCK_BWD
    if T > 0:
        _seq_reduce_bwd_kernel[(triton.cdiv(T, block),)](
            seg,
            m_T if m_T is not None else seg,
            g_B.contiguous(),
            cnt_B,
            dv,
            T,
            B,
            MEAN=mean,
            HAS_MASK=m_T is not None,
            BLOCK=block,
        )
    return dv


def _weights(m_T, T, device, dtype):
    return (m_T != 0).to(dtype) if m_T is not None else torch.ones(T, device=device, dtype=dtype)


def _fwd_torch(v_T, cu_B1, m_T, mean: bool):
    B, T = cu_B1.numel() - 1, v_T.numel()
    acc = _acc_dtype(v_T)
    seg = _segments(cu_B1, T)
    inside = (seg >= 0) & (seg < B)
    idx = torch.where(inside, seg, B)  # out-of-sequence tokens land in a dropped slot
    w = _weights(m_T, T, v_T.device, acc)
    zeros = torch.zeros(B + 1, device=v_T.device, dtype=acc)
    sums = zeros.clone().index_add_(0, idx, v_T.to(acc) * w)[:B]
    cnt = zeros.index_add_(0, idx, w)[:B]
    if mean:
        sums = torch.where(cnt > 0, sums / cnt.clamp_min(1.0), 0.0)
    return sums, cnt


def _bwd_torch(g_B, cnt_B, cu_B1, m_T, T, dtype, mean: bool):
    B = g_B.numel()
    acc = _acc_dtype(g_B)
    seg = _segments(cu_B1, T)
    inside = (seg >= 0) & (seg < B)
    g = g_B.to(acc) / cnt_B.clamp_min(1.0) if mean else g_B.to(acc)
    dv = torch.where(inside, g[seg.clamp(0, max(B - 1, 0))], 0.0) if B > 0 else g.new_zeros(T)
    return (dv * _weights(m_T, T, g_B.device, acc)).to(dtype)


_FWD = {"triton": _fwd_triton, "torch": _fwd_torch}
_BWD = {"triton": _bwd_triton, "torch": _bwd_torch}


class SeqReduceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values_T, cu_B1, mask_T, mean, backend):
        out, cnt = _FWD[backend](values_T, cu_B1, mask_T, mean)
        ctx.save_for_backward(cu_B1, mask_T, cnt)
        ctx.cfg = (values_T.numel(), values_T.dtype, mean, backend)
        ctx.mark_non_differentiable(cnt)
        return out, cnt

    @staticmethod
    def backward(ctx, g_out, _g_cnt):
        cu_B1, mask_T, cnt = ctx.saved_tensors
        T, dtype, mean, backend = ctx.cfg
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return _BWD[backend](g_out, cnt, cu_B1, mask_T, T, dtype, mean), None, None, None, None


def seq_reduce(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    reduction: str = "sum",
    return_counts: bool = False,
    backend: str | None = None,
):
    """Per-sequence sum or mean of values [T] over cu_seqlens [B+1] (optional mask [T]).

    Returns [B] fp32 (and the counted-token counts [B] with return_counts), differentiable
    w.r.t. values; fp64 in and out on the torch path for fp64 values. Mean over zero counted tokens is 0.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"seq_reduce: reduction={reduction!r}, expected one of {_REDUCTIONS}")
    if values.dim() != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"seq_reduce: expected values [T] and cu_seqlens [B+1]; got "
            f"{tuple(values.shape)} and {tuple(cu_seqlens.shape)}"
        )
    if mask is not None and mask.shape != values.shape:
        raise ValueError(f"seq_reduce: mask {tuple(mask.shape)} != values {tuple(values.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_reduce: cu_seqlens must be int32/int64, got {cu_seqlens.dtype}")
    backend = resolve_backend(backend)
    mask = mask.contiguous() if mask is not None else None
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.to(torch.uint8)
    out, cnt = SeqReduceFunction.apply(
        values.contiguous(), cu_seqlens.contiguous(), mask, reduction == "mean", backend
    )
    return (out, cnt) if return_counts else out
