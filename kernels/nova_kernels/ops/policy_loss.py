"""PPO policy loss (clip, dual clip, truncated IS) + KL term, with its aggregation modes.

Shapes: logprobs, old_logprobs, advantages, mask (and rollout_logprobs, ref_logprobs when
given) are [B, T] (rows = sequences), or [N] packed tokens with cu_seqlens [S+1] (rows = the
S sequences). The loss is a 0-d fp32 tensor; the gradient flows to `logprobs` only.

Per token (verl's `compute_policy_loss_vanilla` and `kl_penalty`, NeMo-RL's `calculate_kl`):

    nk    = clamp(logprobs - old, -20, 20);  ratio = exp(nk)
    pg1   = -A * ratio;  pg2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg    = max(pg1, pg2);  and where A < 0 with dual clip c > 1:  pg = min(pg, -A * c)
    w     = min(exp(clamp(old - rollout, -20, 20)), tis_cap)     truncated IS (detached)
    kl    = k1 | k2 | k3 of logr = clamp(ref - logprobs, -20, 20), clamped to [-10, 10]
            k1 = -logr, k2 = logr^2 / 2, k3 = exp(logr) - 1 - logr
    loss_t = w * pg + kl_coef * kl

The clamps of the KL apply to all three estimators, as in NeMo-RL (verl clamps only k3);
pass None to drop either. Aggregation over the masked tokens (verl's `agg_loss`):

    token-mean               sum(loss_t) / num_tokens
    seq-mean-token-sum       mean over non-empty rows of sum_t loss_t
    seq-mean-token-mean      mean over non-empty rows of (sum_t loss_t / (len + 1e-8))
    seq-mean-token-sum-norm  sum(loss_t) / loss_scale_factor   (default: T, or the longest
                             packed sequence; pass a constant such as the max response length)

`num_tokens` / `num_seqs` replace the local counts (e.g. by data-parallel totals). All modes
are loss = sum_rows w_row * rowsum, so the Triton forward reduces each (row, chunk) to a few
partial sums (loss, kl, tokens, clipped, dual-clipped, -nk) and the backward is elementwise:
dlogprobs = grad * w_row * mask * dloss_t/dlogprobs, recomputed from the inputs.

Metrics (masked means over tokens): pg_clipfrac, pg_clipfrac_lower (dual clip), ppo_kl
(mean of old - logprobs, the approximate KL), and kl_loss / pg_loss (aggregated parts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import interpreting, resolve_backend
from .._common import _row_bounds, empty
from ..reference import kl_reference

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
_N_PARTS = 6  # loss, kl, tokens, clipped, dual-clipped, -nk


@dataclass(frozen=True)
class _LossConfig:
    """The settings of one `policy_loss` call (validated there), as both paths and the
    autograd.Function read them; infinities stand for "no clamp / no cap" in the kernels."""

    clip_low: float
    clip_high: float
    dual_clip: float | None  # None: no dual clip
    tis_cap: float  # inf: no truncation
    kl_coef: float
    kl_type: str
    kl_log_ratio_clamp: float | None  # as given (torch path); None: no clamp
    kl_value_clamp: float | None
    agg: str
    loss_scale_factor: float
    num_tokens: float | None  # replace the local counts (e.g. DP totals)
    num_seqs: float | None
    rows: int  # R: B rows, or S packed sequences
    T: int  # padded row length (0 when packed)
    max_len: int  # longest row
    total: int | None = None  # packed: cu_seqlens[-1] from the host (None: read it back)

    @property
    def lr_clamp(self) -> float:
        return math.inf if self.kl_log_ratio_clamp is None else float(self.kl_log_ratio_clamp)

    @property
    def val_clamp(self) -> float:
        return math.inf if self.kl_value_clamp is None else float(self.kl_value_clamp)


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _kl_value_grad(lp, ref, lr_clamp, val_clamp, KL_TYPE: tl.constexpr):
    """-> (kl, dkl/dlp) per token, fp32."""
    logr = ref - lp
    in_r = (logr >= -lr_clamp) & (logr <= lr_clamp)
    logr = tl.minimum(tl.maximum(logr, -lr_clamp), lr_clamp)
    if KL_TYPE == 0:
        kl = -logr
        dkl = logr * 0.0 - 1.0
    elif KL_TYPE == 1:
        kl = 0.5 * logr * logr
        dkl = logr
    else:
        e = tl.exp(logr)
        kl = e - 1.0 - logr
        dkl = e - 1.0
    in_v = (kl >= -val_clamp) & (kl <= val_clamp)
    kl = tl.minimum(tl.maximum(kl, -val_clamp), val_clamp)
    # d logr / d lp = -1
    return kl, tl.where(in_r & in_v, -dkl, 0.0)


@triton.jit
def _token_terms(
    lp_ptr,
    old_ptr,
    adv_ptr,
    m_ptr,
    rl_ptr,
    ref_ptr,
    offs,
    ok,
    clip_low,
    clip_high,
    dual_c,
    tis_cap,
    kl_coef,
    lr_clamp,
    val_clamp,
    HAS_DUAL: tl.constexpr,
    HAS_TIS: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_TYPE: tl.constexpr,
):
    """-> (loss, dloss/dlp, kl, mask, clipped, dual-clipped, -nk), each [BLOCK] fp32."""
    lp = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = (tl.load(m_ptr + offs, mask=ok, other=0) != 0).to(tl.float32)
    diff = lp - old
    in_nk = (diff >= -20.0) & (diff <= 20.0)
    nk = tl.minimum(tl.maximum(diff, -20.0), 20.0)
    ratio = tl.exp(nk)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = pg2 > pg1
    pg = tl.maximum(pg1, pg2)
    dpg_dratio = tl.where(clipped, 0.0, -adv)
    lower = pg * 0.0
    if HAS_DUAL:
        pg3 = -adv * dual_c
        is_lower = (pg > pg3) & (adv < 0.0)
        pg = tl.where(is_lower, pg3, pg)
        dpg_dratio = tl.where(is_lower, 0.0, dpg_dratio)
        lower = is_lower.to(tl.float32)
    dpg = tl.where(in_nk, dpg_dratio * ratio, 0.0)
    if HAS_TIS:
        rl = tl.load(rl_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        w = tl.exp(tl.minimum(tl.maximum(old - rl, -20.0), 20.0))
        w = tl.minimum(w, tis_cap)
        pg = pg * w
        dpg = dpg * w
    if HAS_KL:
        ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        kl, dkl = _kl_value_grad(lp, ref, lr_clamp, val_clamp, KL_TYPE)
        loss = pg + kl_coef * kl
        dloss = dpg + kl_coef * dkl
    else:
        kl = pg * 0.0
        loss = pg
        dloss = dpg
    return loss, dloss, kl, m, clipped.to(tl.float32), lower, -nk


@triton.jit
def _row_span(cu_ptr, rid, c, T, BLOCK_T: tl.constexpr, PACKED: tl.constexpr):
    """Offsets of chunk c of row rid (BLOCK_T tokens) and which of them lie in the row."""
    start, end = _row_bounds(cu_ptr, rid, T, PACKED)
    offs = start + c * BLOCK_T + tl.arange(0, BLOCK_T)
    return offs, offs < end


@triton.jit
def _policy_loss_fwd_kernel(
    lp_ptr,  # [N] current log-probs
    old_ptr,  # [N] old log-probs
    adv_ptr,  # [N] advantages
    m_ptr,  # [N] mask (uint8)
    rl_ptr,  # [N] rollout log-probs (read with HAS_TIS)
    ref_ptr,  # [N] reference log-probs (read with HAS_KL)
    cu_ptr,  # [S+1] row offsets (packed only)
    part_ptr,  # [6, R, NC] fp32 out: per (row, chunk) partial sums
    T,
    R,
    NC,
    clip_low,
    clip_high,
    dual_c,
    tis_cap,
    kl_coef,
    lr_clamp,
    val_clamp,
    HAS_DUAL: tl.constexpr,
    HAS_TIS: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_TYPE: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rid = tl.program_id(0)
    c = tl.program_id(1)
    offs, ok = _row_span(cu_ptr, rid, c, T, BLOCK_T, PACKED)
    loss, _, kl, m, clipped, lower, neg_nk = _token_terms(
        lp_ptr,
        old_ptr,
        adv_ptr,
        m_ptr,
        rl_ptr,
        ref_ptr,
        offs,
        ok,
        clip_low,
        clip_high,
        dual_c,
        tis_cap,
        kl_coef,
        lr_clamp,
        val_clamp,
        HAS_DUAL,
        HAS_TIS,
        HAS_KL,
        KL_TYPE,
    )
    stride = R * NC
    base = part_ptr + rid * NC + c
    tl.store(base, tl.sum(tl.where(m != 0, loss, 0.0), 0))
    tl.store(base + stride, tl.sum(tl.where(m != 0, kl, 0.0), 0))
    tl.store(base + 2 * stride, tl.sum(m, 0))
    tl.store(base + 3 * stride, tl.sum(m * clipped, 0))
    tl.store(base + 4 * stride, tl.sum(m * lower, 0))
    tl.store(base + 5 * stride, tl.sum(tl.where(m != 0, neg_nk, 0.0), 0))


@triton.jit
def _policy_loss_bwd_kernel(
    lp_ptr,  # [N] current log-probs
    old_ptr,  # [N] old log-probs
    adv_ptr,  # [N] advantages
    m_ptr,  # [N] mask (uint8)
    rl_ptr,  # [N] rollout log-probs (read with HAS_TIS)
    ref_ptr,  # [N] reference log-probs (read with HAS_KL)
    cu_ptr,  # [S+1] row offsets (packed only)
    go_ptr,  # [] grad of the loss
    roww_ptr,  # [R] fp32 aggregation weight of each row
    dlp_ptr,  # [N] out: grad of logprobs (logprobs' dtype)
    T,
    clip_low,
    clip_high,
    dual_c,
    tis_cap,
    kl_coef,
    lr_clamp,
    val_clamp,
    HAS_DUAL: tl.constexpr,
    HAS_TIS: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_TYPE: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rid = tl.program_id(0)
    c = tl.program_id(1)
    offs, ok = _row_span(cu_ptr, rid, c, T, BLOCK_T, PACKED)
    _, dloss, _, m, _, _, _ = _token_terms(
        lp_ptr,
        old_ptr,
        adv_ptr,
        m_ptr,
        rl_ptr,
        ref_ptr,
        offs,
        ok,
        clip_low,
        clip_high,
        dual_c,
        tis_cap,
        kl_coef,
        lr_clamp,
        val_clamp,
        HAS_DUAL,
        HAS_TIS,
        HAS_KL,
        KL_TYPE,
    )
    g = tl.load(go_ptr).to(tl.float32) * tl.load(roww_ptr + rid)
    d = tl.where(m != 0, dloss * g, 0.0)
    tl.store(dlp_ptr + offs, d.to(dlp_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launch


# tokens per program the launcher may pick on GPU (nova_kernels._aot compiles each of them)
_GPU_BLOCK_TS = (16, 32, 64, 128, 256, 512, 1024)


def _block_t(max_len: int, rows: int, device: torch.device) -> int:
    """Tokens per program: 1024 on GPU unless that leaves too few programs to fill it."""
    fit = max(16, triton.next_power_of_2(max(max_len, 1)))
    if interpreting() or device.type != "cuda":
        return min(64, fit)
    want = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    block = 1024
    while block > 128 and rows * triton.cdiv(max_len, block) < want:
        block //= 2
    return min(block, fit)


def _flat(x):
    x = x.contiguous().view(-1)
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def _launch_args(cfg: _LossConfig, tensors):
    lp, old, adv, m, rl, ref, cu = (_flat(t) if t is not None else None for t in tensors)
    rl = rl if rl is not None else lp
    ref = ref if ref is not None else lp
    cu = cu if cu is not None else lp
    scalars = (
        cfg.clip_low,
        cfg.clip_high,
        cfg.dual_clip or 0.0,
        cfg.tis_cap,
        cfg.kl_coef,
        cfg.lr_clamp,
        cfg.val_clamp,
    )
    meta = dict(
        HAS_DUAL=cfg.dual_clip is not None,
        HAS_TIS=tensors[4] is not None,
        HAS_KL=tensors[5] is not None,
        KL_TYPE=KL_TYPES.index(cfg.kl_type),
        PACKED=tensors[6] is not None,
    )
    return (lp, old, adv, m, rl, ref, cu), scalars, meta


class _PolicyLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, old, adv, mask, rollout, ref, cu, cfg: _LossConfig):
        rows, T, max_len = cfg.rows, cfg.T, cfg.max_len
        block = _block_t(max_len, rows, logprobs.device)
        nc = max(1, triton.cdiv(max_len, block))
        ptrs, scalars, meta = _launch_args(cfg, (logprobs, old, adv, mask, rollout, ref, cu))
        part = empty((_N_PARTS, rows, nc), dtype=torch.float32, device=logprobs.device)
        if rows > 0:
            _policy_loss_fwd_kernel[(rows, nc)](
                *ptrs, part, T, rows, nc, *scalars, **meta, BLOCK_T=block
            )
        per_row = part.sum(-1)  # [6, R]
        row_w = _row_weights(per_row[2], cfg)
        loss = (row_w * per_row[0]).sum()
        ctx.save_for_backward(logprobs, old, adv, mask, rollout, ref, cu, row_w)
        ctx.cfg, ctx.block, ctx.nc = cfg, block, nc
        stats = torch.stack([(row_w * per_row[1]).sum(), *per_row[2:].sum(-1)])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logprobs, old, adv, mask, rollout, ref, cu, row_w = ctx.saved_tensors
        cfg = ctx.cfg
        ptrs, scalars, meta = _launch_args(cfg, (logprobs, old, adv, mask, rollout, ref, cu))
        alloc = torch.zeros if cu is not None else empty  # packed: tokens past cu[-1]
        dlp = alloc(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
        go = grad_loss.contiguous().float()
        if cfg.rows > 0:
            _policy_loss_bwd_kernel[(cfg.rows, ctx.nc)](
                *ptrs, go, row_w, dlp.view(-1), cfg.T, *scalars, **meta, BLOCK_T=ctx.block
            )
        return dlp, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- torch path


def _row_weights(row_tokens: torch.Tensor, cfg: _LossConfig) -> torch.Tensor:
    """[R] token counts -> [R] weights w_row with loss = sum_rows w_row * rowsum."""
    agg = cfg.agg
    one = torch.ones_like(row_tokens)
    if agg == "token-mean":
        denom = cfg.num_tokens if cfg.num_tokens is not None else row_tokens.sum()
        return one / _nonzero(denom, row_tokens)
    if agg == "seq-mean-token-sum-norm":
        return one / cfg.loss_scale_factor
    nseq = cfg.num_seqs if cfg.num_seqs is not None else (row_tokens > 0).sum()
    w = one / _nonzero(nseq, row_tokens)
    if agg == "seq-mean-token-mean":
        w = w / (row_tokens + 1e-8)
    return w


def _nonzero(x, like):
    """x, or 1 where x is 0. A host number stays a host number: a tensor made from it on the
    device would be a synchronous host-to-device copy per call."""
    if not isinstance(x, torch.Tensor):
        return float(x) if x != 0 else 1.0
    x = x.to(dtype=like.dtype, device=like.device)
    return torch.where(x != 0, x, torch.ones_like(x))


def _per_token_torch(lp, old, adv, mask, rollout, ref, cfg: _LossConfig):
    dt = torch.promote_types(lp.dtype, torch.float32)
    lp, old, adv = lp.to(dt), old.to(dt), adv.to(dt)
    nk = torch.clamp(lp - old, -20.0, 20.0)
    ratio = torch.exp(nk)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    clipped = pg2 > pg1
    pg = torch.maximum(pg1, pg2)
    lower = torch.zeros_like(clipped)
    if cfg.dual_clip is not None:
        pg3 = -adv * cfg.dual_clip
        lower = (pg > pg3) & (adv < 0)
        pg = torch.where(adv < 0, torch.minimum(pg3, pg), pg)
    if rollout is not None:
        w = torch.exp(torch.clamp(old - rollout.to(dt), -20.0, 20.0))
        pg = pg * w.clamp(max=cfg.tis_cap).detach()
    kl = torch.zeros_like(pg)
    if ref is not None:
        kl = kl_reference(lp, ref, cfg.kl_type, cfg.kl_log_ratio_clamp, cfg.kl_value_clamp)
        pg = pg + cfg.kl_coef * kl
    m = (mask != 0).to(dt)
    return [pg * m, kl * m, m, clipped * m, lower * m, -nk.detach() * m]


def _policy_loss_torch(lp, old, adv, mask, rollout, ref, cu, cfg: _LossConfig):
    terms = _per_token_torch(lp, old, adv, mask, rollout, ref, cfg)
    if cu is None:
        per_row = [t.sum(-1) for t in terms]
    else:
        lens = (cu[1:] - cu[:-1]).long()
        n = cfg.total if cfg.total is not None else int(cu[-1])  # host fact, or one read
        seg = torch.repeat_interleave(
            torch.arange(lens.numel(), device=lp.device), lens, output_size=n
        )
        per_row = [t.new_zeros(lens.numel()).index_add(0, seg, t[:n]) for t in terms]
    row_w = _row_weights(per_row[2], cfg)
    loss = (row_w * per_row[0]).sum()
    stats = torch.stack([(row_w * per_row[1]).sum(), *(r.sum() for r in per_row[2:])])
    return loss, stats.detach()


# ----------------------------------------------------------------------------- public


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = 3.0,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = 2.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    kl_log_ratio_clamp: float | None = 20.0,
    kl_value_clamp: float | None = 10.0,
    agg: str = "token-mean",
    loss_scale_factor: float | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped policy loss with dual clip, truncated IS and a KL term (module docstring).

    logprobs [B, T] or [N] (+ cu_seqlens [S+1]): current log-probs, any float dtype (the
    gradient comes back in it). old_logprobs, advantages, mask, rollout_logprobs,
    ref_logprobs: same shape, treated as constants. clip_high defaults to clip_low;
    dual_clip=None turns the dual clip off (verl always uses 3.0); the TIS weight is used when
    rollout_logprobs is given (tis_cap=None: no truncation); the KL term when ref_logprobs is
    given. Returns (loss 0-d fp32, metrics dict of detached 0-d tensors).
    cu_seqlens_host: the same boundaries as host ints (`PackedBatch.cu_seqlens_host`): the
    longest row (the Triton grid, the default loss_scale_factor) and the token count come from
    it, so nothing is read back to the host; without it cu_seqlens is read once per call.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"policy_loss: agg={agg!r}, expected one of {AGG_MODES}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"policy_loss: kl_type={kl_type!r}, expected one of {KL_TYPES}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"policy_loss: dual_clip must be > 1, got {dual_clip}")
    for name, t in (
        ("old_logprobs", old_logprobs),
        ("advantages", advantages),
        ("mask", mask),
        ("rollout_logprobs", rollout_logprobs),
        ("ref_logprobs", ref_logprobs),
    ):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"policy_loss: {name} {tuple(t.shape)} != {tuple(logprobs.shape)}")
    if cu_seqlens is None:
        if logprobs.dim() != 2:
            raise ValueError("policy_loss: expected [B, T] inputs (or [N] with cu_seqlens)")
        rows, T = logprobs.shape
        max_len, total = T, None
    else:
        if logprobs.dim() != 1:
            raise ValueError("policy_loss: packed inputs must be [N]")
        rows, T = cu_seqlens.numel() - 1, 0
        if cu_seqlens_host is not None:
            cu_h = [int(c) for c in cu_seqlens_host]
            if len(cu_h) != rows + 1:
                raise ValueError(
                    f"policy_loss: cu_seqlens_host has {len(cu_h)} entries, cu_seqlens {rows + 1}"
                )
            max_len = max((b - a for a, b in zip(cu_h[:-1], cu_h[1:])), default=0)
            total = cu_h[-1]
        else:
            max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if rows > 0 else 0
            total = None
    cfg = _LossConfig(
        clip_low=float(clip_low),
        clip_high=float(clip_low if clip_high is None else clip_high),
        dual_clip=None if dual_clip is None else float(dual_clip),
        tis_cap=math.inf if tis_cap is None else float(tis_cap),
        kl_coef=float(kl_coef),
        kl_type=kl_type,
        kl_log_ratio_clamp=kl_log_ratio_clamp,
        kl_value_clamp=kl_value_clamp,
        agg=agg,
        loss_scale_factor=float(loss_scale_factor or max(max_len, 1)),
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        rows=rows,
        T=T,
        max_len=max_len,
        total=total,
    )
    args = (logprobs, old_logprobs, advantages, mask, rollout_logprobs, ref_logprobs, cu_seqlens)
    if resolve_backend(backend) == "torch":
        loss, stats = _policy_loss_torch(*args, cfg)
    else:
        detached = [t.detach() if t is not None else None for t in args[1:]]
        loss, stats = _PolicyLossFn.apply(logprobs, *detached, cfg)
    kl_loss, ntok, nclip, nlower, neg_nk = stats.unbind()
    denom = ntok + 1e-8
    metrics = {
        "pg_clipfrac": nclip / denom,
        "pg_clipfrac_lower": nlower / denom,
        "ppo_kl": neg_nk / denom,
        "pg_loss": loss.detach() - cfg.kl_coef * kl_loss,
    }
    if ref_logprobs is not None:
        metrics["kl_loss"] = kl_loss
    return loss, metrics
