"""Vocab-parallel plumbing shared by `linear_logprobs` and `linear_cross_entropy`: the exact
combination of per-rank softmax statistics over the TP group, the sequence-parallel gather /
reduce-scatter of hidden states, targets made local to a vocab shard, input checks, and the
backward of the losses whose gradients are formed in forward.
Shapes as in `nova_kernels.linear_logprobs` (N rows, H hidden, Vp vocab shard)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_info(group) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _tp_combine(m, s, a, t, group, tp: int, with_entropy: bool):
    """Exact combination of per-rank statistics: all_reduce(MAX) of m, all_reduce(SUM) of the
    rescaled [s, t, a]. Identity when tp == 1."""
    if tp == 1:
        return m, s, a, t
    M = m.clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    scale = torch.exp(m - M)
    parts = [s * scale, t] + ([scale * (a + (m - M) * s)] if with_entropy else [])
    buf = torch.stack(parts)
    dist.all_reduce(buf, group=group)
    return M, buf[0], (buf[2] if with_entropy else a), buf[1]


def _sp_gather(x_nH: torch.Tensor, group, tp: int) -> torch.Tensor:
    """[N/tp, H] -> [N, H], rank-major along the rows (megatron's sequence-parallel layout)."""
    x_nH = x_nH.contiguous()
    out = torch.empty(tp * x_nH.shape[0], *x_nH.shape[1:], device=x_nH.device, dtype=x_nH.dtype)
    dist.all_gather_into_tensor(out, x_nH, group=group)
    return out


def _reduce_grad_hidden(g_NH: torch.Tensor, group, tp: int, sp: bool) -> torch.Tensor:
    """Sum the per-shard grad_hidden over the TP group: reduce-scatter (SP) or all-reduce."""
    if tp == 1:
        return g_NH
    if sp:
        out = torch.empty(
            g_NH.shape[0] // tp, *g_NH.shape[1:], device=g_NH.device, dtype=g_NH.dtype
        )
        dist.reduce_scatter_tensor(out, g_NH.contiguous(), group=group)
        return out
    dist.all_reduce(g_NH, group=group)
    return g_NH


def _scale_saved_grads(ctx, g_loss: torch.Tensor) -> tuple:
    """Backward of a loss whose (grad_hidden, grad_weight) were formed in forward and saved:
    both scaled by the scalar upstream gradient (None where not needed)."""
    return tuple(g * g_loss.to(g.dtype) if g is not None else None for g in ctx.saved_tensors)


def _local_targets(targets_N, start: int, vp: int, ignore_index: int) -> torch.Tensor:
    """Global vocab ids -> ids local to the shard [start, start+vp), -1 elsewhere / ignored."""
    local = targets_N.long() - start
    keep = (targets_N != ignore_index) & (local >= 0) & (local < vp)
    return torch.where(keep, local, -1)


def _check(hidden, weight, targets, sequence_parallel: bool, tp: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"linear_logprobs: expected hidden [N, H], weight [Vp, H], targets [N]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_logprobs: hidden H={hidden.shape[1]} != weight H={weight.shape[1]}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_logprobs: hidden {hidden.dtype} != weight {weight.dtype}")
    n = hidden.shape[0] * (tp if sequence_parallel else 1)
    if targets.shape[0] != n:
        raise ValueError(f"linear_logprobs: targets has {targets.shape[0]} rows, expected {n}")
    if targets.dtype.is_floating_point:
        raise ValueError(f"linear_logprobs: targets must be integer ids, got {targets.dtype}")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"linear_logprobs: unsupported dtype {hidden.dtype}")
