"""Outcome advantages over groups of samples of one prompt: GRPO, Dr. GRPO, RLOO.

Layout: scores [S] (one scalar reward per sample) and group_ids [S] int in [0, G), in any
order and with any group sizes; or `group_size=n` for the contiguous [G, n] layout
(scores.view(-1), sample i in group i // n). Per sample, with the group's n, mean and
unbiased std (torch.std, as verl and TRL use):

    grpo     (s - mean) / (std + eps)          n = 1: mean = 0, std = 1 (verl)
    dr_grpo  s - mean                          n = 1: mean = 0 (Dr. GRPO: no std division)
    rloo     n / (n - 1) * (s - mean)          leave-one-out baseline; n = 1: s unchanged

`dr_grpo` is also the group baseline of REINFORCE++-baseline (whitened afterwards over
tokens, see nova_engine.rl.advantages). Also returned: `degenerate` [G] bool, True where every
score of the group is equal (one-sample and empty groups included): such groups carry no
learning signal and the trainer may drop them (DAPO dynamic sampling).

Triton: samples are ordered by group once (torch.argsort, stable; skipped for group_size),
then one program per group makes two passes over its members (sum/min/max, then the
centered sum of squares) and writes their advantages: deterministic, no atomics.

`broadcast_advantages(adv_B, mask_BT)` spreads per-sample advantages over the response tokens,
out[b, t] = adv[b] * mask[b, t] (fp32; masks are 0/1, any dtype), in one pass over [B, T]:
a Triton kernel reading the mask in its own dtype, or on the torch path one promoting
multiply (verl's `scores.unsqueeze(-1) * response_mask`; a bool/int mask is not first
compared with 0 into a temporary, which cost a second and third pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting, resolve_backend

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
_MODE = {name: i for i, name in enumerate(ESTIMATORS)}

_empty = torch.empty  # tests swap in a NaN-filling allocator
# elements per program on GPU (nova_kernels._aot compiles these configs) / interpreter
_GPU_BLOCK_GROUP, _INTERP_BLOCK_GROUP = 256, 32
_GPU_BLOCK_BROADCAST, _INTERP_BLOCK_BROADCAST = 1024, 64


@triton.jit
def _group_chunk(x_ptr, perm_ptr, off, i, lane, n, CONTIGUOUS: tl.constexpr):
    """Scores i .. i+BLOCK of the group starting at `off`: (x fp32, sample indices, valid)."""
    ok = i + lane < n
    if CONTIGUOUS:
        idx = off + i + lane
    else:
        idx = tl.load(perm_ptr + off + i + lane, mask=ok, other=0)
    x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    return x, idx, ok


@triton.jit
def _group_adv_kernel(
    x_ptr,  # [S] scores
    perm_ptr,  # [S] int64 sample indices ordered by group (unused when CONTIGUOUS)
    off_ptr,  # [G] int64 first position of each group in perm
    cnt_ptr,  # [G] int64 group sizes (also for CONTIGUOUS: a 1 would be specialized)
    adv_ptr,  # [S] fp32 out: advantages
    deg_ptr,  # [G] int8 out: 1 where all scores of the group are equal
    group_size,
    eps,
    MODE: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    n = tl.load(cnt_ptr + g)
    if CONTIGUOUS:
        off = g.to(tl.int64) * group_size
    else:
        off = tl.load(off_ptr + g)
    lane = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    for i in range(0, n, BLOCK):
        x, idx, ok = _group_chunk(x_ptr, perm_ptr, off, i, lane, n, CONTIGUOUS)
        acc += x
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
    nf = n.to(tl.float32)
    mean = tl.sum(acc, 0) / tl.maximum(nf, 1.0)
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n, BLOCK):
        x, idx, ok = _group_chunk(x_ptr, perm_ptr, off, i, lane, n, CONTIGUOUS)
        d = tl.where(ok, x - mean, 0.0)
        ss += d * d
    std = tl.sqrt(tl.sum(ss, 0) / tl.maximum(nf - 1.0, 1.0))
    single = n <= 1
    if MODE == 0:  # grpo
        shift = tl.where(single, 0.0, mean)
        scale = 1.0 / (tl.where(single, 1.0, std) + eps)
    elif MODE == 1:  # dr_grpo
        shift = tl.where(single, 0.0, mean)
        scale = 1.0
    else:  # rloo
        shift = tl.where(single, 0.0, mean)
        scale = tl.where(single, 1.0, nf / tl.maximum(nf - 1.0, 1.0))
    for i in range(0, n, BLOCK):
        x, idx, ok = _group_chunk(x_ptr, perm_ptr, off, i, lane, n, CONTIGUOUS)
        tl.store(adv_ptr + idx, (x - shift) * scale, mask=ok)
    all_equal = tl.max(hi, 0) == tl.min(lo, 0)
    tl.store(deg_ptr + g, (all_equal | (n == 0)).to(tl.int8))


@triton.jit
def _broadcast_kernel(
    adv_ptr,  # [B] fp32 per-sample advantages
    mask_ptr,  # [B, T] mask (any dtype), row stride stride_m, unit column stride
    out_ptr,  # [B, T] fp32 out, contiguous
    T,
    stride_m,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < T
    a = tl.load(adv_ptr + b)
    m = tl.load(mask_ptr + b * stride_m + cols, mask=ok, other=0).to(tl.float32)
    tl.store(out_ptr + b * T + cols, a * m, mask=ok)


def broadcast_advantages(
    adv: torch.Tensor, mask: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """out [B, T] fp32 = adv[b] * mask[b, t] for adv [B] and a 0/1 mask [B, T] (bool, int or
    float), in one pass over [B, T] (see the module docstring). No gradient."""
    if adv.dim() != 1 or mask.dim() != 2 or mask.shape[0] != adv.shape[0]:
        raise ValueError(
            f"broadcast_advantages: expected adv [B] and mask [B, T]; got {tuple(adv.shape)} "
            f"and {tuple(mask.shape)}"
        )
    with torch.no_grad():
        adv = adv.float()
        if resolve_backend(backend) == "torch":
            out = adv[:, None] * mask
            return out if out.dtype == torch.float32 else out.float()  # an fp64 mask
        B, T = mask.shape
        out = _empty((B, T), dtype=torch.float32, device=mask.device)
        if B == 0 or T == 0:
            return out
        m = mask if mask.stride(-1) == 1 else mask.contiguous()
        block = _INTERP_BLOCK_BROADCAST if interpreting() else _GPU_BLOCK_BROADCAST
        _broadcast_kernel[(B, triton.cdiv(T, block))](
            adv.contiguous(), m, out, T, m.stride(0), BLOCK=block
        )
        return out


def _layout(scores, group_ids, num_groups, group_size):
    """-> (G, perm or None, offsets or None, counts)."""
    S = scores.numel()
    if group_size is not None:
        if group_ids is not None:
            raise ValueError("group_advantages: pass group_ids or group_size, not both")
        if group_size < 1 or S % group_size:
            raise ValueError(
                f"group_advantages: {S} scores do not split into groups of {group_size}"
            )
        G = S // group_size
        counts = torch.full((G,), group_size, dtype=torch.int64, device=scores.device)
        return G, None, None, counts
    if group_ids is None or group_ids.shape != scores.shape:
        raise ValueError("group_advantages: group_ids must be an int tensor shaped like scores")
    if group_ids.is_floating_point():
        raise ValueError("group_advantages: group_ids must be integers")
    ids = group_ids.long()
    G = int(ids.max()) + 1 if num_groups is None and S else (num_groups or 0)
    counts = torch.bincount(ids, minlength=G)
    if counts.numel() != G:
        raise ValueError(f"group_advantages: group id {int(ids.max())} >= num_groups={G}")
    perm = torch.argsort(ids, stable=True)
    offsets = torch.cumsum(counts, 0) - counts
    return G, perm, offsets, counts


def _group_adv_torch(x, ids, G, estimator, eps):
    x = x.float()
    counts = torch.bincount(ids, minlength=G)
    n = counts.float()
    mean = torch.zeros(G, device=x.device).index_add_(0, ids, x) / n.clamp_min(1)
    ss = torch.zeros(G, device=x.device).index_add_(0, ids, (x - mean[ids]) ** 2)
    std = torch.sqrt(ss / (n - 1).clamp_min(1))
    single = (counts <= 1)[ids]
    shift = torch.where(single, 0.0, mean[ids])
    if estimator == "grpo":
        adv = (x - shift) / (torch.where(single, 1.0, std[ids]) + eps)
    elif estimator == "dr_grpo":
        adv = x - shift
    else:
        scale = torch.where(single, 1.0, n[ids] / (n[ids] - 1).clamp_min(1))
        adv = (x - shift) * scale
    lo = torch.full((G,), float("inf"), device=x.device).scatter_reduce(0, ids, x, "amin")
    hi = torch.full((G,), float("-inf"), device=x.device).scatter_reduce(0, ids, x, "amax")
    degenerate = (lo == hi) | (counts == 0)
    return adv, degenerate


def group_advantages_reference(scores, group_ids, estimator: str, eps: float = 1e-6):
    """verl's loop over a dict of groups (compute_{grpo,rloo}_outcome_advantage), float64.

    scores [S], group_ids [S] -> advantages [S] (promoted float dtype)."""
    dt = torch.promote_types(scores.dtype, torch.float32)
    x = scores.to(dt)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        members.setdefault(g, []).append(i)
    adv = torch.empty_like(x)
    for idx in members.values():
        s = x[idx]
        n = len(idx)
        mean = s.mean() if n > 1 else torch.zeros((), dtype=dt)
        std = s.std() if n > 1 else torch.ones((), dtype=dt)
        if estimator == "grpo":
            adv[idx] = (s - mean) / (std + eps)
        elif estimator == "dr_grpo":
            adv[idx] = s - mean
        elif n > 1:
            adv[idx] = (s - mean) * n / (n - 1)
        else:
            adv[idx] = s
    return adv


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    estimator: str = "grpo",
    num_groups: int | None = None,
    group_size: int | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample advantages from per-group statistics of the scores.

    scores: [S] float; group_ids: [S] int in [0, G) (G = num_groups, default max id + 1), or
    group_size=n for the contiguous layout. estimator: "grpo" | "dr_grpo" | "rloo".
    Returns (advantages [S] fp32, degenerate [G] bool). No gradient.
    """
    if estimator not in _MODE:
        raise ValueError(f"group_advantages: estimator={estimator!r}, expected one of {ESTIMATORS}")
    if scores.dim() != 1:
        raise ValueError(f"group_advantages: scores must be [S], got {tuple(scores.shape)}")
    with torch.no_grad():
        G, perm, offsets, counts = _layout(scores, group_ids, num_groups, group_size)
        if resolve_backend(backend) == "torch":
            if group_size is not None:
                ids = torch.arange(G, device=scores.device).repeat_interleave(group_size)
            else:
                assert group_ids is not None  # _layout requires one of the two
                ids = group_ids.long()
            return _group_adv_torch(scores, ids, G, estimator, eps)
        adv = _empty(scores.shape, dtype=torch.float32, device=scores.device)
        deg = _empty((G,), dtype=torch.int8, device=scores.device)
        if G == 0:
            return adv, deg.bool()
        contiguous = group_size is not None
        block = _INTERP_BLOCK_GROUP if interpreting() else _GPU_BLOCK_GROUP
        dummy = counts
        _group_adv_kernel[(G,)](
            scores.contiguous(),
            perm if perm is not None else dummy,
            offsets if offsets is not None else dummy,
            counts,
            adv,
            deg,
            group_size or 0,
            float(eps),
            MODE=_MODE[estimator],
            CONTIGUOUS=contiguous,
            BLOCK=block,
        )
        return adv, deg.bool()
