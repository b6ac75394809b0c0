"""Statistics of the step reduced over data-parallel ranks: group advantages and masked
whitening with the statistics of every rank's rows (`group` = the DP process group; None =
this process alone), so the per-rank results equal the single-process ones over the whole
step (to fp32 summation order). Group ids are GLOBAL (group_offset + prompt position): a
rank may hold only some groups, or part of one.

    adv_R, degenerate_G = group_advantages_dp(scores_R, gids_R, G, estimator="grpo", group=dp)
    white_T = whiten_dp(adv_T, mask_T, group=dp)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


@dataclass
class GroupStats:
    count: torch.Tensor  # [G] fp32 responses per group, over all ranks
    mean: torch.Tensor  # [G] fp32 (0 for empty groups)
    std: torch.Tensor  # [G] fp32 unbiased (0 for groups of < 2)
    degenerate: torch.Tensor  # [G] bool: all scores equal (size <= 1 included)


def group_stats_dp(
    scores_R: torch.Tensor, group_ids_R: torch.Tensor, num_groups: int, group=None
) -> GroupStats:
    """Per-group count, mean, unbiased std and "all equal" of the scores of every rank.

    scores_R [R] float, group_ids_R [R] int in [0, num_groups) (global ids); `group` the DP
    process group (None: this process alone). Three all-reduces on the scores' device
    (sums, then centered squares: two passes keep fp32 accurate; and max / -min)."""
    if scores_R.dim() != 1 or group_ids_R.shape != scores_R.shape:
        raise ValueError("group_stats_dp: scores and group_ids must both be [R]")
    dev, G = scores_R.device, int(num_groups)
    x, ids = scores_R.float(), group_ids_R.to(dev).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= G):
        raise ValueError(f"group_stats_dp: group ids must lie in [0, {G})")
    sums = torch.zeros(2, G, device=dev)
    sums[0].index_add_(0, ids, torch.ones_like(x))
    sums[1].index_add_(0, ids, x)
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    n = sums[0]
    mean = sums[1] / n.clamp_min(1)
    ss = torch.zeros(G, device=dev).index_add_(0, ids, (x - mean[ids]) ** 2)
    _all_reduce(ss, dist.ReduceOp.SUM, group)
    ext = torch.full((2, G), float("-inf"), device=dev)
    ext[0].scatter_reduce_(0, ids, x, "amax")
    ext[1].scatter_reduce_(0, ids, -x, "amax")
    _all_reduce(ext, dist.ReduceOp.MAX, group)
    std = torch.sqrt(ss / (n - 1).clamp_min(1))
    degenerate = (ext[0] == -ext[1]) | (n == 0)
    return GroupStats(n, mean, std, degenerate)


def group_advantages_dp(
    scores_R: torch.Tensor,
    group_ids_R: torch.Tensor,
    num_groups: int,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome advantages [R] fp32 of this rank's responses from group statistics over all DP
    ranks, and degenerate [G] bool; the semantics of nova_kernels.group_advantages (grpo:
    (s - mean) / (std + eps); dr_grpo: s - mean; rloo: n / (n - 1) (s - mean); a group of one
    keeps mean 0, std 1, scale 1)."""
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: expected one of {GROUP_ESTIMATORS}")
    st = group_stats_dp(scores_R, group_ids_R, num_groups, group)
    ids = group_ids_R.to(scores_R.device).long()
    x = scores_R.float()
    single = (st.count <= 1)[ids]
    shifted = x - torch.where(single, 0.0, st.mean[ids])
    if estimator == "grpo":
        adv = shifted / (torch.where(single, 1.0, st.std[ids]) + eps)
    elif estimator == "dr_grpo":
        adv = shifted
    else:
        n = st.count[ids]
        adv = shifted * torch.where(single, 1.0, n / (n - 1).clamp_min(1))
    return adv, st.degenerate


def whiten_dp(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    group=None,
) -> torch.Tensor:
    """Masked whitening with the mean and unbiased variance of the masked elements of every
    rank (nova_kernels.whiten's semantics, verl's masked_whiten); fp32 of values' shape."""
    if mask.shape != values.shape:
        raise ValueError(f"whiten_dp: mask {tuple(mask.shape)} != values {tuple(values.shape)}")
    x, m = values.float(), (mask != 0).float()
    sums = torch.stack([m.sum(), (x * m).sum()])
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    n = sums[0]
    mean = sums[1] / (n + 1e-8)
    ss = (((x - mean) ** 2) * m).sum().reshape(1)
    _all_reduce(ss, dist.ReduceOp.SUM, group)
    bessel = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
    var = ss[0] / (n + 1e-8) * bessel
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean
