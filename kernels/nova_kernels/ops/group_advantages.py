"""Outcome advantages over groups of samples of one prompt: GRPO, Dr. GRPO, RLOO, with the
group statistics optionally reduced over data-parallel ranks.

Layout: scores [R] (one scalar reward per response of this rank) and group_ids [R] int64 in
[0, G), GLOBAL ids: a rank may hold only some groups, or only part of a group; ids in any
order (usually contiguous runs, not relied on). Per response, with its group's count n, mean
and unbiased std over ALL ranks (torch.std, as verl and TRL use):

    grpo     (s - mean) / (std + eps)          n = 1: mean = 0, std = 1 (verl)
    dr_grpo  s - mean                          n = 1: mean = 0 (Dr. GRPO: no std division)
    rloo     n / (n - 1) * (s - mean)          leave-one-out baseline; n = 1: s unchanged

`dr_grpo` is also the group baseline of REINFORCE++-baseline. Also returned: `degenerate`
[G] bool, True where every score of the group is equal (one-sample groups included) or the
group is empty on every rank: such groups carry no learning signal (DAPO dynamic sampling).

DP composition: `reduce(t, op)` (the caller's in-place all-reduce over its ranks, op "sum" or
"max"; None = this process alone) is called three times, in this order, on fp32 tensors:
    sums [2, G] (count, sum)      "sum"
    ss   [G]    centered sum of squares around the global mean (two passes: fp32 stays
                accurate for scores far from 0)      "sum"
    ext  [2, G] (max, -min), -inf for an empty group  "max"
so every rank gets the statistics of the concatenation of all ranks' responses; this is
`nova_engine.rl.rollouts.group_advantages_dp`'s semantics.

Deterministic (the same bits every run; exact resume relies on it) and without host sync:
no floating-point atomics, no .item() / nonzero / boolean indexing. (The torch path is the
CPU path: on CUDA its index_add_ would add with float atomics; NOVA_KERNELS=torch on a GPU
is for debugging, not for runs that must resume bit-exactly.) Ids are NOT validated
(that would cost a host sync): on the Triton path an id outside [0, G) belongs to no group
and gets a NaN advantage; on the torch path index_add_ raises (CPU) or asserts (CUDA).

Triton: responses are ordered by group once (torch.sort, stable) and group starts found by
searchsorted; one program per group sums its members in a fixed order (count, sum, max,
-min), after the reduce a second program per group sums the centered squares, after the
reduce one elementwise pass over the responses writes the advantages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .._backend import interpreting, resolve_backend
from .._common import empty

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
_MODE = {name: i for i, name in enumerate(ESTIMATORS)}
Reduce = Callable[[torch.Tensor, str], None]

# elements per program on GPU (nova_kernels._aot compiles these configs) / interpreter
_GPU_BLOCK_GROUP, _INTERP_BLOCK_GROUP = 128, 32
_GPU_BLOCK_APPLY, _INTERP_BLOCK_APPLY = 1024, 64


@triton.jit
def _group_partials_kernel(
    x_ptr,  # [R] scores
    perm_ptr,  # [R] int64 response indices ordered by group id
    off_ptr,  # [G + 1] int64 start of group g in perm (searchsorted); off[G] = its end
    sums_ptr,  # [2, G] fp32 out: (count, sum) of this rank's members
    ext_ptr,  # [2, G] fp32 out: (max, -min) of this rank's members, -inf when none
    G,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(off_ptr + g)
    n = tl.load(off_ptr + g + 1) - start
    lane = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    for i in range(0, n, BLOCK):
        ok = i + lane < n
        idx = tl.load(perm_ptr + start + i + lane, mask=ok, other=0)
        x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        acc += x
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
    tl.store(sums_ptr + g, n.to(tl.float32))
    tl.store(sums_ptr + G + g, tl.sum(acc, 0))
    tl.store(ext_ptr + g, tl.max(hi, 0))
    tl.store(ext_ptr + G + g, -tl.min(lo, 0))


@triton.jit
def _group_centered_kernel(
    x_ptr,  # [R] scores
    perm_ptr,  # [R] int64 response indices ordered by group id
    off_ptr,  # [G + 1] int64 group starts in perm
    sums_ptr,  # [2, G] fp32 (count, sum) over all ranks
    ss_ptr,  # [G] fp32 out: this rank's sum of (x - global mean)^2
    G,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(off_ptr + g)
    n = tl.load(off_ptr + g + 1) - start
    mean = tl.load(sums_ptr + G + g) / tl.maximum(tl.load(sums_ptr + g), 1.0)
    lane = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n, BLOCK):
        ok = i + lane < n
        idx = tl.load(perm_ptr + start + i + lane, mask=ok, other=0)
        x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - mean, 0.0)
        acc += d * d
    tl.store(ss_ptr + g, tl.sum(acc, 0))


@triton.jit
def _group_apply_kernel(
    x_ptr,  # [R] scores
    ids_ptr,  # [R] int64 group ids
    sums_ptr,  # [2, G] fp32 (count, sum) over all ranks
    ss_ptr,  # [G] fp32 centered sum of squares over all ranks
    adv_ptr,  # [R] fp32 out: advantages (NaN for an id outside [0, G))
    R,
    G,
    eps,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < R
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gid = tl.load(ids_ptr + offs, mask=ok, other=0)
    inside = ok & (gid >= 0) & (gid < G)
    nf = tl.load(sums_ptr + gid, mask=inside, other=0.0)
    total = tl.load(sums_ptr + G + gid, mask=inside, other=0.0)
    ss = tl.load(ss_ptr + gid, mask=inside, other=0.0)
    single = nf <= 1.0
    mean = total / tl.maximum(nf, 1.0)
    shifted = x - tl.where(single, 0.0, mean)
    if MODE == 0:  # grpo
        std = tl.sqrt(ss / tl.maximum(nf - 1.0, 1.0))
        adv = shifted / (tl.where(single, 1.0, std) + eps)
    elif MODE == 1:  # dr_grpo
        adv = shifted
    else:  # rloo
        adv = shifted * tl.where(single, 1.0, nf / tl.maximum(nf - 1.0, 1.0))
    tl.store(adv_ptr + offs, tl.where(inside, adv, float("nan")), mask=ok)


def _group_adv_triton(x, ids, G, mode, eps, reduce):
    R, dev = x.numel(), x.device
    sorted_ids, perm = torch.sort(ids, stable=True)
    off = torch.searchsorted(sorted_ids, torch.arange(G + 1, device=dev, dtype=torch.int64))
    sums = empty((2, G), dtype=torch.float32, device=dev)
    ext = empty((2, G), dtype=torch.float32, device=dev)
    ss = empty((G,), dtype=torch.float32, device=dev)
    adv = empty((R,), dtype=torch.float32, device=dev)
    interp = interpreting()
    bg = _INTERP_BLOCK_GROUP if interp else _GPU_BLOCK_GROUP
    ba = _INTERP_BLOCK_APPLY if interp else _GPU_BLOCK_APPLY
    if G:
        _group_partials_kernel[(G,)](x, perm, off, sums, ext, G, BLOCK=bg)
    if reduce is not None:
        reduce(sums, "sum")
    if G:
        _group_centered_kernel[(G,)](x, perm, off, sums, ss, G, BLOCK=bg)
    if reduce is not None:
        reduce(ss, "sum")
        reduce(ext, "max")
    if R:
        grid = (triton.cdiv(R, ba),)
        _group_apply_kernel[grid](x, ids, sums, ss, adv, R, G, eps, MODE=mode, BLOCK=ba)
    return adv, (ext[0] == -ext[1]) | (sums[0] == 0)


def _group_adv_torch(x, ids, G, mode, eps, reduce):
    x, dev = x.float(), x.device
    sums = torch.zeros(2, G, device=dev)
    sums[0].index_add_(0, ids, torch.ones_like(x))
    sums[1].index_add_(0, ids, x)
    if reduce is not None:
        reduce(sums, "sum")
    n = sums[0]
    mean = sums[1] / n.clamp_min(1)
    ss = torch.zeros(G, device=dev).index_add_(0, ids, (x - mean[ids]) ** 2)
    ext = torch.full((2, G), float("-inf"), device=dev)
    ext[0].scatter_reduce_(0, ids, x, "amax")
    ext[1].scatter_reduce_(0, ids, -x, "amax")
    if reduce is not None:
        reduce(ss, "sum")
        reduce(ext, "max")
    single = (n <= 1)[ids]
    shifted = x - torch.where(single, 0.0, mean[ids])
    if mode == 0:
        std = torch.sqrt(ss / (n - 1).clamp_min(1))
        adv = shifted / (torch.where(single, 1.0, std[ids]) + eps)
    elif mode == 1:
        adv = shifted
    else:
        scale = n / (n - 1).clamp_min(1)
        adv = shifted * torch.where(single, 1.0, scale[ids])
    return adv, (ext[0] == -ext[1]) | (n == 0)


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: int,
    estimator: str = "grpo",
    eps: float = 1e-6,
    backend: str | None = None,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response advantages from per-group statistics of the scores (module docstring).

    scores: [R] float; group_ids: [R] int64 in [0, num_groups) (global ids, not validated);
    estimator: "grpo" | "dr_grpo" | "rloo"; reduce: None or the caller's in-place all-reduce
    `reduce(t, op)` over its DP ranks, op "sum" | "max" (three calls, module docstring).
    Returns (advantages [R] fp32, degenerate [num_groups] bool). No gradient, no host sync.
    """
    if estimator not in _MODE:
        raise ValueError(f"group_advantages: estimator={estimator!r}, expected one of {ESTIMATORS}")
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            f"group_advantages: expected scores [R] and group_ids [R]; got "
            f"{tuple(scores.shape)} and {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_advantages: group_ids must be integers, got {group_ids.dtype}")
    G = int(num_groups)
    if G < 0:
        raise ValueError(f"group_advantages: num_groups={num_groups}, expected >= 0")
    with torch.no_grad():
        ids = group_ids.to(scores.device, torch.int64)
        if resolve_backend(backend) == "torch":
            return _group_adv_torch(scores, ids, G, _MODE[estimator], float(eps), reduce)
        x = scores.contiguous()
        return _group_adv_triton(x, ids.contiguous(), G, _MODE[estimator], float(eps), reduce)
