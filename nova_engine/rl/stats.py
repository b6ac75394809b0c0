"""Statistics of the step reduced over data-parallel ranks: group advantages and masked
whitening with the statistics of every rank's rows (`group` = the DP process group; None =
this process alone), so the per-rank results equal the single-process ones over the whole
step (to fp32 summation order). Group ids are GLOBAL (group_offset + prompt position): a
rank may hold only some groups, or part of one.

    adv_R, degenerate_G = group_advantages_dp(scores_R, gids_R, G, estimator="grpo", group=dp)
    white_T = whiten_dp(adv_T, mask_T, group=dp)

Both are the production calls of nova_kernels' ops (Triton on GPU, torch on CPU): the ops
compute partial sums, `dp_reduce(group)` all-reduces them in place (sum, or max for the
group extremes), and the ops finish from the reduced sums — the kernels compose with DP
without a second implementation here. No host sync (ids are not range-checked).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

import nova_kernels as nk
from nova_kernels.ops.group_advantages import ESTIMATORS as GROUP_ESTIMATORS

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def dp_reduce(group) -> Callable[[torch.Tensor, str], None] | None:
    """The in-place all-reduce over `group` that nova_kernels' `reduce=` hooks take; None for
    a group of one (or none)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None

    def reduce(t: torch.Tensor, op: str) -> None:
        dist.all_reduce(t, op=_OPS[op], group=group)

    return reduce


def group_advantages_dp(
    scores_R: torch.Tensor,
    group_ids_R: torch.Tensor,
    num_groups: int,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
    group=None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome advantages [R] fp32 of this rank's responses from group statistics over all DP
    ranks, and degenerate [G] bool (all scores of the group equal, or an empty group) —
    nova_kernels.group_advantages' semantics (grpo: (s - mean) / (std + eps); dr_grpo:
    s - mean; rloo: n / (n - 1) (s - mean); a group of one keeps mean 0, std 1, scale 1)."""
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: expected one of {GROUP_ESTIMATORS}")
    if scores_R.dim() != 1 or group_ids_R.shape != scores_R.shape:
        raise ValueError("group_advantages_dp: scores and group_ids must both be [R]")
    return nk.group_advantages(
        scores_R, group_ids_R.to(scores_R.device).long(), num_groups=int(num_groups),
        estimator=estimator, eps=eps, backend=backend, reduce=dp_reduce(group),
    )  # fmt: skip


def whiten_dp(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    group=None,
    backend: str | None = None,
) -> torch.Tensor:
    """Masked whitening with the mean and unbiased variance of the masked elements of every
    rank (nova_kernels.whiten's semantics, verl's masked_whiten); fp32 of values' shape."""
    if mask.shape != values.shape:
        raise ValueError(f"whiten_dp: mask {tuple(mask.shape)} != values {tuple(values.shape)}")
    return nk.whiten(values, mask, shift_mean=shift_mean, eps=eps, backend=backend,
                     reduce=dp_reduce(group))  # fmt: skip
