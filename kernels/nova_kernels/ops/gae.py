"""Reverse discounted scan for RL: GAE (advantages + returns) over packed sequences.

Shapes: N tokens in total with S sequences described by `cu_seqlens` [S+1] (the packed
layout the trainer uses). Outputs are float32.

GAE follows verl's `compute_gae_advantage_return` (current form): walking t from the end,

    delta_t   = r_t + gamma * nv - v_t
    gae_t     = delta_t + gamma * lam * A                     (A = running advantage)
    nv, A     = (v_t, gae_t)   if mask_t else   (nv, A)         (observation steps carry)
    adv_t     = A ;  returns_t = adv_t + v_t

with nv = A = 0 at the end of every row. Whitening is a separate op (`nova_kernels.whiten`).
The trainer's REINFORCE++ token returns are this scan with values 0 and lam = 1: on
masked-in steps R_t = r_t + gamma * R_t' with t' the next masked-in step (masked-out steps
carry R); verl's padded loop restarts the return after a masked-out step instead, which
differs only where a response's mask has holes.

How the Triton kernels scan. The per-step update of the state x = (nv, A) is an affine map
x' = M_t x + c_t with M_t = [[p, 0], [q, s]] lower triangular, c_t = (a, b):
    p = 1-m, q = m*gamma, s = 1-m+m*gamma*lam, a = m*v, b = m*(r-v)
Each program loads a chunk of BLOCK_T steps in *reversed* time order and runs a FORWARD
`tl.associative_scan` composing these maps (never `reverse=True`, which has been wrong on
GPU for non-commutative combines), then applies the prefix maps to the carry coming from
the later part of the row. A row is split over `n_splits` programs when there are too few
rows to fill the GPU: a first kernel writes each split's composed map, the second folds the
maps of the later splits into its carry before scanning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._backend import interpreting, resolve_backend
from .._common import _row_bounds, empty

# time steps per chunk: the launcher picks min(_GPU_BLOCK_T, next pow2 of the longest row, >= 16)
# on GPU, so any of _GPU_BLOCK_TS (nova_kernels._aot compiles each of them); the interpreter 64
_GPU_BLOCK_T, _INTERP_BLOCK_T = 1024, 64
_GPU_BLOCK_TS = (16, 32, 64, 128, 256, 512, 1024)


def _num_warps(block_t: int) -> int:
    return 4 if block_t <= 1024 else 8


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _compose(p1, q1, s1, a1, b1, p2, q2, s2, a2, b2):
    # map 1 applied first, then map 2:  M = M2 @ M1,  c = M2 @ c1 + c2
    return (
        p2 * p1,
        q2 * p1 + s2 * q1,
        s2 * s1,
        p2 * a1 + a2,
        q2 * a1 + s2 * b1 + b2,
    )


@triton.jit
def _step_maps(r_ptr, v_ptr, m_ptr, t, valid, gamma, gl):
    # t: [BLOCK_T] time indices (already reversed), valid: t inside the row
    r = tl.load(r_ptr + t, mask=valid, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t, mask=valid, other=0.0).to(tl.float32)
    m = (tl.load(m_ptr + t, mask=valid, other=0) != 0).to(tl.float32)
    p = 1.0 - m
    q = m * gamma
    s = 1.0 - m + m * gl
    a = m * v
    b = m * (r - v)
    return p, q, s, a, b, v


@triton.jit
def _scan_split_agg_kernel(
    r_ptr,  # [N] rewards
    v_ptr,  # [N] values
    m_ptr,  # [N] mask, nonzero = valid step
    cu_ptr,  # [S+1] row offsets
    agg_ptr,  # [S, n_splits, 5] fp32 out: composed map of each split
    n_splits,
    gamma,
    gl,
    CHUNKS_PER_SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rid = tl.program_id(0)
    k = tl.program_id(1)
    start, end = _row_bounds(cu_ptr, rid, 0, True)
    lane = tl.arange(0, BLOCK_T)
    last = lane == BLOCK_T - 1
    P = 1.0
    Q = 0.0
    S = 1.0
    A = 0.0
    Bv = 0.0
    for c in range(CHUNKS_PER_SPLIT):
        rev = (k * CHUNKS_PER_SPLIT + c) * BLOCK_T + lane
        t = end - 1 - rev
        valid = t >= start
        p, q, s, a, b, v = _step_maps(r_ptr, v_ptr, m_ptr, t, valid, gamma, gl)
        p, q, s, a, b = tl.associative_scan((p, q, s, a, b), 0, _compose)
        # the last lane holds the whole chunk's map (invalid lanes are identities)
        p = tl.sum(tl.where(last, p, 0.0), 0)
        q = tl.sum(tl.where(last, q, 0.0), 0)
        s = tl.sum(tl.where(last, s, 0.0), 0)
        a = tl.sum(tl.where(last, a, 0.0), 0)
        b = tl.sum(tl.where(last, b, 0.0), 0)
        P, Q, S, A, Bv = _compose(P, Q, S, A, Bv, p, q, s, a, b)
    base = agg_ptr + (rid * n_splits + k) * 5
    tl.store(base + 0, P)
    tl.store(base + 1, Q)
    tl.store(base + 2, S)
    tl.store(base + 3, A)
    tl.store(base + 4, Bv)


@triton.jit
def _scan_apply_kernel(
    r_ptr,  # [N] rewards
    v_ptr,  # [N] values
    m_ptr,  # [N] mask
    cu_ptr,  # [S+1] row offsets
    agg_ptr,  # [S, n_splits, 5] composed maps of the splits (read when n_splits > 1)
    adv_ptr,  # [N] fp32 out: advantages
    ret_ptr,  # [N] fp32 out: returns = advantages + values
    n_splits,
    gamma,
    gl,
    CHUNKS_PER_SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rid = tl.program_id(0)
    k = tl.program_id(1)
    start, end = _row_bounds(cu_ptr, rid, 0, True)
    lane = tl.arange(0, BLOCK_T)
    last = lane == BLOCK_T - 1
    # carry (nv, A) entering this split = later splits' maps applied to (0, 0)
    nv = 0.0
    acc = 0.0
    for j in range(k):
        base = agg_ptr + (rid * n_splits + j) * 5
        P = tl.load(base + 0)
        Q = tl.load(base + 1)
        S = tl.load(base + 2)
        A = tl.load(base + 3)
        Bv = tl.load(base + 4)
        nv, acc = P * nv + A, Q * nv + S * acc + Bv
    for c in range(CHUNKS_PER_SPLIT):
        rev = (k * CHUNKS_PER_SPLIT + c) * BLOCK_T + lane
        t = end - 1 - rev
        valid = t >= start
        p, q, s, a, b, v = _step_maps(r_ptr, v_ptr, m_ptr, t, valid, gamma, gl)
        p, q, s, a, b = tl.associative_scan((p, q, s, a, b), 0, _compose)
        nv_t = p * nv + a
        acc_t = q * nv + s * acc + b
        tl.store(adv_ptr + t, acc_t, mask=valid)
        tl.store(ret_ptr + t, acc_t + v, mask=valid)
        nv = tl.sum(tl.where(last, nv_t, 0.0), 0)
        acc = tl.sum(tl.where(last, acc_t, 0.0), 0)


def _pick_splits(rows: int, n_chunks: int, device: torch.device) -> int:
    """Programs per row: 1 when there are enough rows to fill the GPU."""
    if interpreting() or device.type != "cuda" or n_chunks <= 1:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if rows >= 2 * sms:  # enough rows: one pass over the inputs
        return 1
    want = -(-4 * sms // max(rows, 1))
    return max(1, min(n_chunks, want))


def _launch_scan(
    rewards: torch.Tensor,  # [N]
    values: torch.Tensor,  # [N]
    mask: torch.Tensor,  # [N]
    cu_seqlens: torch.Tensor,  # [S+1]
    max_len: int,
    gamma: float,
    gl: float,
    block_t: int | None = None,
    n_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = cu_seqlens.numel() - 1
    if block_t is None:
        block_t = _INTERP_BLOCK_T if interpreting() else _GPU_BLOCK_T
    block_t = min(block_t, max(16, triton.next_power_of_2(max(max_len, 1))))
    n_chunks = max(1, triton.cdiv(max_len, block_t))
    if n_splits is None:
        n_splits = _pick_splits(rows, n_chunks, rewards.device)
    n_splits = max(1, min(n_splits, n_chunks))
    cps = triton.cdiv(n_chunks, n_splits)
    n_splits = triton.cdiv(n_chunks, cps)
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    adv = empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    agg = empty((rows, n_splits, 5), dtype=torch.float32, device=rewards.device)
    if rows == 0 or max_len == 0:
        return adv, ret
    meta = dict(CHUNKS_PER_SPLIT=cps, BLOCK_T=block_t, num_warps=_num_warps(block_t))
    grid = (rows, n_splits)
    args = (rewards, values, m, cu_seqlens, agg)
    if n_splits > 1:
        _scan_split_agg_kernel[grid](*args, n_splits, gamma, gl, **meta)
    _scan_apply_kernel[grid](*args, adv, ret, n_splits, gamma, gl, **meta)
    return adv, ret


# ----------------------------------------------------------------------------- torch path


def _reverse_affine_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x_t = a_t * x_{t+1} + b_t along the last dim with x_T = 0, for [B, T] a, b.

    Log-step doubling (Hillis-Steele): after the step of span k, (a_t, b_t) is the map
    x_{t+2k} -> x_t, and b_t = x_t once t + 2k >= T (there is nothing past the end to add).
    O(B T log T), vectorized."""
    a, b = a.clone(), b.clone()
    T = a.shape[-1]
    k = 1
    while k < T:
        # compose with the map starting k steps later: x_t = a_t (a'_{t+k} x + b'_{t+k}) + b_t
        b[..., : T - k] += a[..., : T - k] * b[..., k:]
        a[..., : T - k] *= a[..., k:].clone()
        k *= 2
    return b


def _gae_torch(rewards, values, mask, gamma, lam):
    # [B, T] each -> (adv, ret) fp32
    r = rewards.float()
    v = values.float()
    m = mask != 0
    B, T = r.shape
    # next valid value strictly after t: index of the first valid step > t (T if none)
    idx = torch.where(m, torch.arange(T, device=r.device).expand(B, T), T)
    nxt = torch.flip(torch.cummin(torch.flip(idx, [1]), 1).values, [1])
    nxt = torch.cat([nxt[:, 1:], torch.full_like(nxt[:, :1], T)], 1)
    v_pad = torch.cat([v, v.new_zeros(B, 1)], 1)
    nv = v_pad.gather(1, nxt)
    mf = m.float()
    # A_t = (1 - m + m gamma lam) A_{t+1} + m delta_t
    adv = _reverse_affine_scan(1.0 - mf + mf * (gamma * lam), mf * (r + gamma * nv - v))
    return adv, adv + v


def _gae_packed_torch(rewards, values, mask, cu, max_len, gamma, lam):
    """[N] inputs -> padded [S, L] rows (L = max_len, from the host), the padded scan, and
    back to [N] by gathering (row, column) of every token: no value is read on the host."""
    N, S, dev = rewards.numel(), cu.numel() - 1, rewards.device
    cu = cu.long()
    lens = cu[1:] - cu[:-1]
    pos = torch.arange(max_len, device=dev)
    valid = pos[None, :] < lens[:, None]
    src = (cu[:-1, None] + pos[None, :]).clamp(0, max(N - 1, 0))
    if N == 0 or S == 0 or max_len == 0:
        zeros = torch.zeros(N, dtype=torch.float32, device=dev)
        return zeros, zeros.clone()
    rp, vp, mp = (torch.where(valid, x[src], 0) for x in (rewards, values, mask))
    a, r = _gae_torch(rp, vp, mp, gamma, lam)
    tok = torch.arange(N, device=dev)
    row = torch.searchsorted(cu[1:], tok, right=True)  # the sequence holding token i
    col = tok - cu[row]
    return a[row, col], r[row, col]


def _max_len(cu_seqlens, cu_seqlens_host):
    """The longest sequence, from the host boundaries when given (else one read-back)."""
    rows = cu_seqlens.numel() - 1
    if cu_seqlens_host is None:
        return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if rows > 0 else 0
    cu_h = [int(c) for c in cu_seqlens_host]
    if len(cu_h) != rows + 1:
        raise ValueError(
            f"gae_packed: cu_seqlens_host has {len(cu_h)} entries, cu_seqlens {rows + 1}"
        )
    return max((b - a for a, b in zip(cu_h[:-1], cu_h[1:])), default=0)


# ----------------------------------------------------------------------------- public


def gae_packed(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gamma: float,
    lam: float,
    *,
    backend: str | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
    block_t: int | None = None,
    n_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over packed sequences: rewards, values, mask [N]; cu_seqlens [S+1] (int, starts
    at 0, nondecreasing, ends at N). Each sequence is scanned on its own.
    Returns (advantages [N] fp32, returns [N] fp32). cu_seqlens_host: the same boundaries
    as host ints (`PackedBatch.cu_seqlens_host`): the longest sequence (the launch / the
    padded width) comes from it and nothing is read back to the host; without it
    cu_seqlens is read once per call. `block_t` / `n_splits` tune the Triton launch."""
    if rewards.dim() != 1 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError("gae_packed: rewards, values, mask must all be [N]")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("gae_packed: cu_seqlens must be [S+1]")
    gamma, lam = float(gamma), float(lam)
    with torch.no_grad():
        max_len = _max_len(cu_seqlens, cu_seqlens_host)
        if resolve_backend(backend) == "torch":
            return _gae_packed_torch(rewards, values, mask, cu_seqlens, max_len, gamma, lam)
        return _launch_scan(
            rewards.contiguous(),
            values.contiguous(),
            mask.contiguous(),
            cu_seqlens.contiguous(),
            max_len,
            gamma,
            gamma * lam,
            block_t,
            n_splits,
        )
